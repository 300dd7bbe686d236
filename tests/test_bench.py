"""Every benchmark in bench/ runs in its `--quick` mode, so none can rot: each must finish, print its
ratio against the baseline it measures alongside, and write its JSON. The numbers of a quick run
mean nothing (tiny sizes, a shared machine); docs/BENCHMARKS.md has the full runs."""

import json
import subprocess
import sys

import pytest

from raytools import REPO

pytestmark = pytest.mark.ray  # most start a local Ray


def run_bench(name: str, tmp_path, *args: str, timeout: int = 300) -> tuple[str, dict]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--json", str(out), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_tower_parallel(tmp_path):
    out, result = run_bench("tower_parallel", tmp_path)
    assert "ratio two-actor / reference" in out
    assert result["results"][0]["ratio"] > 0


def test_pipeline(tmp_path):
    out, result = run_bench("pipeline", tmp_path)
    assert [(r["schedule"], r["microbatches"]) for r in result["rows"]] == [("1f1b", 2), ("gpipe", 2)]
    assert all(r["ratio"] > 0 and 0 <= r["bubble"] < 1 for r in result["rows"])


def test_scaling(tmp_path):
    out, result = run_bench("scaling", tmp_path)
    assert "R=2 / R=1 images/s" in out and result["measured"]["ratio_R2_R1"] > 0


def test_checkpoint(tmp_path):
    out, result = run_bench("checkpoint", tmp_path, "--dir", str(tmp_path))
    assert result["save_s"] and result["disk_s"] and result["async_step_s"]


def test_data_pipeline(tmp_path):
    out, result = run_bench("data_pipeline", tmp_path, "--corpus", str(tmp_path / "corpus"))
    assert {"c/a", "c/b", "d/a", "d/b"} <= result["ratios"].keys()


def test_metrics_overhead(tmp_path, tiny_demo):
    out, result = run_bench("metrics_overhead", tmp_path, "--train-data", tiny_demo.train_pattern, "--val-data",
                            tiny_demo.val_pattern, "--num-classes", "10", "--image-size", "64", "--resize", "72",
                            "--batch-size", "8")
    assert "on/off" in out and result["ratio"] > 0


def test_input(tmp_path):
    out, result = run_bench("input", tmp_path, "--corpus", str(tmp_path / "corpus"))
    assert "K=2 / K=1" in out and result["k2_over_k1"] > 0 and result["k2_over_old"] > 0


def test_inference(tmp_path):
    out, result = run_bench("inference", tmp_path)
    assert "ratio infer / plain" in out and result["ratio"] > 0 and result["images"] == 20
