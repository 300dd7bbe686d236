"""The rendezvous of a mesh's process group, bound to the address it is given and nothing else.

Rank 0 answers "where do we meet" with its node's address and a free port (`free_port`); every
rank then builds its `TCPStore` with `make_store`. torch's store listens on the wildcard address
by default, whatever host it is given; `make_store` hands it a socket already bound to the host
instead (cluster/launch/localnet.py explains the whole loopback default).
"""

from __future__ import annotations

import os
import re
import socket
import stat
from datetime import timedelta

LOOPBACK = "127.0.0.1"


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


