"""What a run measures, where it goes: Prometheus, the run's history and the tables a person reads.

The training loop reports to a `Metrics` at a few points: each step's per-actor results (which
the actors return anyway, so monitoring costs no extra round trip), the end of each epoch, each
complete checkpoint and each restart. The base class does nothing. `RunMetrics`, the driver's,
turns the reports into

- Prometheus metrics (`Exporter`, names below) in a registry of its own, served over HTTP from
  the driver on `--metrics-addr` for the whole run, across mesh restarts;
- the run's history, `RUN_DIR/metrics.jsonl` (cluster/telemetry/history.py), for plots and tables;
- a summary table at the end of each epoch and of the run.

Names follow Prometheus's conventions: prefix `alexnet_`, base units (`_seconds`, `_bytes`),
`_total` for counters, `_ratio` for shares in [0, 1]. Actor metrics carry `replica`, `stage` and
`tower` labels (one series per actor); bad samples `split` and `reason` (the loader's fixed
reasons); restarts `cause` (RESTART_CAUSES). Per-actor phase seconds split each step's loop time
into the disjoint phases of cluster/telemetry/step.py, so they stack.
"""

import collections
import importlib.metadata
import logging
import math
import platform
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector,
                               generate_latest, start_http_server)

from cluster.ckpt import storage
from cluster.rank.loader import LoadReport
from cluster.telemetry.history import HistoryWriter, read_history
from cluster.telemetry.progress import RATE_WINDOW, Progress, format_duration
from cluster.telemetry.step import PHASES, StepSummary, Totals

log = logging.getLogger(__name__)

PREFIX = "alexnet"
ACTOR_LABELS = ("replica", "stage", "tower")
RESTART_CAUSES = ("actor_died", "loader_timeout", "collective_timeout", "collective_failed", "nonfinite_loss")
SNAPSHOT_FILE = "metrics.prom"  # the exporter's last values, in the text format, at the end of the run

