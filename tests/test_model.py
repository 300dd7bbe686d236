"""The network exactly as PAPER.md's table: shapes, parameter count, LRN, init, loss and top-k."""

import pytest
import torch
import torch.nn.functional as F

from stages.config import ModelConfig
from stages.loss import sharded_cross_entropy, sharded_topk_correct, topk_correct
from stages.lrn import CrossMapLRN
from stages.reference import TwoTowerAlexNet
from stages.tower import CROSS_LAYERS, LAYERS, HalfTower

# (layer, weight shape per tower, output shape per tower for a 224×224 input); fc8 split 500/500.
PAPER_TABLE = [
    ("conv1", (48, 3, 11, 11), (48, 27, 27)),   # conv 55×55, then LRN and 3×3/2 pool -> 27
    ("conv2", (128, 48, 5, 5), (128, 13, 13)),  # conv 27×27, pool -> 13
    ("conv3", (192, 256, 3, 3), (192, 13, 13)),  # reads both towers' 2×128 maps
    ("conv4", (192, 192, 3, 3), (192, 13, 13)),
    ("conv5", (128, 192, 3, 3), (128, 6, 6)),   # conv 13×13, pool -> 6
    ("fc6", (2048, 9216), (2048,)),              # 9216 = 2 towers × 128 × 6 × 6
    ("fc7", (2048, 4096), (2048,)),
    ("fc8", (500, 4096), (500,)),
]


def test_parameter_count_is_the_papers():
    # 28,434,112 per tower without fc8, + 4,097,000 for fc8 (PAPER.md)
    net = TwoTowerAlexNet(ModelConfig())
    per_tower = sum(p.numel() for name, p in net.towers[0].named_parameters() if not name.startswith("layers.fc8"))
    assert per_tower == 28_434_112
    assert sum(p.numel() for p in net.parameters()) == 60_965_224


def test_every_layer_shape_and_output_size():
    cfg = ModelConfig(dropout=0.0)
    tower = HalfTower(cfg, tower=0)
    x = torch.randn(2, 3, 224, 224)
    for name, weight_shape, out_shape in PAPER_TABLE:
        block = tower.layers[name]
        learned = block.conv if hasattr(block, "conv") else block.fc
        assert tuple(learned.weight.shape) == weight_shape, name
        assert tuple(learned.bias.shape) == (weight_shape[0],), name
        if name in CROSS_LAYERS:
            x = torch.cat([x, x], dim=1)  # both towers' maps
        x = block(x)
        assert tuple(x.shape) == (2, *out_shape), name
    assert (55 - 3) // 2 + 1 == 27 and tower.layers["conv1"].conv(torch.zeros(1, 3, 224, 224)).shape[-1] == 55


def test_a_narrower_fc_width_changes_fc6_and_fc7_only():
    """--fc-width (the tests' small network): fc6 and fc7 hold fc_width units over the towers,
    fc7 and fc8 read them; every convolution keeps the paper's shape."""
    paper, narrow = (HalfTower(ModelConfig(fc_width=width), tower=1) for width in (4096, 256))
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        assert {k: tuple(p.shape) for k, p in narrow.layers[name].named_parameters()} == \
            {k: tuple(p.shape) for k, p in paper.layers[name].named_parameters()}, name
    assert [tuple(narrow.layers[n].fc.weight.shape) for n in ("fc6", "fc7", "fc8")] == [(128, 9216), (128, 256),
                                                                                        (500, 256)]
    one = TwoTowerAlexNet(ModelConfig(net="one-tower-half", fc_width=256, num_classes=10))
    assert [tuple(one.towers[0].layers[n].fc.weight.shape) for n in ("fc6", "fc7", "fc8")] == [(256, 9216),
                                                                                              (256, 256), (10, 256)]
    logits = TwoTowerAlexNet(ModelConfig(fc_width=256, num_classes=10)).eval()(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 10)
    for width in (0, 255, -2):
        with pytest.raises(ValueError, match=f"fc_width must be a positive multiple of 2 .*got {width}"):
            ModelConfig(fc_width=width)


