"""The driver end to end: bad input fails before any actor with one clear line; a run trains,
evaluates and checkpoints; an actor's exception reaches the user with its traceback; every
listener of a local run is on 127.0.0.1; nothing is left running."""

import json
import os
import re
import subprocess
import time

import pytest
import ray
import torch

from cluster.ckpt import checkpoint
import nettools
from cluster.driver import main
from cluster.launch.actor_mesh import ActorMesh
from cluster import faults
from raytools import short_tmpdir
from runs import DRIVER, assert_nothing_left, assert_same_tensors, placement_pids, shard_tensors, tiny_run_args


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "100", "--microbatches", "3"],
     "batch_size 100 must be divisible by microbatches 3: allowed microbatches are divisors of the batch"),
    (["--recipe", "resnet"], "recipe must be one of alexnet_2012, cuda_convnet_2012, demo, got 'resnet'"),
    (["--towers", "3"], "towers must be one of 1, 2, got 3"),
    (["--fc-width", "255"], "fc_width must be a positive multiple of 2 (the towers share fc6 and fc7 equally), got 255"),
    (["--replicas", "0"], "replicas must be in 1..1024, got 0"),
    (["--stage-resources", "1=ssd"], "stage_resources must be STAGE=RESOURCE items with STAGE in 0..0"),
    (["--lr-scaling", "sqrt"], "lr_scaling must be one of linear, none, got 'sqrt'"),
    (["--stages", "9"], "stages must be one of 1, 2, 3, 4, 5, 6, 7, 8, got 9"),
    (["--stages", "2", "--stage-split", "conv1-conv2 | conv2-fc8"], "stage_split: split 'conv1-conv2 | conv2-fc8' repeats conv2"),
    (["--schedule", "interleaved"], "schedule must be one of 1f1b, gpipe, got 'interleaved'"),
    (["--variant", "alexnet-v2"], "variant must be one of paper, cuda-convnet-2012, got 'alexnet-v2'"),
    (["--lr-schedule", "cosine"], "lr_schedule must be one of plateau, milestones, recorded, got 'cosine'"),
    (["--train-data", "/nonexistent/train-{000000..000003}.tar"], "train_data: "),
    # floats: range and finiteness (NaN passes no comparison, so a bare `< 0` check lets it through)
    (["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "lr must be a finite number >= 0, got inf"),
    (["--momentum", "1.5"], "momentum must be in [0, 1), got 1.5"),
    (["--weight-decay", "-0.1"], "weight_decay must be a finite number >= 0, got -0.1"),
    (["--dropout", "1"], "dropout must be in [0, 1), got 1.0"),
    (["--bucket-mb", "0"], "bucket_mb must be a finite number > 0, got 0.0"),
    (["--max-bad-fraction", "nan"], "max_bad_fraction must be in [0, 1], got nan"),
    (["--collective-timeout-s=-inf"], "collective_timeout_s must be a finite number > 0, got -inf"),
    (["--placement-timeout-s", "0"], "placement_timeout_s must be a finite number > 0, got 0.0"),
    (["--loader-timeout-s", "nan"], "loader_timeout_s must be a finite number > 0, got nan"),
    (["--loss-scale", "0"], "loss_scale must be a finite number > 0, got 0.0"),
    # the loaders and precision
    (["--loaders-per-replica", "-1"], "loaders_per_replica must be >= 0, got -1"),
    (["--loaders-per-replica", "65"], "loaders_per_replica must be in 0..64 (0: auto), got 65"),
    (["--prefetch", "0"], "prefetch must be >= 1, got 0"),
    (["--precision", "fp8"], "precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    (["--grad-reduce-dtype", "fp16"], "grad_reduce_dtype must be one of fp32, bf16, got 'fp16'"),
])

def test_invalid_config_fails_before_any_actor_with_one_line(args, message, tmp_path, capsys, driver_never_starts_ray):
    empty = tmp_path / "empty"
    empty.mkdir()
    defaults = {"--train-data": str(empty / "x.tar"), "--val-data": str(empty)}
    for flag, value in defaults.items():
        if flag not in args:
            args = args + [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err


def test_every_float_option_has_a_checked_range():
    """A float field without an entry in FLOAT_RANGES would accept NaN."""
    import dataclasses

    from cluster.config import FLOAT_RANGES, TrainConfig

    floats = {f.name for f in dataclasses.fields(TrainConfig) if f.type in (float, "float")}
    assert floats == set(FLOAT_RANGES), floats ^ set(FLOAT_RANGES)


def test_help_shows_each_flags_value_in_the_chosen_recipe(capsys):
    from cluster.driver import parse_args

    for recipe, batch in (("demo", "32"), ("alexnet_2012", "128")):
        with pytest.raises(SystemExit):
            parse_args(["--recipe", recipe, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"images per optimizer step (per replica) ({recipe}: {batch})" in text
        assert "9% slower measured" in text  # a literal % in a help string is shown, not formatted


def test_unreadable_shard_pattern_names_the_option(tmp_path, capsys, driver_never_starts_ray):
    empty = tmp_path / "no-shards-here"
    empty.mkdir()
    assert main(["--train-data", str(empty), "--val-data", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train_data: ") and str(empty) in err and len(err.splitlines()) == 1




def _listeners_while_running(proc: subprocess.Popen) -> set:
    """Poll the listening sockets of the driver's whole process tree until it exits."""
    seen = set()
    while proc.poll() is None:
        tree = nettools.process_tree(roots=[proc.pid], pgids=[proc.pid])
        seen.update((l.process, l.addr, l.port) for l in nettools.listening_sockets(tree))
        time.sleep(0.2)
    return seen


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_local_run_trains_checkpoints_and_listens_on_loopback_only(tiny_demo):
    with short_tmpdir("drv") as tmp:
        # 28 steps (the 10 × 6 training images, batch 8 -> 7 steps per epoch, 4 epochs), so the run
        # lasts long enough for its listeners (the loaders' too) to be seen
        args = tiny_run_args(tiny_demo, tmp / "run", "--epochs", "4", "--microbatches", "2", "--lr", "0.004")
        with open(tmp / "driver.log", "w") as log:
            proc = subprocess.Popen(DRIVER + args, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            seen = _listeners_while_running(proc)
        out = (tmp / "driver.log").read_text()
        assert proc.returncode == 0, out[-4000:]
        assert_nothing_left(proc.pid)
    # --lr is for the demo's lr_batch of 32 images: linear scaling gives batch 8 a quarter of it
    assert "initial ε 0.001 (0.004 per 32 images, linear scaling)" in out, out
    assert re.search(r"step \d+/28 \| epoch \d+/4 \| loss [\d.]+ \| lr 0.001 \| [\d.]+ img/s .*\| data wait \d+% \| ETA ", out), out
    assert re.search(r"epoch 4/4: train loss [\d.]+ \| val loss [\d.]+ \| val top-1 [\d.]+% \| val top-5", out), out
    store = re.search(r"rendezvous 127\.0\.0\.1:(\d+)", out)
    assert store, out
    assert "checkpoint-00000028" in out
    non_loopback = {s for s in seen if not nettools.is_loopback(s[1])}
    assert not non_loopback, f"listeners beyond loopback: {non_loopback}"
    ports = {s[2] for s in seen}
    names = {s[0] for s in seen}
    assert int(store.group(1)) in ports, "the rendezvous store was never seen listening"
    assert {"gcs_server", "raylet"} <= names, names


def test_checkpoint_has_a_shard_per_rank_and_a_manifest(tiny_demo, tmp_path, capsys, shared_ray):
    assert main(tiny_run_args(tiny_demo, tmp_path / "run", "--max-steps", "2", "--eval-views", "10")) == 0
    directory = tmp_path / "run" / "checkpoint-00000002"
    manifest = checkpoint.read_manifest(str(directory))
    assert manifest["step"] == 2 and manifest["mesh"] == {"replicas": 1, "stages": 1, "towers": 2}
    assert (manifest["loader"]["epoch"], manifest["loader"]["next_batch"]) == (0, 2)  # resume: batch 2 next
    assert [s["file"] for s in manifest["shards"]] == ["rank00000.pt", "rank00001.pt"]
    for shard in manifest["shards"]:
        assert checkpoint.sha256_file(str(directory / shard["file"])) == shard["sha256"]
    assert f"checkpoint: {directory}" in capsys.readouterr().out
    assert ray.is_initialized()  # a Ray the driver found running is left as it was


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_actor_exception_surfaces_with_traceback_and_nonzero_exit(tiny_demo, tmp_path):
    # rank 1 raises at its third step while rank 0 waits for it in a collective: the driver must
    # report rank 1's error at once (not wait out the collective timeout) and leave nothing behind
    env = {**os.environ, faults.FAILURE_ENV: "1:2"}
    proc = subprocess.Popen(DRIVER + tiny_run_args(tiny_demo, tmp_path / "run"), env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert_nothing_left(proc.pid)
    assert "error: training failed" in err
    assert re.search(r"File \".*cluster/rank/worker.py\", line \d+, in train_step", err), err[-3000:]
    assert "failure injected by ALEXNET_INJECT_FAILURE at rank 1, step 2" in err
    assert "step 2/7" in out and "step 4/7" not in out
    # nor wait for rank 0, blocked in the collective, to tear its process group down: killed at once
    assert "process-group teardown failed" not in err


def test_a_second_run_reuses_the_actors_and_trains_as_on_new_ones(tiny_demo, tmp_path, capsys, shared_ray):
    """A run that ended cleanly keeps its mesh; the next run of the process with the same processes
    (shape, placement, environment) configures those actors afresh instead of starting new ones,
    and its weights, momentum and RNG are bitwise those of the same run on new actors."""
    def run(name, *extra):
        assert main(tiny_run_args(tiny_demo, tmp_path / name, "--max-steps", "3", "--dropout", "0.5", *extra)) == 0
        return capsys.readouterr().out

    ActorMesh.shutdown_idle()  # new actors for the first run
    first = run("first", "--lr", "0.02", "--seed", "7", "--variant", "cuda-convnet-2012", "--eval-views", "10")
    reused = run("reused")
    ActorMesh.shutdown_idle()
    new = run("new")
    (first_pids,), (reused_pids,), (new_pids,) = map(placement_pids, (first, reused, new))
    assert len(first_pids) == 2 and reused_pids == first_pids and not set(new_pids) & set(first_pids)
    assert_same_tensors(*(shard_tensors(tmp_path / name / "checkpoint-00000003") for name in ("reused", "new")))


def test_pipeline_run_prints_its_split_and_bubble_and_writes_a_trace(tiny_demo, tmp_path, capsys, shared_ray):
    trace = tmp_path / "traces" / "step2.json"
    args = tiny_run_args(tiny_demo, tmp_path / "run", "--stages", "2", "--stage-split", "conv1-conv2 | conv3-fc8",
                         "--microbatches", "4", "--schedule", "gpipe", "--max-steps", "3", "--log-every", "1",
                         "--trace", str(trace))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pipeline stages (gpipe, 4 microbatch(es) per step):\n  stage 0: conv1, conv2  (" in out, out
    assert "  stage 1: conv3, conv4, conv5, fc6, fc7, fc8  (" in out
    assert re.search(r"step 3/3 \| .* \| exchange \d+% \| bubble \d+% \| data wait", out), out
    assert f"step 2: {trace}\npipeline bubble " in out
    assert re.search(r"stage 1 tower 1 \(rank 3\): compute \d+ ms, wait \d+ ms, bubble [\d.]+%, peak 4 microbatch", out)
    with open(trace) as f:
        events = json.load(f)["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1, 2, 3}  # 2 stages × 2 towers
    manifest = checkpoint.read_manifest(str(tmp_path / "run" / "checkpoint-00000003"))
    assert manifest["mesh"] == {"replicas": 1, "stages": 2, "towers": 2} and len(manifest["shards"]) == 4
    assert manifest["config"]["stage_split"] == "conv1-conv2 | conv3-fc8"


def test_labels_outside_the_class_range_stop_the_run_before_any_actor(tiny_demo, tmp_path, capsys,
                                                                     driver_never_starts_ray):
    # the demo labels go up to 9; told there are 5 classes, half the samples are bad
    assert main(tiny_run_args(tiny_demo, tmp_path / "run", "--num-classes", "5")) == 2
    err = capsys.readouterr().err.strip()
    assert "max_bad_fraction" in err and "label out of range" in err and len(err.splitlines()) == 1


@pytest.fixture
def inside_a_job(tmp_path, monkeypatch):
    """This process as a Ray job's driver sees itself: in Ray's copy of the working directory."""
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123456789abcdef"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}))
    monkeypatch.setenv("ALEXNET_RUNS", str(tmp_path / "durable"))
    return copy


def test_under_a_job_a_relative_run_dir_is_made_durable(tiny_demo, inside_a_job, tmp_path, capsys,
                                                       driver_never_starts_ray):
    args = tiny_run_args(tiny_demo, "runs/mine", "--show-config")
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(tmp_path / "durable" / "runs" / "mine")
    absolute = tmp_path / "elsewhere"
    assert main(tiny_run_args(tiny_demo, absolute, "--show-config")) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(absolute)  # an absolute one stays


def test_under_a_job_relative_shards_are_refused_in_one_line(tiny_demo, inside_a_job, capsys, driver_never_starts_ray):
    assert main(["--train-data", "shards/train-{000000..000001}.tar", "--val-data", tiny_demo.val_pattern]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: train_data 'shards/train-{000000..000001}.tar' is relative, and this job runs in Ray's "
                   f"temporary copy of the working directory ({inside_a_job}): pass an absolute path on storage "
                   "every node reaches")


def _has_avx512() -> bool:
    try:
        return " avx512f " in f" {open('/proc/cpuinfo').read().split('flags', 1)[1].splitlines()[0]} "
    except (OSError, IndexError):
        return False


def test_the_demo_pins_its_cpu_kernels(tiny_demo, tmp_path, capsys, shared_ray):
    """The demo's figures are the same on CPUs with and without AVX-512: its recipe limits oneDNN
    to AVX2 kernels in the actors. On an AVX-512 CPU that changes the rounding, so the weights
    differ from a run on the CPU's own kernels (which is why two machines of one kind could
    print different demo figures: docs/BENCHMARKS.md)."""
    assert main(["--recipe", "demo", "--show-config", "--run-dir", str(tmp_path / "x")]) == 0
    assert json.loads(capsys.readouterr().out)["cpu_isa"] == "avx2"
    tensors = {}
    for isa in ("avx2", "auto"):
        assert main(tiny_run_args(tiny_demo, tmp_path / isa, "--max-steps", "2", "--cpu-isa", isa)) == 0
        out = capsys.readouterr().out
        assert ("CPU kernels: AVX2 (--cpu-isa avx2)" in out) == (isa == "avx2"), out
        tensors[isa] = shard_tensors(tmp_path / isa / "checkpoint-00000002")
    same = all(torch.equal(tensors["avx2"][n], tensors["auto"][n]) for n in tensors["auto"])
    assert same != _has_avx512(), "AVX2 kernels must round differently from AVX-512 ones (and alike without)"
