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


def _bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Lets a port that only has connections in TIME_WAIT count as free, as servers
    # (Triton, uvicorn) set the same option; a live listener still makes bind fail.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
