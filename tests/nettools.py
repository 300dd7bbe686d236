"""Test-only networking: Ray's token auth with a private token, `ray start --head` arguments on
loopback, and the tools that check what listens where
(`listening_sockets`, `is_loopback`) and which processes a Ray session left (`process_tree`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
from typing import Iterable, NamedTuple

from cluster.launch.localnet import LOOPBACK


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
