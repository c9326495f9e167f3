"""The Transformer's parameter arrays from a model config alone (no weights): names, sizes, LoRA adapters.

    p = count_params(cfg.model, cfg)        # p.total, p.trainable, p.wire (the arrays an update holds)

The planner costs a run from these (`fedlm.plan`), and a silo checks the size of the model a run
asks it to build before building it (`fedlm.federation.task.check_work`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlm.config import Config, ModelConfig
from fedlm.errors import UserError


def linear_shapes(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every matmul weight, as Transformer names them."""
    q, kv = mc.n_heads * mc.head_dim, mc.n_kv_heads * mc.head_dim
    out: dict[str, tuple[int, int]] = {}
    for i in range(mc.n_layers):
        out |= {f"layers.{i}.attn.wqkv": (mc.d_model, q + 2 * kv), f"layers.{i}.attn.wo": (q, mc.d_model),
                f"layers.{i}.mlp.w13": (mc.d_model, 2 * mc.d_ff), f"layers.{i}.mlp.w2": (mc.d_ff, mc.d_model)}
    out["lm_head"] = (mc.d_model, mc.vocab_size)
    return out


def array_sizes(mc: ModelConfig) -> dict[str, int]:
    """Parameter arrays (state-dict names, a tied head once) -> number of values."""
    sizes = {"tok_emb.weight": mc.vocab_size * mc.d_model}
    for name, (i, o) in linear_shapes(mc).items():
        if name != "lm_head":
            sizes[f"{name}.weight"] = i * o
    for i in range(mc.n_layers):
        sizes[f"layers.{i}.attn_norm.weight"] = sizes[f"layers.{i}.mlp_norm.weight"] = mc.d_model
        if mc.qkv_bias:
            sizes[f"layers.{i}.attn.wqkv.bias"] = (mc.n_heads + 2 * mc.n_kv_heads) * mc.head_dim
    sizes["norm.weight"] = mc.d_model
    if not mc.tie_embeddings:
        sizes["lm_head.weight"] = mc.vocab_size * mc.d_model
    return sizes


def lora_arrays(mc: ModelConfig, rank: int, targets: list[str]) -> dict[str, int]:
    """Adapter arrays (A: r×in, B: out×r per targeted Linear, peft's naming) -> values.

    A target matches a module whose name is it or ends with "." + it (peft's rule); one
    that matches no Linear is a UserError naming it.
    """
    shapes = linear_shapes(mc)
    out: dict[str, int] = {}
    for t in targets:
        hits = [n for n in shapes if n == t or n.endswith("." + t)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in shapes})
            raise UserError(f"lora.targets: {t!r} matches no Linear module of the model; known: {', '.join(known)}")
        for n in hits:
            i, o = shapes[n]
            out[f"{n}.lora_A.weight"], out[f"{n}.lora_B.weight"] = rank * i, o * rank
    return out


@dataclass(frozen=True)
class Params:
    total: int  # every parameter, a tied embedding once, adapters included
    trainable: int
    matmul: int  # per-token matmul weights (the head included, tied or not)
    frozen_matmul: int  # of those, the frozen ones (LoRA's base)
    adapters: int
    wire: dict[str, int]  # the arrays an update holds


def count_params(mc: ModelConfig, cfg: Config) -> Params:
    """Exact parameter counts from the shapes (LoRA: only the adapters train and travel)."""
    base = array_sizes(mc)
    matmul = sum(i * o for i, o in linear_shapes(mc).values())
    if cfg.lora.rank:
        adapters = lora_arrays(mc, cfg.lora.rank, cfg.lora.targets)
        n = sum(adapters.values())
        return Params(sum(base.values()) + n, n, matmul, matmul, n, adapters)
    total = sum(base.values())
    return Params(total, total, matmul, 0, 0, base)
