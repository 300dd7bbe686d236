"""The README's cluster path, exactly: `ray start --head`, then `ray job submit --working-dir .
--runtime-env ray_job.yaml -- python cluster/driver.py`, with the real Ray CLI on 127.0.0.1; and
`ray job stop` then the same `ray job submit` again goes on from the last checkpoint."""

import subprocess
import time

import pytest
import torch

from cluster.ckpt import checkpoint
from cluster.driver import main
from raytools import RAY_CLI, REPO, own_head, short_tmpdir
from test_resume import shard_tensors


@pytest.mark.timeout(400)
def test_ray_job_submit_trains_on_a_running_cluster(tiny_demo):
    with short_tmpdir("job") as tmp, own_head(tmp, num_cpus=3) as head:
        run_dir = tmp / "run"
        driver_args = ["--train-data", tiny_demo.train_pattern, "--val-data", tiny_demo.val_pattern,
                       "--num-classes", "10", "--image-size", "64", "--resize", "72", "--batch-size", "8",
                       "--epochs", "1", "--max-steps", "3", "--run-dir", str(run_dir)]
        submit = subprocess.run(
            [str(RAY_CLI), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
             "--runtime-env", "ray_job.yaml", "--", "python", "cluster/driver.py", *driver_args],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=360)
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out, out[-4000:]
        assert "mesh up: 1 replica(s) × 1 stage(s) × 2 tower process(es)" in out, out[-4000:]
        assert "done: 3 steps" in out, out[-4000:]
        manifest = checkpoint.read_manifest(str(run_dir / "checkpoint-00000003"))
        assert manifest["step"] == 3 and len(manifest["shards"]) == 2


@pytest.mark.timeout(600)
def test_a_stopped_job_submitted_again_goes_on_exactly(tiny_demo, shared_ray):
    with short_tmpdir("stop") as tmp, own_head(tmp, num_cpus=3) as head:
        args = ["--train-data", tiny_demo.train_pattern, "--val-data", tiny_demo.val_pattern, "--num-classes", "10",
                "--image-size", "64", "--resize", "72", "--batch-size", "8", "--epochs", "2", "--max-steps", "12",
                "--checkpoint-every", "2", "--log-every", "1"]

        def job(*words: str, timeout: float = 360) -> subprocess.CompletedProcess:
            return subprocess.run([str(RAY_CLI), "job", *words], cwd=REPO, env=head.env, capture_output=True,
                                  text=True, timeout=timeout)

        submit = ["submit", "--address", head.dashboard, "--working-dir", ".", "--runtime-env", "ray_job.yaml"]
        driver = ["--", "python", "cluster/driver.py", *args, "--run-dir", str(tmp / "run")]
        assert job(*submit, "--no-wait", "--submission-id", "first", *driver).returncode == 0
        deadline = time.monotonic() + 240
        while not (tmp / "run" / "checkpoint-00000004" / checkpoint.MANIFEST).exists():
            assert time.monotonic() < deadline, job("logs", "--address", head.dashboard, "first").stdout[-3000:]
            time.sleep(0.5)
        stopped = job("stop", "--address", head.dashboard, "first")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "stopped" in (stopped.stdout + stopped.stderr).lower()
        again = job(*submit, "--submission-id", "again", *driver)
        out = again.stdout + again.stderr
        assert again.returncode == 0 and "succeeded" in out, out[-4000:]
        assert f"resumed from {tmp / 'run' / 'checkpoint-0000000'}" in out and "done: 12 steps" in out, out[-4000:]
        resumed = shard_tensors(tmp / "run" / "checkpoint-00000012")
    # the same 12 steps without a stop, in this process: bitwise the same weights
    with short_tmpdir("straight") as straight:
        assert main(args + ["--run-dir", str(straight / "run")]) == 0
        uninterrupted = shard_tensors(straight / "run" / "checkpoint-00000012")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
