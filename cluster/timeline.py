"""The driver's view of a step's timelines: bubble, compute and wait per (stage, tower), and a
Chrome-trace / Perfetto JSON of the step across all actors.

Each actor reports its own events (cluster/pipeline.py) with wall-clock times. The step's window
runs from the first actor's start to the last actor's flush: a synchronous pipeline's step ends
only when every stage is done. An actor's bubble is the share of that window in which it was not
computing a forward or backward — waiting for its first input, for a gradient, for its last sends,
or for the other stages to drain. The step's bubble is the mean over actors; with S equal stages
it approaches (S − 1) / (M + S − 1) (cluster/schedule.py). The window compares clocks of different
actors: exact on one machine, as good as the nodes' clock sync (NTP: about a millisecond) across
machines.
"""

import json
import os

from cluster.mesh import Mesh


def step_summary(reports: list[dict]) -> dict:
    """Per (stage, tower): compute, wait, bubble and peak activations; the window and the mean
    bubble."""
    window = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    actors = []
    for r in reports:
        actor = {key: r[key] for key in ("rank", "stage", "tower", "compute_s", "wait_s", "peak_in_flight",
                                         "peak_activation_bytes")}
        actor["bubble"] = 1.0 - r["compute_s"] / window if window > 0 else 0.0
        actors.append(actor)
    return {"window_s": window, "bubble": sum(a["bubble"] for a in actors) / len(actors), "actors": actors}


def format_summary(summary: dict) -> str:
    """A few lines a person can read: one per actor."""
    lines = [f"pipeline bubble {100 * summary['bubble']:.1f}% (mean over actors)"]
    for a in summary["actors"]:
        lines.append(f"  stage {a['stage']} tower {a['tower']} (rank {a['rank']}): compute {a['compute_s'] * 1000:.0f} ms, "
                     f"wait {a['wait_s'] * 1000:.0f} ms, bubble {100 * a['bubble']:.1f}%, "
                     f"peak {a['peak_in_flight']} microbatch(es) / {a['peak_activation_bytes'] / 2**20:.1f} MiB of activations")
    return "\n".join(lines)


# Chrome trace names: what each recorded kind is called on the timeline.
_NAMES = {"F": "forward", "B": "backward", "recv": "wait for activations", "recv grad": "wait for gradients",
          "send": "send activations", "send grad": "send gradients", "flush": "flush", "optimizer": "optimizer step",
          "allreduce": "wait for the gradient all-reduce"}


def chrome_trace(reports: list[dict], mesh: Mesh, step: int) -> dict:
    """The Trace Event Format (chrome://tracing, ui.perfetto.dev): one track (process) per actor,
    named by rank, stage and tower; spans for compute and waits, instants for sends; time in µs
    from the step's first event."""
    origin = min(event[2] for report in reports for event in report["events"])
    events = []
    for report in reports:
        rank = report["rank"]
        coord = mesh.coord(rank)
        label = (f"rank {rank}: " + (f"replica {coord.replica}, " if mesh.replicas > 1 else "")
                 + f"stage {coord.stage}, tower {coord.tower}")
        events.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for kind, microbatch, start, end in report["events"]:
            name = _NAMES[kind] + (f" {microbatch}" if microbatch >= 0 else "")
            event = {"name": name, "cat": kind, "pid": rank, "tid": 0, "ts": (start - origin) * 1e6,
                     "args": {"microbatch": microbatch, "step": step}}
            if kind.startswith("send"):
                event.update(ph="i", s="t")
            else:
                event.update(ph="X", dur=(end - start) * 1e6)
            events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"step": step, "mesh": mesh.describe(), "bubble": step_summary(reports)["bubble"]}}


def write_trace(path: str, reports: list[dict], mesh: Mesh, step: int) -> str:
    """Write the step's trace atomically; returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(chrome_trace(reports, mesh, step), f)
    os.replace(tmp, path)
    return path
