"""What an actor tells the driver about one step: a `StepReport`, built in the actor and returned
with the step (so monitoring costs no extra call), reduced once per step on the driver
(cluster/telemetry/step.py) and handed from there to the progress line, the metrics and the
pipeline timeline.

Times are seconds. `started`/`finished` and the events are wall-clock (time.time()), so the
driver can line up the actors of one step; the rest are durations on this actor.
"""

import dataclasses

from torch import Tensor

Event = tuple[str, int, float, float]  # (kind, microbatch or -1, start, end): cluster/rank/pipeline.py


@dataclasses.dataclass
class StepReport:
    rank: int
    replica: int
    stage: int
    tower: int
    images: int  # the replica's batch (rows of one microbatch × microbatches)
    seconds: float  # the whole train_step on this actor
    started: float  # wall clock: the stage's first action
    finished: float  # wall clock: its last transfer landed (the flush)
    compute_s: float  # forward and backward, the cross-tower exchange included
    wait_s: float  # waiting for a neighbouring stage: receives and the flush
    exchange_s: float  # inside the cross-tower collectives
    exchange_bytes: int  # sent in them
    exchange_dtypes: list[str] = dataclasses.field(default_factory=list)  # of the activations and their gradients
    precision: str = "fp32"  # the compute dtype of this actor's forwards (cluster/rank/precision.py)
    sent_dtypes: list[str] = dataclasses.field(default_factory=list)  # of what it sent to the next/previous stage
    skipped: bool = False  # fp16: this step's gradients were not finite and no weight changed
    loss_scale: float | None = None  # fp16: the loss scale after this step
    allreduce_exposed_s: float = 0.0  # waiting for the replicas' gradient all-reduce after backward
    allreduce_bytes: int = 0
    peak_in_flight: int = 0  # most microbatches whose activations were held at once
    peak_activation_bytes: int = 0  # and their bytes
    events: list[Event] = dataclasses.field(default_factory=list)
    loss: float | None = None  # the batch's mean cross-entropy: last stage only
    top1: float | None = None  # the batch's top-1 / top-5 hits: last stage only
    top5: float | None = None
    rss_bytes: int | None = None  # this process's resident memory
    device_allocated_bytes: int | None = None  # GPU actors: PyTorch's allocated and reserved memory
    device_reserved_bytes: int | None = None
    device_utilization: float | None = None  # GPU busy share (NVML), 0..1

    @property
    def key(self) -> tuple[int, int, int]:
        return self.replica, self.stage, self.tower


@dataclasses.dataclass
class ProbeReport:
    """One step's loss, logits and gradients without an optimizer step (tests)."""

    rank: int
    replica: int
    stage: int
    tower: int
    loss: float | None  # last stage only
    logits: Tensor | None  # last stage: the microbatches' logits concatenated, this tower's classes
    grads: dict[str, Tensor]  # reference names (`towers.{t}.layers...`)


@dataclasses.dataclass
class EvalScores:
    """Validation scores of some images: the loss summed over them and the top-1/top-5 hits
    (rows weighted: padding weighs 0). Scores of several batches or replicas add up."""

    loss_sum: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    images: float = 0.0

    def __add__(self, other: "EvalScores") -> "EvalScores":
        return EvalScores(self.loss_sum + other.loss_sum, self.top1 + other.top1, self.top5 + other.top5,
                          self.images + other.images)
