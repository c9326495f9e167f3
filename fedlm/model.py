"""The decoder: a Llama-architecture Transformer with a KV cache, in plain PyTorch.

    model = Transformer(ModelConfig(preset="tiny", vocab_size=4096))
    logits = model(idx)                      # idx (B, T) int64 -> logits (B, T, V)
    cache = KVCache.for_model(model, batch_size=2, max_len=64)
    logits = model(prompts, cache=cache, pad_mask=real)  # prefill (B, T); real: False at padding
    logits = model(next_ids, cache=cache)    # (B, 1): each row continues at its own cache.pos[b]

Llama's architecture, weight for weight: pre-norm RMSNorm (computed in fp32, as Hugging Face
does, so bf16 autocast stays faithful), rotary position embeddings in the `rotate_half`
convention (first half / second half of each head), grouped-query attention through
`scaled_dot_product_attention`, a SwiGLU MLP, no biases (but Qwen2's on q, k and v), tied or untied
embeddings.
Two fusions for speed: q/k/v are one Linear (`wqkv`) and gate/up are one Linear (`w13`);
`fedlm.hf` splits and merges them when it exports or imports Hugging Face weights.

Training speed on CPU (measured against transformers' Llama in bench/model_bench.py):
`model(idx, targets=y)` returns the mean cross-entropy through a chunked head that never
holds the (B*T, V) logits (`chunked_cross_entropy`), and in bf16 the causal attention's
backward recomputes the probabilities with plain matmuls (`CausalAttention`), which on CPU
is about twice as fast as the fused SDPA kernel's backward.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fedlm.config import ModelConfig


@dataclass
class Positions:
    """Where one forward's T tokens sit: their rotary angles and the keys each may attend to.

    Without a cache every row holds positions 0..T-1 under plain causal attention,
    `Positions(cos[:T], sin[:T])`; with one, `KVCache.place` builds it.
    """

    cos: Tensor
    """(T, D), or (B, 1, T, D) when rows hold different positions."""
    sin: Tensor
    mask: Tensor | None = None
    """(T, K) or (B, 1, T, K) bool, True where a query may read a key; None: `is_causal` says it."""
    is_causal: bool = True
    start: int | None = 0
    """The cache column where every row's new tokens start; None when rows start apart (`cols`)."""
    cols: Tensor | None = None
    """(B, T) the cache column of each new token."""
    keys: int = 0
    """Cache columns the queries read (the last column written + 1)."""

    def __post_init__(self) -> None:
        # sin with its first half negated, made once per forward for every layer's apply_rope.
        half = self.sin.shape[-1] // 2
        self.signed_sin = torch.cat((-self.sin[..., :half], self.sin[..., half:]), dim=-1)


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv_heads, max_len, head_dim), for B rows.

    Each row has its own write position `pos[b]` (cache columns used) and padding mask
    `valid[b]` (columns that hold a real token). A forward writes its T new tokens at
    columns pos[b]..pos[b]+T-1 of every row and advances `pos` by T, so decoding never
    reallocates or concatenates. A padded token (`pad_mask` False) is written but never
    attended to, and a token's rotary position is the number of real tokens before it in
    its row: rows padded on the left, the right or both decode as each would alone.
    `rows(i, j)` views some rows, so that one row can be prefilled while others wait.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, L)
        self.max_len = max_len
        # [True] once any forward passed a pad_mask (a list: `rows` views share it). Until
        # then every written column is real, and `place` skips checking `valid`.
        self.padded = [False]

    @classmethod
    def for_model(
        cls, model: Transformer, *, batch_size: int = 1, max_len: int | None = None
    ) -> KVCache:
        """A cache shaped for `model` (its dtype and device), `max_len` defaulting to its context."""
        cfg = model.cfg
        weight = model.tok_emb.weight
        return cls(
            n_layers=cfg.n_layers,
            batch_size=batch_size,
            n_kv_heads=cfg.n_kv_heads,
            max_len=max_len or cfg.max_seq_len,
            head_dim=cfg.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares this one's memory."""
        view = copy.copy(self)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.pos, view.valid = self.pos[start:stop], self.valid[start:stop]
        return view

    def clear(self) -> None:
        """Empty every row (a new sequence starts at position 0)."""
        self.pos.zero_()
        self.valid.zero_()

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its keys, values, position and padding) into row `dst`."""
        n = int(self.pos[src])
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.valid[dst] = self.valid[src]
        self.pos[dst] = self.pos[src]

    def place(self, T: int, pad_mask: Tensor | None, cos: Tensor, sin: Tensor) -> Positions:
        """Where T new tokens go in each row, and what each may see; marks them real or padding.

        cos, sin: the model's rotary tables (max_seq_len, D). pad_mask (B, T): False at padding.
        """
        device = self.pos.device
        first = int(self.pos[0])
        uniform = self.pos.shape[0] == 1 or bool((self.pos == first).all())
        end = (first if uniform else int(self.pos.max())) + T
        limit = min(self.max_len, cos.shape[0])
        if end > limit:
            raise ValueError(f"{end} positions exceed the context of {limit} tokens")
        self.padded[0] = self.padded[0] or pad_mask is not None
        if uniform:
            self.valid[:, first:end] = True if pad_mask is None else pad_mask
            if not self.padded[0] or bool(self.valid[:, :end].all()):  # no padding: positions are columns
                if T == 1 or first == 0:
                    mask, is_causal = None, T > 1
                else:  # query t sits at column first+t and may see keys 0..first+t
                    keys = torch.arange(end, device=device)
                    mask, is_causal = keys[None, :] <= keys[first:, None], False  # (T, end)
                return Positions(cos[first:end], sin[first:end], mask, is_causal, start=first, keys=end)
        cols = self.pos[:, None] + torch.arange(T, device=device)  # (B, T) columns written
        if not uniform:
            real = torch.ones_like(cols, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
            self.valid.scatter_(1, cols, real)
        seen = self.valid[:, :end].cumsum(-1)  # (B, end): real tokens up to each column
        at = (seen.gather(1, cols) - 1).clamp(min=0)  # (B, T) rotary position of each token
        keys = torch.arange(end, device=device)
        # A real key at or before the query's column; a padded query sees only itself.
        mask = (keys <= cols[..., None]) & (self.valid[:, None, :end] | (keys == cols[..., None]))
        return Positions(cos[at][:, None], sin[at][:, None], mask[:, None], False,
                         start=first if uniform else None, cols=cols, keys=end)

    def update(self, layer: int, k: Tensor, v: Tensor, at: Positions) -> tuple[Tensor, Tensor]:
        """Write k, v (B, KV, T, D) where `at` places them; return keys/values (B, KV, at.keys, D)."""
        ks, vs = self.k[layer], self.v[layer]
        if at.start is not None:  # every row writes the same columns: a slice
            ks.narrow(2, at.start, k.shape[2]).copy_(k)  # narrow: cheaper than indexing, per layer and step
            vs.narrow(2, at.start, v.shape[2]).copy_(v)
        else:
            assert at.cols is not None
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            ks[rows, :, at.cols] = k.transpose(1, 2)  # (B, T, KV, D)
            vs[rows, :, at.cols] = v.transpose(1, 2)
        return ks.narrow(2, 0, at.keys), vs.narrow(2, 0, at.keys)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Written out rather than F.rms_norm: on CPU that is a composite of these same ops (same
        # bits, forward and backward) behind three more dispatches, which a decode step pays 2n+1
        # times. The weight is applied after the cast back, as Hugging Face does (and where
        # Opacus's functorch per-sample gradient sees it).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos, sin tables (max_seq_len, head_dim) for rotary embeddings, computed as transformers does.

    Always on the CPU (a model moves them with itself): under Transformer.empty's meta device
    these ops would import torch._dynamo for their meta kernels."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device="cpu") / d))
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, cfg)
    freqs = torch.arange(cfg.max_seq_len, dtype=torch.float, device="cpu")[:, None] * inv_freq  # (L, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, D): the same angle for both halves
    return emb.cos(), emb.sin()


def llama3_frequencies(inv_freq: Tensor, cfg: ModelConfig) -> Tensor:
    """Llama 3.1's rescaled rotary frequencies: a rotation whose wavelength is longer than the original
    context / low_freq_factor turns `rope_factor` times slower, one shorter than the original context /
    high_freq_factor is kept, and those between are blended linearly in context / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = cfg.rope_original_max_seq_len / wavelength  # how many turns the original context holds
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    keep = ((ratio - low) / (high - low)).clamp(0.0, 1.0)  # 1: kept, 0: slowed, between: blended
    return keep * inv_freq + (1 - keep) * inv_freq / cfg.rope_factor


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by position: pairs are (i, i + D/2), the `rotate_half` layout.

    signed_sin is sin with its first half negated (`Positions.signed_sin`), so that
    rotate_half(x) * sin = roll(x, D/2) * signed_sin: two ops fewer per call, same bits.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class CausalAttention(torch.autograd.Function):
    """softmax(q kᵀ/√D + causal mask) v: SDPA's forward, a matmul backward that recomputes P.

    On CPU the flash kernel's bf16 backward runs at a small fraction of the matmul peak; this
    backward recomputes P = softmax(S) in fp32 from q and k (so nothing (T, T) is stored) and
    then needs four (T, T)-sized matmuls: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - rowsum(dO ∘ O)),
    dQ = dS K / √D, dK = dSᵀ Q / √D. q, k, v are (B, H, T, D) with equal head counts.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, out = ctx.saved_tensors  # type: ignore[attr-defined]
        T, D = q.shape[-2], q.shape[-1]
        scale = 1.0 / math.sqrt(D)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # True above the diagonal
        s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).masked_fill_(mask, float("-inf"))
        p = s.softmax(dim=-1)  # (B, H, T, T) fp32
        d_out = d_out.to(q.dtype)
        dv = torch.matmul(p.to(q.dtype).transpose(-1, -2), d_out)
        dp = torch.matmul(d_out, v.transpose(-1, -2)).float()
        delta = (d_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
        ds = p.mul_(dp.sub_(delta)).mul_(scale).to(q.dtype)  # (B, H, T, T)
        dq = torch.matmul(ds, k)
        dk = torch.matmul(ds.transpose(-1, -2), q)
        return dq, dk, dv


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and rotary positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.wqkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, at: Positions, cache: KVCache | None = None, layer: int = 0,
                probs: list[Tensor] | None = None) -> Tensor:
        """`probs`: a list that receives this layer's attention probabilities (see `explicit`)."""
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2)  # (B, H+2KV, T, D)
        # q and k rotated in one call: a decode step is a chain of small ops, each op counts.
        qk, v = qkv.split((H + KV, KV), dim=1)
        qk = apply_rope(qk, at.cos, at.signed_sin)  # (B, H+KV, T, D)
        q, k = qk.split((H, KV), dim=1)  # (B, H, T, D), (B, KV, T, D); v (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v, at)  # (B, KV, at.keys, D)
        if probs is not None:
            y = self.explicit(q, k, v, at, probs)
        elif (at.is_causal and at.mask is None and KV == H and torch.is_grad_enabled()
                and _compute_dtype(x) == torch.bfloat16 and x.device.type == "cpu"):
            y = CausalAttention.apply(q, k, v)  # same values; a faster backward on CPU (GPUs: SDPA's flash)
        else:
            # softmax(q kᵀ / √D + mask) v, each query head reading key/value head h // (H / KV).
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=at.mask, is_causal=at.is_causal, enable_gqa=KV != H
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.wo(y)

    def explicit(self, q: Tensor, k: Tensor, v: Tensor, at: Positions, probs: list[Tensor]) -> Tensor:
        """softmax(q kᵀ/√D + mask) v with the probabilities P written out, for when they are asked for.

        Appends P (B, H, T, K), fp32 (the softmax runs in fp32, as Hugging Face's eager attention
        does), to `probs` and returns P v (B, H, T, D): the output is computed from the very
        probabilities shown. The fused kernel never materialises P, so training and decoding
        keep it; only `Transformer.forward(..., attention=[])` comes here.
        """
        H, KV = self.n_heads, self.n_kv_heads
        if KV != H:  # query head h reads key/value head h // (H / KV)
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        T, K = q.shape[-2], k.shape[-2]
        s = torch.matmul(q, k.transpose(-1, -2)).float() * (self.head_dim ** -0.5)  # (B, H, T, K)
        if at.mask is not None:
            s = s.masked_fill(~at.mask, float("-inf"))
        elif at.is_causal:  # query t (at key column K - T + t) sees keys up to its own column
            above = torch.ones(T, K, dtype=torch.bool, device=s.device).triu(K - T + 1)
            s = s.masked_fill(above, float("-inf"))
        p = s.softmax(dim=-1)
        probs.append(p)
        return torch.matmul(p.to(v.dtype), v)


