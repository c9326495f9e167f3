"""The serving engine against references: the model's own forward and `fedlm.generate`.

Batching must not change what a sequence gets: rows of different lengths decoded together
give each prompt the tokens it gets alone, and sequences that join mid-flight or leave
early do not disturb the others.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from fedlm.config import ModelConfig
from fedlm.generate import generate
from fedlm.model import KVCache, Transformer
from fedlm.serve.engine import Engine, Event, SamplingParams, quantize_int8
from fedlm.serve.text import TextDecoder, chat_template, eos_ids, render_chat
from tests.serve_support import train_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_file(str(train_tokenizer(tmp_path_factory.mktemp("tok"))))


def _model(vocab: int, *, n_kv_heads: int = 4, seed: int = 0) -> Transformer:
    """A random tiny model; untied, because a random tied head's greedy output repeats a token."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(preset="tiny", vocab_size=vocab, max_seq_len=96,
                                   n_kv_heads=n_kv_heads, tie_embeddings=False)).eval()


def _run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    """Submit and wait: (token ids, text, finish reason)."""
    events: list[Event] = []
    done = threading.Event()

    def on_event(e: Event) -> None:
        events.append(e)
        if e.finish_reason is not None:
            done.set()

    engine.submit(prompt, params, on_event)
    assert done.wait(30), "the engine hung"
    ids = [e.token_id for e in events if e.token_id is not None and e.tokens]
    return ids, "".join(e.text for e in events), str(events[-1].finish_reason)


def _submit_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]
                ) -> list[list[int]]:
    """Submit all prompts at once (they share batches) and wait for every token list."""
    results: list[list[int]] = [[] for _ in prompts]
    left = threading.Semaphore(0)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        def on_event(e: Event, i: int = i) -> None:
            if e.token_id is not None and e.tokens:
                results[i].append(e.token_id)
            if e.finish_reason is not None:
                left.release()
        engine.submit(p, sp, on_event)
    for _ in prompts:
        assert left.acquire(timeout=60), "the engine hung"
    return results


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_rows_prefilled_apart_then_decoded_together_match_full_forward(n_kv_heads: int) -> None:
    """The engine's use of the cache: each prompt prefilled into its own row (a view), then one
    batched step over rows at different positions: each row gets its plain forward's logits."""
    model = _model(300, n_kv_heads=n_kv_heads)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 17, 9)]
    cache = KVCache.for_model(model, batch_size=4, max_len=32)
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            model(torch.tensor([p[:-1]]), cache=cache.rows(row, row + 1))
        assert cache.pos.tolist() == [4, 16, 8, 0]
        last = torch.tensor([[p[-1]] for p in prompts])
        got = model(last, cache=cache.rows(0, 3))[:, -1]  # (3, V)
        cache.move_row(2, 0)  # the engine refills a freed row with the last one
        moved = model(torch.tensor([[7]]), cache=cache.rows(0, 1))[0, -1]
        for row, p in enumerate(prompts):
            want = model(torch.tensor([p]))[0, -1]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
        want = model(torch.tensor([prompts[2] + [7]]))[0, -1]
        torch.testing.assert_close(moved, want, atol=1e-4, rtol=1e-4)


def test_concurrent_greedy_equals_generate_alone(tokenizer: Tokenizer) -> None:
    """Prompts of different lengths and budgets, batched, get generate()'s greedy tokens."""
    model = _model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer, max_batch=3)  # 5 sequences > 3 rows: some wait, rows refill
    engine.start()
    try:
        g = torch.Generator().manual_seed(2)
        lengths, budgets = (3, 20, 7, 1, 12), (10, 4, 16, 8, 6)
        prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]
        params = [SamplingParams(max_tokens=m, temperature=0.0) for m in budgets]
        got = _submit_all(engine, prompts, params)
    finally:
        engine.stop()
    for p, m, tokens in zip(prompts, budgets, got, strict=True):
        assert tokens == list(generate(model, p, max_new_tokens=m, temperature=0.0))


def test_seeded_sampling_equals_generate(tokenizer: Tokenizer) -> None:
    """A seed gives generate()'s sampled tokens (temperature and top_p), batched or not."""
    model = _model(tokenizer.get_vocab_size(), seed=3)
    engine = Engine(model, tokenizer, max_batch=4)
    engine.start()
    try:
        prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [9]]
        params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=s)
                  for s in (11, 12, 13)]
        got = _submit_all(engine, prompts, params)
    finally:
        engine.stop()
    for p, sp, tokens in zip(prompts, params, got, strict=True):
        want = list(generate(model, p, max_new_tokens=12, temperature=0.8, top_p=0.9,
                             seed=sp.seed))
        assert tokens == want


