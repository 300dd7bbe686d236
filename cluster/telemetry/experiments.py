"""The paper's experiments: which runs each one trains, what the paper measured, and the tables and
figures of the results (`python -m cluster.experiments`, cluster/experiments.py, trains the runs).

Each experiment compares the paper's network (the baseline) with variants that differ in one
switch, trained with the same recipe, seed and data:

| experiment | variant                                  | the paper (error rates, percentage points)          |
|------------|------------------------------------------|-----------------------------------------------------|
| activation | tanh instead of ReLU (`--activation`)    | Figure 1: ReLU reaches 25% training error ~6× sooner |
| towers     | one tower, half the kernels (`--net`)    | §6: one tower +1.7 top-1, +1.2 top-5                 |
| lrn        | no LRN (`--lrn off`)                     | §6: +1.4, +1.2                                       |
| pooling    | 2×2 stride-2 pooling (`--pooling`)       | §6: +0.4, +0.3                                       |
| all        | the four                                 |                                                      |
| dropout    | inverted dropout (`--dropout-style`)     | none: the paper's own form is the baseline (§4.2)    |

The results come from each run's history (RUN_DIR/<variant>/metrics.jsonl,
cluster/telemetry/history.py): the last epoch's validation errors, and every epoch's training
error for the curves. `write_experiment` writes RUN_DIR/experiments/NAME.md — variant, parameters,
val top-1 and top-5 error, Δ vs the baseline and the paper's Δ — and NAME.png: for `activation`
Figure 1 (training error rate against epochs, ReLU solid, tanh dashed, and the epochs each takes
to reach 25%), for the others the training and validation error of every run.
"""

import dataclasses
import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cluster.ckpt import storage
from cluster.telemetry.history import read_history
from cluster.telemetry.plots import png_bytes
from stages.config import SWITCHES

EXPERIMENTS_DIR = "experiments"
FIGURE1_THRESHOLD = 0.25  # Figure 1: epochs to reach 25% training error
FIGURE1_PAPER = "ReLU about 6× sooner, with a 4-layer net on CIFAR-10"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  # its run dir under RUN_DIR, and its row
    flags: tuple[str, ...]  # the driver flags that make it, on top of every run's
    what: str
    paper_delta: tuple[float, float] | None = None  # §6: (top-1, top-5) error change, percentage points
    paper_note: str = "—"  # what the paper measured instead, when it gives no Δ


BASELINE = Variant("baseline", (), "the paper's network: ReLU, LRN, overlapping pooling, two towers")
VARIANTS = {v.name: v for v in (
    Variant("tanh", ("--activation", "tanh"), "tanh instead of ReLU (§3.1)",
            paper_note="Figure 1: training speed, below"),
    Variant("one-tower-half", ("--net", "one-tower-half", "--towers", "1"),
            "one tower, half the kernels in conv1-conv4 (§3.2)", (1.7, 1.2)),
    Variant("no-lrn", ("--lrn", "off"), "no local response normalization (§3.3)", (1.4, 1.2)),
    Variant("non-overlapping", ("--pooling", "non-overlapping"), "2×2 stride-2 pooling, not 3×3 (§3.4)", (0.4, 0.3)),
    Variant("inverted-dropout", ("--dropout-style", "inverted"),
            "torch.nn.Dropout: the kept units ×2 in training, nothing at test (§4.2 scales at test)"),
)}
ABLATIONS = {"activation": ("tanh",), "towers": ("one-tower-half",), "lrn": ("no-lrn",),
             "pooling": ("non-overlapping",)}
EXPERIMENTS = {**ABLATIONS, "all": tuple(name for names in ABLATIONS.values() for name in names),
               "dropout": ("inverted-dropout",)}
SWITCH_FLAGS = tuple(f"--{name.replace('_', '-')}" for name in SWITCHES)  # what the experiments vary


def runs(experiment: str) -> list[Variant]:
    """The baseline, then the experiment's variants."""
    return [BASELINE] + [VARIANTS[name] for name in EXPERIMENTS[experiment]]


@dataclasses.dataclass
class Result:
    """One run's outcome, from its history."""

    variant: Variant
    parameters: int
    epochs: list[dict]  # the history's epoch records, in order

    @property
    def val_errors(self) -> tuple[float, float]:
        """The last epoch's validation top-1 and top-5 error (NaN before any epoch)."""
        if not self.epochs:
            return math.nan, math.nan
        return self.epochs[-1]["val_top1_error"], self.epochs[-1]["val_top5_error"]

    def epochs_to(self, error: float) -> float | None:
        """The (fractional) epoch at which the training top-1 error first reaches `error`,
        linearly between the epochs before and after; None if no epoch reaches it."""
        previous = None
        for record in self.epochs:
            value = record["train_top1_error"]
            if value <= error:
                if previous is None or previous[1] == value:
                    return float(record["epoch"])
                (epoch, before) = previous
                return epoch + (before - error) / (before - value)
            previous = (record["epoch"], value)
        return None


def read_result(run_dir: str, variant: Variant, parameters: int) -> Result:
    return Result(variant, parameters, read_history(run_dir).epochs)


def _percent(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}%"


def _delta(ours: tuple[float, float], base: tuple[float, float]) -> str:
    return " / ".join(f"{100 * (a - b):+.1f}" for a, b in zip(ours, base))


