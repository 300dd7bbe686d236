"""What a run measures, where it goes: Prometheus, the run's history and the tables a person reads.

The training loop reports to a `Metrics` at a few points: each step's per-actor results (which
the actors return anyway, so monitoring costs no extra round trip), the end of each epoch, each
complete checkpoint and each restart. The base class does nothing. `RunMetrics`, the driver's,
turns the reports into

- Prometheus metrics (`Exporter`, names below) in a registry of its own, served over HTTP from
  the driver on `--metrics-addr` for the whole run, across mesh restarts;
- the run's history, `RUN_DIR/metrics.jsonl` (cluster/history.py), for plots and tables;
- a summary table at the end of each epoch and of the run.

Names follow Prometheus's conventions: prefix `alexnet_`, base units (`_seconds`, `_bytes`),
`_total` for counters, `_ratio` for shares in [0, 1]. Actor metrics carry `replica`, `stage` and
`tower` labels (one series per actor); bad samples `split` and `reason` (the loader's fixed
reasons); restarts `cause` (RESTART_CAUSES). Per-actor phase seconds split each step's loop time
(data wait + the step on the actors + the driver's own work) into disjoint parts, so they stack:
`compute` (forward and backward, exchange excluded), `exchange` (the cross-tower collectives),
`pipeline_wait` (waiting for a neighbouring stage), `allreduce` (waiting for the replicas'
gradient all-reduce after backward), `data_wait` (the driver waiting for the batch) and `other`
(optimizer step, input normalisation, dispatch, checkpoint stalls).
"""

import collections
import dataclasses
import importlib.metadata
import logging
import math
import platform
import time
from collections.abc import Iterable, Iterator

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector,
                               generate_latest, start_http_server)

from cluster import storage
from cluster.history import HistoryWriter, read_history
from cluster.progress import format_duration
from cluster.timeline import step_summary

log = logging.getLogger(__name__)

PREFIX = "alexnet"
ACTOR_LABELS = ("replica", "stage", "tower")
PHASES = ("compute", "exchange", "pipeline_wait", "allreduce", "data_wait", "other")
RESTART_CAUSES = ("actor_died", "collective_timeout", "collective_failed", "nonfinite_loss")
SNAPSHOT_FILE = "metrics.prom"  # the exporter's last values, in the text format, at the end of the run
RATE_WINDOW = 20  # steps over which images/s, decoded images/s and the ETA are measured

_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0)
_CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """Where the training loop reports. This base does nothing (a run without monitoring)."""

    def begin(self, step: int, epoch: int, resumed_from: str = "") -> None:
        """An attempt starts at `step` (0 or its checkpoint's), in 0-based `epoch`."""

    def decoding(self, batches: Iterable) -> Iterable:
        """`batches`, timed as they are decoded (for decoded images/s)."""
        return batches

    def step(self, step: int, epoch: int, lr: float, results: list[dict], data_wait: float,
             seconds: float) -> None:
        """Step `step` (1-based) is done: every actor's train_step result, the seconds the loop
        waited for the batch, and the step's seconds from that wait to the results."""

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
                                            "compute, mean over actors (cluster/timeline.py)")
        # learning
        self.train_loss = gauge("train_loss", "cross-entropy of the last step's batch")
        self.train_error = gauge("train_error_ratio", "top-k error of the last step's batch", ["k"])
        self.val_loss = gauge("val_loss", "validation cross-entropy after the last epoch")
        self.val_error = gauge("val_error_ratio", "validation top-k error after the last epoch", ["k"])
        # data
        self.decoded_images = counter("decoded_images", "training images decoded by the driver's reader")
        self.decode_seconds = counter("decode_seconds", "seconds the reader spent decoding training batches")
        self.decode_rate = gauge("decoded_images_per_second", f"training images decoded per second of "
                                                              f"decoding, over the last {RATE_WINDOW} steps")
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
                                             f"seconds (cluster/metrics.py: the phases stack to the loop time)",
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


