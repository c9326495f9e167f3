"""What every HTTP request passes before a handler sees it, and its line in /metrics.

    slots = Slots(limit=64)
    app.add_middleware(Guard, api_key="secret", max_body_bytes=1_000_000, body_timeout=10.0,
                       slots=slots, metrics=metrics)

In order: the API key (401), the declared body size (413), a slot among `limit` requests
in flight (429), then the whole body within `max_body_bytes` and `body_timeout` seconds
(413, 408). A refusal sent before the body is read closes the connection, so a client that
keeps sending holds nothing. The slot is held from before the body is read until the answer
is complete: a slow body, tokenising and decoding all count against the same limit. A client
that leaves before its answer is complete is counted as status 499 (nginx's "client closed
request"), not as a server error. Routes of class `OffLoopRoute` parse the body's JSON on a
worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedlm.serve.metrics import Metrics
from fedlm.serve.responses import ApiError, error_response

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
"""Paths counted under their own name in /metrics; every other path is counted as "other"."""
T = TypeVar("T")
CLIENT_CLOSED = 499
JSON_INLINE_BYTES = 1 << 16
"""Bodies up to this size are parsed on the event loop (well under a millisecond)."""


class Slots:
    """Requests in flight, at most `limit`; safe from any thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self.in_flight >= self.limit:
                raise ApiError(429, f"too many requests in flight (limit {self.limit}); retry "
                               "shortly", type="rate_limit_error", code="rate_limit_exceeded")
            self.in_flight += 1

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


class Guard:
    """ASGI middleware: API key, slots, body size and time limits, and per-request metrics."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int,
                 body_timeout: float, slots: Slots, metrics: Metrics) -> None:
        self.app = app
        self.expected = None if api_key is None else b"Bearer " + api_key.encode()
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.slots = slots
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, complete, left = 500, False, False

        async def watched_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def watched_receive() -> Message:
            nonlocal left
            message = await receive()
            left = left or message["type"] == "http.disconnect"
            return message

        try:
            await self._guarded(scope, watched_receive, watched_send)
        finally:
            if left and not complete:
                status = CLIENT_CLOSED
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.request(endpoint, status, seconds=time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                await error_response(401, "missing or wrong API key: send 'Authorization: "
                                     "Bearer <key>'", code="invalid_api_key",
                                     close=True)(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            if _declared_length(headers) > self.max_body_bytes:
                raise self._too_large()
            self.slots.acquire()
        except ApiError as e:
            await e.response(close=True)(scope, receive, send)
            return
        try:
            try:
                body = await self._read_body(receive)
            except ApiError as e:
                await e.response(close=True)(scope, receive, send)
                return
            if body is None:
                return  # the client left while sending
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.slots.release()

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left; ApiError 413 or 408 past the limits."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.max_body_bytes:
                        raise self._too_large()
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout") from None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over the limit of {self.max_body_bytes} bytes",
                        code="request_too_large")


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over the body already read, then the client's later messages."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


_WORKER = ThreadPoolExecutor(1, thread_name_prefix="fedlm-off-loop")


async def off_loop(size: int, inline_below: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, on a worker thread when `size` says it is big enough to stall the loop.

    Small work stays on the loop, so a small request's work never queues behind big work.
    Big work runs one at a time on one thread: CPU-bound Python holds the GIL, so more
    threads would not run it faster, only take more turns from the event loop.
    """
    if size < inline_below:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_WORKER, functools.partial(fn, *args))


class _OffLoopJSON(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await off_loop(len(body), JSON_INLINE_BYTES, json.loads, body)
        return self._json


class OffLoopRoute(APIRoute):
    """A FastAPI route that parses a large JSON body on a worker thread.

    Parsing a body near the size limit takes milliseconds of CPU; on the event loop, a flood
    of such bodies would stall every other request, each of which needs several turns of the
    loop (FastAPI's documented way to change how a route reads its request).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OffLoopJSON(request.scope, request.receive))

        return route
