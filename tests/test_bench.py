"""Every benchmark in bench/ runs in its `--quick` mode, so none can rot: each must finish, print its
ratio against the baseline it measures alongside, and write its JSON. The numbers of a quick run
mean nothing (tiny sizes, a shared machine); docs/BENCHMARKS.md has the full runs.

The benchmarks that use Ray run in this process on the session's Ray (`bench_here`), as their
`main` joins a Ray it finds running (cluster.launch.session.ray_session): a process and a Ray
start less each. The others run as the scripts they are (`run_bench`): the data pipeline pins its
process to a core, the actor-start bench times fresh processes."""

import json
import runpy
import subprocess
import sys

import pytest
import torch

from raytools import REPO
from runs import TINY_MODEL

pytestmark = pytest.mark.ray  # most start a local Ray


def run_bench(name: str, tmp_path, *args: str, timeout: int = 300) -> tuple[str, dict]:
    """`python bench/NAME.py --quick` in its own process: (stdout, its JSON)."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--json", str(out), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture
def bench_here(tmp_path, monkeypatch, capsys, shared_ray):
    """`bench_here(NAME, *args)`: bench/NAME.py's `main(["--quick", ...])` in this process, in
    `tmp_path`, with bench/ first on the import path as for the script, on the session's Ray:
    (what it printed, its JSON). Torch's thread count, which a bench may set, is put back."""

    def run(name: str, *args: str) -> tuple[str, dict]:
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(REPO / "bench"))  # as for the script: its folder first (its siblings)
        out = tmp_path / f"{name}.json"
        main = runpy.run_path(str(REPO / "bench" / f"{name}.py"), run_name=f"bench_{name}")["main"]
        threads = torch.get_num_threads()
        try:
            status = main(["--quick", "--json", str(out), *args])
        finally:
            torch.set_num_threads(threads)
        printed = capsys.readouterr()
        assert status == 0, printed.out[-3000:] + printed.err[-3000:]
        return printed.out, json.loads(out.read_text())

    return run


def test_tower_parallel(bench_here):
    out, result = bench_here("tower_parallel")
    assert "ratio two-actor / reference" in out
    assert result["results"][0]["ratio"] > 0


def test_pipeline(bench_here):
    out, result = bench_here("pipeline")
    assert [(r["schedule"], r["microbatches"]) for r in result["rows"]] == [("1f1b", 2), ("gpipe", 2)]
    assert all(r["ratio"] > 0 and 0 <= r["bubble"] < 1 for r in result["rows"])


def test_scaling(bench_here):
    out, result = bench_here("scaling")
    assert "R=2 / R=1 images/s" in out and result["measured"]["ratio_R2_R1"] > 0


def test_checkpoint(tmp_path):
    out, result = run_bench("checkpoint", tmp_path, "--dir", str(tmp_path))
    assert result["save_s"] and result["disk_s"] and result["async_step_s"]


def test_data_pipeline(tmp_path):
    out, result = run_bench("data_pipeline", tmp_path, "--corpus", str(tmp_path / "corpus"))
    assert {"c/a", "c/b", "d/a", "d/b", "d/b_256", "d_load/b_256"} <= result["ratios"].keys()
    assert "seeded by numpy per sample" in out and result["seeding_ratio"] > 0


def test_metrics_overhead(bench_here, tiny_demo):
    out, result = bench_here("metrics_overhead", "--train-data", tiny_demo.train_pattern, "--val-data",
                            tiny_demo.val_pattern, *TINY_MODEL, "--batch-size", "8")
    assert "on/off" in out and result["ratio"] > 0


def test_input(bench_here, tmp_path):
    out, result = bench_here("input", "--corpus", str(tmp_path / "corpus"))
    assert "K=2 / K=1" in out and result["k2_over_k1"] > 0 and result["k2_over_old"] > 0
    assert all(cores and min(cores) >= 0 for cores in result["sink_cores"].values())


def test_gpu_check_dry_run_needs_nothing_but_torch():
    """`bench/gpu_check.sh --device cpu --quick` with Ray, pyarrow, numpy, PIL, webdataset and simplejpeg
    made unimportable, as on the GPU machine (PyTorch and Python only)."""
    blocked = ("ray", "pyarrow", "numpy", "PIL", "webdataset", "simplejpeg", "matplotlib", "prometheus_client")
    code = (f"import runpy, sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            "sys.argv = ['bench/gpu_check.py', '--device', 'cpu', '--quick']\n"
            "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "logits, fp32, cpu vs cpu" in out and ": ok" in out
    for precision in ("fp32", "bf16"):
        for layout in ("off", "on"):
            assert f"| {precision} | {layout} | 8 |" in out, out
    assert "not measured (webdataset or simplejpeg missing)" in out


def test_precision(bench_here):
    out, result = bench_here("precision")
    rows = {r["precision"]: r for r in result["rows"]}
    assert rows["fp32"]["exchange_dtypes"] == ["float32"] and rows["bf16"]["exchange_dtypes"] == ["bfloat16"]
    # half the bytes, but for the sharded loss's few fp32 values (2 per image and tower)
    for half in ("bf16", "fp16"):
        assert 0.5 < rows[half]["exchange_bytes"] / rows["fp32"]["exchange_bytes"] < 0.51


def test_inference(bench_here):
    out, result = bench_here("inference")
    assert "ratio infer / plain" in out and result["ratio"] > 0 and result["images"] == 20


def test_actor_start(tmp_path):
    out, result = run_bench("actor_start", tmp_path)
    assert "ratio ours / baseline" in out and result["ratio"] > 0
    assert result["imports_dynamo"] == {"baseline": True, "ours": False}
    assert result["loader"]["imports_torch"] == {"baseline": True, "ours": False}  # a loader actor: no PyTorch
