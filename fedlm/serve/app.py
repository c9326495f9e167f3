"""The OpenAI-compatible HTTP API over a fedlm model (FastAPI), and `serve_forever` for the CLI.

    app = create_app(Path("runs/demo"), api_key="secret", quantize="int8")
    serve_forever(Path("runs/demo"), host="127.0.0.1", port=8000)   # `fedlm serve`

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream as server-sent
events ending with `data: [DONE]`), GET /v1/models, GET /health (503 while the model loads,
200 after), GET /metrics (Prometheus text). The model loads on a background thread, so the
port answers at once. Every error is a 4xx (or 503 while loading) in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}; limits on body size and time, prompt length
(by characters before tokenising, then by tokens), max_tokens, n and requests in flight keep
one client from starving the rest (guard.py admits each request).
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from fedlm.data.chat import ChatTemplate
from fedlm.errors import UserError
from fedlm.serve.engine import Engine, Event, SamplingParams, Sequence, quantize_int8
from fedlm.serve.guard import Guard, OffLoopRoute, Slots, off_loop
from fedlm.serve.metrics import Metrics
from fedlm.serve.responses import ApiError, Job, StreamWithCleanup, error_response, sse_events
from fedlm.serve.responses import collect as collect_body
from fedlm.serve.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from fedlm.serve.text import FEDLM_STOPS, chat_template, eos_ids, render_chat
from fedlm.serve.text import ChatTemplate as ChatTemplateName

Quantize = Literal["none", "int8"]
TOKENIZE_INLINE_CHARS = 2048
"""Prompts up to this long are tokenised on the event loop (a fraction of a millisecond)."""


@dataclass
class Limits:
    """What one request may ask for; beyond these it gets a 4xx, never a 500 or a hang."""

    max_prompt_tokens: int = 4096
    """Tokens in one prompt (also capped by the model's context)."""
    max_tokens: int = 1024
    """Largest `max_tokens` a request may ask for."""
    max_n: int = 16
    """Sequences one request may ask for (n times the number of prompts)."""
    max_body_bytes: int = 1_000_000
    """Largest request body."""
    max_concurrent: int = 64
    """Requests in flight at once, from the first byte of the body to the last of the answer;
    more get 429."""
    body_timeout: float = 10.0
    """Seconds a client has to send its whole request body; then 408 and the connection closes."""
    max_batch: int = 16
    """Sequences decoded together in one step."""


class ServerState:
    """The model being served, once loaded, and what the handlers share."""

    def __init__(self, *, model_name: str, api_key: str | None, limits: Limits) -> None:
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.tokenizer: Tokenizer | None = None
        self.chat_template: ChatTemplate | None = None  # the model's own (RUN/model/chat_template.jinja)
        self.load_error: str | None = None
        self.max_token_bytes = 0  # the longest vocabulary entry in UTF-8 bytes (_check_length)
        self.created = int(time.time())
        self.slots = Slots(limits.max_concurrent)
        self.loader: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        return self.slots.in_flight

    def ready(self) -> Engine:
        if self.engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else (
                "the model is still loading; retry shortly")
            raise ApiError(503, message, type="server_error", code="model_not_ready")
        return self.engine


def _load(state: ServerState, model_dir: Path, *, quantize: Quantize, threads: int | None,
          device: torch.device) -> None:
    """Load the model and start its engine (runs on a background thread)."""
    try:
        from fedlm.pretrained import chat_template_of, load_any

        if threads:
            torch.set_num_threads(threads)
        model, tokenizer_path = load_any(model_dir, device=device)
        if tokenizer_path is None:
            raise UserError(f"{model_dir}: no tokenizer.json beside the weights; serving needs it")
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        template = chat_template_of(str(model_dir))
        if template is not None:  # the model's own: the one it was tuned in, or its makers' (GGUF, Hugging Face)
            state.chat_template = ChatTemplate.from_text(template, tokenizer_path)
        served: Any = quantize_int8(model) if quantize == "int8" else model
        engine = Engine(served, tokenizer, max_batch=state.limits.max_batch,
                        max_len=min(model.cfg.max_seq_len, state.limits.max_prompt_tokens
                                    + state.limits.max_tokens),
                        eos_ids=eos_ids(tokenizer))
        engine.start()
        state.max_token_bytes = max_token_bytes(tokenizer)
        state.tokenizer = tokenizer
        state.engine = engine
    except Exception as e:  # reported on /health and every endpoint, never a crash
        state.load_error = f"{type(e).__name__}: {e}"


def create_app(
    model_path: Path,
    *,
    api_key: str | None = None,
    quantize: Quantize = "none",
    model_name: str | None = None,
    limits: Limits | None = None,
    threads: int | None = None,
    device: str = "auto",
) -> FastAPI:
    """The FastAPI app serving the model at `model_path` (any `train.init_from` spelling) on
    `device`; loading starts now, in the background."""
    if quantize not in ("none", "int8"):
        raise UserError(f"--quantize must be 'none' or 'int8', got {quantize!r}")
    from fedlm.device import resolve_device
    from fedlm.modelio import find_model_dir
    from fedlm.pretrained import resolve

    on = resolve_device(device, key="--device")
    if quantize == "int8" and on.type != "cpu":
        raise UserError(f"--quantize int8 is dynamic CPU quantisation; with --device {device} ({on}) "
                        "serve with --quantize none, or add --device cpu")
    # a wrong path is a UserError now, not a 503 later
    found = resolve(str(model_path), key="MODEL")
    model_dir = find_model_dir(found) if found.is_dir() else found
    if model_name is None and not Path(str(model_path)).exists():  # a name (`smollm2`): served by that name
        model_name = str(model_path)
    if model_name is None:
        resolved = model_dir.resolve()
        model_name = resolved.parent.name if resolved.name == "model" else (
            resolved.stem if resolved.is_file() else resolved.name)
    state = ServerState(model_name=model_name or "fedlm", api_key=api_key, limits=limits or Limits())
    state.loader = threading.Thread(target=_load, args=(state, model_dir), name="fedlm-load", daemon=True,
                                    kwargs={"quantize": quantize, "threads": threads, "device": on})
    state.loader.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="fedlm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions over a fedlm model.")
    app.state.fedlm = state
    app.router.route_class = OffLoopRoute
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=state.limits.max_body_bytes,
                       body_timeout=state.limits.body_timeout, slots=state.slots,
                       metrics=state.metrics)
    _install_error_handlers(app)
    _install_routes(app, state)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        where = ".".join(loc) or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=loc[0] if loc else None, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


