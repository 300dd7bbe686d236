"""Data parallelism: the replicas of one (stage, tower) average their gradients every step.

Buckets, the way DistributedDataParallel does it (cluster/plan/buckets.py): the parameters, last
layer first (the order backward produces their gradients), are cut into buckets of about
`bucket_bytes`. A gradient is
final once it has accumulated all M microbatches of the step (a hook counts them); when every
gradient of a bucket is final, the bucket is flattened and its all-reduce starts asynchronously
while backward goes on with the earlier layers. Buckets are launched strictly in index order, so
every replica issues the same collectives in the same order whatever order autograd takes.
`finish`, after the last backward, waits for the reductions, divides by the replica count and
writes the averages back into `.grad`.

Accounting: `exposed_s` is the time `finish` waited, the part of the reduction the backward
pass did not hide. With `overlap=False` every bucket is launched in `finish` (the baseline
bench/scaling.py measures the overlap against: 1 − exposed with overlap / exposed without).
"""

import time

import torch
import torch.distributed as dist
from torch import Tensor

from cluster.plan.buckets import DEFAULT_BUCKET_BYTES, bucket_layout


class _Bucket:
    def __init__(self, params: list[Tensor]):
        self.params = params
        self.numel = sum(p.numel() for p in params)  # the bucket's size (the scaling model's check)
        self.pending = len(params)  # gradients not final yet
        self.buffer: Tensor | None = None
        self.work = None


class GradientSync:
    """Averages the gradients of `parameters` over `group` (the replicas of this stage and tower)."""

    def __init__(self, parameters, group, replicas: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 overlap: bool = True, reduce_dtype: torch.dtype = torch.float32):
        """`reduce_dtype`: what the buckets travel as (--grad-reduce-dtype): fp32, or bf16 for
        half the bytes; the averages are written back into the fp32 gradients."""
        self.group, self.replicas, self.overlap, self.reduce_dtype = group, replicas, overlap, reduce_dtype
        params = [p for p in parameters if p.requires_grad]
        layout = bucket_layout([p.numel() * p.element_size() for p in params], bucket_bytes)
        self.buckets = [_Bucket([params[i] for i in indices]) for indices in layout]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated) for p in params]
        self.start(0)  # disarmed until a step starts: backward passes outside a step launch nothing

    def start(self, microbatches: int) -> None:
        """Arm for one step whose gradients accumulate `microbatches` backward passes."""
        self.microbatches = microbatches
        self._counts: dict[int, int] = {}
        self._next = 0
        self.exposed_s = 0.0
        self.bytes = 0
        for bucket in self.buckets:
            bucket.pending, bucket.work, bucket.buffer = len(bucket.params), None, None

    def _accumulated(self, param: Tensor) -> None:
        if not self.microbatches or not self.overlap:
            return
        count = self._counts.get(id(param), 0) + 1
        self._counts[id(param)] = count
        if count == self.microbatches:  # this gradient is final
            bucket = self._bucket_of[id(param)]
            bucket.pending -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for p in bucket.params]
        bucket.buffer = torch.cat(grads).to(self.reduce_dtype)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        self.bytes += bucket.buffer.numel() * bucket.buffer.element_size()

    def finish(self) -> None:
        """After the step's last backward: every bucket reduced (a bucket some parameter of which
        got no gradient is launched now), averages written to `.grad`."""
        waited = time.perf_counter()
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer = bucket.buffer.float().div_(self.replicas)
            offset = 0
            for p in bucket.params:
                flat = bucket.buffer[offset:offset + p.numel()].view(p.shape)
                if p.grad is None:
                    p.grad = flat.clone()
                else:
                    p.grad.copy_(flat)
                offset += p.numel()
            bucket.buffer = bucket.work = None
        self.exposed_s = time.perf_counter() - waited
        self.microbatches = 0

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
