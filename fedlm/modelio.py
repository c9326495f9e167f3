"""fedlm's own model directory format: save it atomically, read it back with checks.

    save_model(model, RUN / "model", tokenizer_path=WS / "tokenizer.json")   # a plain model
    model_dir = find_model_dir(RUN)              # a run dir resolves to RUN/model
    model = load_fedlm_dir(model_dir)            # a fedlm-format directory only

Loading *any* model directory (fedlm's, a LoRA adapter one or a Hugging Face Llama one) is
`fedlm.pretrained.load_model`, which sits above this module and `fedlm.hf`; this module is
the bottom of the model-I/O stack and imports neither (nor `fedlm.lora`, which writes its
adapter directories with `write_model_dir`).

A model directory holds `model.safetensors` (fedlm parameter names; a tied head is stored
once, as `tok_emb.weight`), `config.json` (the ModelConfig fields plus "format": "fedlm")
and, when given, a copy of `tokenizer.json`. A LoRA run's directory holds its adapters
instead (`adapters.safetensors`, and a "lora" entry in config.json naming the base model:
`fedlm.lora.save_adapters`). Every way a directory can be wrong — missing files, a
truncated or corrupt safetensors file, another model's config, wrong shapes — is a
UserError naming the file and the mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlm.config import ModelConfig
from fedlm.data.chat import TEMPLATE_FILE
from fedlm.errors import UserError
from fedlm.fileio import atomic_dir, write_json
from fedlm.model import Transformer

WEIGHTS = "model.safetensors"
ADAPTERS = "adapters.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt — "
            "re-save or re-export the model"
        ) from None


def _shape(t: Tensor | torch.Size) -> str:
    dims = tuple(t.shape if isinstance(t, Tensor) else t)
    return "(" + ", ".join(str(d) for d in dims) + ")"


def assign_weights(model: Transformer, tensors: dict[str, Tensor], *, where: str) -> None:
    """Copy `tensors` into `model` after checking names and shapes against its config."""
    assign_tensors(stored_state(model), tensors, where=where)


def assign_tensors(expected: dict[str, Tensor], tensors: dict[str, Tensor], *, where: str) -> None:
    """Copy `tensors` into the `expected` ones (a model's, by name) after checking names and shapes."""
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing:
        raise UserError(
            f"{where}: missing {len(missing)} tensor(s) the config expects, e.g. {missing[0]!r}; "
            "the weights do not belong to this config.json"
        )
    if unexpected:
        raise UserError(
            f"{where}: {len(unexpected)} tensor(s) the config does not expect, e.g. "
            f"{unexpected[0]!r}; the weights do not belong to this config.json"
        )
    for name, param in expected.items():
        if tensors[name].shape != param.shape:
            key = name.removesuffix(".weight")
            raise UserError(
                f"{where}: {key} has shape {_shape(tensors[name])}, config expects "
                f"{_shape(param)}; the weights do not belong to this config.json"
            )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def stored_state(model: Transformer) -> dict[str, Tensor]:
    """The tensors a model directory stores: the state dict, a tied head only once."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return state


def save_model(model: Transformer, out_dir: Path, *, tokenizer_path: Path | None = None) -> None:
    """Write a plain model's `out_dir` (weights, config, tokenizer) as a whole or not at all.

    A model directory never holds a model with peft layers: save those with
    `fedlm.lora.save_adapters`, or merge them first (`fedlm.lora.merge_lora`).
    """
    state = stored_state(model)
    if any(".lora_" in name for name in state):
        raise ValueError("save_model takes a plain model: merge its LoRA adapters first (fedlm.lora.merge_lora)")
    write_model_dir(Path(out_dir), {name: t.detach() for name, t in state.items()}, model_config_json(model.cfg),
                    weights=WEIGHTS, tokenizer_path=tokenizer_path)


def model_config_json(cfg: ModelConfig) -> dict[str, Any]:
    """config.json's content for a model of shape `cfg`."""
    return dataclasses.asdict(cfg) | {"format": "fedlm"}


def write_model_dir(out_dir: Path, tensors: dict[str, Tensor], config: dict[str, Any], *, weights: str,
                    tokenizer_path: Path | None = None) -> None:
    """A model directory (`weights` from `tensors`, config.json, the tokenizer and the workspace's
    chat template beside it), written as a whole or not at all."""
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise UserError(f"{tokenizer_path}: no such tokenizer file")
    with atomic_dir(out_dir) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / weights), metadata={"format": "pt"})
        write_json(tmp / CONFIG, config)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            template = Path(tokenizer_path).parent / TEMPLATE_FILE  # the workspace's chat template
            if template.is_file():
                shutil.copyfile(template, tmp / TEMPLATE_FILE)


def find_model_dir(path: Path) -> Path:
    """The model directory for `path`: itself when it holds config.json, else `path/model`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such model directory")
    if not path.is_dir():
        raise UserError(f"{path}: expected a model directory (or a run directory), got a file")
    for candidate in (path, path / "model"):
        if (candidate / CONFIG).is_file():
            return candidate
    raise UserError(
        f"{path}: no model here (expected {CONFIG} + {WEIGHTS}, or a run directory with model/)"
    )


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path` (a config.json or an index); anything else is a UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def config_from_json(data: dict[str, Any], where: Path) -> ModelConfig:
    """A ModelConfig from a fedlm config.json, with errors that name the key."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("format", "lora"):  # "lora": an adapter directory's base (`fedlm.lora.save_adapters`)
            continue
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}; known: {', '.join(fields)}")
        kwargs[key] = value
    try:
        return ModelConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def load_fedlm_dir(model_dir: Path, *, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model (eval mode) in a fedlm-format model directory (`"format": "fedlm"` in config.json)."""
    config_path = Path(model_dir) / CONFIG
    data = read_json_object(config_path)
    if data.get("format") != "fedlm":
        raise UserError(f'{config_path}: not a fedlm model config (no "format": "fedlm")')
    if "lora" in data:
        raise UserError(f"{config_path}: LoRA adapters over a base model; load it with fedlm.pretrained.load_model")
    cfg = config_from_json(data, config_path)
    if cfg.vocab_size <= 0:
        raise UserError(f"{config_path}: vocab_size must be > 0")
    tensors = read_safetensors(Path(model_dir) / WEIGHTS)
    model = Transformer.empty(cfg)
    assign_weights(model, tensors, where=str(Path(model_dir) / WEIGHTS))
    return model.to(dtype).eval()