class MLP(nn.Module):
    """SwiGLU: w2(silu(x W_gate) * (x W_up)), gate and up fused into one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # [gate; up]
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, at: Positions, cache: KVCache | None = None,
                probs: list[Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), at, cache, self.layer, probs)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, cfg: ModelConfig, *, seed: int | None = None, init: bool = True) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.activation_checkpointing = False
        # without init, the embedding gets a bare tensor: its own init would draw normal_, which on
        # the meta device (Transformer.empty) costs torch._dynamo's import, ~1.5 s of CPU
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model,
                                    _weight=None if init else torch.empty(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg)
        # Derived from the config, so not saved with the weights.
        self.rope_cos = nn.Buffer(cos, persistent=False)  # (max_seq_len, D)
        self.rope_sin = nn.Buffer(sin, persistent=False)
        if init:
            self.reset_parameters(None if seed is None else torch.Generator().manual_seed(seed))

    @classmethod
    def empty(cls, cfg: ModelConfig) -> Transformer:
        """The model with uninitialised weights, for weights about to be loaded into it.

        Built on the meta device, then given real (empty) storage: neither the modules' own init
        nor `reset_parameters` runs, which for a pretrained model is a second of CPU per load
        and per LoRA merge, and the global RNG is not touched."""
        with torch.device("meta"):
            model = cls(cfg, init=False)
        cos, sin = model.rope_cos, model.rope_sin  # real tables: rope_tables computes on the CPU
        model = model.to_empty(device="cpu")
        if cfg.tie_embeddings:  # to_empty gives each module its own storage
            model.lm_head.weight = model.tok_emb.weight
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        return model

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 / Llama init: N(0, 0.02), residual projections scaled by 1/√(2·n_layers).

        Drawn from `generator` (the global RNG without one). A seeded model takes its own
        generator: the global RNG is process-wide, so another thread drawing from it while
        this one builds would change the weights.
        """
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            assert isinstance(block, Block)
            for proj in (block.attn.wo, block.mlp.w2):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers),
                                generator=generator)

    def forward(
        self,
        idx: Tensor,
        *,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        last_only: bool = False,
        targets: Tensor | None = None,
        attention: list[Tensor] | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for idx (B, T); with a cache, each row continues where it stopped.

        `pad_mask` (B, T) is False where idx holds padding: those positions are never attended
        to and do not count as positions, and their logits are meaningless (a padded forward
        keeps its rows in a cache; without one it makes a temporary one). `last_only` computes
        the head for the last column only (B, 1, V): a prefill that only needs the next token
        skips T-1 rows of the largest matmul. With `targets` (B, T) it returns instead the mean
        next-token cross-entropy (a scalar, fp32), equal to
        `F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())` but computed
        without holding the logits. With `attention` (a list) each layer appends its attention
        probabilities (B, H, T, K) in fp32, computed explicitly (`Attention.explicit`) instead
        of by the fused kernel: for inspection, not for speed.
        """
        B, T = idx.shape
        if pad_mask is not None and cache is None:
            cache = KVCache.for_model(self, batch_size=B, max_len=T)
        at = self._positions(idx, cache, pad_mask)
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.layers:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, at, use_reentrant=False)
            else:
                x = block(x, at, cache, attention)
        if cache is not None:
            cache.pos += T
        if targets is not None:
            h = self.norm(x).flatten(0, 1)  # (B*T, C)
            return chunked_cross_entropy(h, self.lm_head.weight, targets.flatten())
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.lm_head(self.norm(x))  # (B, T, V)

    def _positions(self, idx: Tensor, cache: KVCache | None, pad_mask: Tensor | None) -> Positions:
        """The rotary angles (in the dtype q and k are computed in) and attention of idx's tokens."""
        T = idx.shape[1]
        device = idx.device.type
        dtype = self.tok_emb.weight.dtype
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        cos, sin = self.rope_cos.to(dtype), self.rope_sin.to(dtype)  # (max_seq_len, D)
        if cache is not None:
            return cache.place(T, pad_mask, cos, sin)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"{T} positions exceed the context of {self.cfg.max_seq_len} tokens")
        return Positions(cos[:T], sin[:T], is_causal=T > 1)


