"""Checkpoints: one shard per rank written by its actor, then a manifest written last by the driver.

A checkpoint directory is complete exactly when its manifest exists: shards and manifest are each
written to a temporary name, fsynced and renamed, and the manifest only after every shard. A crash
at any moment leaves the previous complete checkpoint as it was.

Resuming reads the manifest, checks every shard's size and sha256 against it, and refuses a
checkpoint of another architecture or mesh with a message naming each difference.
"""

import hashlib
import json
import logging
import os
import re
import shutil

import torch

MANIFEST = "manifest.json"
KEY_STEP, KEY_EPOCH, KEY_CONFIG, KEY_MESH, KEY_SHARDS = "step", "epoch", "config", "mesh", "shards"
SHARD_MODEL, SHARD_OPTIMIZER, SHARD_COORD = "model", "optimizer", "coord"  # keys inside a rank's shard
SHARD_RNG = "rng"  # the rank's torch RNG state (dropout masks)
KEY_LOADER = "loader"  # the training reader's position: resuming continues with the next sample
KEY_TRAINER = "trainer"  # the loop's own state: lr schedule, the epoch's running loss
# Fields a checkpoint's weights depend on: resuming with any other value is refused.
ARCHITECTURE_FIELDS = ("variant", "num_classes", "image_size", "replicas")
# Fields of the mesh's shape: another value means the whole network is gathered and re-split.
MESH_FIELDS = ("stages", "towers", "stage_split")

log = logging.getLogger(__name__)
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says what is wrong."""


def shard_file(rank: int) -> str:
    """The name of rank `rank`'s shard inside a checkpoint directory."""
    return f"rank{rank:05d}.pt"


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:08d}")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str, state: dict) -> dict:
    """Save `state` to `path` atomically (temp file, fsync, rename); its manifest entry."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": os.path.basename(path), "sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def write_manifest(directory: str, *, step: int, epoch: int, config: dict, mesh: dict,
                   shard_paths: list, loader: dict, trainer: dict | None = None) -> str:
    """`shard_paths`: each shard's manifest entry (`write_shard`'s answer) or its path."""
    shards = [p if isinstance(p, dict) else
              {"file": os.path.basename(p), "sha256": sha256_file(p), "bytes": os.path.getsize(p)}
              for p in shard_paths]
    manifest = {KEY_STEP: step, KEY_EPOCH: epoch, KEY_CONFIG: config, KEY_MESH: mesh, KEY_SHARDS: shards,
                KEY_LOADER: loader, KEY_TRAINER: trainer or {}}
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, default=list)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> dict:
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def complete_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directories of `run_dir` that have a manifest, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = sorted(name for name in os.listdir(run_dir) if _CHECKPOINT_NAME.match(name))
    return [os.path.join(run_dir, name) for name in found if os.path.exists(os.path.join(run_dir, name, MANIFEST))]


def verify(directory: str) -> dict:
    """The manifest of `directory` once every shard it lists is there with its size and sha256;
    else CheckpointError naming the shard and what differs."""
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} has no readable {MANIFEST}: {err}") from None
    for shard in manifest[KEY_SHARDS]:
        path = os.path.join(directory, shard["file"])
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']} is missing")
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']} has {size} bytes, "
                                  f"the manifest says {shard['bytes']} (truncated or replaced)")
        if sha256_file(path) != shard["sha256"]:
            raise CheckpointError(f"checkpoint {directory}: shard {shard['file']}'s sha256 differs from the "
                                  f"manifest's (corrupted or replaced)")
    return manifest


def check_compatible(manifest: dict, config: dict, directory: str) -> bool:
    """Refuse a checkpoint whose architecture differs from this run's configuration; return
    whether its mesh shape (stages, towers, split) differs, so that it must be re-split."""
    saved = manifest[KEY_CONFIG]
    diffs = [f"{name}={saved.get(name)!r} (now {config[name]!r})" for name in ARCHITECTURE_FIELDS
             if saved.get(name) != config[name]]
    if diffs:
        raise CheckpointError(f"checkpoint {directory} was saved with {', '.join(diffs)}: resume with the "
                              f"same values, or start a new --run-dir")
    return any(saved.get(name) != config[name] for name in MESH_FIELDS)


def find_resume(run_dir: str, resume: str) -> str | None:
    """The checkpoint to resume from: `resume` is "never", "auto" (the newest complete checkpoint
    of `run_dir` that verifies; a newer one that does not is logged and passed over) or a path."""
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
    return int(_CHECKPOINT_NAME.search(directory).group(1))


def prune(run_dir: str, keep: int, keep_every: int = 0) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints and those at multiples of
    `keep_every` steps (0: none); returns what was deleted."""
    old = [d for d in (complete_checkpoints(run_dir)[:-keep] if keep > 0 else [])
           if not (keep_every and checkpoint_step(d) % keep_every == 0)]
    for directory in old:
        os.remove(os.path.join(directory, MANIFEST))  # incomplete from here on, whatever happens next
        shutil.rmtree(directory)
    return old
