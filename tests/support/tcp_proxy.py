"""A small threaded TCP forwarder for fault injection: cut the network to a server at will.

``TcpProxy(target_host, target_port)`` listens on 127.0.0.1:<free port> and forwards every
connection to the target. ``cut()`` closes every live connection (with a reset, as a dead
network or a restarted server would) and makes new ones fail at once; ``restore()`` forwards
again. No external tools.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from typing import Any

__all__ = ["TcpProxy"]

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Pipe:
    """One client connection and its upstream connection, pumped by one thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="tcp-proxy-pipe", daemon=True)

    def _run(self) -> None:
        peers = {self.client: self.upstream, self.upstream: self.client}
        try:
            while not self.closed:
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    peers[src].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        _reset(self.client)
        _reset(self.upstream)
        self.proxy._forget(self)


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_host``:``target_port``; cut and restore."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._stop = threading.Event()
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections closed at once because the proxy was cut
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- control -------------------------------------------------------------------------
    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def cut(self) -> None:
        """Close every live connection and refuse new ones until ``restore()``."""
        self._cut.set()
        self._close_all()

    def restore(self) -> None:
        self._cut.clear()

    def live_connections(self) -> int:
        with self._lock:
            return len(self._pipes)

    def close(self) -> None:
        self._stop.set()
        self._cut.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_all()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------
    def _close_all(self) -> None:
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.close()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if self._cut.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(self, client, upstream)
            with self._lock:
                if self._cut.is_set():  # cut() ran while we were connecting upstream
                    self.refused += 1
                    _reset(client)
                    _reset(upstream)
                    continue
                self._pipes.add(pipe)
                self.accepted += 1
            pipe.thread.start()
