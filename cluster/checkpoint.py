"""Checkpoints: one shard per rank written by its actor, then a manifest written last by the driver.

A checkpoint directory is complete exactly when its manifest exists: shards and manifest are each
written to a temporary name, fsynced and renamed, and the manifest only after every shard.
"""

import hashlib
import json
import os

MANIFEST = "manifest.json"
KEY_STEP, KEY_EPOCH, KEY_CONFIG, KEY_MESH, KEY_SHARDS = "step", "epoch", "config", "mesh", "shards"
SHARD_MODEL, SHARD_OPTIMIZER, SHARD_COORD = "model", "optimizer", "coord"  # keys inside a rank's shard
KEY_LOADER = "loader"  # the training reader's position: resuming continues with the next sample


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


def write_manifest(directory: str, *, step: int, epoch: int, config: dict, mesh: dict,
                   shard_paths: list[str], loader: dict) -> str:
    shards = [{"file": os.path.basename(p), "sha256": sha256_file(p), "bytes": os.path.getsize(p)}
              for p in shard_paths]
    manifest = {KEY_STEP: step, KEY_EPOCH: epoch, KEY_CONFIG: config, KEY_MESH: mesh, KEY_SHARDS: shards,
                KEY_LOADER: loader}
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
