"""The training loop: `train()` owns epochs, evaluation, the learning-rate schedule and the
checkpoints, starting from step 0 or a checkpoint (`Start`); `_train_epoch` owns the steps of one
epoch, each one `train_step` on every actor, which runs its stage's schedule over the
microbatches and steps its optimizer. Where the loop stands is one value, a `Position`."""

import dataclasses
import logging
import math
import time
from collections.abc import Callable

from cluster.ckpt import checkpoint
from cluster.ckpt.checkpointer import Checkpointer
from cluster.config import TrainConfig
from cluster.inputs import InputPlan
from cluster.launch.loaders import FedBatch
from cluster.rank.report import EvalScores
from cluster.telemetry.metrics import Metrics
from cluster.telemetry.progress import Progress, format_duration
from cluster.telemetry.step import StepSummary, Totals
from cluster.telemetry.timeline import format_summary, write_trace
from stages.optim import MilestoneSchedule, PlateauSchedule, Rates, RecordedSchedule
from stages.tower import LAYERS

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss of a step was NaN or infinite (the step's update is already in the weights)."""

    def __init__(self, step: int, loss: float, note: str = "lower --lr or check the data"):
        super().__init__(f"loss is {loss} at step {step}: {note}")
        self.step, self.loss = step, loss


def make_schedule(config: TrainConfig):
    if config.lr_schedule == "milestones":
        return MilestoneSchedule(config.scaled_lr, milestones=config.lr_milestones)
    if config.lr_schedule == "recorded":
        return RecordedSchedule(config.scaled_lr)
    return PlateauSchedule(config.scaled_lr, patience=config.lr_patience, max_drops=config.lr_max_drops)


def _rates_text(rates: Rates) -> str:
    """`weights ε 0.0001 (conv1 1e-05), biases ε 0.02 (conv1 0)`: every group's ε."""
    def exceptions(kind: str, default: float) -> str:
        odd = [f"{layer} {rates.of(layer, kind):g}" for layer in LAYERS if rates.of(layer, kind) != default]
        return f" ({', '.join(odd)})" if odd else ""

    text = f"weights ε {rates.weights:g}{exceptions('weight', rates.weights)}"
    if rates.biases is not None:
        text += f", biases ε {rates.biases:g}{exceptions('bias', rates.biases)}"
    return text


def describe_schedule(config: TrainConfig) -> list[str]:
    """The run's ε of every parameter group, and its colour noise, epoch by epoch (1-based), one
    line per run of epochs that share them: what `--show-config` prints. The plateau schedule's
    drops depend on the validation error, so it gives its first epoch's and the rule."""
    schedule = make_schedule(config)
    if config.lr_schedule == "plateau":
        return [f"from epoch 1: {_rates_text(schedule.rates(config.bias_lr))}, colour noise "
                f"{'on' if config.pca_lighting else 'off'}; the weights' ε ÷ 10 when the validation error has not "
                f"improved for {config.lr_patience} epochs, at most {config.lr_max_drops} times"]
    rows: list[tuple[int, int, str]] = []  # (first epoch, last epoch, what they share)
    for epoch in range(config.epochs):
        noise = config.pca_lighting and (config.lighting_epochs is None or epoch < config.lighting_epochs)
        text = f"{_rates_text(schedule.rates(config.bias_lr))}, colour noise {'on' if noise else 'off'}"
        if rows and rows[-1][2] == text:
            rows[-1] = (rows[-1][0], epoch + 1, text)
        else:
            rows.append((epoch + 1, epoch + 1, text))
        schedule.end_epoch(epoch, 0.0)
    return [f"epoch{'s' if a != b else ''} {a}{f'–{b}' if a != b else ''}: {text}" for a, b, text in rows]


@dataclasses.dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top5: float


@dataclasses.dataclass
class TrainResult:
    steps: int
    epochs: list[EpochResult]
    checkpoint: str
    images_per_second: float
    data_wait_fraction: float


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the loop stands: `step` optimizer steps done; the next batch to train is `batch` of
    `epoch` (0-based; `batch` = the epoch's batch count: its steps are done, its evaluation and
    schedule step are not); `loss_sum`: the epoch's losses so far."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0

    def after_step(self, loss: float) -> "Position":
        return Position(self.step + 1, self.epoch, self.batch + 1, self.loss_sum + loss)

    def next_epoch(self) -> "Position":
        return Position(self.step, self.epoch + 1, 0, 0.0)


@dataclasses.dataclass
class Start:
    """Where a run begins: step 0, or a checkpoint's position and schedule state."""

    position: Position = Position()
    schedule: dict = dataclasses.field(default_factory=dict)  # the lr schedule's state_dict
    directory: str = ""  # the checkpoint it comes from
    reshape: bool = False  # saved by a mesh of another shape: gather the network and re-split it

    @property
    def step(self) -> int:
        return self.position.step

    @property
    def epoch(self) -> int:
        return self.position.epoch


def total_steps(config: TrainConfig, train_data: InputPlan) -> int:
    """Optimizer steps of the whole run: every epoch's batches, or --max-steps if fewer."""
    total = config.epochs * train_data.batches_per_epoch
    return min(total, config.max_steps) if config.max_steps else total


def resume_point(directory: str, manifest: dict, train_data: InputPlan) -> Start:
    """The Start a checkpoint's manifest describes, its reader position checked against ours."""
    epoch, next_batch = train_data.check_state(manifest[checkpoint.KEY_LOADER])
    state = manifest[checkpoint.KEY_TRAINER]
    position = Position(manifest[checkpoint.KEY_STEP], epoch, next_batch, state.get("epoch_loss_sum", 0.0))
    return Start(position, state.get("schedule", {}), directory)


def _received(fed: FedBatch, plan: InputPlan, metrics: Metrics) -> None:
    """A batch came from the loaders: their work to the metrics, the bad samples they found to the
    plan (DataError past --max-bad-fraction)."""
    metrics.loaded(fed.reports)
    for report in fed.reports:
        plan.add_bad(report.bad)


def evaluate_scores(workers, val_data: InputPlan, metrics: Metrics = Metrics(),
                    on_batch: Callable[[int, EvalScores], None] | None = None) -> EvalScores:
    """The scores of the whole validation split (centre crop, or the ten views with --eval-views
    10; padding rows weigh 0), from the loaders; `on_batch(batches done, total so far)` after each
    batch (`python -m cluster.evaluate`'s progress bar)."""
    total = EvalScores()
    for fed in workers.batches("val", 0, 0, val_data.batches_per_epoch):
        _received(fed, val_data, metrics)
        total = total + workers.evaluate(fed.images, fed.labels, fed.weights)
        if on_batch is not None:
            on_batch(fed.index + 1, total)
    return total


def evaluate(workers, val_data: InputPlan, metrics: Metrics = Metrics()) -> tuple[float, float, float]:
    """Mean loss, top-1 and top-5 accuracy over the whole validation split (`evaluate_scores`)."""
    total = evaluate_scores(workers, val_data, metrics)
    n = max(total.images, 1)
    return total.loss_sum / n, total.top1 / n, total.top5 / n


class _Loop:
    """One attempt's loop state and what it reports to: the schedule, the checkpointer, the
    progress line, the metrics and the attempt's totals."""

    def __init__(self, config: TrainConfig, workers, train_data: InputPlan, start: Start,
                 print_fn: Callable[[str], None], metrics: Metrics):
        self.config, self.workers, self.train_data, self.print_fn, self.metrics = (
            config, workers, train_data, print_fn, metrics)
        self.schedule = make_schedule(config)
        if start.schedule:
            self.schedule.load_state_dict(start.schedule)
        self.total = total_steps(config, train_data)
        self.progress = Progress(self.total, done=start.step)
        self.run = Totals()  # this attempt's steps, its first (warm-up) left out
        self.skipped = 0  # fp16 steps of this attempt skipped for inf/NaN gradients
        self.saver = Checkpointer(config, workers, train_data, print_fn, metrics)

    def save(self, at: Position, final: bool = False) -> str:
        return self.saver.save(at.step, at.epoch, at.batch,
                               {"schedule": self.schedule.state_dict(), "epoch_loss_sum": at.loss_sum}, final)

    def report(self, summary: StepSummary) -> None:
        """The step to the progress line, the metrics, and (at --trace-step) the pipeline timeline."""
        config = self.config
        self.progress.update(summary.images, summary.loop_seconds, summary.hits[0] if summary.hits else None)
        self.skipped += summary.skipped
        if self.progress.attempt_steps > 1:  # the attempt's first step pays for warm-up
            self.run.add(summary)
        self.metrics.step(summary, self.progress)
        if summary.step == config.trace_step and config.stages > 1:
            where = f": {write_trace(config.trace, summary.reports, config.mesh, summary.step)}" if config.trace else ""
            self.print_fn(f"step {summary.step}{where}\n{format_summary(summary.pipeline)}")
        if summary.step % config.log_every == 0 or summary.step == self.total:
            extra = f" | exchange {100 * summary.exchange_share:.0f}%" if config.mesh.towers > 1 else ""
            if config.mesh.stages > 1:
                extra += f" | bubble {100 * summary.pipeline.bubble:.0f}%"
            if summary.loss_scale is not None:
                extra += f" | loss scale {summary.loss_scale:g}, skipped {self.skipped}"
            extra += f" | data wait {100 * self.run.data_wait_fraction:.0f}%"
            if config.mesh.replicas > 1:
                extra += " (" + ", ".join(f"r{r} {100 * share:.0f}%"
                                          for r, share in enumerate(self.run.replica_data_wait_fractions)) + ")"
            self.print_fn(self.progress.line(summary.epoch, config.epochs, summary.loss, summary.lr, extra))


def _train_epoch(loop: _Loop, at: Position) -> Position:
    """The steps of `at.epoch` from `at.batch` on, until the epoch or the run's steps end."""
    config, workers = loop.config, loop.workers
    rates = loop.schedule.rates(config.bias_lr)  # every parameter group's ε this epoch
    lr = rates.weights
    last = min(loop.train_data.batches_per_epoch, at.batch + loop.total - at.step)  # no batch past the run
    tick = time.perf_counter()  # the end of the previous step: loop time counts from here
    for fed in workers.batches("train", at.epoch, at.batch, last):
        _received(fed, loop.train_data, loop.metrics)
        reports = workers.train_step(fed.images, fed.labels, lr, fed.lighting, step=at.step + 1, rates=rates)
        now = time.perf_counter()
        summary = StepSummary.reduce(reports, config.mesh, step=at.step + 1, epoch=at.epoch, lr=lr,
                                     data_wait=fed.data_wait, loop_seconds=now - tick)
        tick = now
        if not math.isfinite(summary.loss):
            raise NonFiniteLoss(summary.step, summary.loss)
        at = at.after_step(summary.loss)
        loop.report(summary)
        loop.saver.finish()  # an asynchronous checkpoint started before this step
        if loop.saver.due(at.step, epoch_end=False):
            loop.save(at)
    return at


def train(config: TrainConfig, workers, train_data: InputPlan, val_data: InputPlan,
          print_fn=print, start: Start | None = None, metrics: Metrics = Metrics()) -> TrainResult:
    start = start or Start()
    loop = _Loop(config, workers, train_data, start, print_fn, metrics)
    steps_per_epoch = train_data.batches_per_epoch
    print_fn(f"training {loop.total} steps ({config.epochs} epochs × {steps_per_epoch}) of "
             f"{config.batch_size} images in {config.microbatches} microbatch(es) on {config.mesh.describe()}"
             + (f", {config.schedule} schedule" if config.stages > 1 else "")
             + (f"; resuming at step {start.step} (epoch {start.epoch + 1}, batch {start.position.batch})"
                if start.step else ""))
    epochs: list[EpochResult] = []
    at = start.position
    while at.epoch < config.epochs:
        at = _train_epoch(loop, at)
        val_loss, top1, top5 = evaluate(workers, val_data, metrics)
        epochs.append(EpochResult(at.epoch, at.loss_sum / max(at.batch, 1), val_loss, top1, top5))
        finished = at.batch == steps_per_epoch
        print_fn(f"epoch {at.epoch + 1}/{config.epochs}{'' if finished else f' (stopped after batch {at.batch})'}: "
                 f"train loss {epochs[-1].train_loss:.4f} | val loss {val_loss:.4f} | val top-1 {100 * top1:.1f}% "
                 f"| val top-5 {100 * top5:.1f}% | elapsed {format_duration(loop.progress.elapsed())}")
        metrics.epoch(epochs[-1])
        if not finished:  # max_steps ended the run inside the epoch: its schedule step is yet to come
            break
        loop.schedule.end_epoch(at.epoch, 1.0 - top1)
        at = at.next_epoch()
        if at.step >= loop.total:
            break
        if loop.saver.due(at.step, epoch_end=True):
            loop.save(at)
    directory = loop.save(at, final=True)
    loop.saver.finish()
    return TrainResult(at.step, epochs, directory, loop.progress.mean_images_per_second, loop.run.data_wait_fraction)
