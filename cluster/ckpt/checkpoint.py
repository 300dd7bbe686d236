"""Checkpoints: one shard per rank written by its actor, then a manifest written last by the driver.

A checkpoint directory is complete exactly when its manifest exists: shards and manifest are each
written atomically (cluster/ckpt/storage.py: on a local or mounted path a temporary name, fsync and
rename; on an object store one upload), and the manifest only after every shard. A crash at any
moment leaves the previous complete checkpoint as it was.

Every directory here is a location of cluster/ckpt/storage.py: a path or a URI (s3://, gs://, hdfs://).

Resuming reads the manifest, checks every shard's size and sha256 against it, and refuses a
checkpoint of another architecture or mesh with a message naming each difference.
"""

import hashlib
import io
import json
import logging
import re

import torch

from cluster.ckpt import storage
from stages.config import PAPER_FC_WIDTH

MANIFEST = "manifest.json"
KEY_STEP, KEY_EPOCH, KEY_CONFIG, KEY_MESH, KEY_SHARDS = "step", "epoch", "config", "mesh", "shards"
SHARD_MODEL, SHARD_OPTIMIZER, SHARD_COORD = "model", "optimizer", "coord"  # keys inside a rank's shard
SHARD_RNG = "rng"  # the rank's torch RNG state (dropout masks)
SHARD_SCALER = "loss_scaler"  # an fp16 run's loss scale (cluster/rank/precision.py)
KEY_LOADER = "loader"  # the training reader's position: resuming continues with the next sample
KEY_TRAINER = "trainer"  # the loop's own state: lr schedule, the epoch's running loss
# Fields a checkpoint's weights depend on: resuming with any other value is refused.
ARCHITECTURE_FIELDS = ("variant", "num_classes", "image_size", "fc_width", "net", "activation", "lrn",
                       "pooling", "dropout_style", "lrn_text_alpha")
# What a manifest written before a field existed was trained with: the paper's network, and
# torch.nn.Dropout, the only dropout until `dropout_style` came.
ARCHITECTURE_BEFORE = {"fc_width": PAPER_FC_WIDTH, "net": "two-tower", "activation": "relu", "lrn": "on",
                       "pooling": "overlapping", "dropout_style": "inverted", "lrn_text_alpha": False}
# Fields of the mesh's shape: another value means the whole network is gathered and re-split.
MESH_FIELDS = ("replicas", "stages", "towers", "stage_split")

log = logging.getLogger(__name__)
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong."""


def shard_file(rank: int) -> str:
    """The name of rank `rank`'s shard inside a checkpoint directory."""
    return f"rank{rank:05d}.pt"


def checkpoint_dir(run_dir: str, step: int) -> str:
    return storage.join(run_dir, f"checkpoint-{step:08d}")


def sha256_file(path: str) -> str:
    """The sha256 of the file at location `path`, read in blocks."""
    digest = hashlib.sha256()
    with storage.open_storage(path).open_input() as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(path: str) -> dict:
    """The manifest entry of the shard already at location `path`."""
    return {"file": storage.basename(path), "sha256": sha256_file(path), "bytes": storage.open_storage(path).size()}


def write_shard(path: str, state: dict) -> dict:
    """Save `state` to location `path` atomically (cluster/ckpt/storage.py); its manifest entry."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    storage.open_storage(path).write_bytes(data)
    return {"file": storage.basename(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": data.nbytes}


def load_shard(directory: str, file: str, map_location="cpu") -> dict:
    """Shard `file` of checkpoint `directory`, loaded with weights_only=True (tensors and plain
    containers only: a pickle carrying code is refused)."""
    data = storage.open_storage(storage.join(directory, file)).read_bytes()
    return torch.load(io.BytesIO(data), weights_only=True, map_location=map_location)


def write_manifest(directory: str, *, step: int, epoch: int, config: dict, mesh: dict,
                   shard_paths: list, loader: dict, trainer: dict | None = None) -> str:
    """`shard_paths`: each shard's manifest entry (`write_shard`'s answer) or its location."""
    shards = [p if isinstance(p, dict) else _entry(p) for p in shard_paths]
    manifest = {KEY_STEP: step, KEY_EPOCH: epoch, KEY_CONFIG: config, KEY_MESH: mesh, KEY_SHARDS: shards,
                KEY_LOADER: loader, KEY_TRAINER: trainer or {}}
    path = storage.join(directory, MANIFEST)
    storage.open_storage(path).write_bytes(json.dumps(manifest, indent=1, default=list).encode())
    return path


def read_manifest(directory: str) -> dict:
    return json.loads(storage.open_storage(storage.join(directory, MANIFEST)).read_bytes())


def complete_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directories of `run_dir` that have a manifest, oldest first."""
    run = storage.open_storage(run_dir)
    found = [name for name in run.listdir() if _CHECKPOINT_NAME.match(name)]
    return [run.join(name) for name in found if run.child(name, MANIFEST).exists()]


def verify(directory: str) -> dict:
    """The manifest of `directory` once every shard it lists is there with its size and sha256;
    else CheckpointError naming the shard and what differs."""
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} has no readable {MANIFEST}: {storage.error_line(err)}") from None
    for shard in manifest[KEY_SHARDS]:
        path = storage.join(directory, shard["file"])
        stored = storage.open_storage(path)
        if not stored.exists():
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']} is missing")
        size = stored.size()
        if size != shard["bytes"]:
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']} has {size} bytes, "
                                  f"the manifest says {shard['bytes']} (truncated or replaced)")
        if sha256_file(path) != shard["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']}'s sha256 differs from the "
                                  f"manifest's (corrupted or replaced)")
    return manifest


def check_compatible(manifest: dict, config: dict, directory: str) -> bool:
    """Refuse a checkpoint whose architecture differs from this run's configuration; return
    whether its mesh shape (replicas, stages, towers, split) differs, so that it must be re-split."""
    saved = {**ARCHITECTURE_BEFORE, **manifest[KEY_CONFIG]}
    diffs = [f"{name}={saved.get(name)!r} (now {config[name]!r})" for name in ARCHITECTURE_FIELDS
             if saved.get(name) != config[name]]
    if diffs:
        raise CheckpointError(f"checkpoint {directory} was saved with {', '.join(diffs)}: resume with the "
                              f"same values, or start a new --run-dir")
    return any(saved.get(name) != config[name] for name in MESH_FIELDS)


def find_resume(run_dir: str, resume: str) -> str | None:
    """The checkpoint to resume from: `resume` is "never", "auto" (the newest complete checkpoint
    of `run_dir` that verifies; a newer one that does not is logged and passed over) or a
    checkpoint's location (a path or a URI)."""
    if resume == "never":
        return None
    if resume != "auto":
        verify(resume)
        return resume
    for directory in reversed(complete_checkpoints(run_dir)):
        try:
            verify(directory)
            return directory
        except CheckpointError as err:
            log.warning("not resuming from it: %s", err)
    return None


def checkpoint_step(directory: str) -> int:
    return int(_CHECKPOINT_NAME.match(storage.basename(directory)).group(1))


def prune(run_dir: str, keep: int, keep_every: int = 0) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints and those at multiples of
    `keep_every` steps (0: none); returns what was deleted."""
    old = [d for d in (complete_checkpoints(run_dir)[:-keep] if keep > 0 else [])
           if not (keep_every and checkpoint_step(d) % keep_every == 0)]
    for directory in old:
        doomed = storage.open_storage(directory)
        doomed.child(MANIFEST).delete()  # incomplete from here on, whatever happens next
        doomed.delete_dir()
    return old
