"""The cross-tower exchange: an autograd-correct all-gather along dim 1 over a tower group.

Forward: every tower contributes its (b, c, ...) maps and receives both towers' (b, towers·c, ...),
tower 0's channels first, exactly what `torch.cat(maps, dim=1)` gives in the reference.
Backward: the gradient of the gathered maps reaches every tower (each used them downstream), so the
gradient of tower t's own maps is the sum over towers of slice t — a reduce-scatter, which returns
each tower exactly its slice of the summed input gradient.
"""

import time

import torch
import torch.distributed as dist
from torch import Tensor

from cluster.rank.precision import dtype_name

# torch 2.13 renamed the flat-tensor collectives; older releases have only the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ExchangeStats:
    """Seconds spent inside the exchange's collectives, bytes this rank sent and their dtypes, since
    `reset` (in bf16 or fp16 the activations and their gradients travel in the compute dtype)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.bytes_sent = 0
        self.dtypes: set[str] = set()

    def add(self, seconds: float, tensor: Tensor, peers: int) -> None:
        self.seconds += seconds
        self.bytes_sent += tensor.numel() * tensor.element_size() * peers
        self.dtypes.add(dtype_name(tensor.dtype))


class _GatherTowers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, towers: int, stats: ExchangeStats) -> Tensor:
        ctx.group, ctx.towers, ctx.stats = group, towers, stats
        x = x.contiguous()
        b, c = x.shape[0], x.shape[1]
        gathered = x.new_empty((towers * b,) + tuple(x.shape[1:]))  # (towers·b, c, ...)
        start = time.perf_counter()
        _all_gather_flat(gathered, x, group=group)
        stats.add(time.perf_counter() - start, x, towers - 1)
        return gathered.view(towers, *x.shape).movedim(0, 1).reshape(b, towers * c, *x.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        towers = ctx.towers
        b, c = grad.shape[0], grad.shape[1] // towers
        slices = grad.reshape(b, towers, c, *grad.shape[2:]).movedim(1, 0).reshape(towers * b, c, *grad.shape[2:])
        mine = grad.new_empty((b, c) + tuple(grad.shape[2:]))
        start = time.perf_counter()
        _reduce_scatter_flat(mine, slices, op=dist.ReduceOp.SUM, group=ctx.group)
        ctx.stats.add(time.perf_counter() - start, mine, towers - 1)
        return mine, None, None, None


class TowerExchange:
    """`exchange(x)` for a HalfTower: all-gather over the towers of one (replica, stage)."""

    def __init__(self, group, towers: int):
        self.group, self.towers = group, towers
        self.stats = ExchangeStats()

    def __call__(self, x: Tensor) -> Tensor:
        return _GatherTowers.apply(x, self.group, self.towers, self.stats)
