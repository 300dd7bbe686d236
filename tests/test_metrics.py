"""Monitoring: the driver's Prometheus metrics seen through a real Prometheus server (and Ray's own
metrics next to them), the run's history across a restart and across a resume by a new driver,
the progress line and the summary tables."""

import math
import re
import socket
import urllib.request

import pytest
import ray

from cluster.launch import localnet
from cluster.driver import main
from cluster.launch.failures import restart_cause
from cluster.telemetry.history import HistoryWriter, read_history
from cluster.telemetry.metrics import RESTART_CAUSES, SNAPSHOT_FILE, Exporter
from cluster.telemetry.progress import Progress
from monitored import NAN_STEP, TOTAL_STEPS, monitored_run
from prometheus_client.parser import text_string_to_metric_families
from runs import tiny_run_args

pytestmark = [pytest.mark.xdist_group("monitored"), pytest.mark.ray]  # one worker makes the shared run (tests/monitored.py), with Ray


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_demo):
    return monitored_run(tmp_path_factory.mktemp("monitored"), tiny_demo)


def by_label(result: list, label: str) -> dict:
    return {series["metric"][label]: float(series["value"][1]) for series in result}


def only_value(result: list) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_the_monitored_run_finished(run):
    assert run.returncode == 0, run.output[-4000:]
    assert f"loss is nan at step {NAN_STEP}" in run.output and f"done: {TOTAL_STEPS} steps" in run.output


def test_prometheus_received_the_drivers_series_with_sensible_values(run):
    if run.prometheus is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; CI sets ALEXNET_REQUIRE_PROMETHEUS=1)")
    answers = run.prometheus
    assert only_value(answers["images_per_second"]) > 0
    assert math.isfinite(only_value(answers["train_loss"])) and only_value(answers["train_loss"]) > 0
    assert set(by_label(answers["val_error"], "k")) == {"1", "5"}
    assert all(0 <= v <= 1 for v in by_label(answers["val_error"], "k").values())
    # the step as scraped: it rises to the last step; the one drop is the restart going back to
    # the checkpoint of step 8
    steps = [float(v) for _, v in answers["step_samples"][0]["values"]]
    assert steps[-1] == TOTAL_STEPS and steps[0] < steps[-1]
    assert sum(b < a for a, b in zip(steps, steps[1:])) <= 1, steps
    # one series per actor, labelled by tower (stage 0, replica 0): both towers computed and exchanged
    for name in ("compute_seconds", "exchange_seconds"):
        series = {(s["metric"]["replica"], s["metric"]["stage"], s["metric"]["tower"]): float(s["value"][1])
                  for s in answers[name]}
        assert set(series) == {("0", "0", "0"), ("0", "0", "1")}, series
        assert all(v > 0 for v in series.values()), series
    assert all(v > 50 * 2**20 for v in by_label(answers["actor_rss"], "tower").values())  # a torch process
    restarts = by_label(answers["restarts"], "cause")
    assert restarts == {cause: (1.0 if cause == "nonfinite_loss" else 0.0) for cause in RESTART_CAUSES}
    # checkpoints every 4 steps: 4 and 8 before the NaN at step 10, then 12, 16, 20 and the last, 21
    assert only_value(answers["checkpoints"]) == 6
    info = answers["run_info"][0]["metric"]
    assert (info["recipe"], info["mesh"], info["towers"]) == ("demo", "1x1x2", "2")


def test_prometheus_found_rays_own_metrics_through_the_shipped_service_discovery(run):
    if run.prometheus is None:
        pytest.skip("no prometheus binary (apt-get install prometheus; CI sets ALEXNET_REQUIRE_PROMETHEUS=1)")
    assert any(float(s["value"][1]) == 1 for s in run.prometheus["ray_up"]), run.prometheus["ray_up"]
    assert any(name.startswith("ray_") for name in run.prometheus["ray_names"]), run.prometheus["ray_names"][:20]


def test_the_history_keeps_each_step_once_across_the_restart(run):
    raw = (run.run_dir / "metrics.jsonl").read_text()
    # the first attempt logged step 9, then the NaN at step 10 sent the run back to step 8's
    # checkpoint, and the second attempt logged step 9 again
    assert len(re.findall(r'"kind": "steps", "time": [\d.e+]+, "step": 9,', raw)) == 2
    history = read_history(str(run.run_dir))
    assert [s["step"] for s in history.steps] == list(range(1, TOTAL_STEPS + 1))
    assert [s["step"] for s in history.starts] == [0, 8]
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3] and all(e["finished"] for e in history.epochs)
    assert [c["step"] for c in history.checkpoints] == [4, 8, 12, 16, 20, 21]
    assert [(r["step"], r["cause"]) for r in history.restarts] == [(NAN_STEP - 1, "nonfinite_loss")]
    for record in history.steps:  # the phases of every actor add up to the interval's loop time
        for actor in record["actors"]:
            phases = sum(v for k, v in actor.items() if k not in ("replica", "stage", "tower"))
            assert phases == pytest.approx(record["seconds"], rel=0.02), (record, actor)


