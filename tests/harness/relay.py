"""A byte-counting stream relay in front of a real server (agent, S3, gdbserver).

Tests and benchmarks put it between a client and a server to measure what
crosses (bytes a collector receives, bytes gdb fetches) or to cut a
connection midway.  Each accepted connection is pumped both ways by two
threads; :meth:`Relay.passed` sees every piece and may cut its connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path


class Relay:
    """Relays every connection accepted on ``listener`` to ``connect()``."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener, self._connect = listener, connect
        self._lock = threading.Lock()
        self._pumps: list[threading.Thread] = []
        self.up = 0            # bytes client -> server
        self.down = 0          # bytes server -> client
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @classmethod
    def unix(cls, listen: Path, upstream: str) -> Relay:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(listen))
        sock.listen(16)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(upstream)
            return s
        return cls(sock, connect)

    @classmethod
    def tcp(cls, upstream: tuple[str, int]) -> Relay:
        return cls(socket.create_server(("127.0.0.1", 0)),
                   lambda: socket.create_connection(upstream))

    @property
    def address(self) -> str:
        name = self._listener.getsockname()
        return f"unix:{name}" if isinstance(name, str) else f"127.0.0.1:{name[1]}"

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def passed(self, conn: dict[str, int], to_server: bool, n: int) -> bool:
        """Called for every piece (``conn`` is this connection's own scratch);
        False cuts the connection.  Counts by default."""
        with self._lock:
            if to_server:
                self.up += n
            else:
                self.down += n
        return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = self._connect()
            except OSError:
                return
            conn: dict[str, int] = {}
            for args in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(conn, *args), daemon=True)
                t.start()
                self._pumps.append(t)

    def _pump(self, conn: dict[str, int], src: socket.socket, dst: socket.socket,
              to_server: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if not self.passed(conn, to_server, len(data)):
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def join(self, timeout: float) -> None:
        """Wait for the connections so far to end (their bytes all counted)."""
        for t in list(self._pumps):
            t.join(timeout)

    def close(self) -> None:
        self._listener.close()
