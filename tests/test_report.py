"""`python -m cluster.report RUN_DIR`: PNG plots and a markdown report from a finished run's history
(the shared monitored run of tests/monitored.py: 3 epochs, one restart); the driver writes the same
into the run dir at the end."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cluster.telemetry.history import read_history
from cluster.telemetry.plots import PLOTS, time_breakdown
from monitored import TOTAL_STEPS, monitored_run
from raytools import REPO

pytestmark = [pytest.mark.xdist_group("monitored"), pytest.mark.ray]  # one worker makes the shared run (tests/monitored.py), with Ray


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_demo):
    return monitored_run(tmp_path_factory.mktemp("monitored"), tiny_demo)


def assert_real_plot(path) -> None:
    """A valid PNG of a sensible size with something drawn on it (many colours, not one flat fill)."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert 600 <= width <= 3000 and 250 <= height <= 3000, (path, image.size)
        pixels = np.asarray(image.convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 50, (path, colours)
    assert (pixels < 128).any(axis=2).mean() > 0.005, path  # dark ink: axes, text, lines


def test_the_run_wrote_its_report_into_the_run_dir(run):
    assert run.returncode == 0, run.output[-3000:]
    report = run.run_dir / "report"
    last = [line for line in run.output.splitlines() if line.startswith("done: ")][-1]  # the run's last line
    assert last.endswith(f"; checkpoint {run.run_dir / f'checkpoint-{TOTAL_STEPS:08d}'}"
                                                       f"; report {report}"), last
    for name in PLOTS:
        assert_real_plot(report / name)
    text = (report / "report.md").read_text()
    assert len(re.findall(r"^\| [123] \| [\d.]+ \| [\d.]+% \| [\d.]+% \| [\d.]+ \| [\d.]+% \| [\d.]+% \|", text,
                          re.MULTILINE)) == 3, text
    assert f"Step {TOTAL_STEPS} of {TOTAL_STEPS}" in text and "**Restarts:** 1" in text and "nonfinite_loss" in text
    assert all(f"![{name[:-4]}]({name})" in text for name in PLOTS)


@pytest.mark.parametrize("given", ["run dir", "report dir"])
def test_the_report_command_writes_plots_of_a_finished_run(run, tmp_path, given):
    out = tmp_path / "plots"
    source = run.run_dir if given == "run dir" else run.run_dir / "report"  # as the run's last line prints it
    proc = subprocess.run([sys.executable, "-m", "cluster.report", str(source), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"report: {out}"
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS, "report.md"])
    for name in PLOTS:
        assert_real_plot(out / name)


def test_the_time_breakdown_covers_every_step_of_each_actor(run):
    totals, steps = time_breakdown(read_history(str(run.run_dir)))
    assert steps == TOTAL_STEPS  # the steps the restart made the run redo are counted once
    assert list(totals) == [(0, 0, 0), (0, 0, 1)]
    for phases in totals.values():
        assert phases["compute"] > 0 and phases["exchange"] > 0 and phases["pipeline_wait"] < phases["compute"]


def test_the_report_command_says_when_there_is_nothing_to_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.report", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: no metrics history in {tmp_path}") and len(proc.stderr.splitlines()) == 1