def test_reference_logits_and_fc8_on_tower_zero():
    x = torch.randn(2, 3, 224, 224)
    assert TwoTowerAlexNet(ModelConfig()).eval()(x).shape == (2, 1000)
    code = ModelConfig(variant="cuda-convnet-2012")
    assert code.fc8_split == (1000, 0)
    net = TwoTowerAlexNet(code).eval()
    assert net(x).shape == (2, 1000)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224


def test_init_is_the_papers():
    net = TwoTowerAlexNet(ModelConfig(), seed=3)
    for tower in net.towers:
        for name in LAYERS:
            block = tower.layers[name]
            learned = block.conv if hasattr(block, "conv") else block.fc
            expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
            assert torch.all(learned.bias == expected_bias), name
            assert abs(learned.weight.std().item() - 0.01) < 0.001, name
            assert abs(learned.weight.mean().item()) < 0.001, name
    # the same (seed, tower, layer) gives the same weights in any process or stage
    alone = HalfTower(ModelConfig(), tower=1, layers=("conv3", "conv4"), seed=3)
    assert torch.equal(alone.layers["conv4"].conv.weight, net.towers[1].layers["conv4"].conv.weight)
    assert not torch.equal(net.towers[0].layers["conv4"].conv.weight, net.towers[1].layers["conv4"].conv.weight)


def test_code_variant_differences():
    code = TwoTowerAlexNet(ModelConfig(variant="cuda-convnet-2012"))
    conv1 = [name for name, _ in code.towers[0].layers["conv1"].named_children()]
    assert conv1 == ["conv", "lrn", "pool", "relu"]  # LRN before ReLU, then pool, then ReLU
    assert "rnorm" in dict(code.towers[0].layers["conv2"].named_children())
    assert abs(code.towers[0].layers["conv3"].conv.weight.std().item() - 0.03) < 0.002


@pytest.mark.parametrize("shape", [(4, 48, 13, 13), (3, 7, 5, 5), (2, 2, 3, 3)])
def test_fast_lrn_equals_torch(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 40).requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    ours, theirs = CrossMapLRN(5, 1e-4, 0.75, 2.0), torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    y1, y2 = ours(x), theirs(x)
    g1, = torch.autograd.grad(y1, x, grad)
    g2, = torch.autograd.grad(y2, x, grad)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: CrossMapLRN(5, 1e-2, 0.6, 1.5)(t), (x[:1, :, :2, :2].detach().requires_grad_(),))


def test_lrn_text_formula_option():
    x = torch.randn(2, 48, 5, 5) * 30
    literal = ModelConfig(lrn_text_alpha=True)
    torch.testing.assert_close(HalfTower(literal, 0).layers["conv1"].lrn(x),
                               torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(x))


def test_sharded_loss_with_local_exchange_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000, requires_grad=True)
    target = torch.randint(0, 1000, (6,))
    ours = sharded_cross_entropy(logits, target, 0, lambda x: x)
    ref = F.cross_entropy(logits, target)
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2)
    assert topk_correct(logits, target, (1, 5)) == [
        int((logits.argmax(1) == target).sum()),
        int((logits.topk(5, 1).indices == target[:, None]).any(1).sum())]


def test_sharded_topk_pads_a_narrow_shard():
    logits = torch.tensor([[0.1, 3.0, 2.0]])
    assert sharded_topk_correct(logits, torch.tensor([2]), 0, lambda x: x, (1, 5)) == [0, 1]
    assert sharded_topk_correct(logits[:, :0], torch.tensor([2]), 0, lambda x: x, (1, 5)) == [0, 0]


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "alexnet-v2"}, "variant must be one of paper, cuda-convnet-2012"),
    ({"image_size": 32}, "image_size must be at least 63"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
])
def test_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**kwargs)
