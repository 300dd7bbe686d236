"""One tower's half of every layer of the paper's network (PAPER.md §Architecture, Figure 2).

A `HalfTower` holds any run of consecutive layers of one tower (all eight by default; a pipeline
stage holds fewer). It knows nothing of processes: the caller injects `exchange(x) -> x_both`,
which returns both towers' maps concatenated along dim 1 (tower 0's first), and the tower calls it
right before each layer whose input crosses towers — conv3, fc6, fc7 and fc8.
"""

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stages.config import TOWERS, ModelConfig
from stages.lrn import CrossMapLRN, SpatialLRN

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
CROSS_LAYERS = frozenset({"conv3", "fc6", "fc7", "fc8"})  # input: both towers' maps
BIAS_ONE_LAYERS = frozenset({"conv2", "conv4", "conv5", "fc6", "fc7"})  # §5: bias 1, else 0

Exchange = Callable[[Tensor], Tensor]

# Per-tower widths (PAPER.md table); fc8's width is cfg.fc8_split[tower].
WIDTH = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128, "fc6": 2048, "fc7": 2048}


def _lrn(cfg: ModelConfig) -> nn.Module:
    if cfg.lrn_impl == "torch":
        return nn.LocalResponseNorm(5, alpha=cfg.lrn_alpha, beta=0.75, k=2.0)
    return CrossMapLRN(5, alpha=cfg.lrn_alpha, beta=0.75, k=2.0)


def _pool() -> nn.Module:
    return nn.MaxPool2d(kernel_size=3, stride=2)  # overlapping pooling, §3.4


def build_layer(name: str, cfg: ModelConfig, tower: int) -> nn.Sequential:
    """The block for one layer of one tower: the learned layer and what follows it up to the next."""
    both = TOWERS  # a crossing layer reads both towers' maps
    code_2012 = cfg.variant == "cuda-convnet-2012"
    if name == "conv1":  # (b, 3, 224, 224) -> (b, 48, 27, 27)
        conv = nn.Conv2d(3, 48, 11, stride=4, padding=2)  # (b, 48, 55, 55)
        if code_2012:  # the 2012 code: LRN on the pre-ReLU maps, pool, then ReLU
            parts = [("conv", conv), ("lrn", _lrn(cfg)), ("pool", _pool()), ("relu", nn.ReLU(inplace=True))]
        else:
            parts = [("conv", conv), ("relu", nn.ReLU(inplace=True)), ("lrn", _lrn(cfg)), ("pool", _pool())]
    elif name == "conv2":  # (b, 48, 27, 27) -> (b, 128, 13, 13)
        parts = [("conv", nn.Conv2d(48, 128, 5, padding=2)), ("relu", nn.ReLU(inplace=True)),
                 ("lrn", _lrn(cfg))]
        if code_2012:
            parts.append(("rnorm", SpatialLRN(5, scale=0.001, power=0.75)))
        parts.append(("pool", _pool()))
    elif name == "conv3":  # (b, 256, 13, 13) both towers -> (b, 192, 13, 13)
        parts = [("conv", nn.Conv2d(128 * both, 192, 3, padding=1)), ("relu", nn.ReLU(inplace=True))]
    elif name == "conv4":  # (b, 192, 13, 13) -> (b, 192, 13, 13)
        parts = [("conv", nn.Conv2d(192, 192, 3, padding=1)), ("relu", nn.ReLU(inplace=True))]
    elif name == "conv5":  # (b, 192, 13, 13) -> (b, 128, 6, 6)
        parts = [("conv", nn.Conv2d(192, 128, 3, padding=1)), ("relu", nn.ReLU(inplace=True)),
                 ("pool", _pool())]
    elif name == "fc6":  # (b, 256, 6, 6) both towers -> (b, 2048)
        fan_in = 128 * both * cfg.pool5_size ** 2  # 9216, (channel, row, column) order
        parts = [("flatten", nn.Flatten()), ("fc", nn.Linear(fan_in, 2048)),
                 ("relu", nn.ReLU(inplace=True)), ("dropout", nn.Dropout(cfg.dropout))]
    elif name == "fc7":  # (b, 4096) both towers -> (b, 2048)
        parts = [("fc", nn.Linear(2048 * both, 2048)), ("relu", nn.ReLU(inplace=True)),
                 ("dropout", nn.Dropout(cfg.dropout))]
    elif name == "fc8":  # (b, 4096) both towers -> (b, 500): this tower's share of the logits
        parts = [("fc", nn.Linear(2048 * both, cfg.fc8_split[tower]))]
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
    with torch.no_grad():
        learned.weight.normal_(0.0, std, generator=generator)
        learned.bias.fill_(1.0 if name in BIAS_ONE_LAYERS else 0.0)


class HalfTower(nn.Module):
    """Layers `layers` (consecutive, in LAYERS order) of tower `tower`."""

    def __init__(self, cfg: ModelConfig, tower: int, layers: Sequence[str] = LAYERS, seed: int = 0):
        super().__init__()
        if tower not in range(TOWERS):
            raise ValueError(f"tower must be 0 or 1, got {tower}")
        first = LAYERS.index(layers[0])
        if tuple(layers) != LAYERS[first:first + len(layers)]:
            raise ValueError(f"layers must be consecutive in {LAYERS}, got {tuple(layers)}")
        self.cfg, self.tower = cfg, tower
        self.layers = nn.ModuleDict({name: build_layer(name, cfg, tower) for name in layers})
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        for name, block in self.layers.items():
            init_layer(block, name, self.cfg, self.tower, seed)

    def forward(self, x: Tensor, exchange: Exchange) -> Tensor:
        for name, block in self.layers.items():
            if name in CROSS_LAYERS:
                x = exchange(x)  # both towers' maps, tower 0's channels first
            x = block(x)
        return x
