"""Test helpers for a real `ray start --head` on 127.0.0.1 that a test starts and stops itself.

`ray stop` would end every Ray process on the machine; these helpers signal only the process group
(and descendants) of the head the test started, in the order `ray stop` uses.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.launch import localnet
import nettools
from cluster.rank import rendezvous

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).with_name("ray")
SHARED_CPUS = 16  # logical: the largest in-process mesh, 2 replicas × (2 towers + 3 loaders), needs 10
_restore_env = None  # set while the shared Ray runs


def ensure_shared_ray() -> None:
    """The session's one in-process Ray on 127.0.0.1 (tests/conftest.py), started if not running."""
    global _restore_env
    import ray

    if not ray.is_initialized():
        _restore_env = localnet.apply_loopback_env()
        ray.init(num_cpus=SHARED_CPUS, **localnet.local_ray_init_kwargs(include_dashboard=False))


def shared_ray_address() -> str:
    """The address of the session's Ray (started if not running), for a driver run as a process
    of its own to join (`--address`)."""
    import ray

    ensure_shared_ray()
    return ray.get_runtime_context().gcs_address


def stop_shared_ray() -> None:
    global _restore_env
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _restore_env is not None:
        _restore_env()
        _restore_env = None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pids):
    return [p for p in pids if p in nettools._proc_table()]


def stop_session(pgid: int, grace: float = 5.0) -> None:
    """Stop one Ray session: its process group plus descendants, in the order
    `ray stop` uses (raylet, then the rest, then gcs_server), SIGTERM with a
    SIGKILL fallback.  Touches nothing outside that group/tree."""
    for pick in (
        lambda c: c == "raylet",
        lambda c: c not in ("raylet", "gcs_server"),
        lambda c: c == "gcs_server",
    ):
        pids = [p for p in nettools.process_tree(pgids=[pgid]) if pick(_comm(p))]
        pids = [p for p in pids if p != os.getpid()]
        for p in pids:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while _alive(pids) and time.time() < deadline:
            time.sleep(0.1)
        for p in _alive(pids):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 5
    while nettools.process_tree(pgids=[pgid]) - {os.getpid()} and time.time() < deadline:
        time.sleep(0.1)


# `ray start` gives a new raylet 30 s (a constant in ray/_private/node.py) to register with the GCS;
# on a 2-core machine under the whole suite's load it sometimes needs longer. That, and only that,
# is tried again, after stopping what the failed start left.
_REGISTRATION_TIMEOUT = "timed out during startup"
_START_ATTEMPTS = 3


def _ray_start(command: list[str], env: dict, log: Path, what: str) -> int:
    """Run a `ray start` in its own process group; the group id (every process it starts stays
    in it). Raises with the log's tail when it fails for another reason than the raylet's
    registration timeout, or for that one `_START_ATTEMPTS` times."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        with open(log, "w") as out:
            proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:  # then its group is stopped like a failed start's
            proc.kill()
            proc.wait()
        if proc.returncode == 0:
            return proc.pid
        stop_session(proc.pid)
        text = log.read_text()
        if _REGISTRATION_TIMEOUT not in text or attempt == _START_ATTEMPTS:
            raise RuntimeError(f"{what} failed ({proc.returncode}, attempt {attempt}):\n{text[-4000:]}")
        print(f"{what}: the raylet did not register within Ray's 30 s (attempt {attempt}); starting it again",
              file=sys.stderr)
    raise AssertionError("unreachable")


def head_env(workdir: Path, home: Path | None = None) -> dict:
    """Environment for `ray start`, `ray job submit` and drivers of a test's own head: a private
    auth token (or, with `home`, that HOME and whatever token auth Ray makes of its
    ~/.ray/auth_token, as for a user), free metrics ports, the project importable and this venv
    first on PATH (a job's `python` is whatever `ray start` found on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if home is None:
        env.update(nettools.token_auth_env(str(workdir / "token")))
    else:
        env["HOME"] = str(home)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Fixed default ports (44217/44227) would clash with another Ray here.
    env["AUTOSCALER_METRIC_PORT"] = str(rendezvous.free_port())
    env["DASHBOARD_METRIC_PORT"] = str(rendezvous.free_port())
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class Head:
    """A running `ray start --head` of one test: its environment, process group and addresses."""

    def __init__(self, env: dict, pgid: int, gcs_port: int, dashboard_port: int, other_ports: tuple[int, ...]):
        self.env, self.pgid = env, pgid
        self.gcs_port, self.dashboard_port, self.other_ports = gcs_port, dashboard_port, other_ports

    @property
    def dashboard(self) -> str:
        return f"http://{localnet.LOOPBACK}:{self.dashboard_port}"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.gcs_port, self.dashboard_port, *self.other_ports)