@dataclasses.dataclass
class Totals:
    """Sums over some steps (a log interval, an epoch)."""

    steps: int = 0
    images: int = 0
    seconds: float = 0.0  # loop time
    data_wait: float = 0.0
    loss_sum: float = 0.0
    scored: int = 0  # images whose top-k hits the actors reported
    hits1: float = 0.0
    hits5: float = 0.0
    bubble_sum: float = 0.0
    actors: dict = dataclasses.field(default_factory=dict)  # (replica, stage, tower) -> {phase: seconds}

    def add(self, images: int, seconds: float, data_wait: float, loss: float, hits: tuple | None,
            bubble: float, phases: dict) -> None:
        self.steps += 1
        self.images += images
        self.seconds += seconds
        self.data_wait += data_wait
        self.loss_sum += loss
        self.bubble_sum += bubble
        if hits is not None:
            self.scored += images
            self.hits1 += hits[0]
            self.hits5 += hits[1]
        for key, values in phases.items():
            mine = self.actors.setdefault(key, dict.fromkeys(PHASES, 0.0))
            for phase, value in values.items():
                mine[phase] += value

    def error(self, k: int) -> float:
        if not self.scored:
            return math.nan
        return 1.0 - (self.hits1 if k == 1 else self.hits5) / self.scored

    def record(self) -> dict:
        """The history's fields for these steps: means per step, images/s, seconds per actor phase."""
        n = max(self.steps, 1)
        return {"steps": self.steps, "images": self.images, "seconds": self.seconds,
                "loss": self.loss_sum / n, "top1_error": self.error(1), "top5_error": self.error(5),
                "images_per_second": self.images / self.seconds if self.seconds > 0 else math.nan,
                "data_wait_fraction": self.data_wait / self.seconds if self.seconds > 0 else 0.0,
                "bubble": self.bubble_sum / n,
                "actors": [{"replica": key[0], "stage": key[1], "tower": key[2], **phases}
                           for key, phases in sorted(self.actors.items())]}


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
        self._decoded = [0, 0.0]  # images, seconds (the prefetch thread adds)
        self._lr = config.lr
        self._reset(0, 0)

    def _reset(self, step: int, epoch: int) -> None:
        """The state of one attempt (rates restart with it)."""
        self._step, self._epoch = step, epoch
        self._interval, self._epoch_totals = Totals(), Totals()
        self._window: collections.deque = collections.deque(maxlen=RATE_WINDOW)  # (seconds, images)
        self._decode_window: collections.deque = collections.deque(maxlen=RATE_WINDOW)  # (images, seconds)
        self._last_time: float | None = None

    # --- hooks

    def begin(self, step: int, epoch: int, resumed_from: str = "") -> None:
        self._reset(step, epoch)
        self.history.write("start", step=step, epoch=epoch + 1, total_steps=self.total_steps,
                           steps_per_epoch=self.steps_per_epoch, batch_size=self.config.batch_size,
                           replicas=self.mesh.replicas, resumed_from=resumed_from, recipe=self.config.recipe)
        if self.exporter:
            self.exporter.step.set(step)
            self.exporter.epoch.set(epoch + 1)

    def decoding(self, batches: Iterable) -> Iterator:
        it = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            parts = batch.images if isinstance(batch.images, list) else [batch.images]  # one per replica
            seconds, images = time.perf_counter() - started, sum(int(part.shape[0]) for part in parts)
            self._decoded[0] += images
            self._decoded[1] += seconds
            if self.exporter:
                self.exporter.decoded_images.inc(images)
                self.exporter.decode_seconds.inc(seconds)
            yield batch

    def step(self, step: int, epoch: int, lr: float, results: list[dict], data_wait: float,
             seconds: float) -> None:
        now = time.perf_counter()
        loop_seconds = max(now - self._last_time, seconds) if self._last_time is not None else seconds
        self._last_time = now
        self._step, self._epoch, self._lr = step, epoch, lr
        coords = [self.mesh.coord(r["rank"]) for r in results]
        heads = [results[rank] for rank in self.mesh.loss_ranks()]  # results are in rank order
        images = sum(r["images"] for r in heads)  # every replica's batch
        loss = sum(r["loss"] for r in heads) / len(heads)
        hits = None
        if all("top1" in r for r in heads):
            hits = (sum(r["top1"] for r in heads), sum(r["top5"] for r in heads))
        summary = step_summary(results)
        phases = {}
        for coord, r in zip(coords, results):
            exchange, allreduce = r.get("exchange_seconds", 0.0), r.get("allreduce_exposed_s", 0.0)
            phases[(coord.replica, coord.stage, coord.tower)] = {
                "compute": max(r["compute_s"] - exchange, 0.0), "exchange": exchange, "pipeline_wait": r["wait_s"],
                "allreduce": allreduce, "data_wait": data_wait,
                "other": max(loop_seconds - data_wait - r["compute_s"] - r["wait_s"] - allreduce, 0.0)}
        for totals in (self._interval, self._epoch_totals):
            totals.add(images, loop_seconds, data_wait, loss, hits, summary["bubble"], phases)
        self._window.append((loop_seconds, images))
        self._decode_window.append(tuple(self._decoded))
        if self.exporter:
            self._export_step(step, epoch, lr, images, loop_seconds, data_wait, loss, hits, summary, results,
                              coords, phases)
        if step % self.config.log_every == 0 or step == self.total_steps:
            self.history.write("steps", step=step, epoch=epoch + 1, lr=lr, **self._interval.record())
            self._interval = Totals()

    def _export_step(self, step, epoch, lr, images, loop_seconds, data_wait, loss, hits, summary, results,
                     coords, phases) -> None:
        e = self.exporter
        e.step.set(step)
        e.epoch.set(epoch + 1)
        e.learning_rate.set(lr)
        e.images.inc(images)
        e.images_per_second.set(self.images_per_second)
        e.eta.set(self.eta_seconds)
        e.step_duration.observe(loop_seconds)
        e.data_wait.inc(data_wait)
        e.bubble.set(summary["bubble"])
        e.train_loss.set(loss)
        if hits is not None and images:
            e.train_error.labels("1").set(1.0 - hits[0] / images)
            e.train_error.labels("5").set(1.0 - hits[1] / images)
        (first_images, first_seconds), (last_images, last_seconds) = self._decode_window[0], self._decode_window[-1]
        if last_seconds > first_seconds:
            e.decode_rate.set((last_images - first_images) / (last_seconds - first_seconds))
        for coord, r, actor in zip(coords, results, summary["actors"]):
            labels = (str(coord.replica), str(coord.stage), str(coord.tower))
            for phase, value in phases[(coord.replica, coord.stage, coord.tower)].items():
                e.phase_seconds[phase].labels(*labels).inc(value)
            e.exchange_bytes.labels(*labels).inc(r.get("exchange_bytes", 0))
            e.actor_bubble.labels(*labels).set(actor["bubble"])
            e.activation_bytes.labels(*labels).set(r["peak_activation_bytes"])
            for key, gauge in (("rss_bytes", e.rss), ("device_allocated_bytes", e.device_allocated),
                               ("device_reserved_bytes", e.device_reserved),
                               ("device_utilization", e.device_utilization)):
                if key in r:
                    gauge.labels(*labels).set(r[key])
        for split, reader in self.readers.items():
            for reason, count in dict(reader.read_stats.reasons).items():
                new = count - self._bad_seen[(split, reason)]
                if new > 0:
                    e.bad_samples.labels(split, reason).inc(new)
                    self._bad_seen[(split, reason)] = count

    def epoch(self, result) -> None:
        self._last_time = None  # evaluation is not training time
        totals, self._epoch_totals = self._epoch_totals, Totals()
        finished = self._step == (result.epoch + 1) * self.steps_per_epoch
        record = totals.record()
        bad = {f"{split}/{reason}": n for split, reader in self.readers.items()
               for reason, n in sorted(dict(reader.read_stats.reasons).items())}  # a copy: the prefetch thread adds
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

    # --- rates over the recent steps

    @property
    def images_per_second(self) -> float:
        seconds = sum(s for s, _ in self._window)
        return sum(n for _, n in self._window) / seconds if seconds > 0 else math.nan

    @property
    def eta_seconds(self) -> float:
        if not self._window:
            return math.nan
        return sum(s for s, _ in self._window) / len(self._window) * (self.total_steps - self._step)

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
