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

Imports only the standard library; never imports ray. The rendezvous store that binds
127.0.0.1 is cluster/rank/rendezvous.py.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Callable

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


