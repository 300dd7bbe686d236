"""Running one pipeline stage's share of a step: the actions of a schedule (cluster/plan/schedule.py),
the point-to-point transfers between neighbouring stages, and the stage's own timeline.

Transport. Stage s of a (replica, tower) lane sends its output maps to stage s + 1 of the same
lane and receives their gradient back, with torch.distributed isend/irecv (gloo on CPU, NCCL on
GPU). Each direction of each link has its own two-rank process group, so on NCCL a send that waits
for its receiver never blocks a transfer the other way, and on gloo the tag (the microbatch) keeps
transfers apart. Shapes come from the step's plan and the split (stages/split.py), never from a
handshake; a receive for the next microbatch is posted while the current one computes.

Accounting. Every forward, backward, receive wait and send is recorded with wall-clock times, so
the driver can compute the bubble and write a trace (cluster/telemetry/timeline.py). Activation memory is
measured, not estimated: a saved-tensors hook adds up the storages autograd keeps for each
microbatch's backward (parameters excluded), and the stage reports its peak over the step along
with the peak number of microbatches in flight.
"""

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from cluster.plan.schedule import Action
from cluster.rank.precision import dtype_name
from stages.optim import Rates


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the driver tells every actor about one step."""

    mode: str  # "train", "probe" (train without the optimizer step) or "eval"
    microbatches: int
    rows: int  # rows of one microbatch's input: images, times the views in evaluation
    schedule: str = "1f1b"
    lr: float = 0.0  # the weights' ε (the paper's one ε)
    step: int = 0  # the run's step number this plan is for (1-based; 0: not a training step)
    rates: Rates | None = None  # ε of every parameter group (stages/optim.py); None: `lr` for all

    @property
    def group_rates(self) -> Rates:
        return self.rates or Rates(self.lr)


class Link:
    """One direction of one stage boundary of one lane: a two-rank group and the peer's rank."""

    def __init__(self, group, peer: int):
        self.group, self.peer = group, peer

    def send(self, tensor: Tensor, tag: int):
        return dist.isend(tensor, dst=self.peer, group=self.group, tag=tag)

    def recv(self, buffer: Tensor, tag: int):
        return dist.irecv(buffer, src=self.peer, group=self.group, tag=tag)


@dataclasses.dataclass
class StageLinks:
    """This rank's four links (any may be None at the ends of the pipeline)."""

    activations_in: Link | None = None  # from stage s − 1
    activations_out: Link | None = None  # to stage s + 1
    gradients_in: Link | None = None  # from stage s + 1
    gradients_out: Link | None = None  # to stage s − 1


class Timeline:
    """Events of one step on one actor: (kind, microbatch, start, end), wall-clock seconds."""

    def __init__(self):
        self.events: list[tuple[str, int, float, float]] = []

    def add(self, kind: str, microbatch: int, start: float) -> float:
        end = time.time()
        self.events.append((kind, microbatch, start, end))
        return end

    def total(self, *kinds: str) -> float:
        return sum(end - start for kind, _, start, end in self.events if kind in kinds)


class ActivationMeter:
    """Bytes autograd saves for each microbatch's backward (storages counted once, parameters
    excluded); `peak_bytes` and `peak_count` are the largest totals held at one time."""

    def __init__(self, parameters):
        self._parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self._held: dict[int, int] = {}
        self.peak_bytes = self.peak_count = 0

    def recording(self, microbatch: int):
        storages: dict[int, int] = {}

        def pack(tensor: Tensor) -> Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        def finish() -> None:
            self._held[microbatch] = sum(storages.values())
            self.peak_bytes = max(self.peak_bytes, sum(self._held.values()))
            self.peak_count = max(self.peak_count, len(self._held))

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), finish

    def release(self, microbatch: int) -> None:
        self._held.pop(microbatch, None)


