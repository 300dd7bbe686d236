"""`python -m cluster.experiments`: every experiment on tiny settings trains its runs through the real
driver, writes its table and figure from their histories, resumes without training again, and
refuses bad input before any run; the table's arithmetic (Δ, Figure 1's epochs to 25%) by hand."""

import pytest

from cluster import experiments
from cluster.ckpt import checkpoint
from cluster.telemetry.experiments import BASELINE, EXPERIMENTS, VARIANTS, Result, figure1_summary, table
from cluster.telemetry.history import read_history
from runs import TINY_MODEL

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_flags(demo) -> list[str]:
    # tests/runs.py's network in batches of 20: 3 steps an epoch of the 60 training images; the
    # CPU's own kernels, as its tiny_run_args (no runtime env per actor)
    return ["--train-data", demo.train_pattern, "--val-data", demo.val_pattern, *TINY_MODEL, "--batch-size", "20",
            "--log-every", "3", "--no-report", "--metrics-addr", "off", "--cpu-isa", "auto"]


@pytest.mark.timeout(600)
def test_all_experiments_train_write_their_files_and_resume(tiny_demo, tmp_path, capsys, shared_ray):
    root = tmp_path / "ablations"
    argv = ["all", "--recipe", "demo", "--epochs", "2", "--run-dir", str(root), *tiny_flags(tiny_demo)]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    for i, name in enumerate(["baseline", *EXPERIMENTS["all"]], start=1):
        assert f"experiment all: run {i}/5, {name} (" in out
        assert read_history(str(root / name)).epochs[-1]["epoch"] == 2, name  # its own run dir, both epochs
    saved = {name: checkpoint.read_manifest(str(root / name / "checkpoint-00000006"))[checkpoint.KEY_CONFIG]  # 2 × 3 steps
             for name in ["baseline", *EXPERIMENTS["all"]]}
    assert (saved["tanh"]["activation"], saved["no-lrn"]["lrn"], saved["non-overlapping"]["pooling"],
            saved["one-tower-half"]["net"], saved["one-tower-half"]["towers"]) == (
        "tanh", "off", "non-overlapping", "one-tower-half", 1)
    assert all(saved["baseline"][key] == value for key, value in
               dict(activation="relu", lrn="on", pooling="overlapping", net="two-tower", seed=0).items())
    tables = {}
    for name in ("activation", "towers", "lrn", "pooling", "all"):
        md, png = root / "experiments" / f"{name}.md", root / "experiments" / f"{name}.png"
        assert png.read_bytes().startswith(PNG), name
        tables[name] = md.read_text()
        assert f"experiment {name}: {md}, {png}" in out
    rows = [line for line in tables["all"].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(":")[0] for row in rows] == ["| baseline", "| tanh", "| one-tower-half", "| no-lrn",
                                                   "| non-overlapping"]
    baseline = read_history(str(root / "baseline")).epochs[-1]
    assert f"| {100 * baseline['val_top1_error']:.1f}% | {100 * baseline['val_top5_error']:.1f}% | — | — |" in rows[0]
    assert rows[2].endswith("| +1.7 / +1.2 |") and rows[3].endswith("| +1.4 / +1.2 |")
    assert rows[4].endswith("| +0.4 / +0.3 |") and rows[1].endswith("| Figure 1: training speed, below |")
    assert "epochs to 25% training error: ReLU" in tables["activation"] and "![activation](activation.png)" in \
        tables["activation"]
    assert "one-tower-half" in tables["towers"] and "tanh" not in tables["towers"]
    assert "all: baseline val top-1 error" in out and "all: epochs to 25% training error" in out
    # the same command again: every run dir is finished, nothing trains, the same tables
    assert experiments.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("nothing to train") == 5
    assert all((root / "experiments" / f"{name}.md").read_text() == text for name, text in tables.items())


@pytest.mark.parametrize("argv, message", [
    (["towers", "--lrn", "off"], "--lrn is the experiment's own: leave it out"),
    (["lrn", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["pooling", "--batch-size", "10", "--microbatches", "3"], "batch_size 10 must be divisible by microbatches 3"),
])
def test_bad_input_fails_before_any_run(tiny_demo, tmp_path, capsys, driver_never_starts_ray, monkeypatch, argv,
                                        message):
    monkeypatch.setattr(experiments, "ray_session", driver_never_starts_ray_session)
    argv = argv + ["--run-dir", str(tmp_path), "--train-data", tiny_demo.train_pattern,
                   "--val-data", tiny_demo.val_pattern]
    assert experiments.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit_:
        experiments.main(["relu"])
    assert exit_.value.code == 2 and "invalid choice: 'relu'" in capsys.readouterr().err


def driver_never_starts_ray_session(*args, **kwargs):
    raise AssertionError("the experiments started Ray (bad input must stop before any run)")


def result(variant, train_errors, val=(0.1, 0.01)) -> Result:
    epochs = [{"epoch": e, "train_top1_error": err, "val_top1_error": val[0], "val_top5_error": val[1]}
              for e, err in enumerate(train_errors, start=1)]
    return Result(variant, 1000, epochs)


def test_the_tables_arithmetic():
    relu = result(BASELINE, [0.6, 0.3, 0.2], val=(0.100, 0.010))
    # 25% is crossed between epoch 2 (30%) and epoch 3 (20%): 2 + (0.30 − 0.25) / (0.30 − 0.20) = 2.5
    assert relu.epochs_to(0.25) == pytest.approx(2.5)
    tanh = result(VARIANTS["tanh"], [0.9, 0.8, 0.7])
    assert tanh.epochs_to(0.25) is None
    assert figure1_summary([relu, tanh]).startswith(
        "epochs to 25% training error: ReLU 2.5, tanh not reached in 3: ReLU more than 1.2× sooner")
    fast_tanh = result(VARIANTS["tanh"], [0.5, 0.4, 0.35, 0.3, 0.25])
    assert "tanh 5.0: ReLU 2.0× sooner" in figure1_summary([relu, fast_tanh])
    one_tower = result(VARIANTS["one-tower-half"], [0.5], val=(0.123, 0.0))
    lines = table([relu, one_tower])
    # Δ: 12.3% − 10.0% = +2.3 points top-1; 0.0% − 1.0% = −1.0 top-5; the paper's +1.7 / +1.2
    assert lines[-1].endswith("| 12.3% | 0.0% | +2.3 / -1.0 | +1.7 / +1.2 |")
    assert lines[2].endswith("| 10.0% | 1.0% | — | — |")
