"""Loopback-only networking for local (single-host) training runs.

Security default: when the trainer runs locally (no cluster address given),
every listening socket the job opens must be bound to 127.0.0.1, never to
0.0.0.0 / :: / the host's external address.  This module collects the knobs
that achieve that for Ray 2.60 and torch.distributed (gloo), and the tools
tests use to verify it.

What is needed, and why (measured with ``ss -ltnp`` on Ray 2.60 / torch 2.13):

Ray
    Every Ray component decides its bind address from the *node IP*: when the
    node IP is a localhost address, GCS, raylet (node manager and object
    manager), core-worker gRPC servers, dashboard agent (gRPC, HTTP,
    metrics), runtime-env agent, autoscaler and dashboard metrics servers and
    the Ray client server all bind 127.0.0.1; otherwise they bind ``*``
    (``[::]`` dual stack), ``0.0.0.0`` or the external IP.  But
    ``ray.init(_node_ip_address="127.0.0.1")`` and ``ray start
    --node-ip-address=127.0.0.1`` are rewritten to the host's routable address
    by ``services.resolve_ip_for_localhost`` -> ``get_node_ip_address``, unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is false, which is controlled by the
    environment variable ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (read once, when
    ``ray`` is imported).  Setting it to ``0`` makes the node IP 127.0.0.1.
    Its only other effect is that ``ray start --address=...`` (joining a
    *worker* node) is refused, which a local run never does.  There is no
    ``RAY_NODE_IP_ADDRESS`` / ``RAY_OVERRIDE_NODE_IP_ADDRESS`` in Ray 2.60.
    The dashboard (needed for ``ray job submit``) binds ``dashboard_host``,
    default 127.0.0.1; it is kept and pinned explicitly.

torch.distributed
    ``TCPStore(host_name="127.0.0.1", ...)`` still listens on ``*`` (both the
    libuv and the legacy backend bind the wildcard; ``host_name`` is only
    used by clients).  The fix is ``master_listen_fd``: bind a socket to
    127.0.0.1 ourselves and hand its fd to the store (supported by the legacy
    backend for long, by the libuv backend since torch 2.8).  No environment
    variable selects the store's bind address.

gloo
    Each rank opens one listening socket for its pairs, bound to the address
    of its "device": ``GLOO_SOCKET_IFNAME`` if set, else whatever the machine's
    hostname resolves to (127.0.0.1 only on hosts whose /etc/hosts says so),
    else loopback.  ``init_process_group`` ignores ``pg_options`` for gloo, so
    ``GLOO_SOCKET_IFNAME=lo`` (set in the rank's process before the group is
    created) is the way.  NCCL's bootstrap/socket transport is the same idea:
    ``NCCL_SOCKET_IFNAME=lo`` (documented, not verified here: no GPU).

Imports only the standard library and (lazily) torch; never imports ray.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
from datetime import timedelta
from typing import Callable, Iterable, NamedTuple

LOOPBACK = "127.0.0.1"

#: Read by ``ray._private.ray_constants`` at import; "0" keeps 127.0.0.1 as the
#: node IP instead of rewriting it to the host's routable address.
RAY_LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------


def loopback_ifname() -> str:
    """Name of the loopback interface ("lo" on Linux, "lo0" on macOS/BSD)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:  # pragma: no cover - platform without if_nameindex
        names = []
    for cand in ("lo", "lo0"):
        if cand in names:
            return cand
    return "lo"


def collective_loopback_env() -> dict[str, str]:
    """Env vars that pin gloo's pair sockets (and NCCL's bootstrap/socket
    transport) to the loopback interface.

    Must be in the environment of every rank *before* its process group is
    created (gloo reads ``GLOO_SOCKET_IFNAME`` when ``ProcessGroupGloo`` is
    constructed).  ``NCCL_SOCKET_IFNAME`` is the NCCL equivalent for local
    multi-GPU runs; it is untested here (no GPU).
    """
    ifname = loopback_ifname()
    return {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname}