class Receiver:
    """Receives of one kind (activations or gradients) for microbatches 0, 1, ..., in order, one
    posted ahead of the one being consumed."""

    def __init__(self, link: Link, shape: tuple[int, ...], count: int, timeline: Timeline, kind: str,
                 device: torch.device, offset: int, dtype: torch.dtype):
        self.link, self.shape, self.count, self.dtype = link, shape, count, dtype
        self.timeline, self.kind, self.device, self.offset = timeline, kind, device, offset
        self._posted: dict[int, tuple] = {}
        self._post(0)

    def _post(self, microbatch: int) -> None:
        if microbatch < self.count and microbatch not in self._posted:
            buffer = torch.empty(self.shape, device=self.device, dtype=self.dtype)
            self._posted[microbatch] = (buffer, self.link.recv(buffer, self.offset + microbatch))

    def take(self, microbatch: int) -> Tensor:
        self._post(microbatch)
        buffer, work = self._posted.pop(microbatch)
        self._post(microbatch + 1)
        start = time.time()
        work.wait()
        self.timeline.add(self.kind, microbatch, start)
        return buffer


class StageRun:
    """One step of one stage: runs `actions`, transfers through `links`, records a timeline.

    `forward(microbatch, x)` runs the stage's layers on its input (None at stage 0, which reads
    its images itself); at the last stage of a training step it returns the scalar to
    backpropagate (the microbatch's share of the loss)."""

    def __init__(self, plan: StepPlan, links: StageLinks, in_shape: tuple[int, ...] | None,
                 out_shape: tuple[int, ...] | None, device: torch.device, memory_format, parameters,
                 dtype: torch.dtype = torch.float32):
        """`dtype`: what crosses the stage boundaries, the compute dtype (cluster/rank/precision.py)."""
        self.plan, self.links, self.device, self.memory_format = plan, links, device, memory_format
        self.timeline = Timeline()
        self.meter = ActivationMeter(parameters)
        self.training = plan.mode != "eval"
        m = plan.microbatches
        # Tags: activations use 0..M−1, gradients M..2M−1, so no receive can take the other's data.
        self._activations = (Receiver(links.activations_in, in_shape, m, self.timeline, "recv", device, 0, dtype)
                             if links.activations_in else None)
        self._gradients = (Receiver(links.gradients_in, out_shape, m, self.timeline, "recv grad", device, m, dtype)
                           if links.gradients_in and self.training else None)
        self.sent_dtypes: set[str] = set()
        self._sends: list = []
        self._held: dict[int, tuple[Tensor | None, Tensor]] = {}

    def run(self, actions: list[Action], forward: Callable) -> None:
        self.started = time.time()
        for kind, i in actions:
            if kind == "F":
                self._forward(i, forward)
            else:
                self._backward(i)
        start = time.time()
        for work in self._sends:  # the flush: every transfer this stage started has landed
            work.wait()
        self.finished = self.timeline.add("flush", -1, start)

    def _input(self, i: int) -> Tensor | None:
        if self._activations is None:
            return None
        x = self._activations.take(i)
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x.requires_grad_(self.training)

    def _forward(self, i: int, forward: Callable) -> None:
        x = self._input(i)
        start = time.time()
        if self.training:
            hooks, finish = self.meter.recording(i)
            with hooks:
                out = forward(i, x)
            finish()
        else:
            with torch.no_grad():
                out = forward(i, x)
        self.timeline.add("F", i, start)
        if self.links.activations_out is not None:
            self._send(self.links.activations_out, out.detach(), i, "send")
        if self.training:
            self._held[i] = (x, out)

    def _backward(self, i: int) -> None:
        x, out = self._held.pop(i)
        grad = self._gradients.take(i) if self._gradients is not None else None  # None: out is the loss
        start = time.time()
        out.backward(grad)
        self.timeline.add("B", i, start)
        self.meter.release(i)
        if self.links.gradients_out is not None:
            self._send(self.links.gradients_out, x.grad, i + self.plan.microbatches, "send grad")

    def _send(self, link: Link, tensor: Tensor, tag: int, kind: str) -> None:
        self.sent_dtypes.add(dtype_name(tensor.dtype))
        start = time.time()
        self._sends.append(link.send(tensor.contiguous(), tag))
        self.timeline.add(kind, tag % self.plan.microbatches, start)

    def totals(self) -> dict:
        """This step's timeline in StepReport's fields (cluster/rank/report.py)."""
        return {"events": list(self.timeline.events), "started": self.started, "finished": self.finished,
                "compute_s": self.timeline.total("F", "B"), "wait_s": self.timeline.total("recv", "recv grad", "flush"),
                "peak_in_flight": self.meter.peak_count, "peak_activation_bytes": self.meter.peak_bytes,
                "sent_dtypes": sorted(self.sent_dtypes)}
