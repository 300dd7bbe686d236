"""Plots and a short markdown report of a run (`python -m cluster.report`, cluster/report.py, is the
command).

It reads the run's history (`RUN_DIR/metrics.jsonl`, cluster/telemetry/history.py), so it covers every
attempt of the run (restarts and resumes) and works while the run goes on. The driver writes the
same at the end of a run. Output, in `RUN_DIR/report/` unless --out says otherwise:

- `loss.png`: training loss per logged interval, and train and validation loss per epoch;
- `error.png`: train and validation top-1 and top-5 error per epoch (the paper's curves);
- `throughput.png`: images/s over wall-clock time, and the shares of data wait and pipeline
  bubble; restarts marked;
- `time_breakdown.png`: each (stage, tower) actor's milliseconds per step, stacked by phase;
- `report.md`: the run in numbers, each epoch, the time breakdown, checkpoints and restarts.
"""

import collections
import io
import math

from matplotlib.figure import Figure  # the object API: no pyplot, no backend to choose (PNG goes through Agg)
from matplotlib.ticker import MaxNLocator

from cluster.ckpt import storage
from cluster.telemetry.history import History, history_path, read_history
from cluster.telemetry.metrics import PHASES
from cluster.telemetry.progress import format_duration

REPORT_DIR = "report"
PLOTS = ("loss.png", "error.png", "throughput.png", "time_breakdown.png")
_PHASE_COLORS = {"compute": "#4c72b0", "exchange": "#dd8452", "pipeline_wait": "#c44e52", "allreduce": "#8172b3",
                 "data_wait": "#937860", "other": "#bbbbbb"}


class ReportError(ValueError):
    """The run dir has nothing to report."""


