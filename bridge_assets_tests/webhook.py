"""A real HTTP receiver for bridge's alert webhook (`BRIDGE_ALERT_WEBHOOK`): it keeps every JSON
payload POSTed to it, as a team's chat or pager endpoint would receive them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertSink(ThreadingHTTPServer):
    def __init__(self, failures: int = 0) -> None:
        """`failures`: the first POSTs answered 503 (an endpoint having a bad moment)."""
        self.received: list[dict] = []
        self.refused = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                return

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if sink.refused < failures:
                    sink.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                sink.received.append(payload)
                self.send_response(204)
                self.end_headers()

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/bridge"

    def kinds(self) -> list[str]:
        return [event["kind"] for event in self.received]


@contextmanager
def alert_sink(failures: int = 0) -> Iterator[AlertSink]:
    sink = AlertSink(failures)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        yield sink
    finally:
        sink.shutdown()
        sink.server_close()
