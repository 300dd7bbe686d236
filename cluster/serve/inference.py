"""Batch inference with Ray Data (`python -m cluster.infer`): every sample of a set of WebDataset
shards through the trained network, predictions to Parquet, one file per shard.

The pipeline, streaming (Ray Data's executor keeps a bounded number of blocks in flight, so
memory stays flat whatever the data size):

    ShardSource: one read task per shard, reading and decoding it (CPU tasks)  →  Predictor (actor
    pool, GPU when asked)  →  the driver assembles each shard's rows and writes its Parquet file

- **Read.** `ShardSource` is the project's tar reading (data/shards.py `TarSamples`, the loop the
  training reader's index uses) wrapped as a Ray Data datasource, not `read_webdataset`: a
  corrupt or truncated tar then loses only the rest of its shard, counted and listed, where
  `read_webdataset` would fail the task and so the run. Each row carries its shard, its
  position in it and the shard's row count, so the driver knows when a shard is whole.
- **Decode.** The same read task makes each image's centre crop (or ten views) with the
  functions the validation reader calls (cluster/serve/scoring.py), so the pixels are training's
  evaluation's bit for bit. An image that does not decode is a row with an `error`.
- **Predict.** `Predictor`, in an actor pool of `--concurrency` actors (each `--gpus-per-worker`
  GPUs, or `--threads-per-worker` CPUs), runs the reference network and the evaluation's
  softmax averaging (`Scorer`). Ray Data restarts an actor that dies and retries its batches.
- **Write.** When all rows of a shard have arrived, the driver writes `OUT/<shard>.parquet`
  atomically (cluster/ckpt/storage.py: a temporary name and a rename, or one upload): columns
  `key`, `label` (null without a `cls`), `top_classes`, `top_probs` (best first; null for a row
  with an error) and `error`, in the shard's order. Rows are kept by (shard, position), so a
  retried batch cannot write a key twice. The file's metadata records the shard, its size, the
  model's fingerprint, the views and k: a re-run skips every shard whose file is there for the
  same model and settings, and refuses an OUT holding another model's predictions.

At the end `OUT/_summary.json` (ignored by Parquet readers, as its name starts with `_`) lists the
shards, the bad samples (shard, key, reason) and which actor on which node predicted how many.
"""

import collections
import dataclasses
import functools
import io
import json
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import faults
from cluster.ckpt import storage
from cluster.serve.model import Model, ModelError, load_model, one_line
from cluster.serve.scoring import Scorer, image_views
from data.transforms import EvalTransform, TenViewTransform, view_transform
from data.shards import _IMAGE_SUFFIXES, TarSamples

PREDICTIONS_FORMAT = "alexnet-towers predictions v1"
METADATA_KEY = b"alexnet-towers"
SUMMARY = "_summary.json"
ROWS_PER_BLOCK = 32  # rows of one block a read task yields (at 224, 32 × 150 KB of views)


class OutputConflict(ValueError):
    """OUT holds predictions made with another model or settings; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a shard's predictions depend on (besides the shard's bytes)."""

    model: str  # the model's fingerprint
    views: int
    topk: int


# ---------------------------------------------------------------- read


def _add_member(members: dict, suffix: str, info, read: Callable[[], bytes]) -> None:
    """What a read keeps of a member: the first image's place, a short `cls`'s bytes."""
    if suffix in _IMAGE_SUFFIXES:
        members.setdefault("jpg", (info.offset_data, info.size))
    elif suffix == "cls" and info.size <= 32:
        members["cls"] = read()


def _label(members: dict) -> int:
    text = members.get("cls", b"").strip()
    return int(text) if text.isdigit() else -1


def read_shard(shard: int, path: str, transform: EvalTransform | TenViewTransform,
               rows_per_block: int = ROWS_PER_BLOCK) -> Iterator[dict]:
    """The rows of one shard, decoded, `rows_per_block` at a time: shard, pos, count, key, label
    (-1: none), images (uint8 views; zeros for a row with an error) and error ("" when fine). A
    broken tar's sample being read is a row with its error; what follows it is lost, said by a
    row with key "" and pos -1 (which also stands for a shard with no samples at all, so that
    every shard sends a row)."""
    tar = TarSamples(path, _add_member)
    samples = [(key, members) for key, members in tar]
    broken = tar.broken
    if broken is not None and broken.key is not None:
        samples.append((broken.key, broken.members if "jpg" in broken.members else {"broken": broken.reason}))
    trailer = broken is not None or not samples
    count = len(samples) + trailer
    with open(path, "rb", buffering=0) as file:
        for start in range(0, len(samples), rows_per_block):
            rows = [_row(file, key, members, transform) for key, members in samples[start:start + rows_per_block]]
            yield _block(shard, range(start, start + len(rows)), count, rows, transform)
    if trailer:
        why = f"broken tar: {broken.reason}; the rest of the shard is unreadable" if broken else "no samples"
        yield _block(shard, [-1], count, [("", -1, None, why)], transform)


