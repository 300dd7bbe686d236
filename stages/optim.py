"""The paper's momentum SGD (§5), its parameter groups, and the learning-rate schedules.

    v ← momentum·v − weight_decay·ε·w − ε·∂L/∂w
    w ← w + v

ε sits inside the velocity. `torch.optim.SGD` keeps ε outside (v ← m·v + g + wd·w; w ← w − ε·v):
the two agree while ε is constant and differ at every learning-rate drop, where the paper's rule
keeps the velocity built with the old ε and torch's rescales it at once.

Parameter groups (`param_groups`). The paper's variant has one: one ε and weight decay for every
parameter (§5). The authors' 2012 code (`cuda-convnet-2012`; layers/layer-params-145.cfg) gives
each layer's weights and biases their own ε — `epsW` and `epsB` — and weight decay to the weights
only (`wc`; src/layer.cu builds the bias `Weights` with wc = 0): the biases learn at ε_B = 0.02,
twice the weights' initial 0.01 (`BIAS_LR_FACTOR_2012`), and keep it while the weights' ε drops.
A step's ε of every group is one `Rates` value, which the driver hands every actor with the step.
A group whose ε is 0 is frozen: it is not updated at all, its velocity kept (cuda-convnet's
`Weights::update` skips a layer whose rate is 0), so conv1 stops at once when the 2012 run froze it.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

PARAM_KINDS = ("weight", "bias")
BIAS_LR_FACTOR_2012 = 2.0  # epsB / the initial epsW in layer-params-145.cfg: 0.02 / 0.01


def _as_written(method):
    """`torch.optim.Optimizer`'s `method` without its `torch._disable_dynamo` wrapper, whose first
    call imports torch._dynamo: a second of CPU in every actor, as long as importing torch itself,
    for an optimizer that is never compiled."""
    return getattr(method, "__wrapped__", method)


class PaperSGD(Optimizer):
    add_param_group = _as_written(Optimizer.add_param_group)
    zero_grad = _as_written(Optimizer.zero_grad)
    state_dict = _as_written(Optimizer.state_dict)
    load_state_dict = _as_written(Optimizer.load_state_dict)

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
            if lr == 0.0:  # frozen: no step, the velocity kept (see the module docstring)
                continue
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


def layer_and_kind(name: str) -> tuple[str, str]:
    """`towers.0.layers.conv1.conv.weight` (or a HalfTower's `layers.conv1.conv.weight`) →
    ("conv1", "weight")."""
    parts = name.split(".")
    if "layers" not in parts[:-1] or parts[-1] not in PARAM_KINDS:
        raise ValueError(f"{name!r} is not a tower parameter (…layers.LAYER….weight or .bias)")
    return parts[parts.index("layers") + 1], parts[-1]


def param_groups(model: nn.Module, variant: str) -> list[dict]:
    """The optimizer's groups for `model` (a HalfTower or TwoTowerAlexNet, whole or a stage).

    paper: one group of every parameter, as `PaperSGD(model.parameters())` makes. 2012 code: one
    group per parameter tensor, labelled with its `layer` and `kind`, the biases' without weight
    decay. One tensor a group keeps the optimizer's state in the model's parameter order, which
    checkpoints and their consolidation index it by."""
    if variant == "paper":
        return [{"params": list(model.parameters())}]
    groups = []
    for name, param in model.named_parameters():
        layer, kind = layer_and_kind(name)
        groups.append({"params": [param], "layer": layer, "kind": kind,
                       **({"weight_decay": 0.0} if kind == "bias" else {})})
    return groups


@dataclass(frozen=True)
class Rates:
    """ε of every parameter group for one step.

    weights: the weights' ε, and the paper variant's one ε for all;
    biases: the biases' ε (the 2012 code's ε_B), or None for the weights' own;
    layers: (layer, its weights' ε) for the layers whose weights' ε differs (the recorded 2012
        schedule's conv1). A layer whose weights' ε is 0 is frozen, its biases too (the final
        layer-params-145.cfg has epsW = epsB = 0 on conv1)."""

    weights: float
    biases: float | None = None
    layers: tuple[tuple[str, float], ...] = ()

    def of(self, layer: str, kind: str) -> float:
        """ε of `layer`'s weights or biases (`kind`)."""
        weights = dict(self.layers).get(layer, self.weights)
        if kind == "weight" or self.biases is None:
            return weights
        return 0.0 if weights == 0.0 else self.biases


def set_rates(optimizer: Optimizer, rates: Rates) -> None:
    """Each group's ε from `rates`: a labelled group (`param_groups`, 2012 code) its layer's and
    kind's, the paper's one group the weights' ε."""
    for group in optimizer.param_groups:
        group["lr"] = rates.of(group["layer"], group["kind"]) if "layer" in group else rates.weights


class _Schedule:
    """What every schedule gives for the next epoch: `lr`, the weights' ε, and `layer_lrs`, the
    layers whose weights' ε differs from it (only the recorded 2012 schedule has any)."""

    layer_lrs: tuple[tuple[str, float], ...] = ()

    def rates(self, bias_lr: float | None = None) -> Rates:
        """The next epoch's ε of every group; `bias_lr`: the biases' (None: the weights')."""
        return Rates(self.lr, bias_lr, self.layer_lrs)


@dataclass
class PlateauSchedule(_Schedule):
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
class MilestoneSchedule(_Schedule):
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


@dataclass
class RecordedSchedule(MilestoneSchedule):
    """The 2012 run's recorded changes, from the log at the end of layers/layer-params-145.cfg,
    each after the epoch it is logged at (as `MilestoneSchedule`'s milestones, which it extends):

        epoch 25: weights' ε ÷ 10 (0.01 → 0.001)        epoch 51: ÷ 10 (→ 0.0001)
        epoch 67: conv1's weights' ε ÷ 10 (→ 0.00001); colour noise off (`COLOUR_NOISE_EPOCHS`)
        epoch 72: conv1 frozen (ε = 0)                  epoch 79: the other weights' ε ÷ 10 (→ 0.00001)
        epoch 91: stopped (`EPOCHS`)

    The biases keep their ε_B throughout (`Rates.biases`), but for conv1's, frozen with its weights."""

    milestones: tuple[int, ...] = (25, 51, 79)
    CONV1_DROP, CONV1_FROZEN = 67, 72
    COLOUR_NOISE_EPOCHS = 67  # the epochs trained with colour noise: 0-based 0..66
    EPOCHS = 91

    @property
    def layer_lrs(self) -> tuple[tuple[str, float], ...]:
        if self.epochs_done >= self.CONV1_FROZEN:
            return (("conv1", 0.0),)
        if self.epochs_done >= self.CONV1_DROP:
            return (("conv1", self.lr / self.factor),)
        return ()
