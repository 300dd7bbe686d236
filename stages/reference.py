"""The single-process reference network: both towers in one process, exchanging by concatenation.

It is the test oracle every parallel configuration must match, and the model for inference and
export on one device. Its towers are the same `HalfTower` modules the distributed workers run, so
parameter names are `towers.{tower}.layers.{layer}.{conv|fc}.{weight|bias}`.
"""

import torch
from torch import Tensor, nn

from stages.config import TOWERS, ModelConfig
from stages.tower import CROSS_LAYERS, LAYERS, HalfTower


class TwoTowerAlexNet(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleList(HalfTower(cfg, tower, seed=seed) for tower in range(TOWERS))

    def forward(self, images: Tensor) -> Tensor:
        """(b, 3, 224, 224) -> (b, 1000) logits, tower 0's classes first."""
        maps = [images] * TOWERS  # both towers see the whole image
        for name in LAYERS:
            if name in CROSS_LAYERS:  # the local exchange: concatenate both towers' maps
                maps = [torch.cat(maps, dim=1)] * TOWERS
            maps = [tower.layers[name](x) for tower, x in zip(self.towers, maps)]
        return torch.cat(maps, dim=1)
