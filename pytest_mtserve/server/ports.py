"""Port checks done before starting servers.

PyTriton does not fail on a busy port: it waits 60-120 s and times out, or silently talks
to another server already there. Checking first turns that into an immediate, named error.
"""

from __future__ import annotations

import errno
import socket


class PortInUseError(RuntimeError):
    """A port we were asked to listen on is taken by another process."""


def pick_free_port(host: str) -> int:
    """Return a port on ``host`` that is free right now (the OS picks it)."""
    with _bound_socket(host, 0) as sock:
        return int(sock.getsockname()[1])


def ensure_port_free(host: str, port: int, what: str, *, option: str | None = None) -> None:
    """Raise ``PortInUseError`` at once if ``port`` on ``host`` cannot be listened on.

    ``what`` names the listener in the message ("Triton HTTP"); ``option`` is the
    command-line flag that sets this port, so the message can say how to avoid the clash.
    """
    bind_listening_socket(host, port, what, option=option).close()


def bind_listening_socket(host: str, port: int, what: str, *, option: str | None = None) -> socket.socket:
    """Bind ``port`` on ``host`` (0 = any free port) for a server to listen on.

    Handing the bound socket to the server leaves no window in which another process can
    take the port between the check and the server's own bind. Errors as ``ensure_port_free``.
    """
    try:
        return _bound_socket(host, port)
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        fix = f"pass {option} 0 to pick a free one" if option else "choose another port"
        raise PortInUseError(
            f"port {port} on {host} ({what}) is already in use; {fix} or stop the other process"
        ) from None


def bind_listening_sockets(host: str, port: int, count: int, what: str, *, option: str | None = None) -> list[socket.socket]:
    """``count`` sockets bound to one port on ``host`` (0 = any free port), one per server
    process, and the kernel spreads new connections over them (``SO_REUSEPORT``).

    From one shared socket, whichever process wakes first accepts a whole burst of new
    connections (an event loop accepts until none is left), and HTTP clients keep theirs
    open: one process would answer most requests of a run while the others idle.
    Errors as ``bind_listening_socket``.
    """
    probe = bind_listening_socket(host, port, what, option=option)
    if count == 1:
        return [probe]
    # Sockets of a SO_REUSEPORT group may share the port with other processes of this user that
    # set the option too (another server on the same --port): the probe, bound without it,
    # fails on any holder. It has to go before the group can bind.
    port = probe.getsockname()[1]
    probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            group.append(_bound_socket(host, port, reuse_port=True))
    except OSError as error:
        for sock in group:
            sock.close()
        if error.errno != errno.EADDRINUSE:
            raise
        raise PortInUseError(f"port {port} on {host} ({what}) was taken while binding it; start the server again") from None
    return group


def _bound_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Lets a port that only has connections in TIME_WAIT count as free, as servers
    # (Triton, uvicorn) set the same option; a live listener still makes bind fail.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
