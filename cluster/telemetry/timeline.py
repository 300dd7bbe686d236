"""The driver's view of a step's timelines: bubble, compute and wait per (stage, tower), and a
Chrome-trace / Perfetto JSON of the step across all actors.

Each actor reports its own events (cluster/rank/pipeline.py) with wall-clock times. The step's window
runs from the first actor's start to the last actor's flush: a synchronous pipeline's step ends
only when every stage is done. An actor's bubble is the share of that window in which it was not
computing a forward or backward — waiting for its first input, for a gradient, for its last sends,
or for the other stages to drain. The step's bubble is the mean over actors; with S equal stages
it approaches (S − 1) / (M + S − 1) (cluster/plan/schedule.py). The window compares clocks of different
actors: exact on one machine, as good as the nodes' clock sync (NTP: about a millisecond) across
machines.
"""

import dataclasses
import json
import os

from cluster.ckpt import storage
from cluster.plan.mesh import Mesh
from cluster.rank.report import StepReport


@dataclasses.dataclass(frozen=True)
class ActorTimeline:
    rank: int
    stage: int
    tower: int
    compute_s: float
    wait_s: float
    bubble: float  # the share of the step's window this actor was not computing
    peak_in_flight: int
    peak_activation_bytes: int


@dataclasses.dataclass(frozen=True)
class PipelineSummary:
    window_s: float  # from the first actor's start to the last actor's flush
    bubble: float  # the mean over actors
    actors: list[ActorTimeline]


def step_summary(reports: list[StepReport]) -> PipelineSummary:
    """Per actor: compute, wait, bubble and peak activations; the window and the mean bubble."""
    window = max(r.finished for r in reports) - min(r.started for r in reports)
    actors = [ActorTimeline(r.rank, r.stage, r.tower, r.compute_s, r.wait_s,
                            1.0 - r.compute_s / window if window > 0 else 0.0, r.peak_in_flight, r.peak_activation_bytes)
              for r in reports]
    return PipelineSummary(window, sum(a.bubble for a in actors) / len(actors), actors)


def format_summary(summary: PipelineSummary) -> str:
    """A few lines a person can read: one per actor."""
    lines = [f"pipeline bubble {100 * summary.bubble:.1f}% (mean over actors)"]
    for a in summary.actors:
        lines.append(f"  stage {a.stage} tower {a.tower} (rank {a.rank}): compute {a.compute_s * 1000:.0f} ms, "
                     f"wait {a.wait_s * 1000:.0f} ms, bubble {100 * a.bubble:.1f}%, peak {a.peak_in_flight} "
                     f"microbatch(es) / {a.peak_activation_bytes / 2**20:.1f} MiB of activations")
    return "\n".join(lines)


# Chrome trace names: what each recorded kind is called on the timeline.
_NAMES = {"F": "forward", "B": "backward", "recv": "wait for activations", "recv grad": "wait for gradients",
          "send": "send activations", "send grad": "send gradients", "flush": "flush", "optimizer": "optimizer step",
          "allreduce": "wait for the gradient all-reduce"}


def chrome_trace(reports: list[StepReport], mesh: Mesh, step: int) -> dict:
    """The Trace Event Format (chrome://tracing, ui.perfetto.dev): one track (process) per actor,
    named by rank, stage and tower; spans for compute and waits, instants for sends; time in µs
    from the step's first event."""
    origin = min(event[2] for report in reports for event in report.events)
    events = []
    for report in reports:
        rank = report.rank
        coord = mesh.coord(rank)
        label = (f"rank {rank}: " + (f"replica {coord.replica}, " if mesh.replicas > 1 else "")
                 + f"stage {coord.stage}, tower {coord.tower}")
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for kind, microbatch, start, end in report.events:
            name = _NAMES[kind] + (f" {microbatch}" if microbatch >= 0 else "")
            event = {"name": name, "cat": kind, "pid": rank, "tid": 0, "ts": (start - origin) * 1e6,
                     "args": {"microbatch": microbatch, "step": step}}
            if kind.startswith("send"):
                event.update(ph="i", s="t")
            else:
                event.update(ph="X", dur=(end - start) * 1e6)
            events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"step": step, "mesh": mesh.describe(), "bubble": step_summary(reports).bubble}}


def write_trace(path: str, reports: list[StepReport], mesh: Mesh, step: int) -> str:
    """Write the step's trace atomically (cluster/ckpt/storage.py); returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.open_storage(path).write_bytes(json.dumps(chrome_trace(reports, mesh, step)).encode())
    return path
