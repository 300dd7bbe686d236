"""One training step as the driver sees it: every actor's `StepReport` (cluster/rank/report.py)
reduced once into a `StepSummary`, which the trainer hands to the progress line, the metrics and
the timeline; and `Totals`, the sums over some steps (the run, a log interval, an epoch).

Phases. Each actor's share of the step's loop time — from the end of the previous step to the end
of this one: the data wait, the step on every actor, and the driver's own work (dispatch,
checkpoint stalls, printing) — splits into disjoint parts that stack:

    compute        forward and backward, the exchange excluded
    exchange       the cross-tower collectives
    pipeline_wait  waiting for a neighbouring stage (receives, the flush)
    allreduce      waiting for the replicas' gradient all-reduce after backward
    data_wait      the driver waiting for the actor's replica's batch from its loaders
    other          the rest: optimizer step, input normalisation, dispatch, checkpoint stalls
"""

import dataclasses
import math

from cluster.plan.mesh import Mesh
from cluster.rank.report import StepReport
from cluster.telemetry.timeline import PipelineSummary, step_summary

PHASES = ("compute", "exchange", "pipeline_wait", "allreduce", "data_wait", "other")

ActorKey = tuple[int, int, int]  # (replica, stage, tower)


def actor_phases(report: StepReport, data_wait: float, loop_seconds: float) -> dict[str, float]:
    """One actor's seconds of the step by phase (they add up to `loop_seconds`, or more when the
    actor's own clock ran past the driver's)."""
    return {"compute": max(report.compute_s - report.exchange_s, 0.0), "exchange": report.exchange_s,
            "pipeline_wait": report.wait_s, "allreduce": report.allreduce_exposed_s, "data_wait": data_wait,
            "other": max(loop_seconds - data_wait - report.compute_s - report.wait_s - report.allreduce_exposed_s, 0.0)}


@dataclasses.dataclass
class StepSummary:
    step: int  # 1-based, the run's
    epoch: int  # 0-based
    lr: float
    images: int  # every replica's batch
    loss: float  # the global batch's mean cross-entropy (the replicas' mean)
    hits: tuple[float, float] | None  # top-1 and top-5 hits over the global batch, if reported
    data_wait: float  # seconds the loop waited for the batches (the slowest replica's)
    replica_waits: list[float]  # each replica's
    loop_seconds: float  # see the module docstring
    exchange_share: float  # the largest share of an actor's step spent in the exchange
    skipped: bool  # fp16: the step's gradients were not finite, no weight changed
    loss_scale: float | None  # fp16: the loss scale after the step
    pipeline: PipelineSummary  # window and bubble
    phases: dict[ActorKey, dict[str, float]]
    reports: list[StepReport]  # in rank order

    @classmethod
    def reduce(cls, reports: list[StepReport], mesh: Mesh, *, step: int, epoch: int, lr: float,
               data_wait: list[float], loop_seconds: float) -> "StepSummary":
        """`data_wait`: each replica's wait for its batch."""
        heads = [reports[rank] for rank in mesh.loss_ranks()]  # each replica's last stage, tower 0
        hits = None
        if all(r.top1 is not None for r in heads):
            hits = (sum(r.top1 for r in heads), sum(r.top5 for r in heads))
        return cls(step=step, epoch=epoch, lr=lr, images=sum(r.images for r in heads),
                   loss=sum(r.loss for r in heads) / len(heads), hits=hits, data_wait=max(data_wait),
                   replica_waits=list(data_wait), loop_seconds=loop_seconds,
                   exchange_share=max(r.exchange_s / max(r.seconds, 1e-9) for r in reports),
                   skipped=any(r.skipped for r in reports), loss_scale=reports[0].loss_scale,
                   pipeline=step_summary(reports),
                   phases={r.key: actor_phases(r, data_wait[r.replica], loop_seconds) for r in reports},
                   reports=reports)


@dataclasses.dataclass
class Totals:
    """Sums over some steps."""

    steps: int = 0
    images: int = 0
    seconds: float = 0.0  # loop time
    data_wait: float = 0.0
    loss_sum: float = 0.0
    scored: int = 0  # images whose top-k hits the actors reported
    hits1: float = 0.0
    hits5: float = 0.0
    bubble_sum: float = 0.0
    skipped: int = 0  # fp16 steps skipped for inf/NaN gradients
    replica_waits: list = dataclasses.field(default_factory=list)  # per replica, data wait seconds
    actors: dict = dataclasses.field(default_factory=dict)  # ActorKey -> {phase: seconds}

    def add(self, step: StepSummary) -> None:
        self.steps += 1
        self.images += step.images
        self.seconds += step.loop_seconds
        self.data_wait += step.data_wait
        if not self.replica_waits:
            self.replica_waits = [0.0] * len(step.replica_waits)
        self.replica_waits = [total + wait for total, wait in zip(self.replica_waits, step.replica_waits)]
        self.loss_sum += step.loss
        self.bubble_sum += step.pipeline.bubble
        self.skipped += step.skipped
        if step.hits is not None:
            self.scored += step.images
            self.hits1 += step.hits[0]
            self.hits5 += step.hits[1]
        for key, values in step.phases.items():
            mine = self.actors.setdefault(key, dict.fromkeys(PHASES, 0.0))
            for phase, value in values.items():
                mine[phase] += value

    def error(self, k: int) -> float:
        if not self.scored:
            return math.nan
        return 1.0 - (self.hits1 if k == 1 else self.hits5) / self.scored

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait / self.seconds if self.seconds > 0 else 0.0

    @property
    def replica_data_wait_fractions(self) -> list[float]:
        return [wait / self.seconds if self.seconds > 0 else 0.0 for wait in self.replica_waits]

    def record(self) -> dict:
        """The history's fields for these steps: means per step, images/s, seconds per actor phase."""
        n = max(self.steps, 1)
        return {"steps": self.steps, "images": self.images, "seconds": self.seconds,
                "loss": self.loss_sum / n, "top1_error": self.error(1), "top5_error": self.error(5),
                "images_per_second": self.images_per_second, "data_wait_fraction": self.data_wait_fraction,
                "replica_data_wait_fractions": self.replica_data_wait_fractions,
                "bubble": self.bubble_sum / n, "skipped": self.skipped,
                "actors": [{"replica": key[0], "stage": key[1], "tower": key[2], **phases}
                           for key, phases in sorted(self.actors.items())]}
