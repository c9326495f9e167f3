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
    assert cache.pos.tolist() == [30, 30]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-4)


def _pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded to one width with token 0 on `side`: ids (B, W) and real-token mask (B, W)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, cols], real[b, cols] = torch.tensor(r, dtype=torch.long), True
    return ids, real


def test_padded_rows_at_different_positions_match_each_row_alone() -> None:
    """Rows at different cache positions fed left-padded, then right-padded chunks (one row all
    padding), then single steps: each real token gets the logits of its row's tokens run alone."""
    model = make_model(n_kv_heads=2)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 97, (12,), generator=g).tolist() for _ in range(4)]
    alone = [[] for _ in seqs]  # type: list[list[int]]
    got: list[list[torch.Tensor]] = [[] for _ in seqs]

    def feed(cache: KVCache, first_row: int, counts: list[int], side: str) -> None:
        chunks = []
        for i, n in enumerate(counts):
            b = first_row + i
            chunks.append(seqs[b][len(alone[b]) : len(alone[b]) + n])
            alone[b] += chunks[-1]
        ids, real = _pad(chunks, side)
        logits = model(ids, cache=cache, pad_mask=real)
        for i in range(len(counts)):
            got[first_row + i] += list(logits[i][real[i]])

    cache = KVCache.for_model(model, batch_size=4, max_len=24)
    with torch.no_grad():
        feed(cache.rows(3, 4), 3, [6], "left")  # row 3 alone: the rows now sit apart
        feed(cache, 0, [5, 1, 3, 2], "left")
        feed(cache, 0, [2, 3, 0, 1], "right")
        for _ in range(3):
            feed(cache, 0, [1, 1, 1, 1], "left")
        assert cache.pos.tolist() == [5 + 3 + 3] * 3 + [6 + 5 + 3 + 3]
        for b in range(4):
            want = model(torch.tensor([alone[b]]))[0]  # (n, V)
            torch.testing.assert_close(torch.stack(got[b]), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_decoding_matches_transformers(tmp_path: Path, side: str) -> None:
    """A padded batch prefilled and then decoded greedily through the cache gives
    LlamaForCausalLM's logits for the same tokens (its attention_mask, positions counted over
    real tokens) at every real position; a padded forward without a cache gives them too."""
    transformers = pytest.importorskip("transformers")
    from fedlm.hf import export_hf

    model = make_model(seed=1, n_kv_heads=2)
    export_hf(model, tmp_path / "hf", tokenizer_path=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, real = _pad([[5, 17, 3, 88, 41, 9, 60], [7, 2, 30], [11, 12, 13, 14, 15]], side)
    cache = KVCache.for_model(model, batch_size=3, max_len=ids.shape[1] + 6)
    with torch.no_grad():
        no_cache = model(ids, pad_mask=real)
        ours = [model(ids, cache=cache, pad_mask=real)]
        last = real.cumsum(-1).argmax(-1)  # each row's last real column
        nxt = ours[0][torch.arange(3), last].argmax(-1)[:, None]  # (3, 1)
        for _ in range(6):
            ids, real = torch.cat([ids, nxt], 1), torch.cat([real, torch.ones(3, 1, dtype=torch.bool)], 1)
            ours.append(model(nxt, cache=cache))
            nxt = ours[-1][:, -1].argmax(-1)[:, None]
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(ids, attention_mask=real.long(), position_ids=positions).logits
    width = no_cache.shape[1]
    torch.testing.assert_close(no_cache[real[:, :width]], theirs[:, :width][real[:, :width]],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(ours, 1)[real], theirs[real], rtol=1e-4, atol=1e-4)
    assert theirs[real].abs().max() > 1.0  # a meaningful comparison


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


def test_cli_generate_prints_the_generated_text(tmp_path: Path) -> None:
    """`fedlm generate` prints the prompt, then generate()'s tokens streamed through the
    serving TextDecoder: the text of decoding them all at once, no broken characters."""
    from tokenizers import Tokenizer
    from typer.testing import CliRunner

    from fedlm.cli import app
    from fedlm.data.tokenizer import EOS
    from fedlm.pretrained import load_model
    from tests.serve_support import tiny_model_dir

    run = tiny_model_dir(tmp_path, seed=1)
    model, tok_path = load_model(run)
    tok = Tokenizer.from_file(str(tok_path))
    prompt = "naïve café 東京"
    want = list(generate(model, tok.encode(prompt).ids, max_new_tokens=30, temperature=0,
                         eos_id=tok.token_to_id(EOS)))
    args = ["generate", str(run), prompt, "--max-new-tokens", "30", "--temperature", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == prompt + tok.decode(want) + "\n"
    assert "\ufffd" not in result.stdout and len(want) > 0