def test_progress_lines_and_summary_tables_read_well(run):
    out = run.output
    assert re.search(r"metrics: Prometheus metrics on http://127\.0\.0\.1:\d+/metrics", out), out[:2000]
    assert re.search(rf"step 21/{TOTAL_STEPS} \| epoch 3/3 \| loss [\d.]+ \| lr [\d.e-]+ \| [\d.]+ img/s "
                     r"\| train top-1 [\d.]+% \| exchange \d+% \| data wait \d+% \| ETA ", out), out[-3000:]
    # at each epoch's end: train top-k, rates, then milliseconds per step of each (stage, tower)
    assert len(re.findall(r"\n  train top-1 [\d.]+%, top-5 [\d.]+% \| [\d.]+ img/s \(decoding \d+ img/s\)", out)) == 3
    assert re.search(r"\n  stage 0 tower 1 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+\n", out), out[-3000:]
    summary = out[out.index("run summary: 3 epoch(s)"):]
    assert len(re.findall(r"\n +[123] +[\d.]+ +[\d.]+% +[\d.]+% +[\d.]+ +[\d.]+% +[\d.]+%", summary)) == 3, summary
    assert f"{TOTAL_STEPS} steps," in summary and "1 restart(s) (1 nonfinite_loss)" in summary


def test_the_snapshot_holds_the_runs_last_values(run):
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families((run.run_dir / SNAPSHOT_FILE).read_text())
               for s in family.samples}
    assert samples[("alexnet_step", ())] == TOTAL_STEPS
    # images trained: 9 steps of 8 before the NaN (step 10's is not counted), 13 after going back to 8
    assert samples[("alexnet_images_total", ())] == (9 + 13) * 8
    assert samples[("alexnet_step_duration_seconds_count", ())] == 9 + 13
    assert samples[("alexnet_last_checkpoint_step", ())] == TOTAL_STEPS
    assert samples[("alexnet_checkpoint_bytes", ())] > 0


def test_a_new_driver_resuming_the_run_continues_its_history(tiny_demo, tmp_path, capsys, shared_ray):
    run_dir = tmp_path / "run"
    # 4 of the epoch's 7 steps without an exporter (the history is written all the same), then the
    # rest by a second driver, which resumes at the checkpoint of step 4
    assert main(tiny_run_args(tiny_demo, run_dir, "--log-every", "1", "--max-steps", "4", "--metrics-addr", "off",
                              "--no-report")) == 0
    first = capsys.readouterr().out
    assert "metrics: " not in first and not (run_dir / SNAPSHOT_FILE).exists() and not (run_dir / "report").exists()
    assert re.search(r"\n +1\* ", first[first.index("run summary"):]), first  # the epoch, marked as cut short
    assert main(tiny_run_args(tiny_demo, run_dir, "--log-every", "1", "--metrics-addr", "127.0.0.1:0", "--report")) == 0
    second = capsys.readouterr().out
    history = read_history(str(run_dir))
    assert [s["step"] for s in history.starts] == [0, 4]
    assert [s["step"] for s in history.steps] == list(range(1, 8))
    assert [(e["epoch"], e["finished"]) for e in history.epochs] == [(1, True)]
    assert "run summary: 1 epoch(s)" in second and "7 steps," in second and "; * an epoch" not in second
    assert (run_dir / SNAPSHOT_FILE).exists() and (run_dir / "report" / "report.md").exists()


def test_a_fresh_start_in_an_old_run_dir_supersedes_its_history(tmp_path):
    writer = HistoryWriter(str(tmp_path))
    writer.write("start", step=0, epoch=1)
    for step in (2, 4, 6):
        writer.write("steps", step=step, epoch=1)
    writer.write("epoch", step=6, epoch=1)
    writer.write("start", step=4, epoch=1)  # resumed at 4: step 6 and the epoch are logged again
    writer.write("steps", step=6, epoch=1, again=True)
    before_restart = read_history(str(tmp_path))
    assert [(s["step"], s.get("again", False)) for s in before_restart.steps] == [(2, False), (4, False), (6, True)]
    assert before_restart.epochs == []
    writer.write("start", step=0, epoch=1)  # --resume never: a new run in the same dir
    writer.write("steps", step=2, epoch=1, new=True)
    writer.close()
    history = read_history(str(tmp_path))
    assert [(s["step"], s.get("new")) for s in history.steps] == [(2, True)] and len(history.starts) == 1


def test_progress_line_shows_train_top1_of_the_steps_since_the_last_line():
    progress = Progress(10)
    for hits in (2, 6):  # 8 of 16 images right
        progress.update(8, 1.0, hits)
    assert "| 8.0 img/s | train top-1 50.0% | ETA 8s" in progress.line(0, 1, 2.0, 0.01)
    progress.update(8, 1.0)  # no hits reported (e.g. a caller without them): no top-1
    assert "train top-1" not in progress.line(0, 1, 2.0, 0.01)


def test_a_taken_port_falls_back_to_a_free_one_and_serves():
    with socket.socket() as taken:
        taken.bind((localnet.LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        exporter = Exporter()
        try:
            url = exporter.serve(localnet.LOOPBACK, port)
            assert re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", url) and f":{port}/" not in url
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert "# TYPE alexnet_step gauge" in answer.read().decode()
        finally:
            exporter.close()


def test_metrics_addr_must_be_host_and_port(tmp_path, capsys, driver_never_starts_ray):
    assert main(["--metrics-addr", "9408", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: metrics_addr must be HOST:PORT (port 0..65535, 0: any free one) or `off`, got '9408'"


def test_restart_causes_are_named_from_the_failure():
    def task_error(cause: Exception):
        return ray.exceptions.RayTaskError("train_step", "Traceback ...", cause)

    assert restart_cause(ray.exceptions.ActorDiedError()) == "actor_died"
    assert restart_cause(task_error(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                                                 "5000ms for recv operation to complete"))) == "collective_timeout"
    assert restart_cause(task_error(RuntimeError("[gloo/transport/tcp/pair.cc:537] Connection reset by peer"))) \
        == "collective_failed"