@contextlib.contextmanager
def own_head(workdir: Path, num_cpus: int = 2, extra_env: dict | None = None, home: Path | None = None):
    """Start a head on 127.0.0.1 in its own process group; stop exactly that head afterwards.
    `extra_env`: more environment for the head and what joins it (e.g. Ray system settings);
    `home`: the HOME whose ~/.ray/auth_token decides auth (head_env)."""
    gcs, dashboard, agent, client = (rendezvous.free_port() for _ in range(4))
    env = head_env(workdir, home)
    env.update(localnet.loopback_env())
    env.update(extra_env or {})
    args = nettools.ray_start_head_args(port=gcs, dashboard_port=dashboard,
                                        dashboard_agent_listen_port=agent, ray_client_server_port=client)
    command = [str(RAY_CLI), "start", *args, f"--num-cpus={num_cpus}", f"--temp-dir={workdir}"]
    pgid = _ray_start(command, env, workdir / "start.log", "ray start --head")
    try:  # every head process stays in this process group after `ray start` exits
        yield Head(env, pgid, gcs, dashboard, (agent, client))
    finally:
        stop_session(pgid)


@contextlib.contextmanager
def short_tmpdir(prefix: str):
    """A temp dir with a short path: Ray's unix sockets live under it (108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class WorkerNode:
    """A `ray start --address` of one test: a second raylet on 127.0.0.1 joined to the test's head."""

    def __init__(self, pgid: int, name: str):
        self.pgid, self.name, self.killed = pgid, name, False

    def lose(self) -> None:
        """SIGKILL every process of this node at once (its raylet, agents and actors), as a lost
        machine. (The raylet alone left its actors a second or two to finish the run first.)"""
        self.killed = True
        for pid in nettools.process_tree(pgids=[self.pgid]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# `ray start --address ...` on 127.0.0.1. Ray keeps a node's IP on loopback only while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (cluster/launch/localnet.py), and that same setting makes `ray start`
# refuse to join a worker node. This launcher lifts just the refusal, in the `ray start` process
# alone: it takes the given --node-ip-address as it is, and every process it starts (raylet,
# agents, workers) inherits the setting and stays on 127.0.0.1.
_JOIN_ON_LOOPBACK = """
import sys
from ray._private import ray_constants, services
from ray.scripts.scripts import main
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
sys.argv = ["ray", "start", *sys.argv[1:]]
main()
"""


@contextlib.contextmanager
def worker_node(head: Head, workdir: Path, name: str, num_cpus: int = 4):
    """Join a worker node with `num_cpus` CPUs and the custom resource `name` to `head`; every
    port it opens is a free one on 127.0.0.1. Stops exactly that node afterwards."""
    ports = {flag: rendezvous.free_port() for flag in (
        "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port")}
    args = [f"--address={localnet.LOOPBACK}:{head.gcs_port}", f"--node-ip-address={localnet.LOOPBACK}",
            f"--num-cpus={num_cpus}", f'--resources={{"{name}": 1}}', "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in ports.items())]
    pgid = _ray_start([sys.executable, "-c", _JOIN_ON_LOOPBACK, *args], head.env, workdir / f"start-{name}.log",
                      f"ray start (worker {name})")
    try:
        yield WorkerNode(pgid, name)
    finally:
        stop_session(pgid)