IGNORE_INDEX = -100
"""A target that is not trained on (PyTorch's and Hugging Face's ignore_index)."""


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h Wᵀ against targets, and its gradients, a chunk of rows at a time.

    Forward computes each chunk's logits (in `dtype`, softmax in fp32), its loss, and right
    away its gradients dh = (softmax - onehot) W / N and dW += (softmax - onehot)ᵀ h / N, so
    the (N, V) logits and probabilities never exist whole; backward only scales them by the
    incoming gradient. The same three matmuls as the plain head, less memory traffic.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: Tensor, weight: Tensor, targets: Tensor,
                dtype: torch.dtype, chunk: int) -> Tensor:
        n = h.shape[0]
        hc, wc = h.to(dtype), weight.to(dtype)
        need_grad = ctx.needs_input_grad  # type: ignore[attr-defined]
        dh = torch.empty_like(h) if need_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            rows = slice(s, min(s + chunk, n))
            logits = (hc[rows] @ wc.t()).float()  # (c, V)
            tgt = targets[rows]
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, tgt[:, None])[:, 0]).sum()
            if dh is None and dw is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(grad.shape[0], device=grad.device), tgt] -= 1.0
            grad = grad.div_(n).to(dtype)  # d(mean loss)/d(logits) (c, V)
            if dh is not None:
                dh[rows] = grad @ wc
            if dw is not None:
                dw += grad.t() @ hc[rows]
        ctx.grads = (dh, dw)  # type: ignore[attr-defined]  # computed here, not inputs: kept on ctx
        ctx.weight_dtype = weight.dtype  # type: ignore[attr-defined]
        return total / n

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        dh, dw = ctx.grads  # type: ignore[attr-defined]
        gh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        gw = (dw * grad_loss).to(ctx.weight_dtype) if dw is not None else None  # type: ignore[attr-defined]
        return gh, gw, None, None, None


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, *, chunk: int = 256) -> Tensor:
    """Mean cross-entropy of logits h Wᵀ (N, V) against targets (N,) without holding the logits.

    Targets equal to IGNORE_INDEX (-100) count for nothing: the mean is over the others, as
    `F.cross_entropy`'s default ignore_index does.

    h (N, C), weight (V, C). Under autocast the head matmuls run in autocast's dtype and the
    softmax in fp32, as `F.cross_entropy(logits.float(), ...)` over autocast logits would.
    """
    dtype = _compute_dtype(h)
    if not torch.is_grad_enabled():
        h, weight = h.detach(), weight.detach()
    keep = targets != IGNORE_INDEX  # a loss mask (chat silos train on the answers only)
    if not bool(keep.all()):
        if not bool(keep.any()):  # nothing to learn here: a zero loss whose gradients are zero
            return (h.sum() + weight.sum()).float() * 0.0
        h, targets = h[keep], targets[keep]
    with torch.autocast(h.device.type, enabled=False):
        loss = _ChunkedCrossEntropy.apply(h, weight, targets, dtype, chunk)
    assert isinstance(loss, Tensor)
    return loss


def num_params(model: nn.Module) -> int:
    """Parameters in `model`, a tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())
