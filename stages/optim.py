"""The paper's momentum SGD (§5) and its learning-rate schedules.

    v ← momentum·v − weight_decay·ε·w − ε·∂L/∂w
    w ← w + v

ε sits inside the velocity. `torch.optim.SGD` keeps ε outside (v ← m·v + g + wd·w; w ← w − ε·v):
the two agree while ε is constant and differ at every learning-rate drop, where the paper's rule
keeps the velocity built with the old ε and torch's rescales it at once.
"""

from dataclasses import dataclass

import torch
from torch.optim import Optimizer


class PaperSGD(Optimizer):
    def __init__(self, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0005):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(momentum).add_(p, alpha=-decay * lr).add_(p.grad, alpha=-lr)
                p.add_(v)
        return loss


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class PlateauSchedule:
    """ε ÷ `factor` when validation error has not improved for `patience` epochs (§5), at most
    `max_drops` times (the paper reduced it three times)."""

    base_lr: float
    patience: int = 2
    factor: float = 10.0
    max_drops: int = 3
    min_improvement: float = 1e-4
    drops: int = 0
    best: float = float("inf")
    stale_epochs: int = 0

    @property
    def lr(self) -> float:
        return self.base_lr / self.factor ** self.drops

    def end_epoch(self, epoch: int, val_error: float) -> float:
        """Record epoch `epoch`'s validation error; return ε for the next epoch."""
        if val_error < self.best - self.min_improvement:
            self.best, self.stale_epochs = val_error, 0
        else:
            self.stale_epochs += 1
            if self.stale_epochs >= self.patience and self.drops < self.max_drops:
                self.drops, self.stale_epochs = self.drops + 1, 0
        return self.lr

    def state_dict(self) -> dict:
        return {"drops": self.drops, "best": self.best, "stale_epochs": self.stale_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.drops, self.best, self.stale_epochs = state["drops"], state["best"], state["stale_epochs"]


@dataclass
class MilestoneSchedule:
    """ε ÷ `factor` after each listed epoch; (25, 51, 79) reproduces the original run (PAPER.md §5)."""

    base_lr: float
    milestones: tuple[int, ...] = (25, 51, 79)
    factor: float = 10.0
    epochs_done: int = 0

    @property
    def lr(self) -> float:
        return self.base_lr / self.factor ** sum(self.epochs_done >= m for m in self.milestones)

    def end_epoch(self, epoch: int, val_error: float) -> float:
        self.epochs_done = epoch + 1
        return self.lr

    def state_dict(self) -> dict:
        return {"epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_done = state["epochs_done"]
