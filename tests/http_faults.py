"""A reply lost on the way back, for end-to-end tests: `LoseOneReply` sits between workers and a real API server,
forwards every HTTP/1.1 request, and for the first request whose path ends with a given suffix lets the server
handle it (it commits) but closes the client's connection instead of passing the reply on, as a network or a
database connection dying just after a commit would. Start it with `start()`, point workers at `url`,
`close()` at the end.
"""
from __future__ import annotations

import socket
import threading

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


class LoseOneReply:
    def __init__(self, upstream: str, path_suffix: str):
        self.path_suffix = path_suffix
        self.lost: list[str] = []  # the paths whose reply was dropped (at most one)
        self._upstream = httpx.Client(base_url=upstream, timeout=60.0)
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "LoseOneReply":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._upstream.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                request_line = reader.readline()
                if not request_line.strip():
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while (line := reader.readline().decode("latin-1").strip()):
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", 0)))
                forwarded = {k: v for k, v in headers.items() if k not in HOP_BY_HOP and k != "host"}
                reply = self._upstream.request(method, path, headers=forwarded, content=body)
                if self._lose(path):
                    return  # the server did the work; its client never hears of it
                head = [f"HTTP/1.1 {reply.status_code} {reply.reason_phrase}"]
                head += [f"{k}: {v}" for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP]
                head += [f"content-length: {len(reply.content)}", "", ""]
                client.sendall("\r\n".join(head).encode("latin-1") + reply.content)
        except (OSError, ValueError, httpx.HTTPError):
            return
        finally:
            reader.close()
            client.close()

    def _lose(self, path: str) -> bool:
        with self._lock:
            if self.lost or not path.endswith(self.path_suffix):
                return False
            self.lost.append(path)
            return True
