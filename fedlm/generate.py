"""Text generation with a KV cache: greedy, temperature, top-k and top-p, streamed token by token.

    for token_id in generate(model, prompt_ids, max_new_tokens=64, temperature=0.8,
                             top_p=0.95, eos_id=eos, seed=0):
        print(tokenizer.decode([token_id]), end="", flush=True)

Every step is the model's own forward with a `KVCache`: the prompt is prefilled in one call,
then each new token costs one single-position call that reads the cache. Sampling uses its
own `torch.Generator`, so a seed reproduces the same tokens whatever else touched torch's
global RNG. `quantize_int8` makes the int8 copy that `--quantize int8` serves.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fedlm.errors import UserError
from fedlm.model import Block, KVCache, Transformer

COLUMN_MAJOR_MIN_TOKENS = 16
"""Decodes this long (or longer) on CPU run on a `column_major_copy`; shorter ones do not repay it."""


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of `model` for fast CPU decoding: every Linear's weights in int8 (dynamic quantisation).

    Decoding reads every weight once per step, so it runs at memory speed; int8 weights are
    4x fewer bytes than fp32. Logits move by about 1-5%, so greedy text can differ from fp32's.
    The original is left as it was.
    """
    # torch.ao.quantization is deprecated in favour of torchao but still works and needs
    # no extra package; its warning is not the user's concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(  # a copy: inplace=False
            model, {nn.Linear}, dtype=torch.qint8
        )
    assert isinstance(quantized, Transformer)
    return quantized.eval()


def _linear_slots(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear in the model: q/k/v, o, gate/up, down, head."""
    slots: list[tuple[nn.Module, str]] = [(model, "lm_head")]
    for block in model.layers:
        assert isinstance(block, Block)
        slots += [(block.attn, "wqkv"), (block.attn, "wo"), (block.mlp, "w13"), (block.mlp, "w2")]
    return slots


class _ColumnMajorLinear(nn.Module):
    """x Wᵀ with Wᵀ stored contiguous (C_in, C_out): a Linear of `column_major_copy`.

    Called straight through to the matmul, without `nn.Module.__call__`'s hook dispatch: a
    decode step makes 4 Linear calls per layer, and on CPU that dispatch is a measurable
    share of a small model's step. Nothing hooks this private copy (it is never trained).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.wt = linear.weight.detach().t().contiguous()  # a plain attribute: read fast

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.wt)

    __call__ = forward


def column_major_copy(model: Transformer) -> Transformer | None:
    """`model` for CPU decoding: the same forward, each Linear's weight stored column-major.

    At batch 1 a decode step is a chain of vector-matrix products that read every weight
    once, so it runs at memory speed; on CPU a matmul streams a weight laid out as Wᵀ
    (C_in, C_out) in memory markedly faster than the usual W (C_out, C_in)
    (bench/model_bench.py measures the decode speeds). At batch 16 the usual layout is the
    faster one, so the serving engine keeps it. The copy shares every other tensor
    (embeddings, norms, rotary tables) with `model`, costs one pass over the Linear weights,
    and only decodes (its Linears are `_ColumnMajorLinear`). None where it does not apply:
    off the CPU, under autocast, or for Linears that are not plain (int8, LoRA).
    """
    if (model.tok_emb.weight.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or not all(type(b) is Block for b in model.layers)
            or not all(type(getattr(m, name)) is nn.Linear for m, name in _linear_slots(model))):
        return None
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    fast = copy.deepcopy(model, memo=shared)  # new modules over the same tensors
    for parent, name in _linear_slots(fast):
        setattr(parent, name, _ColumnMajorLinear(getattr(parent, name)))
    for module in fast.modules():
        _call_forward_directly(module)
    return fast.eval()


_DIRECT: dict[type, type] = {}


def _call_forward_directly(module: nn.Module) -> None:
    """Make calling `module` run its forward without `nn.Module.__call__`'s hook dispatch.

    A batch-1 decode step calls ~5 modules per layer; on CPU that dispatch is a measurable
    share of a small model's step. Only for `column_major_copy`'s private modules, which
    nothing hooks or trains: the class becomes a subclass whose __call__ is its forward.
    """
    cls = type(module)
    if cls in (_ColumnMajorLinear, nn.ModuleList) or cls in _DIRECT.values():
        return
    if cls not in _DIRECT:
        _DIRECT[cls] = type(cls.__name__, (cls,), {"__call__": cls.forward, "__module__": cls.__module__})
    module.__class__ = _DIRECT[cls]


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


def _check(model: Transformer, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
           top_k: int, top_p: float) -> None:
    """UserError naming the first argument of `generate` that cannot work."""
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
    _check(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
           top_k=top_k, top_p=top_p)
    if max_new_tokens == 0:
        return
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    if max_new_tokens >= COLUMN_MAJOR_MIN_TOKENS:
        model = column_major_copy(model) or model
    cache = KVCache.for_model(model, max_len=len(prompt_ids) + max_new_tokens)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    for step in range(max_new_tokens):
        # inference_mode per step, not around the loop: it must not stay on while the caller
        # runs between yields.
        with torch.inference_mode():
            logits = model(idx, cache=cache, last_only=True)[0, -1]  # (V,)
            token = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
        if token == eos_id:
            return
        yield token
        if step + 1 < max_new_tokens:
            idx = torch.tensor([[token]], dtype=torch.long, device=device)  # (1, 1)
