"""KV-cache decoding and sampling, checked against full forwards, transformers and hand-built cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlm.config import ModelConfig
from fedlm.errors import UserError
from fedlm.generate import filter_logits, generate, quantize_int8, sample_next
from fedlm.model import KVCache, Transformer


def make_model(seed: int = 0, **kw: object) -> Transformer:
    base: dict[str, object] = dict(
        preset="custom", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
        vocab_size=97, max_seq_len=64, rope_theta=500.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**(base | kw)))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights: peaked, seed-sensitive next-token distributions
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.5) + (p.ndim == 1)
            )
    return model.eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cached_decoding_matches_the_full_forward(kv_heads: int) -> None:
    """Prefill, a multi-token chunk at an offset, then single steps: same logits as one pass."""
    model = make_model(n_kv_heads=kv_heads)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, batch_size=2, max_len=30)
        parts = [model(idx[:, :9], cache=cache), model(idx[:, 9:16], cache=cache)]
        parts += [model(idx[:, t : t + 1], cache=cache) for t in range(16, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-4)


def test_cache_overflow_is_refused() -> None:
    model = make_model()
    cache = KVCache.for_model(model, max_len=4)
    with pytest.raises(ValueError, match="exceed the context"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_greedy_equals_transformers_generate(tmp_path: Path) -> None:
    """Greedy fedlm tokens equal LlamaForCausalLM.generate(do_sample=False) on the same weights."""
    transformers = pytest.importorskip("transformers")
    from fedlm.hf import export_hf

    model = make_model(seed=1)
    export_hf(model, tmp_path / "hf", tokenizer_path=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = [5, 17, 3, 88, 41, 9, 60]
    ours = list(generate(model, prompt, max_new_tokens=40, temperature=0))
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=40, do_sample=False, use_cache=True,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    assert ours == out[0, len(prompt) :].tolist()
    assert len(set(ours)) > 3  # not a degenerate repetition


def test_seeded_sampling_is_reproducible_and_isolated() -> None:
    model = make_model()
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
    a = list(generate(model, [1, 2, 3], seed=7, **kw))  # type: ignore[arg-type]
    torch.manual_seed(123)  # the global RNG must not matter
    b = list(generate(model, [1, 2, 3], seed=7, **kw))  # type: ignore[arg-type]
    c = list(generate(model, [1, 2, 3], seed=8, **kw))  # type: ignore[arg-type]
    assert a == b and len(a) == 20
    assert a != c


def test_streams_and_stops_at_eos_without_yielding_it() -> None:
    model = make_model(seed=2)
    greedy = list(generate(model, [4, 5, 6], max_new_tokens=30, temperature=0))
    stream = generate(model, [4, 5, 6], max_new_tokens=30, temperature=0)
    assert next(stream) == greedy[0]  # a generator: tokens come one at a time
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    stopped = list(generate(model, [4, 5, 6], max_new_tokens=30, temperature=0, eos_id=greedy[k]))
    assert stopped == greedy[:k]


def test_prompt_longer_than_the_context_is_a_user_error() -> None:
    model = make_model()  # context 64
    assert len(list(generate(model, [1] * 54, max_new_tokens=10, temperature=0))) == 10
    with pytest.raises(UserError, match="prompt is 55 tokens.*10 new tokens.*context is 64.*54"):
        list(generate(model, [1] * 55, max_new_tokens=10))
    with pytest.raises(UserError, match="empty"):
        list(generate(model, [], max_new_tokens=10))
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        list(generate(model, [97], max_new_tokens=1))


def test_top_k_and_top_p_keep_the_hand_computed_support() -> None:
    """p = [.05, .5, .1, .2, .15]: top-k 2 -> {1, 3}; top-p .7 -> {1, 3}; .71 -> {1, 3, 4}."""
    logits = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15]).log()

    def support(**kw: float) -> set[int]:
        kept = filter_logits(logits, **kw)  # type: ignore[arg-type]
        return set(torch.nonzero(kept > float("-inf")).flatten().tolist())

    assert support(top_k=2) == {1, 3}
    assert support(top_k=0) == {0, 1, 2, 3, 4}
    assert support(top_p=0.5) == {1}
    assert support(top_p=0.69) == {1, 3}
    assert support(top_p=0.71) == {1, 3, 4}
    # top-p applies after top-k, to the renormalised [5/7, 2/7]
    assert support(top_p=0.71, top_k=2) == {1}
    assert support(top_p=0.72, top_k=2) == {1, 3}
    assert support(top_p=1.0) == {0, 1, 2, 3, 4}


def test_filters_match_transformers_warpers() -> None:
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 200, generator=g) * 3
    for top_k, top_p in [(10, 1.0), (0, 0.9), (0, 0.3), (50, 0.8)]:
        ref = logits.clone()
        if top_k:
            ref = transformers.TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = transformers.TopPLogitsWarper(top_p)(None, ref)
        ours = filter_logits(logits, top_k=top_k, top_p=top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (top_k, top_p)


def test_sampling_frequencies_follow_the_renormalised_distribution() -> None:
    """With top-k 2 over p = [.05, .5, .1, .2, .15], draws follow [0, 5/7, 0, 2/7, 0]."""
    logits = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15]).log()
    gen = torch.Generator().manual_seed(0)
    draws = [
        sample_next(logits, temperature=1.0, top_k=2, top_p=1.0, generator=gen) for _ in range(4000)
    ]
    counts = torch.bincount(torch.tensor(draws), minlength=5)
    assert counts[0] == counts[2] == counts[4] == 0
    assert abs(counts[1].item() / 4000 - 5 / 7) < 0.03  # ~4 standard errors
    assert sample_next(logits, temperature=0, top_k=0, top_p=1.0, generator=None) == 1


def test_int8_copy_stays_close_and_leaves_the_original() -> None:
    torch.manual_seed(0)  # the standard init: activations of a realistic scale
    model = Transformer(make_model().cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        ref, got = model(idx), q(idx)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(list(generate(q, [1, 2, 3], max_new_tokens=5, temperature=0))) == 5
