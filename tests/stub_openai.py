"""A loopback OpenAI-compatible chat-completions server (stdlib ``http.server``) for teacher
tests: scripted failures, a canned or computed reply, request accounting.

The server listens as soon as it is constructed (bound to 127.0.0.1, an ephemeral port), so
tests need no readiness wait. ``plan`` is a list consumed one entry per request: ``"ok"``, an
HTTP status to fail with, ``"hang"`` (block until the client gives up), ``"garbage"`` (a 200
with a body that is not JSON) or ``"drop"`` (close the connection without a reply); after the
plan runs out every request succeeds.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    def __init__(self, reply=lambda user_text: "ok", plan=(), hold_s: float = 0.0, retry_after: str | None = None,
                 hold_until_inflight: int = 0):
        self.reply, self.plan, self.hold_s, self.retry_after = reply, list(plan), hold_s, retry_after
        # > 0: each request waits (up to 10 s) until this many are in flight, so a client's
        # concurrency shows however slowly its threads start
        self.hold_until_inflight = hold_until_inflight
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.requests: list[dict] = []  # every request body received (in arrival order)
        self.headers: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.release = threading.Event()  # set at close: unblocks "hang" handlers
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    stub.headers.append(dict(self.headers))
                    action = stub.plan.pop(0) if stub.plan else "ok"
                    stub.inflight += 1
                    stub.max_inflight = max(stub.max_inflight, stub.inflight)
                    stub.changed.notify_all()
                    if stub.hold_until_inflight:
                        stub.changed.wait_for(lambda: stub.inflight >= stub.hold_until_inflight, timeout=10)
                try:
                    if stub.hold_s:  # keep requests overlapping to observe the concurrency bound
                        stub.release.wait(stub.hold_s)
                    self._answer(action, body)
                finally:
                    with stub.lock:
                        stub.inflight -= 1

            def _answer(self, action, body):
                if action == "hang":
                    stub.release.wait(30)
                    return
                if action == "drop":
                    self.close_connection = True
                    return
                if isinstance(action, int):
                    self.send_response(action)
                    if stub.retry_after is not None:
                        self.send_header("Retry-After", stub.retry_after)
                    payload = json.dumps({"error": {"message": f"scripted failure {action}"}}).encode()
                else:
                    self.send_response(200)
                    text = stub.reply(body["messages"][-1]["content"])
                    payload = b"<html>not json" if action == "garbage" else json.dumps({
                        "id": "x", "object": "chat.completion", "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"completion_tokens": len(text.split())},
                    }).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