def _install_routes(app: FastAPI, state: ServerState) -> None:
    _install_status_routes(app, state)
    _install_generation_routes(app, state)


def _install_status_routes(app: FastAPI, state: ServerState) -> None:
    """Health, metrics and the model list: they answer while the model loads (or failed)."""

    @app.get("/health")
    async def health() -> Response:
        if state.engine is not None:
            return JSONResponse({"status": "ok", "model": state.model_name})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        running, waiting = state.engine.load() if state.engine is not None else (0, 0)
        text = state.metrics.render(running=running, waiting=waiting, in_flight=state.in_flight)
        return PlainTextResponse(text,
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> Response:
        state.ready()
        return JSONResponse({"object": "list", "data": [_card(state)]})

    @app.get("/v1/models/{model}", responses=ERRORS)
    async def model_card(model: str) -> Response:
        state.ready()
        _check_model(state, model)
        return JSONResponse(_card(state))


def _install_generation_routes(app: FastAPI, state: ServerState) -> None:
    """The OpenAI completion and chat completion endpoints."""
    limits = state.limits

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = state.ready()
        _check_model(state, body.model)
        texts = body.prompts()
        for text in texts:
            _check_length(state, engine, text)
        prompts = await off_loop(sum(map(len, texts)), TOKENIZE_INLINE_CHARS,
                                 lambda: [_encode(state, engine, t) for t in texts])
        max_tokens = _max_tokens(body.max_tokens, 16, prompts, engine, limits)
        params = _sampling(body, max_tokens, body.stop_list())
        job = Job(prompts, body.n or 1, params, echo=texts if body.echo else None)
        return await _run(request, state, engine, job, chat=False,
                          stream=bool(body.stream), usage_chunk=_include_usage(body))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        engine = state.ready()
        _check_model(state, body.model)
        tokenizer = engine.tokenizer
        template = chat_template(tokenizer)
        text = _render_chat(state, [(m.role, m.text()) for m in body.messages], template)
        _check_length(state, engine, text)
        prompt = await off_loop(len(text), TOKENIZE_INLINE_CHARS, _encode, state, engine, text)
        room = engine.max_len - len(prompt)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = _max_tokens(asked, max(1, min(limits.max_tokens, room)), [prompt], engine,
                                 limits)
        stops = body.stop_list() + (list(FEDLM_STOPS) if template == "fedlm" else [])
        params = _sampling(body, max_tokens, stops)
        job = Job([prompt], body.n or 1, params)
        return await _run(request, state, engine, job, chat=True,
                          stream=bool(body.stream), usage_chunk=_include_usage(body))


def _render_chat(state: ServerState, messages: list[tuple[str, str]], template: ChatTemplateName) -> str:
    """The prompt in the model's own chat template when it has one, else ChatML or fedlm's."""
    if state.chat_template is None:
        return render_chat(messages, template)
    try:
        return state.chat_template.render([{"role": r, "content": c} for r, c in messages],
                                          add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages", code="bad_messages") from None


def _card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "fedlm"}


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{state.model_name!r} (see GET /v1/models)", param="model",
                       code="model_not_found")


def _prompt_limit(state: ServerState, engine: Engine) -> int:
    """The most tokens a prompt may have: the configured limit, within the model's context."""
    return min(state.limits.max_prompt_tokens, engine.max_len - 1)


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """The longest vocabulary entry (special tokens included), in UTF-8 bytes.

    A token stands for at most that many characters of text (a byte-level entry spells one
    byte per character, others spell their text), so a text of more than n x this many
    characters has more than n tokens.
    """
    return max(len(t.encode("utf-8")) for t in tokenizer.get_vocab(with_added_tokens=True))


