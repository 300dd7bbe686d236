"""The paper's network as one network with grouped convolutions, and conversion to and from it.

The two towers of Figure 2 are one network whose own-tower layers are grouped convolutions:

| layer | weight                        | reads                                     |
|-------|-------------------------------|-------------------------------------------|
| conv1 | (96, 3, 11, 11)               | the image (both towers see all of it)     |
| conv2 | (256, 48, 5, 5), groups = 2   | each tower its own 48 maps                |
| conv3 | (384, 256, 3, 3)              | both towers' 256 maps                     |
| conv4 | (384, 192, 3, 3), groups = 2  | each tower its own 192 maps               |
| conv5 | (256, 192, 3, 3), groups = 2  | each tower its own 192 maps               |
| fc6   | (4096, 9216)                  | both towers' pool5, (channel, row, col)   |
| fc7   | (4096, 4096)                  | both towers' fc6                          |
| fc8   | (1000, 4096)                  | both towers' fc7                          |

Output channels and units are tower 0's first, then tower 1's, so every layer's output is exactly
the reference's concatenation of the towers' outputs, and the layers that read both towers read
the same input. Channel-wise pieces (ReLU, pooling, dropout, cuda-convnet's spatial `rnorm`) act
on each map alone; LRN normalises across neighbouring maps *of one tower*, so here it runs on
each group of channels separately (`PerGroup`). Each layer's pieces and their order come from
`stages.tower.build_layer`, so both variants have the reference's layer order by construction.

`to_grouped` / `from_grouped` convert between this network's parameter names (`conv1.weight`,
..., `fc8.bias`) and the reference's (`towers.{t}.layers.{layer}.{conv|fc}.{weight|bias}`):
each grouped tensor is the towers' tensors stacked along dim 0 (output channels or units).

The one-tower comparison net (`net` = one-tower-half) is its own one-group network: conv2
(128, 48, 5, 5), conv3 (192, 128, 3, 3), conv4 (192, 192, 3, 3), conv5 (256, 192, 3, 3), fc6
(4096, 9216), fc7 (4096, 4096), fc8 (1000, 4096).
"""

from collections import OrderedDict

import torch
from torch import Tensor, nn

from stages.config import TOWERS, ModelConfig
from stages.lrn import CrossMapLRN
from stages.reference import TwoTowerAlexNet
from stages.tower import CROSS_LAYERS, LAYERS, build_layer, widths

# Layers whose input is the tower's own maps: one grouped convolution, a group per tower.
GROUPED_LAYERS = tuple(name for name in LAYERS[1:] if name not in CROSS_LAYERS)  # conv2, conv4, conv5
PARAMS = ("weight", "bias")
_CROSS_MAP = (CrossMapLRN, nn.LocalResponseNorm)  # the pieces that mix neighbouring maps


class PerGroup(nn.Module):
    """Apply `module` to each of `groups` equal runs of channels (dim 1) separately: the
    tower-local LRN on both towers' maps at once."""

    def __init__(self, module: nn.Module, groups: int = TOWERS):
        super().__init__()
        self.module, self.groups = module, groups

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.module(part) for part in x.chunk(self.groups, dim=1)], dim=1)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def _learned_name(layer: str) -> str:
    return "conv" if layer.startswith("conv") else "fc"