def _epochs_of(history: History, step: int) -> float:
    """A step as a fractional epoch (the x axis of the learning curves)."""
    per_epoch = history.starts[-1]["steps_per_epoch"] if history.starts else 0
    return step / per_epoch if per_epoch else float(step)


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_loss(history: History) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    steps = history.steps
    ax.plot([_epochs_of(history, s["step"]) for s in steps], [s["loss"] for s in steps], color="#4c72b0",
            linewidth=1, alpha=0.6, label="training loss (per logged interval)")
    epochs = history.epochs
    ax.plot([_epochs_of(history, e["step"]) for e in epochs], [e["train_loss"] for e in epochs], "o-",
            color="#4c72b0", label="training loss (epoch mean)")
    ax.plot([_epochs_of(history, e["step"]) for e in epochs], [e["val_loss"] for e in epochs], "s-",
            color="#dd8452", label="validation loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_error(history: History) -> Figure:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    epochs = [e["epoch"] for e in history.epochs]
    for key, label, style, color in (("train_top1_error", "train top-1", "o-", "#4c72b0"),
                                     ("train_top5_error", "train top-5", "o--", "#4c72b0"),
                                     ("val_top1_error", "validation top-1", "s-", "#dd8452"),
                                     ("val_top5_error", "validation top-5", "s--", "#dd8452")):
        ax.plot(epochs, [100 * e[key] for e in history.epochs], style, color=color, label=label)
    if not epochs:
        ax.text(0.5, 0.5, "no epoch evaluated yet", transform=ax.transAxes, ha="center")
    ax.set(xlabel="epoch", ylabel="error (%)", title="Top-1 and top-5 error", ylim=(0, 100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_throughput(history: History) -> Figure:
    fig = Figure(figsize=(8, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    origin = history.starts[0]["time"] if history.starts else (history.steps[0]["time"] if history.steps else 0)
    span = (history.steps[-1]["time"] - origin) if history.steps else 0
    unit, scale = ("hours", 3600) if span > 3 * 3600 else ("minutes", 60) if span > 180 else ("seconds", 1)
    # each attempt its own line: a gap where the run was down (a restart, a resume)
    gaps = [{"time": start["time"], "images_per_second": math.nan, "data_wait_fraction": math.nan, "bubble": math.nan}
            for start in history.starts[1:]]
    points = sorted(history.steps + gaps, key=lambda record: record["time"])
    times = [(p["time"] - origin) / scale for p in points]
    top.plot(times, [p["images_per_second"] for p in points], ".-", color="#4c72b0", label="images/s")
    top.set(ylabel="images/s", title="Throughput")
    top.set_ylim(bottom=0)
    bottom.plot(times, [100 * p["data_wait_fraction"] for p in points], ".-", color="#937860", label="data wait")
    bottom.plot(times, [100 * p["bubble"] for p in points], ".-", color="#c44e52", label="bubble")
    bottom.set(xlabel=f"wall-clock {unit} since the start", ylabel="share of step (%)")
    for i, restart in enumerate(history.restarts):
        for ax in (top, bottom):
            ax.axvline((restart["time"] - origin) / scale, color="red", linestyle="--", linewidth=1,
                       label=f"restart ({restart['cause']})" if i == 0 and ax is top else None)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    return fig


def time_breakdown(history: History) -> tuple[dict, int]:
    """Each actor's seconds per phase over the kept steps, and the number of steps."""
    totals: dict = collections.defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
    steps = 0
    for record in history.steps:
        steps += record["steps"]
        for actor in record["actors"]:
            key = (actor["replica"], actor["stage"], actor["tower"])
            for phase in PHASES:
                totals[key][phase] += actor.get(phase, 0.0)
    return dict(sorted(totals.items())), steps


def _actor_name(key: tuple, replicas: int) -> str:
    return (f"replica {key[0]} " if replicas > 1 else "") + f"stage {key[1]} tower {key[2]}"


def plot_time_breakdown(history: History) -> Figure:
    totals, steps = time_breakdown(history)
    replicas = max((key[0] for key in totals), default=0) + 1
    fig = Figure(figsize=(8, 1.6 + 0.6 * max(len(totals), 1)), layout="constrained")
    ax = fig.subplots()
    names = [_actor_name(key, replicas) for key in totals]
    left = [0.0] * len(totals)
    for phase in PHASES:
        widths = [1000 * phases[phase] / max(steps, 1) for phases in totals.values()]
        if max(widths, default=0.0) < 0.001 * max(left + widths + [1e-9]):  # nothing to see (e.g. no pipeline)
            continue
        ax.barh(names, widths, left=left, color=_PHASE_COLORS[phase], label=phase.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set(xlabel="milliseconds per step", title=f"Where each actor's step time goes (mean over {steps} steps)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(PHASES), fontsize="small")
    return fig


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def markdown(history: History, run_dir: str) -> str:
    start = history.starts[-1] if history.starts else {}
    last_step = history.steps[-1]["step"] if history.steps else 0
    seconds = sum(s["seconds"] for s in history.steps)
    images = sum(s["images"] for s in history.steps)
    wait = sum(s["data_wait_fraction"] * s["seconds"] for s in history.steps)
    lines = [f"# Run report: `{run_dir}`", "",
             f"Recipe `{start.get('recipe', '?')}`, batch {start.get('batch_size', '?')} × "
             f"{start.get('replicas', 1)} replica(s). Step {last_step} of {start.get('total_steps', '?')}, "
             f"{len(history.epochs)} epoch(s) evaluated.", ""]
    if history.epochs:
        best = min(history.epochs, key=lambda e: e["val_top1_error"])
        final = history.epochs[-1]
        lines += [f"- **Validation error** after epoch {final['epoch']}: top-1 {_pct(final['val_top1_error'])}, "
                  f"top-5 {_pct(final['val_top5_error'])} (best top-1 {_pct(best['val_top1_error'])}, "
                  f"epoch {best['epoch']})."]
    lines += [f"- **Throughput:** {images / seconds if seconds else 0:.1f} images/s over {format_duration(seconds)} "
              f"of training; data wait {_pct(wait / seconds if seconds else 0)} of step time.",
              f"- **Checkpoints:** {len(history.checkpoints)}"
              + (f", the last at step {history.checkpoints[-1]['step']} "
                 f"({history.checkpoints[-1]['bytes'] / 2**20:.1f} MiB, training stalled "
                 f"{history.checkpoints[-1]['stall']:.2f} s)" if history.checkpoints else "") + ".",
              f"- **Restarts:** {len(history.restarts)}"
              + "".join(f"\n  - at step {r['step']}: {r['cause']} ({r['detail']})" for r in history.restarts), ""]
    lines += ["## Epochs", "", "| epoch | train loss | train top-1 err | train top-5 err | val loss | val top-1 err "
              "| val top-5 err | lr | images/s | time (s) |", "|" + "---|" * 10]
    for e in history.epochs:
        lines.append(f"| {e['epoch']}{'' if e['finished'] else ' (cut)'} | {e['train_loss']:.4f} "
                     f"| {_pct(e['train_top1_error'])} | {_pct(e['train_top5_error'])} | {e['val_loss']:.4f} "
                     f"| {_pct(e['val_top1_error'])} | {_pct(e['val_top5_error'])} | {e['lr']:.3g} "
                     f"| {e['images_per_second']:.1f} | {e['seconds']:.0f} |")
    totals, steps = time_breakdown(history)
    replicas = max((key[0] for key in totals), default=0) + 1
    lines += ["", f"## Time per step (ms, mean over {steps} steps)", "",
              "| actor | " + " | ".join(p.replace("_", " ") for p in PHASES) + " | total |",
              "|" + "---|" * (len(PHASES) + 2)]
    for key, phases in totals.items():
        values = [1000 * phases[p] / max(steps, 1) for p in PHASES]
        lines.append(f"| {_actor_name(key, replicas)} | " + " | ".join(f"{v:.1f}" for v in values)
                     + f" | {sum(values):.1f} |")
    lines += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in PLOTS] + [""]
    return "\n".join(lines)


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write the plots and report.md of `run_dir` into `out` (default RUN_DIR/report); returns `out`."""
    history = read_history(run_dir)
    if history.empty:
        raise ReportError(f"no metrics history in {run_dir} ({history_path(run_dir)} is missing or has no "
                          f"steps): is it a run dir, and has its run taken a step?")
    out = out or storage.join(run_dir, REPORT_DIR)
    storage.open_storage(out).makedirs()
    for name, plot in zip(PLOTS, (plot_loss, plot_error, plot_throughput, plot_time_breakdown)):
        storage.open_storage(storage.join(out, name)).write_bytes(png_bytes(plot(history)))
    storage.open_storage(storage.join(out, "report.md")).write_bytes(markdown(history, run_dir).encode())
    return out
