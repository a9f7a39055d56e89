"""Serve's HTTP proxy: a request whose ingress replica died before answering is sent once more, and
answered 503 JSON with ``Retry-After`` if that fails too (never Ray's plain-text 500).

Why a proxy middleware: when the ingress replica a request went to dies (``kill -9``, a crash), Ray Serve
2.60's proxy catches the ``RayActorError`` (``ray/serve/_private/proxy.py:1388``), maps it to 500
(``ray/serve/_private/http_util.py:954-963``, ``get_http_response_status``) and sends nothing, because
``send_http_response_on_exception`` (``http_util.py:981-992``) answers only 408, 429 and 503; uvicorn then
answers ``500 Internal Server Error`` as text/plain. Nothing in our app sees that request, and Serve has no
setting to retry it. Serve does let the proxy's ASGI app be wrapped: the function named by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``ray/serve/_private/constants.py:473``, read by each proxy at
start, ``http_util.configure_http_middlewares``) returns Starlette middlewares. ``proxy_middlewares`` is that
function; ``serve.settings.patient_serve_proxy`` sets the variable before Ray starts (on a ``ray start``
cluster, set it in ``ray start``'s environment: see serve/config.yaml).

The retry is safe because every route is idempotent: scoring is a function of the slide, N, T and the seed
(a retried score gets a new ``score_id``), and the GETs read state. The retry reaches a live replica:
the proxy's router drops a replica whose call raised ``ActorDiedError``. Only a request whose body is at
most ``MAX_REPLAYED_BODY_BYTES`` is retried (the proxy holds it in memory meanwhile: a JSON scoring request is
well under 1 kB, an upload is a slide); a larger one, and one whose client went away, is not.

This module runs inside Ray's proxy actor: it imports Starlette and the standard library only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("ray.serve")

IMPORT_PATH = "serve.proxy_retry:proxy_middlewares"  # the value of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
RETRY_AFTER_S = 5  # a replaced replica or a drained queue is usually back within seconds
MAX_REPLAYED_BODY_BYTES = 1 << 20
ATTEMPTS = 2  # the first sending and one more


class RetryUnansweredRequests:
    """ASGI middleware around the proxy's app: a request the app returned from without starting an answer
    (its replica died) is sent again if its body was kept; still unanswered, it gets 503 JSON."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_REPLAYED_BODY_BYTES, attempts: int = ATTEMPTS) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.attempts = attempts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        disconnected = False
        answered = False

        async def client_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        body = await self._read_small_body(scope, client_receive)
        if disconnected:  # the client went away while sending its body: nobody to answer
            return
        attempts = self.attempts if body is not None else 1
        for attempt in range(1, attempts + 1):
            app_receive = client_receive if body is None else _replay(body, client_receive)
            try:
                # A copy per attempt: the proxy rewrites the scope it is given (it strips the route prefix
                # from ``path`` into ``root_path``), so a resent original would reach another application.
                await self.app({**scope, "headers": list(scope.get("headers", []))}, app_receive, tracked_send)
            except Exception:
                if answered:
                    raise
                logger.exception("the proxy's app failed before answering %s %s", scope.get("method"),
                                 scope.get("path"))
            if answered or disconnected:
                return
            logger.warning("%s %s: no answer from the ingress (its replica died?), attempt %d of %d",
                           scope.get("method"), scope.get("path"), attempt, attempts)
        await _send_json(send, 503, {"detail": f"scoring backend unavailable (the ingress replica died); retry in "
                                               f"{RETRY_AFTER_S} s"}, retry_after_s=RETRY_AFTER_S)

    async def _read_small_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole request body when its declared length is at most the limit, else ``None`` (then it is
        streamed to the app untouched, and not retried)."""
        length = _content_length(scope)
        if length is None or length > self.max_body_bytes:
            return None
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return 0  # no body: safe to resend
    return None  # chunked or unknown: streamed, not kept


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the kept body once, then waits on the client's (for its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, content: dict[str, Any], retry_after_s: int) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry_after_s).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): its middlewares."""
    return [Middleware(RetryUnansweredRequests)]