def _row(file, key: str, members: dict, transform) -> tuple[str, int, np.ndarray | None, str]:
    """(key, label, views or None, error) of one sample."""
    label = _label(members)
    if "broken" in members:
        return key, label, None, f"broken tar: {members['broken']}"
    if "jpg" not in members:
        return key, label, None, "missing jpg"
    offset, size = members["jpg"]
    try:
        return key, label, image_views(os.pread(file.fileno(), size, offset), transform), ""
    except ValueError as err:
        return key, label, None, f"undecodable image: {one_line(err)[:200]}"


def _block(shard: int, positions, count: int, rows: list[tuple], transform) -> dict:
    crop = transform.crop
    shape = (3, crop, crop) if isinstance(transform, EvalTransform) else (10, 3, crop, crop)
    images = np.zeros((len(rows), *shape), dtype=np.uint8)
    for i, (_, _, views, _) in enumerate(rows):
        if views is not None:
            images[i] = views
    return {"shard": np.full(len(rows), shard, np.int32), "pos": np.array(list(positions), np.int32),
            "count": np.full(len(rows), count, np.int32), "key": np.array([r[0] for r in rows], dtype=object),
            "label": np.array([r[1] for r in rows], np.int64), "images": images,
            "error": np.array([r[3] for r in rows], dtype=object)}


