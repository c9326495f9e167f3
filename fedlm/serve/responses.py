"""How the API answers: OpenAI's error shape, one JSON body, or a stream of server-sent events.

    raise ApiError(400, "max_tokens is too large", param="max_tokens")   # -> {"error": {...}}
    return await collect(request, queue, job, ...)                      # the whole answer
    return StreamWithCleanup(sse_events(queue, job, ...), cleanup)      # SSE, ends [DONE]

Events arrive on an asyncio queue as (sequence index, Event) from the engine's thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from fedlm.serve.engine import Event, SamplingParams


class ApiError(Exception):
    """An error the client caused (or a 503 while loading), sent in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error",
        param: str | None = None, code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self, *, close: bool = False) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param,
                              code=self.code, close=close)


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error",
    param: str | None = None, code: str | None = None, close: bool = False,
) -> JSONResponse:
    """OpenAI's error body; `close` ends the connection after it (the request body may be unread)."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers={"Connection": "close"} if close else None)


class StreamWithCleanup(StreamingResponse):
    """A stream that runs `cleanup` however it ends: finished, failed or the client gone."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class Job:
    """One request's sequences: what to submit, and where their events arrive."""

    prompts: list[list[int]]
    """Token ids per prompt."""
    n: int
    params: SamplingParams
    echo: list[str] | None = None


async def collect(request: Request, queue: asyncio.Queue[tuple[int, Event]], job: Job,
                   total: int, meta: dict[str, Any], chat: bool, prompt_tokens: int,
                   note: Callable[[Event, int], None]) -> Response:
    """Wait for every sequence to finish and answer with one JSON body (or 499 if they left)."""
    texts = [job.echo[i // job.n] if job.echo else "" for i in range(total)]
    reasons: list[str | None] = [None] * total
    completion_tokens = 0
    done = 0
    checked = time.monotonic()
    while done < total:
        try:
            i, event = await asyncio.wait_for(queue.get(), timeout=0.25)
        except TimeoutError:
            event = None
        if time.monotonic() - checked > 0.25:  # events may never pause: check on the clock
            checked = time.monotonic()
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody is listening; free the rows
        if event is None:
            continue
        note(event, i)
        texts[i] += event.text
        completion_tokens += event.tokens
        if event.finish_reason is not None:
            if event.finish_reason == "error":
                raise ApiError(500, f"generation failed: {event.error}", type="server_error")
            reasons[i] = event.finish_reason
            done += 1
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if chat:
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
             "finish_reason": reasons[i]} for i in range(total)]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage})
    choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
               for i in range(total)]
    return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": usage})


async def sse_events(queue: asyncio.Queue[tuple[int, Event]], job: Job, total: int,
                     meta: dict[str, Any], chat: bool, usage_chunk: bool, prompt_tokens: int,
                     note: Callable[[Event, int], None]) -> AsyncIterator[str]:
    """OpenAI's chunks as `data: {json}` events, each sequence's text as it comes, then [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {} if text is None else {"content": text})
            choice: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**meta, "object": obj, "choices": [choice]})

    for i in range(total):
        if chat:
            yield chunk(i, None, None, first=True)
        elif job.echo:
            yield chunk(i, job.echo[i // job.n], None)
    completion_tokens = 0
    done = 0
    while done < total:
        i, event = await queue.get()
        note(event, i)
        completion_tokens += event.tokens
        if event.finish_reason == "error":
            yield sse({"error": {"message": f"generation failed: {event.error}",
                                  "type": "server_error", "param": None, "code": None}})
            break
        if event.text:
            yield chunk(i, event.text, None)
        if event.finish_reason is not None:
            yield chunk(i, None, event.finish_reason)
            done += 1
    if usage_chunk:
        yield sse({**meta, "object": obj, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}})
    yield "data: [DONE]\n\n"
