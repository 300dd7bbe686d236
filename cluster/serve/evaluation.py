"""Evaluation of a trained network on a validation set, on the Ray mesh or in one process
(`python -m cluster.evaluate`), with the paper's table and the run's own figure beside it.

Both ways run the trainer's evaluation code, so their numbers are the trainer's:

- **mesh**: the tower actors of `--replicas` × `--stages` × `--towers` (by default the shape the
  checkpoint was trained with) take the network with `load_consolidated`, as a resume into
  another mesh shape does, and `cluster.trainer.evaluate_scores` runs over batches the loader
  actors make (the driver decodes nothing). Same shape and batch as training: the same
  arithmetic, so the figure is bit for bit the one the trainer logged for that checkpoint.
- **local**: one `TowerWorker` in this process, towers = 1 (the reference network,
  `TwoTowerAlexNet`), no Ray, fed by the same reader (data/loader.py `ShardBatches`) with the
  same transforms; its `evaluate` is the actors' code with the local exchange.

What can differ between the two is the order of a few float reductions: with the towers in two
processes the softmax's normaliser is a log-sum-exp of the two towers' log-sum-exps, in one it is
one log-sum-exp over all classes (stages/loss.py `sharded_view_average`), a difference in the
last bits of the log-probabilities. The loss then agrees to ~1e-6 relative; the top-1/top-5
counts agree exactly unless two classes' scores tie to within that (tests/test_evaluate.py checks
both).
"""

import dataclasses
import os
from collections.abc import Callable

from cluster.config import ConfigError, TrainConfig
from cluster.inputs import InputPlan, open_reader
from cluster.rank.pipeline import StepPlan
from cluster.rank.report import EvalScores
from cluster.serve.model import Model
from cluster.telemetry.history import read_history
from data.loader import ShardBatches
from data.shards import expand_shards

# PAPER.md §6, error rates: (setting, top-1, top-5).
PAPER_RESULTS = (
    ("ILSVRC-2012 val, 1 CNN", 0.407, 0.182),
    ("ILSVRC-2010 test, centre crop", 0.390, 0.183),
    ("ILSVRC-2010 test, 10 views", 0.375, 0.170),
)
OnBatch = Callable[[int, EvalScores], None]


class EvaluationFailed(RuntimeError):
    """The mesh could not be placed, an actor failed or a loader hung; the message is one line."""


@dataclasses.dataclass
class Result:
    """An evaluation's totals: images scored (padding and undecodable ones weigh 0), top-1/top-5
    hits and the summed loss, and the samples the reader skipped by reason."""

    images: int
    top1_hits: int
    top5_hits: int
    loss_sum: float
    bad: dict[str, int]

    @classmethod
    def of(cls, scores: EvalScores, bad: dict[str, int]) -> "Result":
        return cls(round(scores.images), round(scores.top1), round(scores.top5), scores.loss_sum, dict(bad))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def top1_error(self) -> float:
        """1 − top-1 accuracy, computed as the trainer's history records it."""
        return 1.0 - self.top1_hits / max(self.images, 1)

    @property
    def top5_error(self) -> float:
        return 1.0 - self.top5_hits / max(self.images, 1)


def evaluation_config(model: Model, val_data: str, views: int | None = None, local: bool = False,
                      **overrides) -> TrainConfig:
    """The configuration the evaluation runs with: the run's own (from the checkpoint; the
    defaults for an export) with the network's architecture and resize, `val_data`, `views`
    (default: the run's), and `overrides` (batch_size, replicas, stages, towers, ...; None: as
    trained). `local`: one process holding both towers. Raises ConfigError (one line)."""
    trained = {f.name: model.training[f.name] for f in dataclasses.fields(TrainConfig)
               if model.training and f.name in model.training}
    fields = {**trained, "variant": model.cfg.variant, "num_classes": model.cfg.num_classes,
              "image_size": model.cfg.image_size, "lrn_impl": model.cfg.lrn_impl, "resize": model.resize,
              "val_data": val_data, "train_data": trained.get("train_data") or val_data,
              **{name: value for name, value in overrides.items() if value is not None}}
    if views is not None:
        fields["eval_views"] = views
    if local:
        fields.update(replicas=1, stages=1, towers=1)
    if fields.get("stages") != trained.get("stages") and overrides.get("stage_split") is None:
        fields["stage_split"] = "flops"  # the trained split was for another stage count
    batch, m = fields.get("batch_size", TrainConfig.batch_size), fields.get("microbatches", 1)
    if fields.get("stages", 1) == 1 or batch % m:
        fields["microbatches"] = 1  # microbatches only pipeline stages; any divisor of the batch computes the same
    return TrainConfig(**fields).resolved_split()


def open_validation(config: TrainConfig) -> InputPlan:
    """The validation reader's index (no image opened): ConfigError (one line) for bad shards."""
    try:
        return InputPlan(open_reader(config, "val"), "val")
    except ValueError as err:
        raise ConfigError(f"--val-data: {err}: give validation shards (python -m data.convert makes them)") from None