class ShardSource(Datasource):
    """The shards as a Ray Data datasource: one read task per shard, which reads and decodes it
    (`read_shard`) in a CPU task."""

    def __init__(self, shards: list[tuple[int, str]], resize: int, crop: int, views: int):
        super().__init__()
        self.shards, self.resize, self.crop, self.views = shards, resize, crop, views

    def estimate_inmemory_data_size(self) -> int:
        return sum(os.path.getsize(path) for _, path in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        transform = view_transform(self.resize, self.crop, self.views)

        def read(shard: int, path: str) -> Iterator:
            for block in read_shard(shard, path, transform):
                yield pa.table({name: _column(values) for name, values in block.items()})

        return [ReadTask(functools.partial(read, shard, path),
                         BlockMetadata(num_rows=None, size_bytes=os.path.getsize(path), input_files=[path],
                                       exec_stats=None))
                for shard, path in self.shards]


def _column(values: np.ndarray) -> pa.Array:
    """A numpy column as Arrow: images as Ray Data's tensor extension type."""
    if values.ndim > 1:
        from ray.data.extensions import ArrowTensorArray

        return ArrowTensorArray.from_numpy(values)
    return pa.array(values.tolist() if values.dtype == object else values)


class Predictor:
    """One actor of the pool: the network on its device; rows of views → their top-k."""

    def __init__(self, source: str, fingerprint: str, views: int, topk: int, threads: int):
        """Loads the model at `source` itself (storage every node reaches, like the shards), which
        must be the one the driver loaded (`fingerprint`)."""
        torch.set_num_threads(threads)
        model = load_model(source)
        if model.fingerprint != fingerprint:
            raise ModelError(f"{source} changed while the run started (fingerprint {model.fingerprint}, the "
                             f"driver's {fingerprint}): run again")
        self.scorer, self.topk = Scorer(model, views), topk
        context = ray.get_runtime_context()
        self.worker = f"{context.get_node_id()}:{os.getpid()}"
        self.batches = 0
        print(f"inference actor pid {os.getpid()} on node {context.get_node_id()} ({self.scorer.device})", flush=True)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        ok = np.array([not error for error in batch["error"]], dtype=bool)
        classes = np.full((n, self.topk), -1, dtype=np.int32)
        probs = np.full((n, self.topk), np.nan, dtype=np.float32)
        if ok.any():
            best, p = self.scorer.topk(torch.from_numpy(np.ascontiguousarray(batch["images"][ok])), self.topk)
            classes[ok, :best.shape[1]], probs[ok, :best.shape[1]] = best.numpy(), p.numpy()
        self.batches += 1
        if faults.infer_kill_at(self.batches):
            os.kill(os.getpid(), signal.SIGKILL)
        out = {name: batch[name] for name in ("shard", "pos", "count", "key", "label", "error")}
        return {**out, "top_classes": classes, "top_probs": probs, "worker": np.array([self.worker] * n, dtype=object)}


# ---------------------------------------------------------------- write


def output_path(out: str, shard: str) -> str:
    """OUT/<shard name without .tar>.parquet."""
    name = os.path.basename(shard)
    return storage.join(out, (name[:-4] if name.endswith(".tar") else name) + ".parquet")


def read_metadata(path: str) -> dict | None:
    """The metadata a predictions file records, or None when there is no such file."""
    stored = storage.open_storage(path)
    if not stored.exists():
        return None
    with stored.open_input() as f:
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    try:
        return json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        return {}


def pending_shards(paths: list[str], out: str, settings: Settings) -> tuple[list[str], list[str]]:
    """(shards to predict, shards whose predictions are complete). Raises OutputConflict when a
    file of OUT was made with another model, views or k (or is not ours)."""
    todo, done = [], []
    for path in paths:
        saved = read_metadata(output_path(out, path))
        if saved is None:
            todo.append(path)
            continue
        ours = dataclasses.asdict(settings)
        if saved.get("format") != PREDICTIONS_FORMAT or any(saved.get(k) != v for k, v in ours.items()):
            theirs = {k: saved.get(k) for k in ours}
            raise OutputConflict(f"{output_path(out, path)} holds predictions made with {theirs}, not {ours}: give "
                                 f"another --out, or delete that directory's files")
        (done if saved.get("shard_bytes") == os.path.getsize(path) else todo).append(path)
    return todo, done


def write_predictions(path: str, shard: str, rows: dict[int, tuple], broken: str | None, settings: Settings) -> int:
    """One shard's predictions to `path`, in position order, atomically; the rows with errors."""
    ordered = [rows[pos] for pos in sorted(rows)]
    errors = [row[4] or None for row in ordered]
    table = pa.table({
        "key": pa.array([row[0] for row in ordered], pa.string()),
        "label": pa.array([row[1] if row[1] >= 0 else None for row in ordered], pa.int64()),
        "top_classes": pa.array([None if e else row[2] for row, e in zip(ordered, errors)], pa.list_(pa.int32())),
        "top_probs": pa.array([None if e else row[3] for row, e in zip(ordered, errors)], pa.list_(pa.float32())),
        "error": pa.array(errors, pa.string()),
    })
    metadata = {"format": PREDICTIONS_FORMAT, **dataclasses.asdict(settings), "shard": os.path.abspath(shard),
                "shard_bytes": os.path.getsize(shard), "rows": len(ordered), "errors": sum(map(bool, errors)),
                "broken": broken}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.open_storage(path).write_bytes(buffer.getbuffer())
    return metadata["errors"]


@dataclasses.dataclass
class Summary:
    """What a run did (`OUT/_summary.json`)."""

    shards: int = 0  # in --data
    skipped: int = 0  # complete before this run
    written: int = 0  # by this run
    rows: int = 0  # predicted by this run, errors included
    bad: list[dict] = dataclasses.field(default_factory=list)  # {shard, key, reason}, this run's
    broken: list[dict] = dataclasses.field(default_factory=list)  # {shard, reason}
    actors: dict[str, int] = dataclasses.field(default_factory=dict)  # "node:pid" → rows predicted
    seconds: float = 0.0

    @property
    def bad_by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(entry["reason"].split(":", 1)[0] for entry in self.bad))

    @property
    def nodes(self) -> set[str]:
        return {worker.split(":", 1)[0] for worker in self.actors}


class ShardAssembler:
    """The driver's side: the rows of each shard until it is whole, then its file."""

    def __init__(self, shards: list[str], out: str, settings: Settings, summary: Summary,
                 on_shard: Callable[[str], None] = lambda shard: None):
        self.shards, self.out, self.settings, self.summary, self.on_shard = shards, out, settings, summary, on_shard
        self.rows: dict[int, dict[int, tuple]] = collections.defaultdict(dict)
        self.expected: dict[int, int] = {}
        self.broken: dict[int, str] = {}

    def add(self, batch: dict) -> None:
        touched = set()
        for i in range(len(batch["key"])):
            shard, pos = int(batch["shard"][i]), int(batch["pos"][i])
            self.expected[shard] = int(batch["count"][i])
            touched.add(shard)
            error = batch["error"][i]
            if pos < 0:  # the shard's trailer: what was lost after a break
                self.broken[shard] = error
                self.rows[shard][pos] = None
                continue
            if pos not in self.rows[shard]:  # a retried batch brings its rows again
                worker = batch["worker"][i]
                self.summary.actors[worker] = self.summary.actors.get(worker, 0) + 1
            self.rows[shard][pos] = (batch["key"][i], int(batch["label"][i]), batch["top_classes"][i].tolist(),
                                     batch["top_probs"][i].tolist(), error)
        for shard in touched:
            if len(self.rows[shard]) == self.expected[shard]:
                self._write(shard)

    def _write(self, shard: int) -> None:
        rows = {pos: row for pos, row in self.rows.pop(shard).items() if row is not None}
        path = self.shards[shard]
        write_predictions(output_path(self.out, path), path, rows, self.broken.get(shard), self.settings)
        self.summary.written += 1
        self.summary.rows += len(rows)
        self.summary.bad += [{"shard": path, "key": row[0], "reason": row[4]} for row in rows.values() if row[4]]
        if shard in self.broken:
            self.summary.broken.append({"shard": path, "reason": self.broken.pop(shard)})
        self.on_shard(path)

    @property
    def unfinished(self) -> list[str]:
        return [self.shards[shard] for shard in sorted(self.rows)]


