"""LoRA on fedlm's Transformer (and so on any Llama model loaded into it, SmolLM2 included), via `peft`.

    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"])
    adapter_names(model)          # the state-dict names that train (and cross the wire)
    merged_state(model)           # the base weights with W + (alpha/rank)·B·A folded in
    plain = merge_lora(model)     # a new plain Transformer with the adapters merged
    save_adapters(model, out, base={"spec": "smollm2", "sha256": ...})   # a run's model/: adapters + base
    plain = load_adapters(base_model, settings, tensors, where="RUN/model")   # base + adapters, merged

`apply_lora` injects peft's LoRA layers in place (`peft.inject_adapter_in_model`): the model
stays a `Transformer`, every base weight is frozen, and only `lora_A` / `lora_B` train. B starts
at zero, so the adapted model computes exactly what the base did. Targets are matched as peft
matches them (a module name equal to the target or ending in ".target"); a target that matches
no module is a UserError naming it and listing the Linear modules there are.

fedlm fuses q/k/v (`wqkv`) and gate/up (`w13`), so an adapter on `wqkv` shares one A between
q, k and v (its B is the three Bs stacked): a rank-r adapter of the fused matrix, not three.

A LoRA run over a pretrained model stores its adapters, not the base weights again
(`save_adapters`: adapters.safetensors, a few MB, and config.json's "lora" entry naming the
base and its sha256); `fedlm.pretrained.load_model` loads the base, applies the adapters and
merges them (`load_adapters`), so `fedlm eval/generate/serve/export` and `train.init_from`
get a plain model whichever way a run was saved. A LoRA model without a base to name (a fresh,
seeded one) is saved merged: `save_model(plain_model(model), ...)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedlm.errors import UserError
from fedlm.model import Transformer
from fedlm.modelio import (
    ADAPTERS,
    assign_tensors,
    assign_weights,
    model_config_json,
    write_model_dir,
)

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


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """The rank, alpha and adapted modules (full names) of a model `apply_lora` adapted."""
    _, LoraLayer = _peft()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    return {"rank": int(first.r[ADAPTER]), "alpha": float(first.lora_alpha[ADAPTER]),  # type: ignore[attr-defined]
            "targets": list(layers)}


def save_adapters(model: Transformer, out_dir: Path, *, base: dict[str, str],
                  tokenizer_path: Path | None = None) -> None:
    """Write `model`'s adapters as a model directory over `base` ({"spec", "sha256"}: what
    `fedlm.pretrained.base_reference` gives for train.init_from), as a whole or not at all.

    config.json holds the model's shape and {"lora": {"base", "base_sha256", "rank", "alpha",
    "targets"}}; adapters.safetensors the A and B of every adapted module (peft's names).
    """
    state = model.state_dict()
    tensors = {name: state[name].detach().to("cpu") for name in adapter_names(model)}
    lora = {"base": base["spec"], "base_sha256": base["sha256"], **lora_settings(model)}
    write_model_dir(Path(out_dir), tensors, model_config_json(model.cfg) | {"lora": lora}, weights=ADAPTERS,
                    tokenizer_path=tokenizer_path)


def load_adapters(base: Transformer, settings: dict[str, Any], tensors: dict[str, Tensor], *,
                  where: str) -> Transformer:
    """A new plain Transformer: `base` (consumed) with the adapters `tensors` applied as `settings`
    ({"rank", "alpha", "targets"}, what `save_adapters` wrote) and merged."""
    apply_lora(base, rank=int(settings["rank"]), alpha=float(settings["alpha"]), dropout=0.0,
               targets=list(settings["targets"]))
    state = base.state_dict()
    assign_tensors({name: state[name] for name in adapter_names(base)}, tensors, where=where)
    return merge_lora(base)