def loopback_env() -> dict[str, str]:
    """Env vars to set before starting a *local* Ray (``ray.init`` or
    ``ray start --head``) so that every Ray listener binds 127.0.0.1.

    * ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: keep 127.0.0.1 as node IP (see
      module docstring).  Must be set before ``import ray`` in the driver, or
      use :func:`apply_loopback_env`, which also patches an already imported
      ray.  Child processes (raylet, agents, workers, job drivers) inherit it.
    * ``RAY_USAGE_STATS_ENABLED=0``: a local run makes no outbound reports.
    * :func:`collective_loopback_env`: workers inherit it from the raylet, so
      actors creating gloo/NCCL groups get loopback devices.
    """
    env = {RAY_LOOPBACK_NODE_ENV: "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(collective_loopback_env())
    return env


def apply_loopback_env(environ: dict | None = None) -> Callable[[], None]:
    """Put :func:`loopback_env` into ``environ`` (default ``os.environ``) and,
    if ``ray`` is already imported in this process, flip the constant it read
    at import time (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``).

    Call it in the driver before ``ray.init(**local_ray_init_kwargs())``.
    Returns a function that restores the previous state.
    """
    environ = os.environ if environ is None else environ
    saved = {k: environ.get(k) for k in loopback_env()}
    environ.update(loopback_env())
    consts = sys.modules.get("ray._private.ray_constants")
    saved_const = getattr(consts, "ENABLE_RAY_CLUSTER", None) if consts else None
    if consts is not None and hasattr(consts, "ENABLE_RAY_CLUSTER"):
        consts.ENABLE_RAY_CLUSTER = False

    def undo() -> None:
        for k, v in saved.items():
            if v is None:
                environ.pop(k, None)
            else:
                environ[k] = v
        if consts is not None and saved_const is not None:
            consts.ENABLE_RAY_CLUSTER = saved_const

    return undo


def token_auth_env(token_path: str, *, create: bool = True) -> dict[str, str]:
    """Env vars that turn on Ray token authentication with a private token
    file (instead of the shared ``~/.ray/auth_token``).

    Loopback binding keeps other hosts out, not other local users: token auth
    is the second half of the local security default.  ``ray.init`` enables it
    by default for a new local cluster; ``ray start --head`` only if a token
    already exists; the ``ray job`` CLI only if ``RAY_AUTH_MODE=token`` is set.
    Put these vars in the env of ``ray start``, ``ray job submit`` and the
    driver.  With ``create`` a random token is written (mode 0600) if missing.
    """
    if create and not os.path.exists(token_path):
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path}


# ---------------------------------------------------------------------------
# Ray arguments
# ---------------------------------------------------------------------------


def local_ray_init_kwargs(
    *, include_dashboard: bool = True, dashboard_port: int | None = None
) -> dict:
    """kwargs for ``ray.init`` when starting a local cluster (no address).

    Only effective together with :func:`apply_loopback_env` (or
    :func:`loopback_env` set before ``import ray``): without it Ray rewrites
    ``_node_ip_address="127.0.0.1"`` to the host's address.  The dashboard
    (needed for ``ray job submit``) is kept and bound to 127.0.0.1.
    """
    kwargs = {
        "_node_ip_address": LOOPBACK,
        "include_dashboard": include_dashboard,
        "dashboard_host": LOOPBACK,
    }
    if dashboard_port is not None:
        kwargs["dashboard_port"] = dashboard_port
    return kwargs


def ray_start_head_args(
    *,
    port: int,
    dashboard_port: int,
    dashboard_agent_listen_port: int | None = None,
    ray_client_server_port: int | None = None,
) -> list[str]:
    """Arguments for ``ray start --head`` bound to loopback (run it with
    :func:`loopback_env` in its environment; ``--node-ip-address=127.0.0.1``
    alone is rewritten to the host's address).  The agent/client ports
    default to fixed numbers (52365, 10001) in Ray; pass free ones to avoid
    clashing with another Ray on the same host.
    """
    args = [
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        "--include-dashboard=true",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
    ]
    if dashboard_agent_listen_port is not None:
        args.append(f"--dashboard-agent-listen-port={dashboard_agent_listen_port}")
    if ray_client_server_port is not None:
        args.append(f"--ray-client-server-port={ray_client_server_port}")
    return args


# ---------------------------------------------------------------------------
# Ports and the rendezvous store
# ---------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = LOOPBACK, *, reserve: bool = True) -> int:
    """A TCP port that is free on ``host``, for a server started later by
    another process (Ray's ``--port``/``dashboard_port`` and the like).

    The kernel picks the port (bind to port 0 on ``host``, never the
    wildcard).  With ``reserve`` the port is left in TIME_WAIT (we accept a
    loopback connection on it and close the server side first): for about 60 s
    the kernel will not hand it out as an ephemeral port to anyone else, but
    servers that set SO_REUSEADDR (gRPC, aiohttp, Ray's own port check,
    TCPStore) can still bind it.  This narrows, not closes, the race; where a
    socket can be handed over instead (TCPStore: :func:`make_store`), no port
    number needs to travel at all.
    """
    fam = _family(host)
    with socket.socket(fam, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, 0))
        port = srv.getsockname()[1]
        if not reserve:
            return port
        srv.listen(1)
        with socket.socket(fam, socket.SOCK_STREAM) as cli:
            cli.connect(srv.getsockname()[:2])
            conn, _ = srv.accept()
            conn.close()  # active close on the server side -> TIME_WAIT on port
    return port


def _torch_libuv_takes_fd() -> bool:
    """The libuv TCPStore backend honours ``master_listen_fd`` since 2.8."""
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (2, 8)


