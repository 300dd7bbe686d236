"""Mixed precision on one actor: the compute dtype, fp32 master weights, and fp16's loss scale.

`--precision` fp32 | bf16 | fp16 (`auto`: bf16 on GPU actors, fp32 on CPUs). In bf16 or fp16:

- each stage's forward runs under `torch.autocast` on the actor's device: convolutions and the
  fully connected layers compute in the compute dtype, so their outputs — what the towers
  exchange at conv3, fc6, fc7 and fc8, and what a stage sends to the next — are in it too, half
  the bytes of fp32 (and the gradients that come back are);
- LRN (stages/lrn.py), the softmax and the cross-entropy, and the sharded loss's exchange run in
  fp32: the worker casts the logits up before the loss;
- the parameters and the momentum stay fp32 (autocast casts a copy of each weight per use), so the
  paper's update rule runs in fp32 exactly as in an fp32 run, and checkpoints hold fp32 whatever
  the run's precision: a bf16 checkpoint resumes as fp32 and the other way round.

fp16's range is too small for small gradients, so fp16 adds dynamic loss scaling (`LossScaler`,
the rule of torch.amp.GradScaler, made mesh-wide): the loss is multiplied by S before backward;
after it, every rank checks its own gradients for inf/NaN and the ranks agree by an all-reduce
(MAX) of that flag over the whole mesh, so they all skip the same steps. A finite step divides the
gradients by S and steps the optimizer; after `window` finite steps in a row S doubles. A step
with an inf/NaN gradient changes no weight and no momentum, and halves S. S is saved in each
shard, so a resume goes on with it.
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REDUCE_DTYPES = ("fp32", "bf16")


def dtype_name(dtype: torch.dtype) -> str:
    """`float32`, `bfloat16`, ...: how reports name what travelled."""
    return str(dtype).removeprefix("torch.")


def resolve(precision: str, device_type: str) -> str:
    """`auto`: bf16 on a GPU (its tensor cores), fp32 on a CPU; anything else as given."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


class Precision:
    """The compute dtype of one actor's forward passes."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.dtype, self.device = name, DTYPES[name], device

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self):
        """The context a stage's forward runs in (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed)


class LossScaler:
    """fp16's dynamic loss scale, agreed by every rank (module docstring)."""

    def __init__(self, scale: float = 2.0**16, window: int = 2000, factor: float = 2.0):
        self.scale, self.window, self.factor = float(scale), window, factor
        self.good_steps = 0  # finite steps since the scale last changed

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self.scale

    def unscale(self, parameters: list[Tensor], group=None) -> bool:
        """After backward (and the replicas' all-reduce): whether every rank's gradients are finite
        (all ranks take part, in the same order); if so, the gradients divided by the scale."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:  # on the device: one host synchronisation below, not one per gradient
            flag = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float().reshape(1)
        else:
            flag = torch.zeros(1)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        finite = flag.item() == 0.0
        if finite:
            for g in grads:
                g.div_(self.scale)
        return finite

    def update(self, finite: bool) -> None:
        """The scale after a step: halved after an inf/NaN, doubled after `window` finite steps."""
        if not finite:
            self.scale, self.good_steps = self.scale / self.factor, 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale, self.good_steps = self.scale * self.factor, 0
        if not math.isfinite(self.scale):
            raise FloatingPointError("the fp16 loss scale overflowed")

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
