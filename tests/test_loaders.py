"""Loader actors (cluster/launch/loaders.py, cluster/rank/loader.py): the driver decodes nothing;
the weights are bitwise the same whatever the loader count, and a checkpoint goes on with another;
what a loader actor makes is what the replica's reader makes, without PyTorch in its process;
prefetch stays bounded; bad samples of every loader of every replica are merged. Dead and hung
loaders: tests/test_faults.py."""

import json
import re
import warnings

import numpy as np
import pytest
import torch

from cluster.driver import main
from cluster.inputs import InputPlan
from cluster.launch.actor_mesh import ActorMesh
from cluster.rank.staging import from_object_store
from cluster.telemetry.history import read_history
from data.loader import ShardBatches, decoded_in_process
from data.shards import expand_shards, read_samples, write_shards
from parity import small_config
from runs import assert_same_tensors, shard_tensors, tiny_run_args

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)

COMMON = ["--epochs", "1", "--log-every", "1", "--checkpoint-every", "3", "--no-report"]
DECODED = re.compile(r"^decoded: (.*); the driver (\d+)$", re.MULTILINE)


def trained(demo, run_dir, capsys, *extra) -> str:
    before = decoded_in_process()
    assert main(tiny_run_args(demo, run_dir, *COMMON, *extra)) == 0
    assert decoded_in_process() == before  # this process is the driver: it decoded no image
    return capsys.readouterr().out


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_weights_are_bitwise_the_same_for_any_loader_count(tiny_demo, tmp_path, capsys, shared_ray, replicas):
    # a global batch of 8 (60 images: 7 steps an epoch), 4 steps; replica r's loader k makes its
    # batches b ≡ k (mod K)
    per_replica = ["--replicas", str(replicas), "--batch-size", str(8 // replicas), "--max-steps", "4"]
    tensors = {}
    for loaders in (1, 2, 3):
        out = trained(tiny_demo, tmp_path / f"k{loaders}", capsys, *per_replica, "--loaders-per-replica", str(loaders))
        assert f"loaders: {loaders} per replica" in out
        counts, driver = DECODED.search(out).groups()
        assert driver == "0"
        # every loader of every replica decoded: 4 training batches and the validation split
        made = dict(re.findall(r"(replica \d+ loader \d+) (\d+)", counts))
        assert sorted(made) == [f"replica {r} loader {k}" for r in range(replicas) for k in range(loaders)], out
        tensors[loaders] = shard_tensors(tmp_path / f"k{loaders}" / "checkpoint-00000004")
    for loaders in (2, 3):
        assert tensors[loaders].keys() == tensors[1].keys()
        for name in tensors[1]:
            assert torch.equal(tensors[loaders][name], tensors[1][name]), (loaders, name)


def test_a_checkpoint_of_one_loader_goes_on_with_three_exactly(tiny_demo, tmp_path, capsys, shared_ray):
    trained(tiny_demo, tmp_path / "straight", capsys, "--max-steps", "6", "--loaders-per-replica", "1")
    trained(tiny_demo, tmp_path / "run", capsys, "--max-steps", "3", "--loaders-per-replica", "1")
    out = trained(tiny_demo, tmp_path / "run", capsys, "--max-steps", "6", "--loaders-per-replica", "3")
    assert f"resumed from {tmp_path / 'run' / 'checkpoint-00000003'}" in out and "loaders: 3 per replica" in out
    assert_same_tensors(shard_tensors(tmp_path / "straight" / "checkpoint-00000006"),
                        shard_tensors(tmp_path / "run" / "checkpoint-00000006"))


def test_the_loaders_make_the_replicas_batches_and_keep_prefetch_bounded(tiny_demo, shared_ray):
    import ray

    config = small_config(replicas=2, batch_size=4, image_size=64, resize=72, loaders_per_replica=2, prefetch=2,
                          train_data=tiny_demo.train_pattern, val_data=tiny_demo.val_pattern)
    reader = ShardBatches(tiny_demo.train_pattern, 4, train=True, seed=config.seed, resize=72, crop=64,
                          num_classes=10, replicas=2)
    plan = InputPlan(reader)
    val = ShardBatches(tiny_demo.val_pattern, 4, train=False, seed=config.seed, resize=72, crop=64, num_classes=10,
                       replicas=2)
    with ActorMesh.take(config, readers={"train": reader, "val": val}) as workers:
        loaders = workers.loaders
        fed = list(workers.batches("train", 1, 2, plan.batches_per_epoch))
        assert [f.index for f in fed] == list(range(2, plan.batches_per_epoch))
        assert loaders.most_ahead <= 2 * 2  # K × prefetch batches asked for beyond the one waited for
        for r in range(2):
            local = reader.for_replica(r)
            for f in fed:
                expected = local.batch(1, f.index)
                arrays = ray.get([f.images[r], f.labels[r], f.lighting[r]])
                assert all(isinstance(array, np.ndarray) for array in arrays)  # Ray's copy-free kind
                images, labels, lighting = map(from_object_store, arrays)
                assert torch.equal(images, expected.images) and torch.equal(labels, expected.labels)
                assert torch.equal(lighting, expected.lighting)
                assert f.reports[r].loader == f.index % 2 and f.reports[r].replica == r
        rows = workers.placement_table().splitlines()
        assert [row.split()[0] for row in rows[-4:]] == ["L0.0", "L0.1", "L1.0", "L1.1"]
        # the loaders made all that without PyTorch in their processes; the tower actors have it
        assert not any(_maps_torch(where["pid"]) for replica in loaders.where for where in replica)
        assert all(_maps_torch(where["pid"]) for where in workers.where)


def _maps_torch(pid: int) -> bool:
    """Whether process `pid` (on this machine) has PyTorch's library loaded."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


def _with_bad_images(demo, out_dir, bad: set[int]) -> str:
    """The demo's training samples in one shard, the images of samples `bad` (index order)
    replaced by bytes that are no JPEG: the index (N, labels, order) stays the same."""
    samples = list(read_samples(expand_shards(demo.train_pattern)))
    rewritten = [(key, b"not a jpeg " * 20 if index in bad else jpg, cls)
                 for index, (key, jpg, cls) in enumerate(samples)]
    write_shards(rewritten, str(out_dir), "train", len(rewritten))
    return str(out_dir / "train-000000.tar")


def test_bad_samples_of_both_replicas_are_counted_once_each(tiny_demo, tmp_path, capsys, shared_ray):
    # two replicas of 4 images; two bad samples in replica 0's share of epoch 1, one in replica 1's
    order = ShardBatches(tiny_demo.train_pattern, 4, train=True, seed=5, resize=72, crop=64, num_classes=10,
                         replicas=2)
    shares = [order.for_replica(r).epoch_indices(0).ravel().tolist() for r in range(2)]
    bad = {shares[0][1], shares[0][5], shares[1][2]}
    pattern = _with_bad_images(tiny_demo, tmp_path / "shards", bad)
    args = ["--train-data", pattern, "--replicas", "2", "--batch-size", "4", "--seed", "5", "--max-bad-fraction",
            "0.2", "--loaders-per-replica", "2"]
    before = decoded_in_process()
    assert main(tiny_run_args(tiny_demo, tmp_path / "run", *COMMON, *args)) == 0
    assert decoded_in_process() == before
    out = capsys.readouterr().out
    assert "bad samples 3" in out, out  # the epoch table: replica 0's two and replica 1's one
    epoch = read_history(str(tmp_path / "run")).epochs[-1]
    assert epoch["bad_samples"] == {"train/undecodable image": 3}, json.dumps(epoch["bad_samples"])


def test_a_read_only_array_out_of_the_object_store_becomes_a_tensor_without_a_copy():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)
    array.flags.writeable = False  # as Ray hands a loader's array out of the object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's read-only warning is answered in the docstring
        tensor = from_object_store(array)
    assert tensor.data_ptr() == array.ctypes.data
    assert torch.equal(tensor, torch.arange(24, dtype=torch.uint8).view(2, 3, 2, 2))
    ones = torch.ones(2)
    assert from_object_store(ones) is ones and from_object_store(None) is None
