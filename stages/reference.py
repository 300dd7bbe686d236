"""The single-process reference network: both towers in one process, exchanging by concatenation.

It is the test oracle every parallel configuration must match, and the model for inference and
export on one device. Its towers are the same `HalfTower` modules the distributed workers run, so
parameter names are `towers.{tower}.layers.{layer}.{conv|fc}.{weight|bias}`. Given a run of
`layers`, it is one pipeline stage of both towers (what a towers = 1 actor holds). For the
one-tower comparison net (`net` = one-tower-half) it holds that one tower, named `towers.0...`.
"""

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stages.config import ModelConfig
from stages.tower import LAYERS, HalfTower, cross_layers


class TwoTowerAlexNet(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0, layers: Sequence[str] = LAYERS):
        super().__init__()
        self.cfg, self.layer_names = cfg, tuple(layers)
        self.towers = nn.ModuleList(HalfTower(cfg, tower, layers, seed=seed) for tower in range(cfg.towers))

    def forward(self, x: Tensor) -> Tensor:
        """(b, 3, 224, 224) images -> (b, 1000) logits, tower 0's classes first. A stage that
        starts later takes and a stage that ends earlier returns both towers' maps concatenated."""
        towers, crossing = self.cfg.towers, cross_layers(self.cfg)
        if self.layer_names[0] == LAYERS[0]:
            maps = [x] * towers  # both towers see the whole image
        else:
            maps = list(x.chunk(towers, dim=1))  # tower 0's maps, then tower 1's (equal widths)
        for name in self.layer_names:
            if name in crossing:  # the local exchange: concatenate both towers' maps
                maps = [torch.cat(maps, dim=1)] * towers
            maps = [tower.layers[name](x) for tower, x in zip(self.towers, maps)]
        return torch.cat(maps, dim=1)


def parameter_count(cfg: ModelConfig) -> int:
    """Learned parameters of `cfg`'s whole network, counted on the meta device (no memory):
    60,965,224 for the paper's; 59,798,312 for the one-tower comparison net at 1000 classes."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # 2012 variant: tower 1's fc8
        return sum(p.numel() for p in TwoTowerAlexNet(cfg).parameters())