def table(results: list[Result]) -> list[str]:
    """The markdown table: the first result is the baseline."""
    base = results[0].val_errors
    lines = ["| variant | parameters | epochs | val top-1 err | val top-5 err | Δ vs baseline (top-1 / top-5) "
             "| the paper's Δ (§6) |", "|---|---|---|---|---|---|---|"]
    for result in results:
        errors = result.val_errors
        ours = "—" if result is results[0] else _delta(errors, base)
        paper = result.variant.paper_delta
        theirs = " / ".join(f"{d:+.1f}" for d in paper) if paper else result.variant.paper_note
        lines.append(f"| {result.variant.name}: {result.variant.what} | {result.parameters:,} | {len(result.epochs)} "
                     f"| {_percent(errors[0])} | {_percent(errors[1])} | {ours} | {theirs} |")
    return lines


def figure1_summary(results: list[Result]) -> str:
    """Figure 1's number: epochs to 25% training error with ReLU and tanh, and their ratio."""
    relu = next(r for r in results if r.variant is BASELINE)
    tanh = next(r for r in results if r.variant.name == "tanh")
    epochs = len(tanh.epochs)
    to_relu, to_tanh = relu.epochs_to(FIGURE1_THRESHOLD), tanh.epochs_to(FIGURE1_THRESHOLD)
    said = (f"epochs to {100 * FIGURE1_THRESHOLD:.0f}% training error: ReLU "
            f"{f'{to_relu:.1f}' if to_relu else f'not reached in {len(relu.epochs)}'}, tanh "
            f"{f'{to_tanh:.1f}' if to_tanh else f'not reached in {epochs}'}")
    if to_relu and to_tanh:
        said += f": ReLU {to_tanh / to_relu:.1f}× sooner"
    elif to_relu:
        said += f": ReLU more than {epochs / to_relu:.1f}× sooner"
    return said + f" (the paper: {FIGURE1_PAPER})"


def summary(experiment: str, results: list[Result]) -> list[str]:
    """One line a variant, and Figure 1's for `activation` (what the command prints at the end)."""
    base = results[0].val_errors
    lines = [f"{experiment}: baseline val top-1 error {_percent(base[0])}, top-5 {_percent(base[1])}"]
    for result in results[1:]:
        paper = result.variant.paper_delta
        lines.append(f"{experiment}: {result.variant.name} val top-1 error {_percent(result.val_errors[0])}, top-5 "
                     f"{_percent(result.val_errors[1])}: Δ {_delta(result.val_errors, base)}"
                     + (f" (the paper's: {paper[0]:+.1f} / {paper[1]:+.1f})" if paper else ""))
    if any(r.variant.name == "tanh" for r in results):
        lines.append(f"{experiment}: {figure1_summary(results)}")
    return lines


def _epoch_curve(ax, result: Result, key: str, style: str, label: str) -> None:
    ax.plot([e["epoch"] for e in result.epochs], [100 * e[key] for e in result.epochs], style, label=label)


def plot_figure1(results: list[Result]) -> Figure:
    """Figure 1: training error rate against epochs, ReLU solid, tanh dashed."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for result in results:
        relu = result.variant is BASELINE
        _epoch_curve(ax, result, "train_top1_error", "-" if relu else "--", "ReLU" if relu else "tanh")
    ax.axhline(100 * FIGURE1_THRESHOLD, color="grey", linewidth=1, linestyle=":", label="25%")
    ax.set(xlabel="epochs", ylabel="training error rate (%)", ylim=(0, 100),
           title="Figure 1: ReLU (solid) and tanh (dashed)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_comparison(experiment: str, results: list[Result]) -> Figure:
    """Training and validation top-1 error of every run per epoch; the baseline solid."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    train_ax, val_ax = fig.subplots(1, 2, sharey=True)
    for result in results:
        style = "o-" if result.variant is BASELINE else "s--"
        _epoch_curve(train_ax, result, "train_top1_error", style, result.variant.name)
        _epoch_curve(val_ax, result, "val_top1_error", style, result.variant.name)
    train_ax.set(xlabel="epoch", ylabel="top-1 error (%)", title=f"{experiment}: training", ylim=(0, 100))
    val_ax.set(xlabel="epoch", title=f"{experiment}: validation")
    for ax in (train_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def write_experiment(run_root: str, experiment: str, results: list[Result], command: str) -> tuple[str, str]:
    """RUN_ROOT/experiments/NAME.md and NAME.png; returns their locations."""
    out = storage.join(run_root, EXPERIMENTS_DIR)
    storage.open_storage(out).makedirs()
    png, md = storage.join(out, f"{experiment}.png"), storage.join(out, f"{experiment}.md")
    figure = plot_figure1(results) if experiment == "activation" else plot_comparison(experiment, results)
    storage.open_storage(png).write_bytes(png_bytes(figure))
    lines = [f"# Experiment `{experiment}`", "", f"`{command}`", "",
             "Every run: the same recipe, seed and data; its run dir is "
             f"`{storage.join(run_root, '<variant>')}`. Errors are the last epoch's on the validation "
             "split; Δ is in percentage points.", "", *table(results), ""]
    if experiment == "activation":
        lines += [figure1_summary(results) + ".", ""]
    lines += [f"![{experiment}]({experiment}.png)", ""]
    storage.open_storage(md).write_bytes("\n".join(lines).encode())
    return md, png
