"""One short training run watched by a real Prometheus, shared by the monitoring tests
(test_metrics, test_report, test_dashboard): the first test that asks runs it, the others in the
same pytest process reuse it.

The run: the driver as a subprocess on the tiny demo data, 3 epochs of 7 steps, a progress line
every step, a checkpoint every 4 steps, its exporter on a free loopback port, and a NaN loss
injected once at step 10, so the run goes back to its last checkpoint (a restart, counted) and
steps past that checkpoint are logged twice in the history. Ray's temp dir is a fresh directory,
so its service-discovery file is this run's.

Prometheus: Debian's `prometheus` (.ci/run installs it), on a free loopback port with a temporary
storage dir, configured from the shipped monitoring/prometheus.yml with only the addresses and
the scrape interval (1 s) changed. It is started before the driver and stopped after the queries.
Without the binary the run still happens and `prometheus` is None, unless
ALEXNET_REQUIRE_PROMETHEUS=1 (CI), which makes it an error.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from cluster.launch import localnet
from cluster.rank import rendezvous
from cluster import faults
from raytools import REPO
from runs import DRIVER, assert_nothing_left, tiny_run_args

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
REQUIRE_ENV = "ALEXNET_REQUIRE_PROMETHEUS"
SHIPPED_CONFIG = REPO / "monitoring" / "prometheus.yml"
RUN_ARGS = ("--epochs", "3", "--log-every", "1", "--checkpoint-every", "4", "--report")
NAN_STEP = 10  # its checkpoint before: step 8, complete once step 9 is done
TOTAL_STEPS = 21  # 10 classes × 6 images, batch 8: 7 steps an epoch

# What the tests ask Prometheus, by name: instant queries over the run's whole time range
QUERIES = {
    "images_per_second": "max_over_time(alexnet_images_per_second[15m])",
    "train_loss": "last_over_time(alexnet_train_loss[15m])",
    "val_error": "last_over_time(alexnet_val_error_ratio[15m])",
    "compute_seconds": "max_over_time(alexnet_actor_compute_seconds_total[15m])",
    "exchange_seconds": "max_over_time(alexnet_actor_exchange_seconds_total[15m])",
    "restarts": "max_over_time(alexnet_restarts_total[15m])",
    "run_info": "max_over_time(alexnet_run_info[15m])",
    "checkpoints": "max_over_time(alexnet_checkpoints_total[15m])",
    "actor_rss": "max_over_time(alexnet_actor_resident_memory_bytes[15m])",
    "ray_up": 'max_over_time(up{job="ray"}[15m])',
    "step_samples": "alexnet_step[15m]",  # a range vector: every scraped sample
}


@dataclasses.dataclass
class MonitoredRun:
    run_dir: Path
    returncode: int
    output: str
    prometheus: dict | None  # QUERIES' answers ("data.result" lists) and "ray_names"; None: no Prometheus


_cached: MonitoredRun | None = None


def prometheus_available() -> bool:
    if os.path.exists(PROMETHEUS):
        return True
    if os.environ.get(REQUIRE_ENV) == "1":
        raise RuntimeError(f"{REQUIRE_ENV}=1 but {PROMETHEUS} is missing: apt-get install prometheus")
    return False


def monitored_run(tmp_root: Path, demo) -> MonitoredRun:
    """The shared run (see the module docstring), made on first use under `tmp_root`."""
    global _cached
    if _cached is None:
        _cached = _run(tmp_root, demo)
    return _cached


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _prometheus_config(path: Path, driver_port: int, ray_tmp: Path) -> None:
    """The shipped config, pointed at this run's driver and Ray, scraping every second."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["alexnet"]["static_configs"][0]["targets"] = [f"{localnet.LOOPBACK}:{driver_port}"]
    sd = jobs["ray"]["file_sd_configs"][0]
    sd["files"] = [str(ray_tmp / "ray" / "prom_metrics_service_discovery.json")]
    sd["refresh_interval"] = "1s"
    path.write_text(yaml.safe_dump(config))


def _start_prometheus(workdir: Path, config: Path) -> tuple[subprocess.Popen, str]:
    port = rendezvous.free_port()
    log = open(workdir / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address={localnet.LOOPBACK}:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{localnet.LOOPBACK}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as answer:
                if answer.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("prometheus did not become ready in 60 s: " + (workdir / "prometheus.log").read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run(tmp_root: Path, demo) -> MonitoredRun:
    run_dir = tmp_root / "run"
    driver_port = rendezvous.free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="mon", dir="/tmp"))  # short: Ray's socket paths must fit
    prometheus = base = None
    try:
        if prometheus_available():
            config = tmp_root / "prometheus.yml"
            _prometheus_config(config, driver_port, ray_tmp)
            prometheus, base = _start_prometheus(tmp_root, config)
        env = {**os.environ, faults.NAN_ENV: f"{NAN_STEP}:{tmp_root / 'nan-once'}", "RAY_TMPDIR": str(ray_tmp)}
        args = tiny_run_args(demo, run_dir, *RUN_ARGS, "--metrics-addr", f"{localnet.LOOPBACK}:{driver_port}")
        proc = subprocess.Popen(DRIVER + args, env=env, cwd=tmp_root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        output, _ = proc.communicate(timeout=400)
        assert_nothing_left(proc.pid)  # Ray's processes too, before their temp dir goes
        answers = None
        if prometheus is not None:
            time.sleep(1.5)  # a last scrape interval
            answers = {name: query(base, expr) for name, expr in QUERIES.items()}
            names_url = f"{base}/api/v1/label/__name__/values?" + urllib.parse.urlencode({"match[]": '{job="ray"}'})
            with urllib.request.urlopen(names_url, timeout=10) as answer:
                answers["ray_names"] = json.load(answer)["data"]
        return MonitoredRun(run_dir, proc.returncode, output, answers)
    finally:
        if prometheus is not None:
            _stop(prometheus)
        shutil.rmtree(ray_tmp, ignore_errors=True)
