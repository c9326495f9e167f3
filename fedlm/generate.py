"""Text generation with a KV cache: greedy, temperature, top-k and top-p, streamed token by token.

    for token_id in generate(model, prompt_ids, max_new_tokens=64, temperature=0.8,
                             top_p=0.95, eos_id=eos, seed=0):
        print(tokenizer.decode([token_id]), end="", flush=True)

The prompt is prefilled in one forward pass; each new token then costs one single-position
forward that reads the cache. Sampling uses its own `torch.Generator`, so a seed reproduces
the same tokens whatever else touched torch's global RNG.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlm.errors import UserError
from fedlm.model import Block, KVCache, Transformer, apply_rope


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of `model` for fast CPU decoding: every Linear's weights in int8 (dynamic quantisation).

    Decoding at batch 1 reads every weight once per token, so it runs at memory speed;
    int8 weights are 4x fewer bytes than fp32 (about 2x the tokens/s of the fp32 model on a
    laptop-class CPU). Logits move by about 1-5%, so greedy text can differ from fp32's.
    """
    # torch.ao.quantization is deprecated in favour of torchao but still works and needs
    # no extra package; its warning is not the user's concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )
    assert isinstance(quantized, Transformer)
    return quantized.eval()


class _Decoder:
    """One-token decode steps for a plain `Transformer`, with every matrix pre-transposed.

    At batch 1 a step is a chain of matrix-vector products that read every weight once, so it
    runs at memory speed; on this CPU `x @ Wᵀ` with Wᵀ stored contiguous (C_in, C_out) streams
    about 30% faster than with W stored (C_out, C_in), and calling the matmuls directly skips
    the module and autocast dispatch of the full forward. The copies cost one pass over the
    weights per `generate` call. The cache is the model's own `KVCache`: the prompt is
    prefilled by the model's forward, then each step appends one position to it.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.layers = []
        for block in model.layers:
            assert isinstance(block, Block)
            attn, mlp = block.attn, block.mlp
            self.layers.append((block.attn_norm, attn.wqkv.weight.t().contiguous(), attn.wo.weight.t().contiguous(),
                                block.mlp_norm, mlp.w13.weight.t().contiguous(), mlp.w2.weight.t().contiguous(),
                                attn.split))
        self.head = model.lm_head.weight.t().contiguous()  # (C, V)

    @staticmethod
    def supports(model: Transformer) -> bool:
        """Plain fp32/bf16 Linear weights only (not a quantised copy, not LoRA-wrapped layers)."""
        if torch.is_autocast_enabled("cpu") or not all(type(b) is Block for b in model.layers):
            return False
        linears: list[torch.nn.Module] = [model.lm_head]
        for block in model.layers:
            assert isinstance(block, Block)
            linears += [block.attn.wqkv, block.attn.wo, block.mlp.w13, block.mlp.w2]
        return all(type(m) is torch.nn.Linear for m in linears)

    def step(self, token: int, cache: KVCache) -> Tensor:
        """Next-token logits (V,) after `token` at position cache.pos; advances the cache."""
        cfg = self.model.cfg
        H, KV, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pos = cache.pos
        x = self.model.tok_emb.weight[token][None]  # (1, C)
        cos = self.model.rope_cos[pos].to(x.dtype)  # (D,)
        sin = self.model.rope_sin[pos].to(x.dtype)
        for i, (attn_norm, wqkv, wo, mlp_norm, w13, w2, split) in enumerate(self.layers):
            q, k, v = (attn_norm(x) @ wqkv).split(split, dim=-1)  # (1, H*D), (1, KV*D) x2
            q = apply_rope(q.view(1, H, 1, D), cos, sin)  # (1, H, 1, D)
            k = apply_rope(k.view(1, KV, 1, D), cos, sin)
            cache.k[i][:, :, pos : pos + 1] = k
            cache.v[i][:, :, pos : pos + 1] = v.view(1, KV, 1, D)
            y = F.scaled_dot_product_attention(
                q, cache.k[i][:, :, : pos + 1], cache.v[i][:, :, : pos + 1], enable_gqa=KV != H
            )  # (1, H, 1, D)
            x = x + y.reshape(1, H * D) @ wo
            gate, up = (mlp_norm(x) @ w13).chunk(2, dim=-1)  # (1, F) each
            x = x + (F.silu(gate) * up) @ w2
        cache.pos += 1
        return (self.model.norm(x) @ self.head)[0]  # (V,)


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top k and outside the top-p nucleus (V,) or (B, V).

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p
    (the token that crosses it is kept), as in transformers' TopPLogitsWarper.
    """
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits[drop] = float("-inf")
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """One token id from next-token logits (V,): argmax at temperature 0, else a filtered draw."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
) -> Iterator[int]:
    """Stream up to `max_new_tokens` new token ids after `prompt_ids`; EOS ends it unyielded."""
    context = model.cfg.max_seq_len
    if not prompt_ids:
        raise UserError("the prompt is empty: give at least one token of text")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if len(prompt_ids) + max_new_tokens > context:
        raise UserError(
            f"the prompt is {len(prompt_ids)} tokens and {max_new_tokens} new tokens are asked for, "
            f"but the model's context is {context} tokens: shorten the prompt to at most "
            f"{max(context - max_new_tokens, 0)} tokens or lower --max-new-tokens"
        )
    vocab = model.cfg.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab}")
    if max_new_tokens == 0:
        return

    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cache = KVCache.for_model(model, max_len=len(prompt_ids) + max_new_tokens)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    decoder: _Decoder | None = None
    if max_new_tokens > 1 and _Decoder.supports(model):
        with torch.inference_mode():
            decoder = _Decoder(model)
    token = -1
    for step in range(max_new_tokens):
        # inference_mode per step, not around the loop: it must not stay on while the caller
        # runs between yields.
        with torch.inference_mode():
            if step > 0 and decoder is not None:
                logits = decoder.step(token, cache)  # (V,)
            else:
                logits = model(idx, cache=cache, last_only=True)[0, -1]  # (V,)
            token = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
        if token == eos_id:
            return
        yield token
        if step + 1 < max_new_tokens:
            idx = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