# ---------------------------------------------------------------- the run


def reserve_actors(options: "InferOptions", resources: dict, timeout_s: float = 120.0):
    """A placement group of one bundle per inference actor, spread over the nodes (Ray places the
    bundles together, before any task takes the CPUs, where a SPREAD actor placed later may find
    one node busy): the actors land on as many nodes as can hold them."""
    bundle = {"CPU": resources["num_cpus"], **({"GPU": resources["num_gpus"]} if "num_gpus" in resources else {})}
    group = placement_group([bundle] * options.concurrency, strategy="SPREAD")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(f"{options.concurrency} inference actor(s) of {bundle} could not be placed within "
                           f"{timeout_s:g} s (the cluster has {ray.available_resources()} free): lower "
                           f"--concurrency or add nodes")
    return group


@dataclasses.dataclass(frozen=True)
class InferOptions:
    batch_size: int = 64  # images per forward pass
    concurrency: int = 1  # actors in the pool
    gpus_per_worker: float = 0.0  # 0: the actors run on CPUs
    threads_per_worker: int = 1  # torch threads (and Ray CPUs) of a CPU actor
    views: int = 1
    topk: int = 5


def run_inference(model: Model, todo: list[str], out: str, options: InferOptions, summary: Summary,
                  env: dict[str, str] | None = None, on_shard: Callable[[str], None] = lambda shard: None) -> Summary:
    """Predict the shards `todo` (`pending_shards`'s first list) into `out`, adding to `summary`;
    `env`: environment for the pipeline's workers (tests' fault injection, cluster/faults.py)."""
    started = time.perf_counter()
    settings = Settings(model.fingerprint, options.views, options.topk)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command draws its own
    remote = {"runtime_env": {"env_vars": env}} if env else {}
    resources = ({"num_gpus": options.gpus_per_worker, "num_cpus": 1} if options.gpus_per_worker > 0
                 else {"num_cpus": options.threads_per_worker})
    slots = reserve_actors(options, resources)
    try:
        source = ShardSource(list(enumerate(todo)), model.resize, model.crop, options.views)
        dataset = ray.data.read_datasource(source, override_num_blocks=len(todo), **remote)
        predictor = dict(source=model.checkpoint if model.kind == "checkpoint" else model.source,
                         fingerprint=model.fingerprint, views=options.views, topk=options.topk,
                         threads=options.threads_per_worker)
        with warnings.catch_warnings():  # scheduling_strategy is a `ray_remote_args`, deprecated from Ray 2.64 on
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            dataset = dataset.map_batches(Predictor, fn_constructor_kwargs=predictor, batch_size=options.batch_size,
                                          batch_format="numpy", concurrency=options.concurrency,
                                          scheduling_strategy=PlacementGroupSchedulingStrategy(slots), **resources,
                                          **remote)
        assembler = ShardAssembler(todo, out, settings, summary, on_shard)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            assembler.add(batch)
    finally:
        remove_placement_group(slots)
    if assembler.unfinished:
        raise RuntimeError(f"the pipeline ended with {len(assembler.unfinished)} shard(s) incomplete, e.g. "
                           f"{assembler.unfinished[0]}")
    summary.seconds = time.perf_counter() - started
    return summary


def write_summary(out: str, summary: Summary, model: Model, options: InferOptions) -> str:
    path = storage.join(out, SUMMARY)
    record = {**dataclasses.asdict(summary), "bad_by_reason": summary.bad_by_reason, "nodes": sorted(summary.nodes),
              "model": model.source, "fingerprint": model.fingerprint, "options": dataclasses.asdict(options)}
    storage.open_storage(path).write_bytes(json.dumps(record, indent=1).encode())
    return path
