"""Dropout as the paper (§4.2) and the authors' code (`HiddenSexLayer`) did it, the default of both
variants: a mask in training, the kept units unscaled; the outputs × 0.5 at test. Its test-time
function is inverted dropout's (nn.Dropout) on the next layers' weights × 0.5; its masks drop
half the units, independently, and leave the others as they were."""

import math

import pytest
import torch
from torch import nn

from stages.config import VARIANTS, ModelConfig
from stages.dropout import PaperDropout
from stages.reference import TwoTowerAlexNet

N = 200_000  # units: the share dropped is 0.5 within 5 standard deviations, sqrt(0.25 / N) each


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_papers_dropout_is_the_default_of_both_variants(variant):
    net = TwoTowerAlexNet(ModelConfig(variant=variant, num_classes=10, image_size=63))
    for tower in net.towers:
        for layer in ("fc6", "fc7"):
            assert type(tower.layers[layer].dropout) is PaperDropout and tower.layers[layer].dropout.p == 0.5
    inverted = TwoTowerAlexNet(ModelConfig(variant=variant, num_classes=10, image_size=63, dropout_style="inverted"))
    assert type(inverted.towers[0].layers["fc6"].dropout) is nn.Dropout


@pytest.mark.parametrize("variant", VARIANTS)
def test_at_test_time_it_is_inverted_dropout_on_halved_weights(variant):
    """fc7 and fc8 read the dropped-out fc6 and fc7: paper(W)(x) = inverted(W with fc7, fc8
    weights × 0.5)(x), since fc(0.5 · h) = (0.5 · W) h + b."""
    common = dict(variant=variant, num_classes=10, image_size=63, dropout=0.5)
    paper = TwoTowerAlexNet(ModelConfig(**common), seed=4).eval()
    inverted = TwoTowerAlexNet(ModelConfig(**common, dropout_style="inverted"), seed=4).eval()
    x = torch.randn(6, 3, 63, 63) * 60
    with torch.no_grad():
        unchanged = inverted(x)
        for tower in inverted.towers:
            for layer in ("fc7", "fc8"):
                tower.layers[layer].fc.weight.mul_(0.5)
        ours, halved = paper(x), inverted(x)
    torch.testing.assert_close(ours, halved, rtol=1e-5, atol=1e-6)
    assert (ours - unchanged).abs().max() > 1e-3  # without the halving they differ: the check can fail


def test_the_mask_drops_half_the_units_and_leaves_the_rest_unscaled():
    torch.manual_seed(0)
    dropout = PaperDropout(0.5).train()
    x = torch.rand(N) + 1.0  # no unit is 0 before dropout
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / N)
    assert torch.equal(y[kept], x[kept])  # unscaled: nn.Dropout would have doubled them
    assert nn.Dropout(0.5).train()(x).max() >= 2.0 > x.max()  # nn.Dropout doubles the kept units
    # E[y] = 0.5 · x, the test-time output
    assert abs(y.sum().item() / x.sum().item() - 0.5) < 5 * math.sqrt(0.25 / N)
    torch.testing.assert_close(dropout.eval()(x), 0.5 * x)


def test_masks_are_independent_draws_of_the_generator_and_the_backward_uses_them():
    dropout = PaperDropout(0.5).train()
    torch.manual_seed(3)
    first, second = dropout(torch.ones(N)), dropout(torch.ones(N))
    both = ((first != 0) & (second != 0)).float().mean().item()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)  # two fresh masks: independent
    torch.manual_seed(3)
    assert torch.equal(dropout(torch.ones(N)), first)  # the seed fixes the mask (a rank's RNG state)
    x = torch.ones(1000, requires_grad=True)
    y = dropout(x)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(x.grad, 3.0 * (y != 0).float())  # ∂L/∂a = ∂L/∂y · m


def test_no_dropout_is_the_identity_and_bad_probabilities_are_refused():
    x = torch.randn(10)
    assert torch.equal(PaperDropout(0.0).train()(x), x) and torch.equal(PaperDropout(0.0).eval()(x), x)
    with pytest.raises(ValueError, match=r"dropout_style must be one of paper, inverted, got 'gaussian'"):
        ModelConfig(dropout_style="gaussian")
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        PaperDropout(1.0)
