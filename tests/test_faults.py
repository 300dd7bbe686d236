"""Failures: a tower actor killed with SIGKILL mid-run is detected, the mesh is rebuilt from the
last checkpoint and the run finishes with bitwise the weights of an uninterrupted run; past
--max-restarts the run stops with exit status 1 and says why. A hung actor is caught by the
collective timeout and replaced the same way. A NaN loss goes back to the last checkpoint once.

The runs whose actors a test kills as they train are drivers of their own (`python
cluster/driver.py`, whose output the test reads as it comes) that join the session's Ray
(`--address`, as a job on a cluster does) instead of starting one each; the others run `main()`
in this process."""

import os
import re
import signal
import subprocess
import time

import pytest

from cluster.ckpt import checkpoint
from cluster.driver import main
from cluster import faults
from cluster.ckpt.storage import TMP_SUFFIX
from raytools import shared_ray_address
from runs import (DRIVER, assert_gone, assert_same_tensors, placement_pids, placement_tables, shard_tensors,
                  tiny_run_args)

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)

COMMON = ["--epochs", "2", "--log-every", "1", "--checkpoint-every", "2", "--max-steps", "10"]


def run_and_kill_an_actor(args: list[str], cwd, after_line: str, loader: bool = False,
                          count: int = 2) -> tuple[int, str]:
    """Run the driver on the session's Ray; once `after_line` is printed, SIGKILL the last of its
    `count` tower actors (or loader actors) in its placement table. Then every actor of the run
    must be gone. (status, output)"""
    proc = subprocess.Popen(DRIVER + args + ["--address", shared_ray_address()], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, killed = [], None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        lines.append(line)
        if killed is None and line.startswith(after_line):
            actors = [pid for row, pid in placement_tables("".join(lines))[0] if row.startswith("L") == loader]
            assert len(actors) == count, "".join(lines)
            killed = actors[-1]
            os.kill(killed, signal.SIGKILL)
        assert time.monotonic() < deadline, "".join(lines[-20:])
    proc.wait(timeout=60)
    out = "".join(lines)
    assert killed is not None, out
    assert_gone([pid for table in placement_tables(out) for _, pid in table])
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(tiny_demo, tmp_path_factory, local_ray) -> dict:
    """The tensors of the last checkpoint of the run every faulty variant must end as."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert main(tiny_run_args(tiny_demo, run_dir, *COMMON)) == 0
    return shard_tensors(run_dir / "checkpoint-00000010")


@pytest.mark.timeout(600)
def test_a_killed_actor_is_replaced_and_the_run_ends_as_if_nothing_happened(tiny_demo, tmp_path, uninterrupted):
    status, out = run_and_kill_an_actor(tiny_run_args(tiny_demo, tmp_path / "killed", *COMMON), tmp_path,
                                        after_line="step 5/10")
    assert status == 0, out[-3000:]
    # checkpoints come every 2 steps: the kill lands in step 6 or 7, the run goes on from step 4 or 6
    assert "restart 1/3: " in out and "going on from " + str(tmp_path / "killed" / "checkpoint-0000000") in out
    assert "done: 10 steps" in out
    before, after = placement_pids(out)
    assert not set(after) & set(before)  # a new mesh: the killed actor's partner too, at once
    assert_same_tensors(uninterrupted, shard_tensors(tmp_path / "killed" / "checkpoint-00000010"))


@pytest.mark.timeout(600)
def test_a_killed_loader_is_replaced_and_the_run_ends_as_if_nothing_happened(tiny_demo, tmp_path, uninterrupted):
    args = tiny_run_args(tiny_demo, tmp_path / "killed", *COMMON, "--loaders-per-replica", "2")
    status, out = run_and_kill_an_actor(args, tmp_path, after_line="step 5/10", loader=True)
    assert status == 0, out[-3000:]
    assert "restart 1/3: ActorDiedError" in out, out[-3000:]
    assert "done: 10 steps" in out
    before, after = placement_pids(out)
    assert after == before and len(before) == 2  # only the loaders are new: the tower actors went on
    assert_same_tensors(uninterrupted, shard_tensors(tmp_path / "killed" / "checkpoint-00000010"))


@pytest.mark.timeout(300)
def test_a_hung_loader_is_named_and_replaced(tiny_demo, tmp_path, monkeypatch, capsys, shared_ray, uninterrupted):
    # replica 0's loader 1 sleeps instead of making training batch 5 of epoch 1 (once): the driver
    # waits 3 s for it, names it, rebuilds the mesh from the newest checkpoint and finishes
    monkeypatch.setenv(faults.LOADER_HANG_ENV, f"0:1:0:5:{tmp_path / 'marker'}")
    status = main(tiny_run_args(tiny_demo, tmp_path / "run", *COMMON, "--loaders-per-replica", "2",
                                "--loader-timeout-s", "3"))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert status == 0, out[-3000:]
    assert re.search(r"restart 1/3: LoaderTimeout: loader 1 of replica 0 \(pid \d+ on 127\.0\.0\.1\) did not "
                     r"deliver batch 5 of epoch 1 \(train\) within 3 s", out), out[-3000:]
    assert "done: 10 steps" in out
    before, after = placement_pids(out)
    assert after == before and len(before) == 2  # the same tower actors, new loaders
    assert_same_tensors(uninterrupted, shard_tensors(tmp_path / "run" / "checkpoint-00000010"))


@pytest.mark.timeout(600)
def test_an_actor_killed_while_writing_a_checkpoint_leaves_the_previous_one(tiny_demo, tmp_path, uninterrupted):
    """Rank 1's shard of checkpoint 4 is half written (its temporary file) when the actor is
    SIGKILLed: checkpoint 4 never gets a manifest, the run goes on from checkpoint 2 and ends
    with the uninterrupted run's weights."""
    shard = tmp_path / "run" / "checkpoint-00000004" / "rank00001.pt"
    env = {**os.environ, faults.SLOW_WRITE_ENV: f"4:{shard}"}  # that one write pauses half-way
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(DRIVER + tiny_run_args(tiny_demo, tmp_path / "run", *COMMON, "--address",
                                                       shared_ray_address()),
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not shard.with_name(shard.name + TMP_SUFFIX).exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(dict(placement_tables(log.read_text())[0])["1"], signal.SIGKILL)  # rank 1
    assert not (shard.parent / checkpoint.MANIFEST).exists()
    proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"going on from {tmp_path / 'run' / 'checkpoint-00000002'}" in text, text[-3000:]
    assert_same_tensors(uninterrupted, shard_tensors(tmp_path / "run" / "checkpoint-00000010"))


@pytest.mark.timeout(300)
def test_past_max_restarts_the_run_stops_with_a_clear_error(tiny_demo, tmp_path):
    args = tiny_run_args(tiny_demo, tmp_path / "run", *COMMON, "--max-restarts", "0")
    status, out = run_and_kill_an_actor(args, tmp_path, after_line="step 3/10")
    assert status == 1, out[-3000:]
    assert "error: training failed: " in out and "restart 1/" not in out


def test_only_failures_of_the_machinery_are_restarted():
    import ray
    import torch.distributed as dist

    from cluster.launch.failures import restartable

    def task_error(cause: Exception):
        return ray.exceptions.RayTaskError("train_step", "Traceback ...", cause)

    peer_gone = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:16805: Connection reset by peer")
    assert restartable(task_error(peer_gone))
    assert restartable(task_error(dist.DistBackendError("NCCL communicator was aborted")))
    assert restartable(ray.exceptions.ActorDiedError())
    assert not restartable(task_error(RuntimeError("failure injected by ALEXNET_INJECT_FAILURE at rank 1, step 2")))
    assert not restartable(task_error(ValueError("labels must be in [0, 10)")))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transient", [True, False])
def test_a_nan_loss_goes_back_to_the_checkpoint_once(tiny_demo, tmp_path, transient, monkeypatch, capsys,
                                                     shared_ray):
    # the loss of step 5 is NaN (its update spoils the weights): the run goes back to step 4's
    # checkpoint once. A fault that does not come back (transient) lets it finish; one that does
    # stops it, naming the step.
    monkeypatch.setenv(faults.NAN_ENV, f"5:{tmp_path / 'marker'}" if transient else "5")
    status = main(tiny_run_args(tiny_demo, tmp_path / "run", *COMMON))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert f"loss is nan at step 5: lower --lr or check the data; going on once from {tmp_path / 'run'}" in out
    before, after = placement_pids(out)
    assert after == before  # back to the checkpoint on the same, well actors
    if transient:
        assert status == 0 and "done: 10 steps" in out, out[-3000:]
    else:
        assert status == 1, out[-3000:]
        assert "error: training failed: loss is nan at step 5: again, after going on once from" in out


@pytest.mark.timeout(300)
def test_a_hung_actor_is_caught_by_the_collective_timeout_and_replaced(tiny_demo, tmp_path, monkeypatch, capsys,
                                                                       shared_ray):
    # rank 1 sleeps through step 5 (once): rank 0's exchange times out after 5 s, the mesh is
    # rebuilt from the last complete checkpoint and the run finishes
    monkeypatch.setenv(faults.HANG_ENV, f"1:5:{tmp_path / 'marker'}")
    status = main(tiny_run_args(tiny_demo, tmp_path / "run", *COMMON, "--collective-timeout-s", "5"))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert status == 0, out[-3000:]
    # step 4's checkpoint is asynchronous: its manifest comes after step 5, which never ends
    assert re.search(r"restart 1/3: RuntimeError: .*Timed out", out), out[-3000:]
    assert f"going on from {tmp_path / 'run' / 'checkpoint-00000002'}" in out
    assert "done: 10 steps" in out