def make_store(
    host: str,
    port: int,
    world_size: int,
    rank: int,
    timeout: float | timedelta = 300.0,
):
    """Create the rendezvous ``TCPStore``; rank 0's server binds ``host`` only.

    Rank 0 binds a listening socket to ``(host, port)`` itself and passes its
    fd as ``master_listen_fd``: the store adopts (and later closes) it, so the
    server never listens on the wildcard.  ``port=0`` lets the kernel choose;
    read the result from ``store.port`` and send it to the other ranks (no
    free-port race at all).  Other ranks connect to ``(host, port)``.
    """
    import torch.distributed as dist

    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if rank != 0:
        return dist.TCPStore(
            host, port, world_size, False, timeout=timeout, wait_for_workers=False
        )

    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, 2 * world_size))
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    ino = os.fstat(sock.fileno()).st_ino
    fd = sock.detach()  # ownership moves to the store
    kwargs = {} if _torch_libuv_takes_fd() else {"use_libuv": False}
    try:
        return dist.TCPStore(
            host,
            port,
            world_size,
            True,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=fd,
            **kwargs,
        )
    except BaseException:
        try:  # close it only if the failed store did not already
            if stat.S_ISSOCK(os.fstat(fd).st_mode) and os.fstat(fd).st_ino == ino:
                os.close(fd)
        except OSError:
            pass
        raise


def init_loopback_process_group(
    backend: str,
    store,
    rank: int,
    world_size: int,
    timeout: float | timedelta = 300.0,
) -> None:
    """``torch.distributed.init_process_group`` over ``store`` with the
    collective's own sockets pinned to loopback (:func:`collective_loopback_env`
    is put into this process's environment first)."""
    import torch.distributed as dist

    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    os.environ.update(collective_loopback_env())
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout
    )


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------


class Listener(NamedTuple):
    pid: int | None  # None if the owner is not visible to us
    addr: str  # as bound: "127.0.0.1", "::ffff:127.0.0.1", "::", "0.0.0.0", ...
    port: int
    process: str  # command name ("" if unknown)


def is_loopback(addr: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped ::ffff:127.x.y.z.

    Wildcards ("*", "0.0.0.0", "::") and any other address are False."""
    addr = addr.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


_USERS_RE = re.compile(r'\("([^"]*)",pid=(\d+),fd=\d+\)')


def _split_local(local: str) -> tuple[str, int]:
    host, _, port = local.rpartition(":")
    if host.startswith("["):  # [::ffff:127.0.0.1] or [fe80::1]%eth0
        host = host[1:].replace("]", "", 1)
    host = host.split("%", 1)[0]  # 127.0.0.1%lo (SO_BINDTODEVICE)
    if host == "*":
        host = "::"  # ss prints a dual-stack [::] listener as "*"
    return host, int(port)


def _from_ss(ss: str) -> list[Listener]:
    out = subprocess.run(
        [ss, "-ltnpH"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    result = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] != "LISTEN":
            continue
        host, port = _split_local(fields[3])
        users = _USERS_RE.findall(" ".join(fields[5:]))
        if not users:
            result.append(Listener(None, host, port, ""))
        for name, pid in users:
            result.append(Listener(int(pid), host, port, name))
    return result


def _from_proc() -> list[Listener]:
    """Fallback without iproute2: /proc/net/tcp{,6} + /proc/<pid>/fd."""
    by_inode: dict[str, tuple[str, int]] = {}
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            mapped = getattr(ip, "ipv4_mapped", None)
            addr = f"::ffff:{mapped}" if mapped else str(ip)  # as ss prints it
            by_inode[f[9]] = (addr, int(hexport, 16))
    result, seen = [], set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode in by_inode:
                    seen.add(inode)
                    result.append(Listener(int(pid), *by_inode[inode], comm))
    result += [Listener(None, *a, "") for i, a in by_inode.items() if i not in seen]
    return result


def listening_sockets(pids: Iterable[int] | None = None) -> list[Listener]:
    """Listening TCP sockets (IPv4 and IPv6), from ``ss -ltnpH`` (or /proc if
    ``ss`` is missing).  With ``pids`` only sockets owned by those processes
    (a socket shared by several processes is listed once per process)."""
    ss = shutil.which("ss") or next(
        (p for p in ("/usr/sbin/ss", "/sbin/ss", "/usr/bin/ss") if os.path.exists(p)),
        None,
    )
    listeners = _from_ss(ss) if ss else _from_proc()
    if pids is None:
        return listeners
    wanted = set(pids)
    return [lst for lst in listeners if lst.pid in wanted]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every process we can see."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            data = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()  # after "pid (comm) "
        if rest[0] != "Z":
            table[int(pid)] = (int(rest[1]), int(rest[2]))
    return table


def process_tree(roots: Iterable[int] = (), pgids: Iterable[int] = ()) -> set[int]:
    """Live pids in ``roots`` or in process groups ``pgids``, plus all their
    descendants.  Use it to collect one Ray session's processes: a driver
    that ran ``ray.init`` (its children are the GCS, raylet, dashboard...; the
    raylet's are the agents and workers) or the process group of a
    ``ray start --head`` launched with ``start_new_session=True``."""
    table = _proc_table()
    roots, pgids = set(roots), set(pgids)
    found = {p for p, (_, g) in table.items() if p in roots or g in pgids}
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    stack = list(found)
    while stack:
        for c in children.get(stack.pop(), ()):
            if c not in found:
                found.add(c)
                stack.append(c)
    return found
