"""Step-level batched decoding for the server: one thread runs the model, requests join and leave.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.start()
    seq = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0.0), on_event)
    ...                                  # on_event(Event) is called from the engine's thread
    seq.cancel()                         # a client that went away frees its row at the next step
    engine.stop()

Continuous batching: every step the engine admits waiting sequences (one prefill forward
each, which also yields their first token), then advances every running sequence by one
token in a single batched forward. Rows of different lengths share one preallocated KV
cache (max_batch, n_kv_heads, max_len, head_dim) per layer, with a position per row and a
mask per row; a finished row is refilled by moving the last row into it, so the running
rows are always 0..n-1 and attention reads one contiguous slice.

The model's own `KVCache` keeps one position for the whole batch, so the batched forward
is written here on top of the model's modules (its norms, fused q/k/v, MLP, head), which
also makes it work unchanged on a dynamically quantised (int8) model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

from fedlm.generate import sample_next
from fedlm.model import Attention, Block, Transformer, apply_rope
from fedlm.serve.text import TextDecoder


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


class RowCache:
    """Per-layer K/V buffers (max_batch, KV, max_len, D) with one position per row."""

    def __init__(self, model: Transformer, *, max_batch: int, max_len: int) -> None:
        cfg = model.cfg
        shape = (max_batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        dtype = model.tok_emb.weight.dtype
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst`."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


def _attend(
    attn: Attention, x: Tensor, cos: Tensor, sin: Tensor, cache: RowCache, layer: int,
    pos: Tensor, prefill_row: int | None,
) -> Tensor:
    """Attention for rows that continue at `pos` (B,), or one row's prompt when prefilling."""
    B, T, _ = x.shape
    H, KV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.wqkv(x).split(attn.split, dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = k.view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
    v = v.view(B, T, KV, D).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if prefill_row is not None:  # one row (B = 1), positions 0..T-1: plain causal attention
        cache.k[layer][prefill_row, :, :T] = k[0]
        cache.v[layer][prefill_row, :, :T] = v[0]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=KV != H)
    else:  # rows 0..B-1, one new token each at its own position
        rows = torch.arange(B)
        cache.k[layer][rows, :, pos] = k[:, :, 0]  # (B, KV, D)
        cache.v[layer][rows, :, pos] = v[:, :, 0]
        L = int(pos.max()) + 1
        keys = cache.k[layer][:B, :, :L]  # (B, KV, L, D)
        values = cache.v[layer][:B, :, :L]
        mask = (torch.arange(L)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=KV != H)
    y = y.transpose(1, 2).reshape(B, T, H * D)
    return attn.wo(y)


def forward_rows(
    model: Transformer, idx: Tensor, cache: RowCache, pos: Tensor, *, prefill_row: int | None = None
) -> Tensor:
    """Next-token logits (B, V) for the last position of each row of idx (B, T).

    Decoding: idx (B, 1), row b's token sits at position pos[b]. Prefill: idx (1, T) is the
    prompt of cache row `prefill_row`, at positions 0..T-1 (pos is ignored).
    """
    B, T = idx.shape
    if prefill_row is not None:
        cos = model.rope_cos[:T]  # (T, D)
        sin = model.rope_sin[:T]
    else:
        cos = model.rope_cos[pos][:, None, None, :]  # (B, 1, 1, D)
        sin = model.rope_sin[pos][:, None, None, :]
    x = model.tok_emb(idx)  # (B, T, C)
    for layer, block in enumerate(model.layers):
        assert isinstance(block, Block)
        x = x + _attend(block.attn, block.attn_norm(x), cos, sin, cache, layer, pos, prefill_row)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x[:, -1]))  # (B, V)


def quantize_int8(model: Transformer) -> nn.Module:
    """A copy of `model` with every Linear dynamically quantised to int8 (CPU inference)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


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
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.eos_ids = set(eos_ids or [])
        self.cache = RowCache(model, max_batch=max_batch, max_len=self.max_len)
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
        """(running, waiting) sequences, for metrics."""
        with self.cond:
            return len(self.running), len(self.waiting)

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
        row = len(self.running)
        idx = torch.tensor([seq.prompt_ids], dtype=torch.long)  # (1, T)
        logits = forward_rows(self.model, idx, self.cache, torch.zeros(1, dtype=torch.long),
                              prefill_row=row)
        seq.pos = len(seq.prompt_ids)
        self.running.append(seq)
        self._accept(seq, logits[0])

    def _decode_step(self) -> None:
        idx = torch.tensor([[s.last_token] for s in self.running], dtype=torch.long)  # (B, 1)
        pos = torch.tensor([s.pos for s in self.running], dtype=torch.long)  # (B,)
        logits = forward_rows(self.model, idx, self.cache, pos)  # (B, V)
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
                self.cache.move_row(last, i, moved.pos)
                self.running[i] = moved
            self.running.pop()

