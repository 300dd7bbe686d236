"""The README's cluster path, exactly: `ray start --head`, then `ray job submit --working-dir .
--runtime-env ray_job.yaml -- python cluster/driver.py`, with the real Ray CLI on 127.0.0.1."""

import subprocess

import pytest

from cluster import checkpoint
from raytools import RAY_CLI, REPO, own_head, short_tmpdir


@pytest.mark.timeout(400)
def test_ray_job_submit_trains_on_a_running_cluster(tiny_demo):
    with short_tmpdir("job") as tmp, own_head(tmp, num_cpus=2) as head:
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
