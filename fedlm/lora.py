"""LoRA on fedlm's Transformer (and so on any Llama model loaded into it, SmolLM2 included), via `peft`.

    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"])
    adapter_names(model)          # the state-dict names that train (and cross the wire)
    merged_state(model)           # the base weights with W + (alpha/rank)·B·A folded in
    plain = merge_lora(model)     # a new plain Transformer with the adapters merged
    save_model(plain_model(model), out)   # plain_model: merge_lora only when there are adapters

`apply_lora` injects peft's LoRA layers in place (`peft.inject_adapter_in_model`): the model
stays a `Transformer`, every base weight is frozen, and only `lora_A` / `lora_B` train. B starts
at zero, so the adapted model computes exactly what the base did. Targets are matched as peft
matches them (a module name equal to the target or ending in ".target"); a target that matches
no module is a UserError naming it and listing the Linear modules there are.

fedlm fuses q/k/v (`wqkv`) and gate/up (`w13`), so an adapter on `wqkv` shares one A between
q, k and v (its B is the three Bs stacked): a rank-r adapter of the fused matrix, not three.

A model directory never holds adapters: `fedlm.modelio.save_model` takes a plain model, so a
LoRA model is saved as `save_model(plain_model(model), ...)` (its adapters merged), and
`load_model`, `fedlm eval/generate/serve/export` work on it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedlm.errors import UserError
from fedlm.model import Transformer
from fedlm.modelio import assign_weights

ADAPTER = "default"  # peft's adapter name; one adapter per model


def _peft() -> tuple[type, type]:
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise UserError("lora.rank > 0 needs peft: pip install 'peft>=0.17,<0.20'") from None
    return LoraConfig, LoraLayer


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's Linear modules (what a LoRA target can match)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in name]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """UserError when a target matches no Linear module (naming it and the module names)."""
    names = linear_names(model)
    for target in targets:
        if not any(_matches(n, target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise UserError(
                f"lora.targets: {target!r} matches no Linear module of the model; "
                f"module names: {', '.join(leaves)} (e.g. layers.0.attn.wqkv)"
            )


def has_lora(model: nn.Module) -> bool:
    """Whether `apply_lora` (peft) injected adapters into `model`."""
    return any("lora_A" in name for name, _ in model.named_parameters(remove_duplicate=False))


def apply_lora(model: Transformer, *, rank: int, alpha: float, dropout: float,
               targets: Sequence[str], seed: int | None = None) -> Transformer:
    """Inject LoRA adapters (scale alpha/rank) into `targets` in place; freeze everything else.

    With `seed`, every A is drawn from a generator of its own (so the same on every silo and
    the server, whatever other threads draw meanwhile); without, from the global RNG.
    """
    if rank <= 0:
        raise ValueError("apply_lora needs rank > 0")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    check_targets(model, targets)
    LoraConfig, _ = _peft()
    from peft import inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        bias="none")
    # peft draws A from the global RNG (Kaiming-uniform); B = 0, so the output is unchanged.
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if seed is not None:  # peft takes no generator: draw A again, as peft does, from our own
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same A on every device
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    a = torch.empty(p.shape, dtype=p.dtype)
                    p.copy_(nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator))
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_("lora_" in name)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """State-dict names of the adapter weights (the trainable ones), in state-dict order."""
    return [name for name in model.state_dict() if ".lora_A." in name or ".lora_B." in name]


def num_trainable(model: nn.Module) -> int:
    """Parameters that train (adapters only under LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_state(model: Transformer) -> dict[str, Tensor]:
    """The plain Transformer's state dict with each adapter folded in: W + (alpha/rank)·B·A.

    A tied head is left out (as `fedlm.modelio.stored_state` does). Computed in fp32 without
    touching `model`, so training can go on after a save.
    """
    _, LoraLayer = _peft()
    out: dict[str, Tensor] = {}
    lora_modules = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, t in model.state_dict().items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t.detach()
    with torch.no_grad():
        for name, m in lora_modules.items():
            key = f"{name}.weight"
            base = out[key]
            delta = m.get_delta_weight(ADAPTER)  # type: ignore[attr-defined]  # (out, in): scaling · B @ A
            out[key] = (base.float() + delta.float()).to(base.dtype)
    if model.cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in out.items()}


def merge_lora(model: Transformer) -> Transformer:
    """A new plain Transformer (no peft layers) computing what `model` computes, adapters merged."""
    plain = Transformer.empty(dataclasses.replace(model.cfg))
    assign_weights(plain, merged_state(model), where="merged LoRA model")
    plain.activation_checkpointing = model.activation_checkpointing
    return plain.train(model.training)


def plain_model(model: Transformer) -> Transformer:
    """`model` itself when it has no adapters, else `merge_lora(model)`: what a model directory stores."""
    return merge_lora(model) if has_lora(model) else model
