"""One tower's half of every layer of the paper's network (PAPER.md §Architecture, Figure 2).

A `HalfTower` holds any run of consecutive layers of one tower (all eight by default; a pipeline
stage holds fewer). It knows nothing of processes: the caller injects `exchange(x) -> x_both`,
which returns both towers' maps concatenated along dim 1 (tower 0's first), and the tower calls it
right before each layer whose input crosses towers — conv3, fc6, fc7 and fc8.

The ablation switches of `ModelConfig` (activation, lrn, pooling, dropout_style) only change the
pieces `build_layer` puts after each learned layer. With `net` = one-tower-half the network has
one tower of `ONE_TOWER_HALF_CONV_WIDTH` convolutions, no layer crosses towers and the exchange
is never called. `fc_width` sets fc6's and fc7's units (the paper's 4096 over both towers).
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stages.config import ModelConfig
from stages.dropout import PaperDropout
from stages.lrn import CrossMapLRN, SpatialLRN

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
CROSS_LAYERS = frozenset({"conv3", "fc6", "fc7", "fc8"})  # input: both towers' maps
BIAS_ONE_LAYERS = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})  # §5: bias 1, else 0

Exchange = Callable[[Tensor], Tensor]

# Per-tower output channels of the convolutions (PAPER.md table); fc6's and fc7's units are
# cfg.fc_width shared by the towers (2048 each in the paper), fc8's cfg.fc8_split[tower].
CONV_WIDTH = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128}
# §3.2's comparison net, one tower (`net` = one-tower-half): half the kernels in conv1–conv4, but
# the full conv5 and fully-connected layers (its footnote; the authors' layers-145-half.cfg).
ONE_TOWER_HALF_CONV_WIDTH = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 256}


def widths(cfg: ModelConfig) -> dict[str, int]:
    """Each layer's output channels or units in one tower of `cfg`'s network (fc8: cfg.fc8_split)."""
    convs = ONE_TOWER_HALF_CONV_WIDTH if cfg.net == "one-tower-half" else CONV_WIDTH
    units = cfg.fc_width // cfg.towers
    return {**convs, "fc6": units, "fc7": units}


def cross_layers(cfg: ModelConfig) -> frozenset[str]:
    """The layers whose input is every tower's maps: CROSS_LAYERS, or none in a one-tower net."""
    return CROSS_LAYERS if cfg.towers > 1 else frozenset()


def _lrn(cfg: ModelConfig) -> list[tuple[str, nn.Module]]:
    """The LRN piece (§3.3), or none with `lrn` off."""
    if cfg.lrn == "off":
        return []
    if cfg.lrn_impl == "torch":
        return [("lrn", nn.LocalResponseNorm(5, alpha=cfg.lrn_alpha, beta=0.75, k=2.0))]
    return [("lrn", CrossMapLRN(5, alpha=cfg.lrn_alpha, beta=0.75, k=2.0))]


def _pool(cfg: ModelConfig) -> tuple[str, nn.Module]:
    return "pool", nn.MaxPool2d(kernel_size=cfg.pool_size, stride=2)  # 3×3: overlapping, §3.4


def _activation(cfg: ModelConfig) -> tuple[str, nn.Module]:
    return cfg.activation, nn.ReLU(inplace=True) if cfg.activation == "relu" else nn.Tanh()  # §3.1


def _dropout(cfg: ModelConfig) -> tuple[str, nn.Module]:
    return "dropout", PaperDropout(cfg.dropout) if cfg.dropout_style == "paper" else nn.Dropout(cfg.dropout)


