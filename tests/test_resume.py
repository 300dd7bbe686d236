"""Checkpoints and resume: a stopped run resumed from its checkpoint continues exactly (same loss
at every step, bitwise-equal weights and momentum); a corrupted, truncated, unfinished or
mismatched checkpoint is refused with a message saying what differs; old checkpoints are pruned."""

import os
import re

import pytest

from cluster.ckpt import checkpoint
from cluster.driver import main
from cluster.ckpt.consolidate import consolidate_with_momentum
from runs import assert_same_tensors, losses, shard_tensors, tiny_run_args

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)










@pytest.mark.timeout(600)
@pytest.mark.parametrize("mesh", [[], ["--stages", "2", "--microbatches", "2"]], ids=["towers", "pipeline"])
def test_a_resumed_run_continues_exactly(tiny_demo, tmp_path, capsys, mesh, shared_ray):
    # 60 training images in batches of 8: 7 steps per epoch. Dropout on (its masks must be restored).
    common = ["--epochs", "2", "--log-every", "1", "--checkpoint-every", "3", "--dropout", "0.5", *mesh]
    assert main(tiny_run_args(tiny_demo, tmp_path / "straight", *common, "--max-steps", "10")) == 0
    straight = capsys.readouterr().out
    assert main(tiny_run_args(tiny_demo, tmp_path / "stopped", *common, "--max-steps", "5")) == 0
    first_part = capsys.readouterr().out
    assert "epoch 1/2 (stopped after batch 5)" in first_part
    assert main(tiny_run_args(tiny_demo, tmp_path / "stopped", *common, "--max-steps", "10")) == 0
    resumed = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoint-00000005'}" in resumed
    assert "resuming at step 5 (epoch 1, batch 5)" in resumed
    # the same loss at every step, before and after the stop
    assert losses(straight) == {**losses(first_part), **losses(resumed)} and len(losses(straight)) == 10
    # epoch 1 ends at step 7, after the resume: the same evaluation
    epoch_line = re.compile(r"^epoch 1/2: train loss .* val top-5 [\d.]+%", re.MULTILINE)
    assert epoch_line.search(straight).group(0) == epoch_line.search(resumed).group(0)
    assert_same_tensors(shard_tensors(tmp_path / "straight" / "checkpoint-00000010"),
                        shard_tensors(tmp_path / "stopped" / "checkpoint-00000010"))
    # keep_checkpoints (3): steps 3 and 5 were pruned from "stopped", 6, 9 and 10 remain (next to
    # the run's metrics history and report), and no storage-check or temporary file is left
    left = sorted(os.listdir(tmp_path / "stopped"))
    assert [name for name in left if name.startswith("checkpoint-")] == [f"checkpoint-{s:08d}" for s in (6, 9, 10)]
    assert not [name for name in left if name.startswith(".") or name.endswith(".tmp")], left
    # a finished run resubmitted as it was has nothing left to do
    assert main(tiny_run_args(tiny_demo, tmp_path / "stopped", *common, "--max-steps", "10")) == 0
    assert "nothing to train" in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_checkpoints(tiny_demo, tmp_path_factory, local_ray):
    """A run with checkpoints at steps 1 and 2."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(tiny_run_args(tiny_demo, run, "--max-steps", "2", "--checkpoint-every", "1")) == 0
    return run


def _refused(tiny_demo, run, capsys, *extra) -> str:
    assert main(tiny_run_args(tiny_demo, run, "--max-steps", "3", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.timeout(600)
def test_a_two_stage_checkpoint_goes_on_in_one_process(tiny_demo, tmp_path, capsys, shared_ray):
    # S = 2 × 2 towers for 3 steps, then S = 1 with both towers in one actor for 2 more: the
    # same weights and momentum as 5 steps of S = 1 × 2 towers. Dropout off, so only summation
    # order differs: 1e-4 relative over 5 steps (tests/parity.py explains the 1e-5 of 3 steps).
    common = ["--epochs", "1", "--log-every", "1", "--checkpoint-every", "3", "--dropout", "0"]
    two = ["--stages", "2", "--stage-split", "conv1-conv2 | conv3-fc8"]
    assert main(tiny_run_args(tiny_demo, tmp_path / "reshaped", *common, *two, "--max-steps", "3")) == 0
    assert main(tiny_run_args(tiny_demo, tmp_path / "reshaped", *common, "--towers", "1", "--max-steps", "5")) == 0
    out = capsys.readouterr().out
    assert "re-split from 1 replica(s) × 2 stage(s) (conv1-conv2 | conv3-fc8) × 2 tower process(es)" in out
    assert main(tiny_run_args(tiny_demo, tmp_path / "straight", *common, "--max-steps", "5")) == 0
    _, straight, straight_momentum = consolidate_with_momentum(str(tmp_path / "straight" / "checkpoint-00000005"))
    _, reshaped, reshaped_momentum = consolidate_with_momentum(str(tmp_path / "reshaped" / "checkpoint-00000005"))
    assert straight.keys() == reshaped.keys() == straight_momentum.keys() == reshaped_momentum.keys()
    for name in straight:
        for ours, ref in ((reshaped[name], straight[name]), (reshaped_momentum[name], straight_momentum[name])):
            assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), name


def test_a_checkpoint_of_another_architecture_is_refused(tiny_demo, two_checkpoints, capsys):
    err = _refused(tiny_demo, two_checkpoints, capsys, "--num-classes", "10", "--variant", "cuda-convnet-2012")
    assert "was saved with variant='paper' (now 'cuda-convnet-2012')" in err
    err = _refused(tiny_demo, two_checkpoints, capsys, "--batch-size", "4")
    # another global batch goes on only from an epoch's start (tests/test_multinode.py re-splits replicas)
    assert "global batch of 8 (1 × 8); with 1 × 4 it can only go on from an epoch's start" in err


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (truncate, "has {size} bytes, the manifest says {bytes}"),
    (flip_a_byte, "sha256 differs from the manifest's"),
])
def test_a_damaged_shard_is_refused_and_auto_resume_falls_back(tiny_demo, two_checkpoints, tmp_path, capsys,
                                                               damage, message):
    run = tmp_path / "run"
    for step in (1, 2):
        src = two_checkpoints / f"checkpoint-{step:08d}"
        (run / src.name).mkdir(parents=True)
        for name in os.listdir(src):
            (run / src.name / name).write_bytes((src / name).read_bytes())
    newest = run / "checkpoint-00000002"
    shard = newest / "rank00001.pt"
    recorded = checkpoint.read_manifest(str(newest))[checkpoint.KEY_SHARDS][1]["bytes"]
    damage(shard)
    err = _refused(tiny_demo, run, capsys, "--resume", str(newest))
    assert message.format(size=shard.stat().st_size, bytes=recorded) in err and "rank00001.pt" in err
    # auto passes over the damaged checkpoint to the one before it
    assert checkpoint.find_resume(str(run), "auto") == str(run / "checkpoint-00000001")


def test_an_unfinished_checkpoint_is_not_resumed_from(two_checkpoints, tmp_path):
    # a crash between the shards and the manifest: the directory has shards and no manifest
    run = tmp_path / "run"
    for step in (1, 2):
        src = two_checkpoints / f"checkpoint-{step:08d}"
        (run / src.name).mkdir(parents=True)
        for name in os.listdir(src):
            if not (step == 2 and name == checkpoint.MANIFEST):
                (run / src.name / name).write_bytes((src / name).read_bytes())
    assert checkpoint.complete_checkpoints(str(run)) == [str(run / "checkpoint-00000001")]
    assert checkpoint.find_resume(str(run), "auto") == str(run / "checkpoint-00000001")
    assert checkpoint.find_resume(str(run), "never") is None
    with pytest.raises(checkpoint.CheckpointError, match="no readable manifest.json"):
        checkpoint.find_resume(str(run), str(run / "checkpoint-00000002"))


def test_pruning_keeps_the_newest_and_every_nth(tmp_path):
    for step in range(1, 11):
        directory = tmp_path / f"checkpoint-{step:08d}"
        directory.mkdir()
        (directory / checkpoint.MANIFEST).write_text("{}")
    (tmp_path / "checkpoint-00000011").mkdir()  # unfinished: not counted, not deleted
    checkpoint.prune(str(tmp_path), keep=3, keep_every=4)
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint-{s:08d}" for s in (4, 8, 9, 10, 11)]
