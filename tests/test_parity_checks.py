"""The parity checks can fail on a small error. A reference run whose bias gradient is wrong by a
few percent, in a layer whose bias starts at 1, ends with weights within 1e-5 · max|w| of the
right run's — the old check, comparing weights only, passed it — but its updates, its gradients
(and so every mesh that computed them wrong) fail `assert_trained_like` and `assert_gradients_like`."""

import pytest

from parity import (RTOL, assert_gradients_like, assert_rel_close, assert_trained_like, reference_run,
                    small_config)


@pytest.mark.parametrize("layer, factor", [("conv2", 1.35), ("conv4", 1.01)])
def test_a_wrong_bias_gradient_hides_in_the_weights_but_not_in_the_update(layer, factor):
    config = small_config()
    right = reference_run(config)
    name = f"towers.0.layers.{layer}.conv.bias"  # starts at 1 (§5)

    def wrong_gradient(net):
        net.towers[0].layers[layer].conv.bias.grad.mul_(factor)

    wrong = reference_run(config, after_backward=wrong_gradient)
    for key, w in wrong.final.items():  # the weights alone: every tensor within RTOL of the right ones
        assert_rel_close(w, right.final[key], f"{key} (weights only)")
    assert (wrong.final[name] - right.final[name]).abs().max() <= RTOL * right.final[name].abs().max()
    with pytest.raises(AssertionError, match=f"update of {name.replace('.', '[.]')}"):
        assert_trained_like(wrong.final, wrong.losses, right, f"{layer} bias gradient × {factor}")
    with pytest.raises(AssertionError, match=f"gradient of {name.replace('.', '[.]')}"):
        assert_gradients_like(wrong.grads, right, f"{layer} bias gradient × {factor}")


def test_the_right_run_passes_its_own_checks():
    config = small_config()
    first, second = reference_run(config), reference_run(config)
    assert_trained_like(second.final, second.losses, first, "the same run twice")
    assert_gradients_like(second.grads, first, "the same run twice")
