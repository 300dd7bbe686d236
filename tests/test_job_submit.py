"""The README's cluster path, as a newcomer copies it: the block of "Running on a Ray cluster" run
line by line with the real Ray CLI on 127.0.0.1 — on a fresh machine (no ~/.ray/auth_token) and
after `make demo` (a token already there) — and where a job's checkpoints go: under
$ALEXNET_RUNS, not Ray's temporary copy of the working directory, so that the same command
submitted after a code change resumes; the last line's paths work with cluster.report and
cluster.export. And `ray job stop`, then the same `ray job submit`, goes on exactly."""

import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cluster import faults
from cluster.ckpt import checkpoint
from cluster.driver import main
from raytools import RAY_CLI, REPO, own_head, short_tmpdir
from runs import TINY_MODEL, shard_tensors

pytestmark = pytest.mark.ray  # starts Ray or its actors (`make test-fast` leaves these out)

README_BLOCK = [
    ". .venv/bin/activate",
    "ray get-auth-token --generate > /dev/null",
    "export RAY_AUTH_MODE=token",
    "ray start --head",
    "ray job submit --working-dir . --runtime-env ray_job.yaml -- python cluster/driver.py",
]


def readme_block() -> list[str]:
    """The commands of the README's "Running on a Ray cluster" block, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Running on a Ray cluster", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_block_is_the_one_tested():
    assert readme_block() == README_BLOCK


def tiny_args(demo, *extra) -> list[str]:
    return ["--train-data", demo.train_pattern, "--val-data", demo.val_pattern, *TINY_MODEL, "--batch-size", "8",
            "--epochs", "1", *extra]


def working_copy(into) -> str:
    """The repository's tracked files (what a user has checked out), to submit from and to change."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)
    return str(into)


def run_block(home, head, cwd: str, driver_args: list[str]) -> subprocess.CompletedProcess:
    """The README's commands after `ray start --head` (which `own_head` ran with loopback ports):
    the token, the auth mode and the submit, in the user's shell (HOME = `home`)."""
    script = "\n".join([
        "set -e",
        f". {REPO}/.venv/bin/activate",  # README_BLOCK[0], from the copy's own place
        README_BLOCK[1],
        README_BLOCK[2],
        f"{README_BLOCK[4].replace('ray job submit', f'ray job submit --address {head.dashboard}', 1)} "
        + " ".join(driver_args),
    ])
    env = {**head.env, "HOME": str(home)}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=420)


@pytest.mark.timeout(600)
def test_a_job_from_a_fresh_machine_checkpoints_durably_and_resumes_after_a_code_change(tiny_demo):
    with short_tmpdir("job") as tmp:
        home, runs = tmp / "home", tmp / "runs"
        home.mkdir()
        env = {"ALEXNET_RUNS": str(runs)}
        # a fresh machine: no ~/.ray/auth_token yet; the README generates it before `ray start --head`
        subprocess.run([str(RAY_CLI), "get-auth-token", "--generate"], env={"HOME": str(home), "PATH": ""},
                       capture_output=True, check=True)
        copy = working_copy(tmp / "work")
        with own_head(tmp, num_cpus=3, extra_env=env, home=home) as head:
            first = run_block(home, head, copy, tiny_args(tiny_demo, "--max-steps", "2"))
            out = first.stdout + first.stderr
            assert first.returncode == 0 and "succeeded" in out, out[-4000:]
            durable = runs / "runs" / "demo"  # the recipe's default run dir, made durable
            assert re.search(rf"^recipe demo: .*; run dir {re.escape(str(durable))} \(a Ray job", out, re.MULTILINE), out
            assert (durable / "checkpoint-00000002" / checkpoint.MANIFEST).exists()
            assert "mesh up: 1 replica(s) × 1 stage(s) × 2 tower process(es)" in out and "done: 2 steps" in out
            with open(f"{copy}/README.md", "a") as readme:  # a code change: Ray makes a new package
                readme.write("\n<!-- changed -->\n")
            again = run_block(home, head, copy, tiny_args(tiny_demo, "--max-steps", "4"))
            out = again.stdout + again.stderr
            assert again.returncode == 0, out[-4000:]
            assert f"resumed from {durable / 'checkpoint-00000002'}" in out, out[-4000:]
            done = re.search(r"^done: 4 steps, .*; checkpoint (\S+); report (\S+)$", out, re.MULTILINE)
            assert done and done.group(1) == str(durable / "checkpoint-00000004"), out[-3000:]
        checkpoint_dir, report_dir = done.groups()
        for command in (["cluster.report", report_dir, "--out", str(tmp / "plots")],
                        ["cluster.export", checkpoint_dir, str(tmp / "net.pt")]):
            proc = subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.timeout(600)
def test_a_stopped_job_submitted_again_goes_on_exactly(tiny_demo, shared_ray):
    # after `make demo`: its local Ray left a token in ~/.ray/auth_token
    with short_tmpdir("stop") as tmp:
        home = tmp / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text("a-token-from-make-demo-" + "0" * 40)
        args = tiny_args(tiny_demo, "--epochs", "2", "--max-steps", "12", "--checkpoint-every", "2", "--log-every",
                         "1", "--run-dir", str(tmp / "run"))
        # the first job's tower 0 sleeps at step 7 (once: the marker), so the stop lands mid-run
        # however quick the steps; the newest checkpoint is then 4 or 6
        hung = tmp / "hung"
        with own_head(tmp, num_cpus=3, home=home, extra_env={faults.HANG_ENV: f"0:7:{hung}"}) as head:
            env = {**head.env, "HOME": str(home), "RAY_AUTH_MODE": "token"}  # README_BLOCK[2]

            def job(*words: str, timeout: float = 360) -> subprocess.CompletedProcess:
                return subprocess.run([str(RAY_CLI), "job", *words], cwd=REPO, env=env, capture_output=True,
                                      text=True, timeout=timeout)

            submit = ["submit", "--address", head.dashboard, "--working-dir", ".", "--runtime-env", "ray_job.yaml"]
            driver = ["--", "python", "cluster/driver.py", *args]
            assert job(*submit, "--no-wait", "--submission-id", "first", *driver).returncode == 0
            deadline = time.monotonic() + 240
            while not (hung.exists() and (tmp / "run" / "checkpoint-00000004" / checkpoint.MANIFEST).exists()):
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
        assert main(args[:-1] + [str(tmp / "straight")]) == 0
        uninterrupted = shard_tensors(tmp / "straight" / "checkpoint-00000012")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
