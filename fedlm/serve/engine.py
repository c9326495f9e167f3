"""Step-level batched decoding for the server: one thread runs the model, requests join and leave.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.start()
    seq = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0.0), on_event)
    ...                                  # on_event(Event) is called from the engine's thread
    seq.cancel()                         # a client that went away frees its row at the next step
    engine.stop()

Continuous batching: every step the engine admits waiting sequences (one prefill forward
each, which also yields their first token), then advances every running sequence by one
token in a single batched forward. Both are the model's own forward over one `KVCache`
of max_batch rows, each row at its own position: a prefill writes one row (a view of
it), a decode step all running rows. A finished row is refilled by moving the last row
into it, so the running rows are always 0..n-1 and a step reads one contiguous slice.
The model may be `quantize_int8`'s copy: its forward is the same.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor

from fedlm.generate import quantize_int8, sample_next
from fedlm.model import KVCache, Transformer
from fedlm.serve.text import TextDecoder

__all__ = ["Engine", "Event", "SamplingParams", "Sequence", "quantize_int8"]


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it ends."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    """Strings that end the text (not included in it)."""


@dataclass
class Event:
    """What one step produced for one sequence."""

    text: str
    """New text, safe to send (may be empty while a character or stop string is pending)."""
    tokens: int
    """New tokens generated in this step (0 or 1)."""
    finish_reason: str | None = None
    """None while running; "stop" (EOS or a stop string), "length", "cancelled" or "error"."""
    error: str | None = None
    token_id: int | None = None
    """The token generated in this step, if any (EOS included)."""


class Sequence:
    """One prompt being continued; the handle `Engine.submit` returns."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        decoder: TextDecoder,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_event = on_event
        self.decoder = decoder
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed % 2**63)
        self.pos = 0  # tokens in this row of the cache
        self.generated = 0
        self.last_token = -1
        self.finished = False
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        """Stop generating for this sequence; its row is freed at the engine's next step."""
        self.cancelled = True


class Engine:
    """Runs one model for many sequences at once on a background thread."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_len: int | None = None,
        eos_ids: list[int] | None = None,
    ) -> None:
        self.model = model.eval()
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))  # int8: none, CPU
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.eos_ids = set(eos_ids or [])
        self.cache = KVCache.for_model(model, batch_size=max_batch, max_len=self.max_len)
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.steps = 0

    # -- public API, any thread ---------------------------------------------------------
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]
    ) -> Sequence:
        """Queue a prompt; `on_event` gets its text as it is generated (from the engine thread)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ValueError(
                f"{len(prompt_ids)} prompt tokens + {params.max_tokens} new tokens exceed "
                f"the context of {self.max_len}"
            )
        seq = Sequence(prompt_ids, params, on_event, TextDecoder(self.tokenizer, stop=params.stop))
        with self.cond:
            if self.closed:
                raise RuntimeError("the engine is stopped")
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="fedlm-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences, for metrics.

        A sequence counts as running until it has finished, not until the engine thread frees
        its row: a client that has its last token must not see its own request still running.
        """
        with self.cond:
            return sum(not s.finished for s in list(self.running)), len(self.waiting)

    # -- the engine thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.running:
                    self.cond.wait()
                if self.closed:
                    break
                admitted: list[Sequence] = []
                while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    for seq in admitted:
                        if seq.cancelled:
                            self._emit(seq, Event("", 0, "cancelled"))
                            continue
                        self._prefill(seq)
                    self._drop_finished()
                    if self.running:
                        self._decode_step()
                        self._drop_finished()
            except Exception as e:  # a bug must not hang every client: fail them all, loudly
                for seq in [*self.running, *admitted]:
                    if not seq.finished:
                        self._emit(seq, Event("", 0, "error", error=f"{type(e).__name__}: {e}"))
                self.running = []
        for seq in [*self.running, *self.waiting]:
            self._emit(seq, Event("", 0, "cancelled"))

    def _prefill(self, seq: Sequence) -> None:
        row = self.cache.rows(len(self.running), len(self.running) + 1)
        row.clear()
        idx = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.model(idx, cache=row, last_only=True)[0, -1].to("cpu")  # (V,): sampled on the CPU
        seq.pos = len(seq.prompt_ids)
        self.running.append(seq)
        self._accept(seq, logits)

    def _decode_step(self) -> None:
        idx = torch.tensor([[s.last_token] for s in self.running], dtype=torch.long, device=self.device)  # (B, 1)
        rows = self.cache.rows(0, len(self.running))  # each row continues at its own position
        # (B, V), to the CPU in one copy: each row is sampled with its sequence's CPU generator
        logits = self.model(idx, cache=rows, last_only=True)[:, -1].to("cpu")
        self.steps += 1
        for seq, row in zip(self.running, logits, strict=True):
            seq.pos += 1
            self._accept(seq, row)

    def _accept(self, seq: Sequence, logits: Tensor) -> None:
        """Sample the next token of `seq` from its logits (V,) and tell its client."""
        if seq.cancelled:
            seq.finished = True
            self._emit(seq, Event("", 0, "cancelled"))
            return
        p = seq.params
        token = sample_next(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                            generator=seq.generator)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if token in self.eos_ids:
            seq.finished = True
            self._emit(seq, Event(seq.decoder.flush(), 0, "stop", token_id=token))
            return
        seq.generated += 1
        seq.last_token = token
        text, stopped = seq.decoder.push(token)
        if stopped:
            seq.finished = True
            self._emit(seq, Event(text, 1, "stop", token_id=token))
        elif seq.generated >= p.max_tokens or seq.pos + 1 > self.max_len:
            seq.finished = True
            self._emit(seq, Event(text + seq.decoder.flush(), 1, "length", token_id=token))
        else:
            self._emit(seq, Event(text, 1, token_id=token))

    def _emit(self, seq: Sequence, event: Event) -> None:
        if event.finish_reason is not None:
            seq.finished = True
        try:
            seq.on_event(event)
        except Exception:  # a client's callback failing must not stop the others
            seq.cancelled = True

    def _drop_finished(self) -> None:
        """Free the rows of finished sequences, moving the last rows into the gaps."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.cancelled and not seq.finished:
                self._emit(seq, Event("", 0, "cancelled"))
            if not seq.finished:
                i += 1
                continue
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move_row(last, i)
                self.running[i] = moved
            self.running.pop()