def tower_widths(layer: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Output channels or units of each tower's `layer`: its rows of the grouped weight, in order."""
    return cfg.fc8_split if layer == "fc8" else (widths(cfg)[layer],) * cfg.towers


def _grouped_learned(layer: str, tower_learned: nn.Module, cfg: ModelConfig) -> nn.Module:
    """One tower's conv or fc widened to both towers' outputs (grouped where the tower reads only
    its own maps)."""
    out = sum(tower_widths(layer, cfg))
    if isinstance(tower_learned, nn.Linear):
        return nn.Linear(tower_learned.in_features, out)
    groups = cfg.towers if layer in GROUPED_LAYERS else 1
    return nn.Conv2d(tower_learned.in_channels * groups, out, tower_learned.kernel_size,
                     stride=tower_learned.stride, padding=tower_learned.padding, groups=groups)


class GroupedAlexNet(nn.Module):
    """The two-tower network as one network: `state_dict()` keys are `conv1.weight`, `conv1.bias`,
    ..., `fc8.bias`. With `to_grouped` of a `TwoTowerAlexNet`'s weights it computes the same
    logits (tower 0's classes first). Weights start at PyTorch's default init: load a trained
    state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        after = {}
        for layer in LAYERS:
            block = build_layer(layer, cfg, tower=0)  # the reference's pieces, in its order
            learned = _learned_name(layer)
            setattr(self, layer, _grouped_learned(layer, getattr(block, learned), cfg))
            names = [name for name, _ in block.named_children()]
            if names[:names.index(learned)] not in ([], ["flatten"]):
                raise AssertionError(f"{layer}: unexpected pieces before its {learned}: {names}")
            after[layer] = nn.Sequential(OrderedDict(
                (name, PerGroup(part, cfg.towers) if isinstance(part, _CROSS_MAP) else part)
                for name, part in block.named_children() if name not in ("flatten", learned)))
        self.after = nn.ModuleDict(after)  # everything after each learned layer; no parameters

    def forward(self, x: Tensor) -> Tensor:
        """(b, 3, 224, 224) images -> (b, num_classes) logits."""
        for layer in LAYERS:
            learned = getattr(self, layer)
            if isinstance(learned, nn.Linear):
                x = torch.flatten(x, 1)  # fc6: (b, 256, 6, 6) -> (b, 9216), (channel, row, column)
            x = self.after[layer](learned(x))
        return x


def grouped_keys(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every grouped parameter name and its shape, in layer order (no memory allocated)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in GroupedAlexNet(cfg).state_dict().items()}


def _reference_key(tower: int, layer: str, param: str) -> str:
    return f"towers.{tower}.layers.{layer}.{_learned_name(layer)}.{param}"


def _check_keys(state: dict, expected: list[str], what: str) -> None:
    missing = [key for key in expected if key not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{what} state: missing {missing or 'none'}, unexpected {unexpected or 'none'}")


def to_grouped(reference_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Reference names (`towers.{t}.layers.{layer}.{conv|fc}.{param}`) -> grouped names
    (`{layer}.{param}`): the towers' tensors stacked along dim 0, tower 0's first."""
    _check_keys(reference_state, [_reference_key(t, layer, p) for t in range(cfg.towers) for layer in LAYERS
                                  for p in PARAMS], "reference")
    return {f"{layer}.{param}": torch.cat([reference_state[_reference_key(t, layer, param)]
                                           for t in range(cfg.towers)], dim=0)
            for layer in LAYERS for param in PARAMS}


def from_grouped(grouped_state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Grouped names -> reference names: each tensor cut along dim 0 into the towers' rows
    (fc8: `cfg.fc8_split`). The pieces are copies, so saving one does not save the whole."""
    _check_keys(grouped_state, [f"{layer}.{param}" for layer in LAYERS for param in PARAMS], "grouped")
    state = {}
    for t in range(cfg.towers):
        for layer in LAYERS:
            for param in PARAMS:
                whole = grouped_state[f"{layer}.{param}"]
                widths = tower_widths(layer, cfg)
                if whole.shape[0] != sum(widths):
                    raise ValueError(f"{layer}.{param} has {whole.shape[0]} rows, the configuration gives "
                                     f"{' + '.join(map(str, widths))} (is num_classes or variant right?)")
                state[_reference_key(t, layer, param)] = whole.split(widths, dim=0)[t].clone()
    return state


def grouped_from_state(grouped_state: dict[str, Tensor], cfg: ModelConfig) -> GroupedAlexNet:
    """The grouped network holding a grouped state (e.g. an export), in eval mode."""
    with torch.device("meta"):  # no init: every parameter is assigned from the state
        net = GroupedAlexNet(cfg)
    net.load_state_dict(grouped_state, assign=True)
    return net.eval()


def reference_from_grouped(grouped_state: dict[str, Tensor], cfg: ModelConfig) -> TwoTowerAlexNet:
    """The single-process reference network holding a grouped state (e.g. an export), in eval mode."""
    with torch.device("meta"):
        net = TwoTowerAlexNet(cfg)
    net.load_state_dict(from_grouped(grouped_state, cfg), assign=True)
    return net.eval()
