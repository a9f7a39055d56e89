"""The proxy middleware that resends a request whose ingress replica died before answering (no Ray)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from serve.proxy_retry import (
    MAX_REPLAYED_BODY_BYTES,
    RETRY_AFTER_S,
    RetryUnansweredRequests,
    proxy_middlewares,
)


def _scope(method: str, body_length: int | None) -> dict[str, Any]:
    headers = [] if body_length is None else [(b"content-length", str(body_length).encode())]
    return {"type": "http", "method": method, "path": "/v1/score", "headers": headers}


class FakeProxyApp:
    """Stands in for Serve's proxy app: answers nothing (as when the ingress replica dies) for the first
    ``dead`` calls, then echoes the body it received with 200."""

    def __init__(self, dead: int) -> None:
        self.dead = dead
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        assert scope["path"] == "/v1/score"  # every attempt sees the request as the client sent it
        scope["path"] = "/score"  # as Serve's proxy strips a route prefix, in place
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        self.bodies.append(b"".join(chunks))
        if len(self.bodies) <= self.dead:
            return  # the proxy caught the replica's death and sent nothing
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.bodies[-1]})


def _call(app: FakeProxyApp, body: bytes, method: str = "POST", chunk: int = 7, declared: bool = True,
          disconnect: bool = False) -> list[dict]:
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect:
        messages = messages[:1] + [{"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # a connected client sends nothing more
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    middleware = RetryUnansweredRequests(app)
    asyncio.run(middleware(_scope(method, len(body) if declared else None), receive, send))
    return sent


def test_a_request_unanswered_once_is_sent_again_with_its_body() -> None:
    app = FakeProxyApp(dead=1)
    body = json.dumps({"slide": "her2-2.tiff", "seed": 3}).encode()
    sent = _call(app, body)
    assert app.bodies == [body, body]
    assert sent[0]["status"] == 200 and sent[1]["body"] == body


def test_a_request_unanswered_twice_gets_503_json_with_retry_after() -> None:
    app = FakeProxyApp(dead=2)
    sent = _call(app, b'{"slide": "a.svs"}')
    assert len(app.bodies) == 2
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"content-type"] == b"application/json"
    assert headers[b"retry-after"] == str(RETRY_AFTER_S).encode()
    assert "unavailable" in json.loads(body["body"])["detail"]


def test_large_or_undeclared_bodies_are_streamed_once_never_resent() -> None:
    large = b"x" * (MAX_REPLAYED_BODY_BYTES + 1)
    for body, declared in [(large, True), (b"chunked upload", False)]:
        app = FakeProxyApp(dead=1)
        sent = _call(app, body, chunk=65536, declared=declared)
        assert app.bodies == [body]  # passed through whole, one attempt
        assert sent[0]["status"] == 503


def test_an_answered_request_and_a_gone_client_are_not_resent() -> None:
    app = FakeProxyApp(dead=0)
    assert _call(app, b"", method="GET", declared=False)[0]["status"] == 200
    assert len(app.bodies) == 1
    app = FakeProxyApp(dead=5)
    assert _call(app, b"0123456789abcdef", disconnect=True) == []  # the client left mid-body: no one to answer
    assert app.bodies == []


def test_the_proxy_callback_returns_the_middleware() -> None:
    (middleware,) = proxy_middlewares()
    assert middleware.cls is RetryUnansweredRequests
