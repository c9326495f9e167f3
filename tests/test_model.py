"""The decoder against a numpy reference, and the model directory's save/load contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlm.config import ModelConfig
from fedlm.errors import UserError
from fedlm.model import Attention, Positions, RMSNorm, Transformer, num_params
from fedlm.modelio import find_model_dir, save_model
from fedlm.pretrained import load_model


def small_cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(
        preset="custom", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
        vocab_size=101, max_seq_len=48, rope_theta=500.0,
    )  # fmt: skip
    return ModelConfig(**(base | kw))  # type: ignore[arg-type]


def spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter O(0.1-1) random values so mistakes show up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (p.ndim == 1)
            )
    return model


def np_rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Rotate pairs (i, i + D/2) of x (H, T, D) by angle pos * theta^(-2i/D)."""
    _, T, D = x.shape
    half = D // 2
    angle = np.arange(T)[:, None] * theta ** (-np.arange(half) * 2.0 / D)  # (T, D/2)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_attention_matches_numpy_softmax_formula() -> None:
    """Attention = softmax(q kᵀ / √d + causal mask) v per head, kv heads shared by groups."""
    torch.manual_seed(0)
    cfg = small_cfg(n_heads=4, n_kv_heads=2)
    attn = spread(Attention(cfg))
    assert isinstance(attn, Attention)
    T, H, KV, D = 7, 4, 2, 16
    x = torch.randn(1, T, cfg.d_model)
    cos, sin = Transformer(cfg).rope_cos[:T], Transformer(cfg).rope_sin[:T]
    with torch.no_grad():
        got = attn(x, Positions(cos, sin))[0].double().numpy()

    xn = x[0].double().numpy()
    w = attn.wqkv.weight.detach().double().numpy()
    q, k, v = np.split(xn @ w.T, [H * D, H * D + KV * D], axis=-1)
    q = np_rope(q.reshape(T, H, D).transpose(1, 0, 2), cfg.rope_theta)
    k = np_rope(k.reshape(T, KV, D).transpose(1, 0, 2), cfg.rope_theta)
    v = v.reshape(T, KV, D).transpose(1, 0, 2)
    heads = []
    for h in range(H):
        g = h // (H // KV)
        scores = q[h] @ k[g].T / np.sqrt(D)
        scores[np.triu_indices(T, 1)] = -np.inf
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)  # each row sums to one
        heads.append(p @ v[g])
    ref = np.concatenate(heads, axis=-1) @ attn.wo.weight.detach().double().numpy().T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_rmsnorm_matches_numpy_and_keeps_bf16_input_dtype() -> None:
    norm = spread(RMSNorm(32, eps=1e-5))
    x = torch.randn(3, 32)
    xn = x.double().numpy()
    ref = (
        xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * norm.weight.detach().double().numpy()
    )
    np.testing.assert_allclose(norm(x).detach().numpy(), ref, atol=1e-5)
    assert (
        norm(x.bfloat16()).dtype == torch.float32
    )  # weight (fp32) * normed (bf16) promotes, as HF


def test_param_counts_match_the_formula_and_presets() -> None:
    """Embedding + per layer (qkv, o, gate/up, down, two norms) + final norm (+ untied head)."""
    for tie in (True, False):
        cfg = small_cfg(tie_embeddings=tie)
        C, F, V, L, kv = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers, cfg.n_kv_heads * 16
        per_layer = C * (C + 2 * kv) + C * C + 3 * C * F + 2 * C
        expected = V * C + L * per_layer + C + (0 if tie else V * C)
        assert num_params(Transformer(cfg)) == expected
    assert 1e6 <= num_params(Transformer(ModelConfig(preset="tiny", vocab_size=4096))) <= 3e6
    assert 15e6 <= num_params(Transformer(ModelConfig(preset="small", vocab_size=8192))) <= 30e6


def test_init_is_seeded_and_scales_residual_projections() -> None:
    torch.manual_seed(3)
    a = Transformer(small_cfg(n_layers=8, d_model=128, d_ff=256))
    torch.manual_seed(3)
    b = Transformer(small_cfg(n_layers=8, d_model=128, d_ff=256))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert abs(a.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(a.layers[0].attn.wqkv.weight.std().item() - 0.02) < 0.002
    assert abs(a.layers[0].mlp.w2.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2*8)
    assert torch.equal(a.layers[0].attn_norm.weight, torch.ones(128))


def test_vocab_size_must_be_set() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelConfig(preset="tiny"))


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = spread(Transformer(small_cfg()))
    assert isinstance(model, Transformer)
    idx = torch.randint(0, 101, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ckpt
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = Transformer(small_cfg()).eval()
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        ref = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(idx)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


# --- the model directory ---


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip_is_bitwise(tmp_path: Path, tie: bool) -> None:
    torch.manual_seed(0)
    model = spread(Transformer(small_cfg(tie_embeddings=tie)))
    assert isinstance(model, Transformer)
    tok = tmp_path / "tok.json"
    tok.write_text('{"not": "checked"}')
    save_model(model, tmp_path / "run" / "model", tokenizer_path=tok)
    state = torch.get_rng_state()
    loaded, tok_path = load_model(tmp_path / "run")  # a run dir resolves to run/model
    assert torch.equal(torch.get_rng_state(), state), "loading must not move the global RNG"
    assert tok_path == tmp_path / "run" / "model" / "tokenizer.json"
    assert tok_path.read_text() == tok.read_text()
    assert loaded.cfg == model.cfg and not loaded.training
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    if tie:
        assert loaded.lm_head.weight is loaded.tok_emb.weight
    # loading builds the model without init (Transformer.empty): the derived buffers are rebuilt
    assert torch.equal(loaded.rope_cos, model.rope_cos) and torch.equal(loaded.rope_sin, model.rope_sin)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["format"] == "fedlm" and config["d_model"] == 64


def test_load_model_in_bf16(tmp_path: Path) -> None:
    save_model(Transformer(small_cfg()), tmp_path / "m")
    model, tok = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert tok is None and model.tok_emb.weight.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 101)


