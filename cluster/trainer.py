"""The training loop: `train()` owns epochs, evaluation, the learning-rate schedule and the
checkpoints (`Checkpointer`), starting from step 0 or a checkpoint (`Start`); each step is one
`train_step` on every actor, which runs its stage's schedule over the microbatches and steps its
optimizer."""

import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator

from cluster import checkpoint, storage
from cluster.config import TrainConfig
from cluster.metrics import Metrics
from cluster.progress import Progress, format_duration
from cluster.replica_data import ReplicaReaders
from cluster.timeline import format_summary, step_summary, write_trace
from stages.optim import MilestoneSchedule, PlateauSchedule

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss of a step was NaN or infinite (the step's update is already in the weights)."""

    def __init__(self, step: int, loss: float, note: str = "lower --lr or check the data"):
        super().__init__(f"loss is {loss} at step {step}: {note}")
        self.step, self.loss = step, loss


def make_schedule(config: TrainConfig):
    if config.lr_schedule == "milestones":
        return MilestoneSchedule(config.scaled_lr, milestones=config.lr_milestones)
    return PlateauSchedule(config.scaled_lr, patience=config.lr_patience, max_drops=config.lr_max_drops)


def prefetched(batches: Iterator, put, depth: int = 2) -> Iterator:
    """Decode the next batches on a thread and place them in the object store while actors compute.
    Yields (batch refs, seconds the loop waited for them): the data-wait of that step."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def stored(tensor):  # a tensor, one per replica, or None
        if isinstance(tensor, list):
            return [put(t) for t in tensor]
        return None if tensor is None else put(tensor)

    def produce():
        try:
            for batch in batches:
                slots.put(dataclasses.replace(batch, images=stored(batch.images), labels=stored(batch.labels),
                                              lighting=stored(batch.lighting), weights=stored(batch.weights)))
            slots.put(done)
        except BaseException as err:  # re-raised in the consumer
            slots.put(err)

    threading.Thread(target=produce, daemon=True, name="prefetch").start()
    while True:
        start = time.perf_counter()
        item = slots.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item, time.perf_counter() - start


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


class WaitShare:
    """The share of step time the loop spent waiting for the next batch (first step excluded:
    the pipeline is still filling)."""

    def __init__(self):
        self.waited = self.total = 0.0
        self.steps = 0

    def add(self, waited: float, total: float) -> None:
        self.steps += 1
        if self.steps > 1:
            self.waited, self.total = self.waited + waited, self.total + total

    @property
    def fraction(self) -> float:
        return self.waited / self.total if self.total else 0.0


def step_extras(config: TrainConfig, results: list[dict], wait_share: WaitShare) -> str:
    """The progress line's tail: exchange share, pipeline bubble, data wait."""
    extra = ""
    if config.mesh.towers > 1:
        comm = max(r["exchange_seconds"] / max(r["seconds"], 1e-9) for r in results)
        extra += f" | exchange {100 * comm:.0f}%"
    if config.mesh.stages > 1:
        extra += f" | bubble {100 * step_summary(results)['bubble']:.0f}%"
    return extra + f" | data wait {100 * wait_share.fraction:.0f}%"


def replica_total(results: list[dict], ranks: list[int], key: str) -> float | None:
    """`key`'s sum over the replicas' reports (`ranks`: each replica's loss rank), if reported:
    e.g. the global batch's top-1 hits, which Progress divides by the global batch's images."""
    values = [results[rank].get(key) for rank in ranks]
    return None if values[0] is None else sum(values)


def evaluate(workers, loader: ReplicaReaders) -> tuple[float, float, float]:
    """Mean loss, top-1 and top-5 accuracy over the whole validation split (centre crop, or the
    ten views with --eval-views 10; padding rows weigh 0)."""
    totals = {"loss_sum": 0.0, "top1": 0, "top5": 0, "images": 0}
    for batch, _ in prefetched(loader.epoch_batches(0), workers.put):
        result = workers.evaluate(batch.images, batch.labels, batch.weights)
        for key in totals:
            totals[key] += result[key]
    n = max(totals["images"], 1)
    return totals["loss_sum"] / n, totals["top1"] / n, totals["top5"] / n


@dataclasses.dataclass
class Start:
    """Where a run begins: step 0, or a checkpoint's position and loop state."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0  # of `epoch`; batches_per_epoch: the epoch's steps are all done
    trainer: dict = dataclasses.field(default_factory=dict)  # schedule state, the epoch's loss sum
    directory: str = ""  # the checkpoint it comes from
    reshape: bool = False  # saved by a mesh of another shape: gather the network and re-split it


def total_steps(config: TrainConfig, train_data: ReplicaReaders) -> int:
    """Optimizer steps of the whole run: every epoch's batches, or --max-steps if fewer."""
    total = config.epochs * train_data.batches_per_epoch
    return min(total, config.max_steps) if config.max_steps else total


def resume_point(directory: str, manifest: dict, train_data: ReplicaReaders) -> Start:
    """The Start a checkpoint's manifest describes, its reader position checked against ours."""
    epoch, next_batch = train_data.check_state(manifest[checkpoint.KEY_LOADER])
    return Start(manifest[checkpoint.KEY_STEP], epoch, next_batch, manifest[checkpoint.KEY_TRAINER], directory)


class Checkpointer:
    """Writes checkpoints: every actor its shard, then the manifest with the reader's position
    and the loop's state, then prunes to the newest `keep_checkpoints`.

    With --async-checkpoint the actors copy their state (the stall) and write it in a thread
    while the next step runs; `finish`, called after that step, waits for the writes (more
    stall only if they are not done) and writes the manifest. Until then the checkpoint is
    incomplete and a resume takes the one before."""

    def __init__(self, config: TrainConfig, workers, train_data: ReplicaReaders, print_fn, metrics: Metrics = Metrics()):
        self.config, self.workers, self.train_data, self.print_fn = config, workers, train_data, print_fn
        self.metrics = metrics
        self.last_step = -1
        self.pending: tuple | None = None

    def save(self, step: int, epoch: int, next_batch: int, schedule, epoch_loss_sum: float,
             final: bool = False) -> str:
        directory = checkpoint.checkpoint_dir(self.config.run_dir, step)
        if step == self.last_step:
            return directory
        self.finish()
        storage.open_storage(directory).makedirs()
        manifest = {"step": step, "epoch": epoch, "loader": self.train_data.state_dict(epoch, next_batch),
                    "trainer": {"schedule": schedule.state_dict(), "epoch_loss_sum": epoch_loss_sum}}
        asynchronous = self.config.async_checkpoint and not final
        started = time.perf_counter()
        entries = self.workers.call("save", directory, asynchronous)
        self.pending = (directory, manifest, None if asynchronous else entries, time.perf_counter() - started, started)
        self.last_step = step
        if not asynchronous:
            self.finish()
        return directory

    def finish(self) -> None:
        """Complete the pending checkpoint, if any: its shards written, then its manifest."""
        if self.pending is None:
            return
        directory, manifest, entries, stall, began = self.pending
        self.pending = None
        started = time.perf_counter()
        if entries is None:
            entries = self.workers.call("finish_save")
        stall += time.perf_counter() - started
        checkpoint.write_manifest(directory, config=self.config.to_dict(), mesh=dataclasses.asdict(self.config.mesh),
                                  shard_paths=entries, **manifest)
        checkpoint.prune(self.config.run_dir, self.config.keep_checkpoints, self.config.keep_every)
        self.print_fn(f"checkpoint: {storage.absolute(directory)} (training stalled {stall:.2f} s)")
        self.metrics.checkpoint(manifest["step"], stall, time.perf_counter() - began, entries)


def train(config: TrainConfig, workers, train_data: ReplicaReaders, val_data: ReplicaReaders,
          print_fn=print, start: Start | None = None, metrics: Metrics = Metrics()) -> TrainResult:
    start = start or Start()
    schedule = make_schedule(config)
    if start.trainer:
        schedule.load_state_dict(start.trainer["schedule"])
    lr = schedule.lr
    steps_per_epoch = train_data.batches_per_epoch
    total = total_steps(config, train_data)
    progress = Progress(total, done=start.step)
    wait_share = WaitShare()
    saver = Checkpointer(config, workers, train_data, print_fn, metrics)
    epochs: list[EpochResult] = []
    epoch, batch_index, loss_sum = start.epoch, start.next_batch, start.trainer.get("epoch_loss_sum", 0.0)
    print_fn(f"training {total} steps ({config.epochs} epochs × {steps_per_epoch}) of "
             f"{config.batch_size} images in {config.microbatches} microbatch(es) on {config.mesh.describe()}"
             + (f", {config.schedule} schedule" if config.stages > 1 else "")
             + (f"; resuming at step {start.step} (epoch {start.epoch + 1}, batch {start.next_batch})" if start.step else ""))
    loss_ranks = config.mesh.loss_ranks()  # each replica's last stage holds its loss
    for epoch in range(start.epoch, config.epochs):
        if epoch != start.epoch:
            batch_index, loss_sum = 0, 0.0
        for batch, data_wait in prefetched(metrics.decoding(train_data.epoch_batches(epoch, batch_index)), workers.put):
            if progress.steps >= total:
                break
            started = time.perf_counter()
            results = workers.train_step(batch.images, batch.labels, lr, batch.lighting, step=progress.steps + 1)
            wait_share.add(data_wait, time.perf_counter() - started + data_wait)
            loss = sum(results[rank]["loss"] for rank in loss_ranks) / len(loss_ranks)  # of the global batch
            if not math.isfinite(loss):
                raise NonFiniteLoss(progress.steps + 1, loss)
            progress.update(sum(results[rank]["images"] for rank in loss_ranks), replica_total(results, loss_ranks, "top1"))
            metrics.step(progress.steps, epoch, lr, results, data_wait, time.perf_counter() - started + data_wait)
            loss_sum, batch_index = loss_sum + loss, batch.index + 1
            if progress.steps == config.trace_step and config.stages > 1:
                where = f": {write_trace(config.trace, results, config.mesh, progress.steps)}" if config.trace else ""
                print_fn(f"step {progress.steps}{where}\n{format_summary(step_summary(results))}")
            if progress.steps % config.log_every == 0 or progress.steps == total:
                print_fn(progress.line(epoch, config.epochs, loss, lr, step_extras(config, results, wait_share)))
            saver.finish()  # an asynchronous checkpoint started before this step
            if config.checkpoint_every and progress.steps % config.checkpoint_every == 0:
                saver.save(progress.steps, epoch, batch_index, schedule, loss_sum)
        val_loss, top1, top5 = evaluate(workers, val_data)
        epochs.append(EpochResult(epoch, loss_sum / max(batch_index, 1), val_loss, top1, top5))
        finished = batch_index == steps_per_epoch
        print_fn(f"epoch {epoch + 1}/{config.epochs}{'' if finished else f' (stopped after batch {batch_index})'}: "
                 f"train loss {epochs[-1].train_loss:.4f} | val loss {val_loss:.4f} | val top-1 {100 * top1:.1f}% "
                 f"| val top-5 {100 * top5:.1f}% | elapsed {format_duration(progress.clock() - progress.started)}")
        metrics.epoch(epochs[-1])
        if not finished:  # max_steps ended the run inside the epoch: its schedule step is yet to come
            break
        lr = schedule.end_epoch(epoch, 1.0 - top1)
        epoch, batch_index, loss_sum = epoch + 1, 0, 0.0
        if not config.checkpoint_every or progress.steps >= total:
            saver.save(progress.steps, epoch, batch_index, schedule, loss_sum)
        if progress.steps >= total:
            break
    directory = saver.save(progress.steps, epoch, batch_index, schedule, loss_sum, final=True)
    saver.finish()
    return TrainResult(progress.steps, epochs, directory, progress.images_per_second, wait_share.fraction)