def _check_length(state: ServerState, engine: Engine, text: str) -> None:
    """Refuse a prompt that cannot fit, by its length alone, before paying to tokenise it."""
    limit = _prompt_limit(state, engine)
    if len(text) > limit * state.max_token_bytes:
        raise ApiError(400, f"the prompt is {len(text)} characters, more than {limit} tokens can "
                       f"hold; this server takes at most {limit} tokens", param="prompt",
                       code="context_length_exceeded")


def _encode(state: ServerState, engine: Engine, text: str) -> list[int]:
    """Token ids of a prompt, checked against the prompt limit; "" becomes the EOS token."""
    ids: list[int] = engine.tokenizer.encode(text).ids
    if not ids:
        if not engine.eos_ids:
            raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        ids = [min(engine.eos_ids)]
    limit = _prompt_limit(state, engine)
    if len(ids) > limit:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server takes at most {limit}",
                       param="prompt", code="context_length_exceeded")
    return ids


def _max_tokens(asked: int | None, default: int, prompts: list[list[int]], engine: Engine,
                limits: Limits) -> int:
    max_tokens = asked if asked is not None else default
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most "
                       f"{limits.max_tokens}", param="max_tokens", code="invalid_value")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > engine.max_len:
        raise ApiError(400, f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceeds "
                       f"the context of {engine.max_len} tokens; lower max_tokens or shorten "
                       "the prompt", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
              stops: list[str]) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=stops,
    )


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


async def _run(request: Request, state: ServerState, engine: Engine, job: Job, *, chat: bool,
               stream: bool, usage_chunk: bool) -> Response:
    """Submit the job's sequences and answer with one JSON body or a stream of events."""
    total = len(job.prompts) * job.n
    if total > state.limits.max_n:
        raise ApiError(400, f"{total} sequences asked for (n × prompts); this server allows "
                       f"at most {state.limits.max_n} per request", param="n", code="invalid_value")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    seqs: list[Sequence] = []

    def cleanup() -> None:
        for seq in seqs:
            seq.cancel()

    try:
        for i in range(total):
            params = job.params
            if params.seed is not None and i:
                params = SamplingParams(**{**params.__dict__, "seed": params.seed + i})

            def on_event(event: Event, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))

            seqs.append(engine.submit(job.prompts[i // job.n], params, on_event))
    except BaseException:
        cleanup()
        raise
    prompt_tokens = sum(len(p) for p in job.prompts)
    state.metrics.tokens(prompt=prompt_tokens)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": state.model_name}

    def note(event: Event, i: int) -> None:
        state.metrics.tokens(completion=event.tokens)
        seq = seqs[i]
        if event.tokens and seq.generated == 1 and seq.first_token_at is not None:
            state.metrics.first_token(seq.first_token_at - seq.submitted)

    if stream:
        return StreamWithCleanup(sse_events(
            queue, job, total, meta, chat, usage_chunk, prompt_tokens, note), cleanup)
    try:
        return await collect_body(request, queue, job, total, meta, chat, prompt_tokens, note)
    finally:
        cleanup()


def serve_forever(
    model: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_file: Path | None = None,
    quantize: Quantize = "none",
    max_batch: int = 16,
    max_concurrent: int = 64,
    max_prompt_tokens: int = 4096,
    max_tokens: int = 1024,
    max_body_bytes: int = 1_000_000,
    body_timeout: float = 10.0,
    threads: int | None = None,
    model_name: str | None = None,
    device: str = "auto",
) -> None:
    """Run the server until interrupted (what `fedlm serve` does)."""
    import logging

    import uvicorn

    api_key = None
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{api_key_file}: cannot read the API key file ({e})") from None
        if not api_key:
            raise UserError(f"{api_key_file}: the API key file is empty; put the key on one line")
    for flag, value in (("--max-batch", max_batch), ("--max-concurrent", max_concurrent),
                        ("--max-prompt-tokens", max_prompt_tokens), ("--max-tokens", max_tokens),
                        ("--max-body-bytes", max_body_bytes)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not (body_timeout > 0 and math.isfinite(body_timeout)):
        raise UserError(f"--body-timeout must be a number of seconds > 0, got {body_timeout}")
    limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                    max_body_bytes=max_body_bytes, max_concurrent=max_concurrent,
                    max_batch=max_batch, body_timeout=body_timeout)
    sock = _listen(host, port)  # before the model starts loading: a taken port is bad input
    app = create_app(model, api_key=api_key, quantize=quantize, limits=limits, threads=threads,
                     model_name=model_name, device=device)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    address = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info("serving on http://%s:%d (CTRL+C to quit)", address,
                                            sock.getsockname()[1])
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    # Leaving while the loader is inside torch aborts the interpreter ("terminate called
    # without an active exception"), so let a load under way finish first.
    if app.state.fedlm.loader is not None:
        app.state.fedlm.loader.join(timeout=60)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to serve on; UserError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebinding after a restart
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).rstrip(".")
        raise UserError(f"cannot listen on {host}:{port}: {reason}; stop what holds the port or "
                        "pick another --port / --host") from None
    return sock