def test_truncated_or_corrupt_weights_name_the_file(tmp_path: Path) -> None:
    save_model(Transformer(small_cfg()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(tmp_path / "m")
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match=r"model\.safetensors"):
        load_model(tmp_path / "m")
    weights.unlink()
    with pytest.raises(UserError, match=r"model\.safetensors: missing"):
        load_model(tmp_path / "m")


def test_wrong_shapes_name_tensor_and_shapes(tmp_path: Path) -> None:
    save_model(Transformer(small_cfg(d_model=32)), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps(cfg | {"d_model": 64}))  # another model's config
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "m")
    msg = str(err.value)
    assert (
        "model.safetensors" in msg
        and "tok_emb has shape (101, 32), config expects (101, 64)" in msg
    )
    config.write_text(json.dumps(cfg | {"n_layers": 3}))
    with pytest.raises(UserError, match="missing 1 tensor|missing .* e.g. 'layers.2"):
        load_model(tmp_path / "m")
    config.write_text(json.dumps(cfg | {"d_modle": 32}))
    with pytest.raises(UserError, match="config.json: unknown key 'd_modle'"):
        load_model(tmp_path / "m")
    config.write_text("{ not json")
    with pytest.raises(UserError, match="config.json: not readable JSON"):
        load_model(tmp_path / "m")


def test_find_model_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such model directory"):
        find_model_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="no model here"):
        find_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="neither a fedlm model config"):
        load_model(tmp_path)


def test_failed_save_keeps_the_old_model(tmp_path: Path) -> None:
    save_model(Transformer(small_cfg()), tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="missing: no such tokenizer file"):
        save_model(Transformer(small_cfg()), tmp_path / "m", tokenizer_path=tmp_path / "missing")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("chunk", [7, 256])
def test_loss_from_targets_equals_cross_entropy_of_logits(chunk: int) -> None:
    """The chunked head + loss equals F.cross_entropy of the full logits, loss and gradients,
    with chunks that do and do not divide the rows; forward(idx, targets=) uses it."""
    from fedlm.model import chunked_cross_entropy

    torch.manual_seed(0)
    model = spread(Transformer(small_cfg(tie_embeddings=False)))
    idx = torch.randint(0, 101, (3, 20))
    y = torch.randint(0, 101, (3, 20))
    params = list(model.parameters())
    ref = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref, params)
    h = torch.randn(60, 64, requires_grad=True)
    w = torch.randn(101, 64, requires_grad=True)
    got = chunked_cross_entropy(h, w, y.flatten(), chunk=chunk)
    want = torch.nn.functional.cross_entropy(h @ w.t(), y.flatten())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    loss = model(idx, targets=y)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, params), ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bf16_attention_backward_matches_float64_reference() -> None:
    """The bf16 training path's matmul backward of causal attention against autograd through a
    float64 softmax(QKᵀ/√D + mask)·V."""
    from fedlm.model import CausalAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    d_out = torch.randn(2, 3, 17, 8, generator=g)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    mask = torch.ones(17, 17, dtype=torch.bool).triu(1)
    p = (q64 @ k64.transpose(-1, -2) / 8**0.5).masked_fill(mask, float("-inf")).softmax(-1)
    (p @ v64).backward(d_out.double())
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    out = CausalAttention.apply(qb, kb, vb)
    out.backward(d_out)
    for got, ref in ((qb.grad, q64.grad), (kb.grad, k64.grad), (vb.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)  # type: ignore[union-attr]


def test_an_empty_model_runs_no_init() -> None:
    """Transformer.empty (every load and LoRA merge) draws nothing and builds nothing it then
    overwrites: the global RNG stays put, and nothing imports torch._dynamo (which the meta
    kernels of normal_ and of the rotary tables' ops would, at ~1.5 s of CPU per process)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from fedlm.config import ModelConfig\n"
        "from fedlm.model import Transformer\n"
        "state = torch.get_rng_state()\n"
        "m = Transformer.empty(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32))\n"
        "assert m.tok_emb.weight.device.type == 'cpu' and m.lm_head.weight is m.tok_emb.weight\n"
        "assert torch.equal(torch.get_rng_state(), state)\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