def evaluate_on_mesh(config: TrainConfig, model: Model, val_data: InputPlan, on_batch: OnBatch | None = None,
                     print_fn=print) -> tuple[Result, str]:
    """The trainer's evaluation on an actor mesh of `config`'s shape: (the result, the mesh)."""
    import ray  # only for the mesh: --local runs without it

    from cluster.launch.actor_mesh import ActorMesh, PlacementError
    from cluster.launch.loaders import LoaderTimeout
    from cluster.launch.failures import failure_cause
    from cluster.launch.session import ray_session
    from cluster.trainer import evaluate_scores

    cpus = config.mesh.world_size * config.threads_per_worker + config.replicas * max(
        config.loaders_per_replica, 1) * config.loader_threads
    try:
        with ray_session(config.address, cpus) as env:
            with ActorMesh.take(config, env, readers={"val": val_data.reader}) as workers:
                print_fn(f"placement:\n{workers.placement_table()}")
                workers.load_consolidated(model.state, {})
                scores = evaluate_scores(workers, val_data, on_batch=on_batch)
    except (PlacementError, LoaderTimeout) as err:
        raise EvaluationFailed(str(err)) from None
    except ray.exceptions.RayError as err:
        raise EvaluationFailed(failure_cause(err)) from None
    return Result.of(scores, val_data.read_stats.reasons), config.mesh.describe()


def evaluate_in_process(config: TrainConfig, model: Model, reader: ShardBatches,
                        on_batch: OnBatch | None = None) -> Result:
    """The trainer's evaluation in this process: one TowerWorker holding both towers (the
    reference network) over `reader`'s batches. `config`: towers = stages = replicas = 1."""
    from cluster.rank.worker import TowerWorker

    worker = TowerWorker(config, 0)
    worker.load_consolidated((model.state, {}))
    m = config.microbatches
    plan = StepPlan("eval", m, config.batch_size // m * config.eval_views, config.schedule)
    total = EvalScores()
    try:
        for b in range(reader.batches_per_epoch):
            batch = reader.batch(0, b)
            total = total + worker.evaluate(plan, batch.images, batch.labels, batch.weights)
            if on_batch is not None:
                on_batch(b + 1, total)
    finally:
        reader.close()
    return Result.of(total, reader.read_stats.reasons)


def training_figure(model: Model) -> dict | None:
    """The run's own validation figure at training time for this network's step (or the last
    before it), from the run's history (cluster/telemetry/history.py); None without one."""
    if model.run_dir is None or model.step is None:
        return None
    try:
        epochs = [e for e in read_history(model.run_dir).epochs if e["step"] <= model.step]
    except (OSError, ValueError, KeyError):
        return None
    if not epochs:
        return None
    last = epochs[-1]
    trained = model.training or {}
    return {"step": last["step"], "epoch": last["epoch"], "top1_error": last["val_top1_error"],
            "top5_error": last["val_top5_error"], "loss": last["val_loss"], "views": trained.get("eval_views"),
            "val_data": trained.get("val_data")}


def views_name(views: int | None) -> str:
    return {1: "centre crop", 10: "10 views"}.get(views, "views unknown")


def comparison(result: Result, views: int, training: dict | None, model: Model) -> str:
    """This evaluation next to the run's figure at training time and the paper's (§6)."""
    rows = [(f"this evaluation ({views_name(views)}, {result.images} images)", result.top1_error, result.top5_error)]
    if training is not None:
        same_step = "" if training["step"] == model.step else f", not this network's step {model.step}"
        rows.append((f"this run at training time (step {training['step']}{same_step}, {views_name(training['views'])})",
                     training["top1_error"], training["top5_error"]))
    rows += [(f"paper: {setting}", top1, top5) for setting, top1, top5 in PAPER_RESULTS]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'':<{width}}  {'top-1 error':>11}  {'top-5 error':>11}"]
    lines += [f"{name:<{width}}  {100 * top1:>10.1f}%  {100 * top5:>10.1f}%" for name, top1, top5 in rows]
    return "\n".join(lines)


def result_json(result: Result, config: TrainConfig, model: Model, mode: str, mesh: str,
                training: dict | None, seconds: float) -> dict:
    """What `--json` writes."""
    return {
        "source": model.source, "checkpoint": model.checkpoint, "step": model.step, "fingerprint": model.fingerprint,
        "val_data": config.val_data, "views": config.eval_views, "mode": mode, "mesh": mesh,
        "batch_size": config.batch_size, "images": result.images, "top1_hits": result.top1_hits,
        "top5_hits": result.top5_hits, "top1_error": result.top1_error, "top5_error": result.top5_error,
        "loss": result.loss, "bad_samples": result.bad, "seconds": seconds, "training": training,
        "paper": [{"setting": setting, "top1_error": top1, "top5_error": top5} for setting, top1, top5 in PAPER_RESULTS],
        "notes": model.notes,
    }


def same_data(a: str | None, b: str | None) -> bool:
    """Whether two shard patterns name the same files."""
    try:
        return bool(a and b) and [os.path.realpath(p) for p in expand_shards(a)] == [
            os.path.realpath(p) for p in expand_shards(b)]
    except ValueError:
        return False