_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0)
_CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """Where the training loop reports. This base does nothing (a run without monitoring)."""

    def begin(self, step: int, epoch: int, resumed_from: str = "") -> None:
        """An attempt starts at `step` (0 or its checkpoint's), in 0-based `epoch`."""

    def loaded(self, reports: list[LoadReport]) -> None:
        """The loaders made a batch for every replica (training or evaluation): their reports."""

    def step(self, summary: StepSummary, progress: Progress) -> None:
        """A step is done (cluster/telemetry/step.py); `progress` has the run's rate and ETA."""

    def epoch(self, result) -> None:
        """Epoch `result.epoch` (0-based) is evaluated: a trainer.EpochResult."""

    def checkpoint(self, step: int, stall: float, duration: float, entries: list[dict]) -> None:
        """A checkpoint is complete: training stalled `stall` s for it, its shards and manifest
        took `duration` s from start to finish, `entries` are its shards' manifest entries."""

    def restart(self, cause: str, detail: str = "") -> None:
        """The mesh is being rebuilt; `cause` is one of RESTART_CAUSES."""

    def finish(self) -> None:
        """The run is done."""

    def close(self) -> None:
        """Stop serving and release files (also after a failed run)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Exporter:
    """The run's Prometheus metrics, in a registry of its own (several runs may share a process,
    as tests do), and the HTTP server that serves them."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.server = None
        ProcessCollector(namespace=PREFIX, registry=r)  # the driver's resident memory, CPU seconds, ...

        def gauge(name, doc, labels=()):
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r)

        def counter(name, doc, labels=()):
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        self.run_info = Info(f"{PREFIX}_run", "the run's configuration: recipe, mesh and schedule", registry=r)
        self.build_info = Info(f"{PREFIX}_build", "versions of this project, Python, PyTorch and Ray", registry=r)
        # progress
        self.step = gauge("step", "optimizer steps done (the run's step number)")
        self.total_steps = gauge("total_steps", "optimizer steps the run will take")
        self.epoch = gauge("epoch", "the epoch being trained, 1-based")
        self.eta = gauge("eta_seconds", "estimated seconds until the last step, at the recent step rate")
        self.learning_rate = gauge("learning_rate", "the learning rate ε of the last step")
        # throughput and its time
        self.images = counter("images", "images trained on (every replica)")
        self.images_per_second = gauge("images_per_second", f"images trained per second over the last "
                                                            f"{RATE_WINDOW} steps (evaluation excluded)")
        self.step_duration = Histogram(f"{PREFIX}_step_duration_seconds", "loop time of one step: data wait, "
                                       "the step on every actor and the driver's own work", registry=r,
                                       buckets=_STEP_BUCKETS)
        self.data_wait = counter("data_wait_seconds", "seconds the loop waited for the next batch")
        self.bubble = gauge("bubble_ratio", "share of the last step's window in which actors did not "
                                            "compute, mean over actors (cluster/telemetry/timeline.py)")
        # learning
        self.train_loss = gauge("train_loss", "cross-entropy of the last step's batch")
        self.skipped_steps = counter("skipped_steps", "fp16 steps skipped because a gradient was inf or NaN (the "
                                                      "loss scale halves)")
        self.loss_scale = gauge("loss_scale", "fp16: the loss scale after the last step")
        self.train_error = gauge("train_error_ratio", "top-k error of the last step's batch", ["k"])
        self.val_loss = gauge("val_loss", "validation cross-entropy after the last epoch")
        self.val_error = gauge("val_error_ratio", "validation top-k error after the last epoch", ["k"])
        # data
        self.decoded_images = counter("decoded_images", "images the loader actors decoded (training and evaluation)")
        self.decode_seconds = counter("decode_seconds", "seconds the loader actors spent making batches")
        self.replica_data_wait = counter("replica_data_wait_seconds", "seconds the loop waited for each replica's "
                                                                      "batch from its loaders", ["replica"])
        self.decode_rate = gauge("decoded_images_per_second", f"images a loader decodes per second of its work, "
                                                              f"over the last {RATE_WINDOW} steps")
        self.bad_samples = counter("bad_samples", "samples skipped as unreadable, by split and reason",
                                   ["split", "reason"])
        # checkpoints and restarts
        self.checkpoints = counter("checkpoints", "complete checkpoints written")
        self.checkpoint_duration = Histogram(f"{PREFIX}_checkpoint_duration_seconds", "seconds from a "
                                             "checkpoint's start to its manifest", registry=r,
                                             buckets=_CHECKPOINT_BUCKETS)
        self.checkpoint_stall = Histogram(f"{PREFIX}_checkpoint_stall_seconds", "seconds training waited "
                                          "for a checkpoint", registry=r, buckets=_CHECKPOINT_BUCKETS)
        self.checkpoint_bytes = gauge("checkpoint_bytes", "bytes of the last complete checkpoint's shards")
        self.checkpoint_written = counter("checkpoint_written_bytes", "bytes of checkpoint shards written")
        self.last_checkpoint_time = gauge("last_checkpoint_timestamp_seconds", "Unix time the last complete "
                                                                               "checkpoint was finished")
        self.last_checkpoint_step = gauge("last_checkpoint_step", "step of the last complete checkpoint")
        self.restarts = counter("restarts", "times the mesh was rebuilt from a checkpoint, by cause", ["cause"])
        # actors
        self.phase_seconds = {phase: counter(f"actor_{phase}_seconds", f"each actor's {phase.replace('_', ' ')} "
                                             f"seconds (cluster/telemetry/metrics.py: the phases stack to the loop time)",
                                             ACTOR_LABELS) for phase in PHASES}
        self.exchange_bytes = counter("actor_exchange_bytes", "bytes each actor sent in the cross-tower "
                                                              "exchange", ACTOR_LABELS)
        self.actor_bubble = gauge("actor_bubble_ratio", "each actor's share of the last step's window not "
                                                        "computing", ACTOR_LABELS)
        self.activation_bytes = gauge("actor_peak_activation_bytes", "activations each actor held at the "
                                                                     "last step's peak", ACTOR_LABELS)
        self.rss = gauge("actor_resident_memory_bytes", "each actor process's resident memory", ACTOR_LABELS)
        self.device_allocated = gauge("actor_device_memory_allocated_bytes", "GPU memory each actor's "
                                                                             "tensors hold", ACTOR_LABELS)
        self.device_reserved = gauge("actor_device_memory_reserved_bytes", "GPU memory PyTorch's caching "
                                                                           "allocator reserved", ACTOR_LABELS)
        self.device_utilization = gauge("actor_device_utilization_ratio", "share of the last sample period "
                                                                          "the actor's GPU was busy (NVML)",
                                        ACTOR_LABELS)
        for gauge_ in (self.images_per_second, self.train_loss, self.val_loss, self.eta, self.bubble, self.decode_rate,
                       self.checkpoint_bytes, self.last_checkpoint_time, self.last_checkpoint_step):
            gauge_.set(math.nan)  # no measurement yet (not 0)
        for k in ("1", "5"):
            self.train_error.labels(k).set(math.nan)
            self.val_error.labels(k).set(math.nan)
        for cause in RESTART_CAUSES:
            self.restarts.labels(cause)  # present at 0

    def describe_run(self, config) -> None:
        mesh = config.mesh
        self.run_info.info({"recipe": config.recipe, "variant": config.variant, "mesh": f"{mesh.replicas}x"
                            f"{mesh.stages}x{mesh.towers}", "replicas": str(mesh.replicas), "stages": str(mesh.stages),
                            "towers": str(mesh.towers), "schedule": config.schedule,
                            "microbatches": str(config.microbatches), "batch_size": str(config.batch_size),
                            "image_size": str(config.image_size)})
        self.build_info.info({"version": _version("alexnet-towers"), "python": platform.python_version(),
                              "torch": _version("torch"), "ray": _version("ray"),
                              "prometheus_client": _version("prometheus-client")})

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics on host:port (port 0: a free one); when the port is taken, on a free one
        with a warning (training matters more than the port). Returns the URL."""
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            if port == 0:
                raise
            log.warning("metrics port %s:%d is not free (%s): serving on a free port instead", host, port, err)
            self.server, _ = start_http_server(0, addr=host, registry=self.registry)
        bound = self.server.server_address[1]
        return f"http://{'[' + host + ']' if ':' in host else host}:{bound}/metrics"

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class RunMetrics(Metrics):
    """The driver's metrics: Prometheus (unless --metrics-addr off), the history in the run dir and
    the epoch and run summary tables. `train_data`/`val_data` are the readers (their bad-sample
    counts); `total_steps` the run's step total."""

    def __init__(self, config, train_data, val_data, total_steps: int, print_fn=print):
        self.config, self.mesh, self.print_fn = config, config.mesh, print_fn
        self.readers = {"train": train_data, "val": val_data}
        self.total_steps, self.steps_per_epoch = total_steps, train_data.batches_per_epoch
        self.history = HistoryWriter(config.run_dir)
        self.exporter = None
        self.url = ""
        if config.metrics_endpoint is not None:
            self.exporter = Exporter()
            self.exporter.describe_run(config)
            self.exporter.total_steps.set(total_steps)
            self.url = self.exporter.serve(*config.metrics_endpoint)
            print_fn(f"metrics: Prometheus metrics on {self.url}")
        self._bad_seen: dict = collections.Counter()
        self._decoded = [0, 0.0]  # images the loaders decoded, and their seconds making batches
        self.decoded_by_loader: collections.Counter = collections.Counter()  # (replica, loader) → images
        self._lr = config.lr
        self._reset(0, 0)

    def _reset(self, step: int, epoch: int) -> None:
        """The state of one attempt (rates restart with it)."""
        self._step, self._epoch = step, epoch
        self._interval, self._epoch_totals = Totals(), Totals()
        self._decode_window: collections.deque = collections.deque(maxlen=RATE_WINDOW)  # (images, seconds)

    # --- hooks

    def begin(self, step: int, epoch: int, resumed_from: str = "") -> None:
        self._reset(step, epoch)
        self.history.write("start", step=step, epoch=epoch + 1, total_steps=self.total_steps,
                           steps_per_epoch=self.steps_per_epoch, batch_size=self.config.batch_size,
                           replicas=self.mesh.replicas, resumed_from=resumed_from, recipe=self.config.recipe)
        if self.exporter:
            self.exporter.step.set(step)
            self.exporter.epoch.set(epoch + 1)

    def loaded(self, reports: list[LoadReport]) -> None:
        for report in reports:
            self.decoded_by_loader[(report.replica, report.loader)] += report.decoded
            self._decoded[0] += report.decoded
            self._decoded[1] += report.seconds
            if self.exporter:
                self.exporter.decoded_images.inc(report.decoded)
                self.exporter.decode_seconds.inc(report.seconds)

    def step(self, summary: StepSummary, progress: Progress) -> None:
        self._step, self._epoch, self._lr = summary.step, summary.epoch, summary.lr
        for totals in (self._interval, self._epoch_totals):
            totals.add(summary)
        self._decode_window.append(tuple(self._decoded))
        if self.exporter:
            self._export_step(summary, progress)
        if summary.step % self.config.log_every == 0 or summary.step == self.total_steps:
            self.history.write("steps", step=summary.step, epoch=summary.epoch + 1, lr=summary.lr,
                               **self._interval.record())
            self._interval = Totals()

    def _export_step(self, summary: StepSummary, progress: Progress) -> None:
        e = self.exporter
        e.step.set(summary.step)
        e.epoch.set(summary.epoch + 1)
        e.learning_rate.set(summary.lr)
        e.images.inc(summary.images)
        e.images_per_second.set(progress.images_per_second)
        e.eta.set(progress.eta())
        e.step_duration.observe(summary.loop_seconds)
        e.data_wait.inc(summary.data_wait)
        for replica, wait in enumerate(summary.replica_waits):
            e.replica_data_wait.labels(str(replica)).inc(wait)
        e.bubble.set(summary.pipeline.bubble)
        e.train_loss.set(summary.loss)
        e.skipped_steps.inc(int(summary.skipped))
        if summary.loss_scale is not None:
            e.loss_scale.set(summary.loss_scale)
        if summary.hits is not None and summary.images:
            e.train_error.labels("1").set(1.0 - summary.hits[0] / summary.images)
            e.train_error.labels("5").set(1.0 - summary.hits[1] / summary.images)
        (first_images, first_seconds), (last_images, last_seconds) = self._decode_window[0], self._decode_window[-1]
        if last_seconds > first_seconds:
            e.decode_rate.set((last_images - first_images) / (last_seconds - first_seconds))
        for r, actor in zip(summary.reports, summary.pipeline.actors):
            labels = (str(r.replica), str(r.stage), str(r.tower))
            for phase, value in summary.phases[r.key].items():
                e.phase_seconds[phase].labels(*labels).inc(value)
            e.exchange_bytes.labels(*labels).inc(r.exchange_bytes)
            e.actor_bubble.labels(*labels).set(actor.bubble)
            e.activation_bytes.labels(*labels).set(r.peak_activation_bytes)
            for value, gauge in ((r.rss_bytes, e.rss), (r.device_allocated_bytes, e.device_allocated),
                                 (r.device_reserved_bytes, e.device_reserved),
                                 (r.device_utilization, e.device_utilization)):
                if value is not None:
                    gauge.labels(*labels).set(value)
        for split, reader in self.readers.items():
            for reason, count in dict(reader.read_stats.reasons).items():
                new = count - self._bad_seen[(split, reason)]
                if new > 0:
                    e.bad_samples.labels(split, reason).inc(new)
                    self._bad_seen[(split, reason)] = count

    def epoch(self, result) -> None:
        totals, self._epoch_totals = self._epoch_totals, Totals()
        finished = self._step == (result.epoch + 1) * self.steps_per_epoch
        record = totals.record()
        bad = {f"{split}/{reason}": n for split, reader in self.readers.items()
               for reason, n in sorted(dict(reader.read_stats.reasons).items())}  # a copy: the counts go on growing
        self.history.write("epoch", step=self._step, epoch=result.epoch + 1, finished=finished, lr=self._lr,
                           train_loss=result.train_loss, train_top1_error=record["top1_error"],
                           train_top5_error=record["top5_error"], val_loss=result.val_loss,
                           val_top1_error=1.0 - result.val_top1, val_top5_error=1.0 - result.val_top5,
                           images_per_second=record["images_per_second"], seconds=record["seconds"],
                           data_wait_fraction=record["data_wait_fraction"], bubble=record["bubble"],
                           bad_samples=bad, actors=record["actors"])
        if self.exporter:
            self.exporter.val_loss.set(result.val_loss)
            self.exporter.val_error.labels("1").set(1.0 - result.val_top1)
            self.exporter.val_error.labels("5").set(1.0 - result.val_top5)
        self.history.sync()
        self.print_fn(epoch_table(totals, record, sum(bad.values()), self._decode_rate(), self.mesh.replicas))

    def checkpoint(self, step: int, stall: float, duration: float, entries: list[dict]) -> None:
        size = sum(entry.get("bytes", 0) for entry in entries)
        self.history.write("checkpoint", step=step, stall=stall, duration=duration, bytes=size)
        self.history.sync()
        if self.exporter:
            e = self.exporter
            e.checkpoints.inc()
            e.checkpoint_duration.observe(duration)
            e.checkpoint_stall.observe(stall)
            e.checkpoint_bytes.set(size)
            e.checkpoint_written.inc(size)
            e.last_checkpoint_time.set(time.time())
            e.last_checkpoint_step.set(step)

    def restart(self, cause: str, detail: str = "") -> None:
        if cause not in RESTART_CAUSES:
            raise ValueError(f"restart cause must be one of {', '.join(RESTART_CAUSES)}, got {cause!r}")
        self.history.write("restart", step=self._step, cause=cause, detail=detail[:300])
        self.history.sync()
        if self.exporter:
            self.exporter.restarts.labels(cause).inc()

    def finish(self) -> None:
        self.print_fn(run_table(read_history(self.config.run_dir)))

    def close(self) -> None:
        if self.exporter:
            snapshot = storage.join(self.config.run_dir, SNAPSHOT_FILE)
            storage.open_storage(snapshot).write_bytes(self.exporter.text().encode())
            self.exporter.close()
        self.history.close()

    # --- the decode rate over the recent steps

    def _decode_rate(self) -> float:
        images, seconds = self._decoded
        return images / seconds if seconds > 0 else math.nan