def build_layer(name: str, cfg: ModelConfig, tower: int) -> nn.Sequential:
    """The block for one layer of one tower: the learned layer and what follows it up to the next.
    Shapes are the paper's two-tower net at 224 (the one-tower net: conv5 256, fc6 and fc7 4096)."""
    width = widths(cfg)

    def reads(before: str) -> int:  # a crossing layer reads every tower's maps
        return width[before] * (cfg.towers if name in CROSS_LAYERS else 1)

    code_2012 = cfg.variant == "cuda-convnet-2012"
    if name == "conv1":  # (b, 3, 224, 224) -> (b, 48, 27, 27)
        conv = nn.Conv2d(3, width["conv1"], 11, stride=4, padding=2)  # (b, 48, 55, 55)
        if code_2012:  # the 2012 code: LRN on the pre-ReLU maps, pool, then ReLU
            parts = [("conv", conv), *_lrn(cfg), _pool(cfg), _activation(cfg)]
        else:
            parts = [("conv", conv), _activation(cfg), *_lrn(cfg), _pool(cfg)]
    elif name == "conv2":  # (b, 48, 27, 27) -> (b, 128, 13, 13)
        parts = [("conv", nn.Conv2d(width["conv1"], width["conv2"], 5, padding=2)), _activation(cfg), *_lrn(cfg)]
        if code_2012 and cfg.lrn == "on":
            parts.append(("rnorm", SpatialLRN(5, scale=0.001, power=0.75)))
        parts.append(_pool(cfg))
    elif name == "conv3":  # (b, 256, 13, 13) both towers -> (b, 192, 13, 13)
        parts = [("conv", nn.Conv2d(reads("conv2"), width["conv3"], 3, padding=1)), _activation(cfg)]
    elif name == "conv4":  # (b, 192, 13, 13) -> (b, 192, 13, 13)
        parts = [("conv", nn.Conv2d(width["conv3"], width["conv4"], 3, padding=1)), _activation(cfg)]
    elif name == "conv5":  # (b, 192, 13, 13) -> (b, 128, 6, 6)
        parts = [("conv", nn.Conv2d(width["conv4"], width["conv5"], 3, padding=1)), _activation(cfg), _pool(cfg)]
    elif name == "fc6":  # (b, 256, 6, 6) both towers -> (b, 2048)
        fan_in = reads("conv5") * cfg.pool5_size ** 2  # 9216, (channel, row, column) order
        parts = [("flatten", nn.Flatten()), ("fc", nn.Linear(fan_in, width["fc6"])), _activation(cfg), _dropout(cfg)]
    elif name == "fc7":  # (b, 4096) both towers -> (b, 2048)
        parts = [("fc", nn.Linear(reads("fc6"), width["fc7"])), _activation(cfg), _dropout(cfg)]
    elif name == "fc8":  # (b, 4096) both towers -> (b, 500): this tower's share of the logits
        parts = [("fc", nn.Linear(reads("fc7"), cfg.fc8_split[tower]))]
    else:
        raise ValueError(f"layer must be one of {', '.join(LAYERS)}, got {name!r}")
    return nn.Sequential(OrderedDict(parts))


def init_layer(block: nn.Sequential, name: str, cfg: ModelConfig, tower: int, seed: int) -> None:
    """The paper's init (§5): weights N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.

    Each (seed, tower, layer) has its own generator, so a layer gets the same weights whichever
    process or pipeline stage builds it.
    """
    std = 0.03 if cfg.variant == "cuda-convnet-2012" and name in ("conv3", "conv4", "conv5") else 0.01
    generator = torch.Generator().manual_seed(seed * 1_000_003 + tower * 101 + LAYERS.index(name))
    learned = block.conv if hasattr(block, "conv") else block.fc
    if learned.weight.is_meta:  # shapes only (parameter counts, splits): no values to draw, and a
        return  # seeded normal_ on the meta device imports torch._dynamo (a second of CPU)
    with torch.no_grad():
        learned.weight.normal_(0.0, std, generator=generator)
        learned.bias.fill_(1.0 if name in BIAS_ONE_LAYERS else 0.0)


class HalfTower(nn.Module):
    """Layers `layers` (consecutive, in LAYERS order) of tower `tower`."""

    def __init__(self, cfg: ModelConfig, tower: int, layers: Sequence[str] = LAYERS, seed: int = 0):
        super().__init__()
        if tower not in range(cfg.towers):
            raise ValueError(f"tower must be in 0..{cfg.towers - 1} for the {cfg.net} net, got {tower}")
        first = LAYERS.index(layers[0])
        if tuple(layers) != LAYERS[first:first + len(layers)]:
            raise ValueError(f"layers must be consecutive in {LAYERS}, got {tuple(layers)}")
        self.cfg, self.tower, self.crossing = cfg, tower, cross_layers(cfg)
        self.layers = nn.ModuleDict({name: build_layer(name, cfg, tower) for name in layers})
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        for name, block in self.layers.items():
            init_layer(block, name, self.cfg, self.tower, seed)

    def forward(self, x: Tensor, exchange: Exchange) -> Tensor:
        for name, block in self.layers.items():
            if name in self.crossing:
                x = exchange(x)  # both towers' maps, tower 0's channels first
            x = block(x)
        return x