def test_eos_and_stop_strings_end_a_sequence(tokenizer: Tokenizer) -> None:
    """EOS ends a sequence without its text; a stop string is cut out of the text."""
    model = _model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("The silos").ids
    # Seeded sampling: a random model's greedy output (tied embeddings) just repeats a token.
    sampling = {"max_tokens": 20, "temperature": 1.0, "seed": 0}
    alone = list(generate(model, prompt, max_new_tokens=20, temperature=1.0, seed=0))
    k = next(i for i in range(3, 20) if alone[i] not in alone[:i])
    engine = Engine(model, tokenizer, max_batch=2, eos_ids=[alone[k]])  # pretend it is EOS
    engine.start()
    try:
        ids, text, reason = _run(engine, prompt, SamplingParams(**sampling))  # type: ignore[arg-type]
        assert reason == "stop" and ids == alone[:k]
        assert text == tokenizer.decode(alone[:k])

        full = tokenizer.decode(alone)
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        engine.eos_ids = set()
        _, text, reason = _run(engine, prompt, SamplingParams(**sampling, stop=[stop]))  # type: ignore[arg-type]
        assert reason == "stop" and text == full[: full.index(stop)]
    finally:
        engine.stop()


def test_cancelled_sequence_frees_its_row(tokenizer: Tokenizer) -> None:
    """A cancelled sequence leaves the batch; the others finish with their own tokens."""
    model = _model(tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer, max_batch=2)
    engine.start()
    try:
        started = threading.Event()
        reasons: list[str] = []

        def on_event(e: Event) -> None:
            started.set()
            if e.finish_reason:
                reasons.append(e.finish_reason)

        seq = engine.submit([1, 2, 3], SamplingParams(max_tokens=90, temperature=0.0), on_event)
        assert started.wait(10)
        seq.cancel()
        ids, _, _ = _run(engine, [7, 8], SamplingParams(max_tokens=10, temperature=0.0))
        assert ids == list(generate(model, [7, 8], max_new_tokens=10, temperature=0.0))
        assert reasons == ["cancelled"] and engine.load() == (0, 0)
    finally:
        engine.stop()


def test_int8_engine_matches_quantized_model(tokenizer: Tokenizer) -> None:
    """The int8 model in the engine gives the quantized model's own greedy tokens."""
    model = _model(tokenizer.get_vocab_size())
    q = quantize_int8(model)
    assert sum(isinstance(m, torch.nn.Linear) for m in q.modules()) == 0  # all Linears swapped
    engine = Engine(q, tokenizer, max_batch=2)
    engine.start()
    try:
        ids, _, _ = _run(engine, [3, 4, 5], SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        engine.stop()
    with torch.inference_mode():
        idx = [3, 4, 5]
        for _ in range(8):  # the reference: full forward each step, no cache
            idx.append(int(q(torch.tensor([idx]))[0, -1].argmax()))
    assert ids == idx[3:]


def test_text_decoder_holds_back_partial_characters_and_stops(tokenizer: Tokenizer) -> None:
    """Streamed deltas concatenate to the decoded text; nothing past a stop string is sent."""
    text = "café 東京 🙂 and the server averages"
    ids = tokenizer.encode(text).ids
    dec = TextDecoder(tokenizer)
    deltas = [dec.push(i)[0] for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.flush() == tokenizer.decode(ids) == text

    dec = TextDecoder(tokenizer, stop=["server"])
    out, stopped = "", False
    for i in ids:
        delta, stopped = dec.push(i)
        out += delta
        if stopped:
            break
    assert stopped and out == text[: text.index("server")]


def test_chat_templates(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """fedlm's plain template, and ChatML (SmolLM2's) when the tokenizer has <|im_start|>."""
    msgs = [("system", "Be brief."), ("user", "Hi")]
    assert chat_template(tokenizer) == "fedlm"
    assert render_chat(msgs, "fedlm") == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    chatml = Tokenizer.from_file(str(train_tokenizer(tmp_path, chatml=True)))
    assert chat_template(chatml) == "chatml"
    assert render_chat(msgs, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert eos_ids(chatml) == [chatml.token_to_id("<|endoftext|>"),
                               chatml.token_to_id("<|im_end|>")]