# --- tables a person reads (in `ray job logs` too: plain text, fixed columns)

def _percent(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def epoch_table(totals: Totals, record: dict, bad_samples: int, decode_rate: float, replicas: int) -> str:
    """The end of an epoch: train top-k, rates, and each actor's milliseconds per step by phase."""
    n = max(totals.steps, 1)
    lines = [f"  train top-1 {_percent(1 - record['top1_error'])}, top-5 {_percent(1 - record['top5_error'])} "
             f"| {record['images_per_second']:.1f} img/s (decoding {decode_rate:.0f} img/s) "
             f"| data wait {_percent(record['data_wait_fraction'])} | bubble {_percent(record['bubble'])} "
             f"| bad samples {bad_samples}"]
    shown = [p for p in PHASES if p != "allreduce" or replicas > 1]
    lines.append(f"  {'ms per step':<24}" + "".join(f"{p.replace('_', ' '):>15}" for p in shown) + f"{'total':>15}")
    for key, phases in sorted(totals.actors.items()):
        who = (f"replica {key[0]} " if replicas > 1 else "") + f"stage {key[1]} tower {key[2]}"
        values = [phases[p] for p in shown] + [sum(phases.values())]
        lines.append(f"  {who:<24}" + "".join(f"{1000 * v / n:>15.1f}" for v in values))
    return "\n".join(lines)


def run_table(history) -> str:
    """The end of the run: one row per epoch (every attempt's, from the history), then totals."""
    epochs = history.epochs
    lines = [f"run summary: {len(epochs)} epoch(s)"]
    header = ("epoch", "train loss", "train top-1", "train top-5", "val loss", "val top-1", "val top-5", "lr",
              "img/s", "time")
    lines.append("  " + "".join(f"{h:>12}" for h in header))
    for e in epochs:
        row = (f"{e['epoch']}" + ("" if e["finished"] else "*"), f"{e['train_loss']:.4f}",
               _percent(1 - e["train_top1_error"]), _percent(1 - e["train_top5_error"]), f"{e['val_loss']:.4f}",
               _percent(1 - e["val_top1_error"]), _percent(1 - e["val_top5_error"]), f"{e['lr']:.3g}",
               f"{e['images_per_second']:.1f}", format_duration(e["seconds"]))
        lines.append("  " + "".join(f"{c:>12}" for c in row))
    seconds = sum(s["seconds"] for s in history.steps)
    images = sum(s["images"] for s in history.steps)
    causes = collections.Counter(r["cause"] for r in history.restarts)
    last = history.checkpoints[-1]["step"] if history.checkpoints else None
    lines.append(f"  {history.steps[-1]['step'] if history.steps else 0} steps, {format_duration(seconds)} of "
                 f"training, {images / seconds if seconds else 0:.1f} img/s; {len(history.checkpoints)} "
                 f"checkpoint(s)" + (f", the last at step {last}" if last is not None else "")
                 + f"; {sum(causes.values())} restart(s)"
                 + (f" ({', '.join(f'{n} {c}' for c, n in sorted(causes.items()))})" if causes else "")
                 + ("; * an epoch cut short by --max-steps" if any(not e["finished"] for e in epochs) else ""))
    return "\n".join(lines)
