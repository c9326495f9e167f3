"""The HTTP API against real clients: the `openai` package and raw HTTP, over real uvicorn.

What a client gets is checked against references: the text of `fedlm.generate` decoded by
the tokenizer, OpenAI's SSE chunk format, OpenAI's error shape, and prometheus_client's
parser for /metrics.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from tokenizers import Tokenizer

import fedlm.pretrained
from fedlm.generate import generate
from fedlm.model import Transformer
from fedlm.pretrained import load_model
from fedlm.serve.app import Limits, create_app, max_token_bytes
from fedlm.serve.engine import Engine
from fedlm.serve.text import FEDLM_STOPS, render_chat
from tests.serve_support import live_server, tiny_model_dir, train_tokenizer

torch.set_num_threads(1)
KEY = "sk-test-key"
LIMITS = Limits(max_prompt_tokens=64, max_tokens=48, max_n=4, max_body_bytes=200_000,
                max_concurrent=8, max_batch=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(run_dir: Path) -> tuple[Transformer, Tokenizer]:
    model, tok = load_model(run_dir)
    assert tok is not None
    return model, Tokenizer.from_file(str(tok))


@pytest.fixture(scope="module")
def base(run_dir: Path) -> Iterator[str]:
    with live_server(create_app(run_dir, api_key=KEY, limits=LIMITS)) as url:
        yield url


@pytest.fixture()
def client(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)


AUTH = {"Authorization": f"Bearer {KEY}"}


def _is_openai_error(resp: httpx.Response) -> bool:
    body = resp.json()
    return set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"} \
        and isinstance(body["error"]["message"], str) and body["error"]["message"] != ""


def test_health_is_503_while_loading_then_200(run_dir: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """/health says 503 until the model is loaded, then 200; other endpoints 503 meanwhile."""
    gate = threading.Event()
    real = fedlm.pretrained.load_model

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(fedlm.pretrained, "load_model", slow_load)
    with live_server(create_app(run_dir, api_key=KEY), ready=False) as url:
        assert httpx.get(f"{url}/health").status_code == 503  # no key needed for /health
        resp = httpx.get(f"{url}/v1/models", headers=AUTH)
        assert resp.status_code == 503 and _is_openai_error(resp)
        gate.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200


def test_models_and_greedy_completion_match_generate(
    client: OpenAI, reference: tuple[Transformer, Tokenizer]
) -> None:
    """The openai client's completion is generate()'s greedy text, with usage counted."""
    model, tok = reference
    (card,) = client.models.list().data
    assert card.id == "run"
    prompt = "Each round the server"
    resp = client.completions.create(model="run", prompt=prompt, max_tokens=12, temperature=0)
    ids = tok.encode(prompt).ids
    want = list(generate(model, ids, max_new_tokens=12, temperature=0.0))
    assert resp.choices[0].text == tok.decode(want)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 12)


def test_chat_with_seed_matches_generate_and_n_choices(
    client: OpenAI, reference: tuple[Transformer, Tokenizer]
) -> None:
    """Chat renders fedlm's template; choice i is generate() with seed + i; a seed repeats."""
    model, tok = reference
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    args: Any = {"model": "run", "messages": messages, "max_tokens": 20, "temperature": 0.9,
                 "seed": 7, "n": 2}
    first = client.chat.completions.create(**args)
    again = client.chat.completions.create(**args)
    prompt_ids = tok.encode(render_chat([("system", "Be brief."), ("user", "Hi")], "fedlm")).ids
    eos = tok.token_to_id("<|endoftext|>")
    assert len(first.choices) == 2
    for i, choice in enumerate(first.choices):
        ref = tok.decode(list(generate(model, prompt_ids, max_new_tokens=20, temperature=0.9,
                                       seed=7 + i, eos_id=eos)))
        cuts = [ref.index(s) for s in FEDLM_STOPS if s in ref]
        assert choice.message.content == (ref[: min(cuts)] if cuts else ref)
        assert choice.message.role == "assistant"
        assert choice.message.content == again.choices[i].message.content
    assert first.usage is not None and first.usage.prompt_tokens == len(prompt_ids)


def test_streaming_with_openai_client(client: OpenAI) -> None:
    """Streamed deltas add up to the non-streamed text; the last chunk carries finish_reason."""
    whole = client.completions.create(model="run", prompt="The silos", max_tokens=16,
                                      temperature=0).choices[0].text
    chunks = list(client.completions.create(model="run", prompt="The silos", max_tokens=16,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"

    chat = list(client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, stream=True,
        stream_options={"include_usage": True}, seed=1))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-2].choices[0].finish_reason in ("stop", "length")
    assert chat[-1].choices == [] and chat[-1].usage is not None


def test_raw_sse_format(base: str) -> None:
    """Every event is `data: <json>` in OpenAI's chunk shape, and the stream ends `data: [DONE]`."""
    body = {"model": "run", "prompt": ["a", "b"], "n": 2, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    finished = set()
    for line in events[:-1]:
        assert line.startswith("data: ")
        chunk = json.loads(line.removeprefix("data: "))
        assert chunk["object"] == "text_completion" and chunk["model"] == "run"
        (choice,) = chunk["choices"]
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert finished == {0, 1, 2, 3}  # 2 prompts x n=2


def test_api_key_required_except_health(base: str) -> None:
    """No key or a wrong key is a 401 in OpenAI's shape; /health needs none."""
    assert httpx.get(f"{base}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = httpx.get(f"{base}/v1/models", headers=headers)
        assert resp.status_code == 401 and _is_openai_error(resp)
        assert httpx.get(f"{base}/metrics", headers=headers).status_code == 401
    bad = OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="run", prompt="x", max_tokens=1)


GOOD = {"model": "run", "prompt": "The silos", "max_tokens": 2}
BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("malformed json", b'{"model": "run", "prompt": ', 400),
    ("not an object", b"[1, 2, 3]", 400),
    ("prompt wrong type", json.dumps({**GOOD, "prompt": 5}).encode(), 400),
    ("max_tokens as string", json.dumps({**GOOD, "max_tokens": "5"}).encode(), 400),
    ("negative max_tokens", json.dumps({**GOOD, "max_tokens": -1}).encode(), 400),
    ("huge max_tokens", json.dumps({**GOOD, "max_tokens": 10**9}).encode(), 400),
    ("absurd max_tokens", json.dumps({**GOOD, "max_tokens": 10**40}).encode(), 400),
    ("n = 0", json.dumps({**GOOD, "n": 0}).encode(), 400),
    ("n too large", json.dumps({**GOOD, "n": 5}).encode(), 400),
    ("temperature < 0", json.dumps({**GOOD, "temperature": -1}).encode(), 400),
    ("temperature NaN", b'{"model": "run", "prompt": "x", "temperature": NaN}', 400),
    ("top_p = 0", json.dumps({**GOOD, "top_p": 0}).encode(), 400),
    ("unknown model", json.dumps({**GOOD, "model": "gpt-4"}).encode(), 404),
    ("invalid utf-8", b'{"model": "run", "prompt": "\xff\xfe bad"}', 400),
    ("lone surrogate", b'{"model": "run", "prompt": "\\ud800"}', 400),
    ("prompt over the token limit", json.dumps({**GOOD, "prompt": "silos " * 200}).encode(), 400),
    ("1 MB prompt", json.dumps({**GOOD, "prompt": "x" * 1_000_000}).encode(), 413),
    ("seed out of range", json.dumps({**GOOD, "seed": 2**70}).encode(), 400),
    ("too many stops", json.dumps({**GOOD, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(base: str, name: str, body: bytes,
                                                         status: int) -> None:
    resp = httpx.post(f"{base}/v1/completions", content=body,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    assert _is_openai_error(resp)
    assert httpx.post(f"{base}/v1/completions", json=GOOD, headers=AUTH).status_code == 200


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": 5}], [{"content": "x"}]])
def test_bad_chat_messages(base: str, messages: Any) -> None:
    resp = httpx.post(f"{base}/v1/chat/completions", headers=AUTH,
                      json={"model": "run", "messages": messages})
    assert resp.status_code == 400 and _is_openai_error(resp)


def test_metrics_parse_as_prometheus_and_count(client: OpenAI, base: str) -> None:
    """/metrics parses with prometheus_client; a request moves its counters by its usage."""

    def scrape() -> dict[str, Any]:
        text = httpx.get(f"{base}/metrics", headers=AUTH).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    before = scrape()
    resp = client.completions.create(model="run", prompt="The silos", max_tokens=9, temperature=0)
    after = scrape()
    assert resp.usage is not None

    def value(fams: dict[str, Any], name: str, **labels: str) -> float:
        return sum(s.value for s in fams[name].samples  # counters' samples end in _total
                   if s.name == f"{name}_total" and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value(after, "fedlm_completion_tokens") - value(before, "fedlm_completion_tokens") == 9
    assert value(after, "fedlm_prompt_tokens") - value(before, "fedlm_prompt_tokens") == \
        resp.usage.prompt_tokens
    done = {"endpoint": "/v1/completions", "status": "200"}
    assert value(after, "fedlm_requests", **done) - value(before, "fedlm_requests", **done) == 1
    hist = after["fedlm_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [s.value for s in hist.samples if s.name.endswith("_bucket")
               and s.labels["endpoint"] == "/v1/completions"]
    assert buckets == sorted(buckets) and buckets[-1] >= 1
    assert after["fedlm_time_to_first_token_seconds"].type == "histogram"


PIECES = ["<|endoftext|>", "<|im_start|>", "The silos ", "x" * 40, " " * 30, "\n\n", "🙂", "東京",
          "naïve café"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> list[Tokenizer]:
    """The byte-level BPE of the tests, plain and with ChatML's special tokens."""
    return [Tokenizer.from_file(str(train_tokenizer(tmp_path_factory.mktemp("tok"), chatml=chatml)))
            for chatml in (False, True)]


@settings(max_examples=200, deadline=None, database=None)
@given(parts=st.lists(st.one_of(st.text(max_size=40), st.sampled_from(PIECES)), max_size=30))
def test_the_length_bound_never_refuses_a_prompt_that_fits(tokenizers: list[Tokenizer],
                                                          parts: list[str]) -> None:
    """A text is never longer than its token count x the longest vocabulary entry, so
    refusing by length before tokenising refuses only prompts with too many tokens."""
    text = "".join(parts)
    for tok in tokenizers:
        assert len(text) <= len(tok.encode(text).ids) * max_token_bytes(tok)


def _slow(engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02) -> None:
    """Make every decode step take `seconds`, so a long generation is still running later."""
    step = engine._decode_step

    def slow_step() -> None:
        time.sleep(seconds)
        step()

    monkeypatch.setattr(engine, "_decode_step", slow_step)


def test_disconnect_frees_the_slot_and_concurrency_limit(run_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With one slot, a second request gets 429; a client that leaves mid-stream frees it."""
    app = create_app(run_dir, limits=Limits(max_concurrent=1, max_tokens=100, max_batch=2))
    with live_server(app) as url:
        state = app.state.fedlm
        _slow(state.engine, monkeypatch)
        # greedy: a sampled EOS could end it early
        body = {"model": "run", "prompt": "The silos", "max_tokens": 100, "stream": True,
                "temperature": 0}
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                next(lines)  # generation is under way
                busy = httpx.post(f"{url}/v1/completions", json=GOOD)
                assert busy.status_code == 429 and _is_openai_error(busy)
            # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 5
        while state.in_flight or state.engine.load() != (0, 0):
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.02)
        assert state.engine.steps < 90  # cancelled, not run to max_tokens
        assert httpx.post(f"{url}/v1/completions", json=GOOD).status_code == 200

        # A non-streaming client that gives up is noticed too.
        steps = state.engine.steps
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 5
        while state.in_flight or state.engine.load() != (0, 0):
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.02)
        assert state.engine.steps - steps < 90


def test_a_client_that_leaves_is_counted_499_not_500(run_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The openai client gives up on a slow answer (timeout) and closes a stream after its
    first chunk: /metrics counts each as 499, nothing as 5xx, and the slots are freed."""
    app = create_app(run_dir, limits=Limits(max_tokens=100, max_batch=2))
    with live_server(app) as url:
        state = app.state.fedlm
        _slow(state.engine, monkeypatch)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            client.completions.create(model="run", prompt="The silos", max_tokens=100,
                                      temperature=0)
        stream = client.with_options(timeout=10).chat.completions.create(
            model="run", messages=[{"role": "user", "content": "Hi"}], max_tokens=100,
            temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while state.in_flight or state.engine.load() != (0, 0):
            assert time.monotonic() < deadline, "the slots were not freed"
            time.sleep(0.02)
        text = httpx.get(f"{url}/metrics").text
    counts = {(s.labels["endpoint"], s.labels["status"]): s.value
              for f in text_string_to_metric_families(text) if f.name == "fedlm_requests"
              for s in f.samples if s.name == "fedlm_requests_total"}
    assert counts.get(("/v1/completions", "499")) == 1, counts
    assert counts.get(("/v1/chat/completions", "499")) == 1, counts
    assert not [key for key in counts if key[1].startswith("5")], counts


def _chat_prompt_tokens(run: Path) -> int:
    """The prompt tokens of a chat completion of "Hi" from the model at `run`, served in process."""
    with TestClient(create_app(run)) as http:
        deadline = time.monotonic() + 20
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        resp = http.post("/v1/chat/completions", json={
            "model": "run", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert resp.status_code == 200
    return int(resp.json()["usage"]["prompt_tokens"])


def test_chatml_template_for_smollm2_style_tokenizers(tmp_path: Path) -> None:
    """With <|im_start|> in the tokenizer, chat prompts are rendered in ChatML."""
    run = tiny_model_dir(tmp_path, chatml=True)
    tok = Tokenizer.from_file(str(run / "model" / "tokenizer.json"))
    want = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").ids
    assert _chat_prompt_tokens(run) == len(want)
    assert tok.token_to_id("<|im_start|>") in want  # parsed as the special token


def test_a_model_is_served_in_its_own_chat_template(tmp_path: Path) -> None:
    """A model directory whose tokenizer_config.json carries a chat template (a Hugging Face model:
    Llama 3's, Qwen2's) is served in that template, not fedlm's guess from the tokenizer (ChatML):
    the same lookup `fedlm data tokenizer --from-model` installs for chat silos (`chat_template_of`)."""
    run = tiny_model_dir(tmp_path, chatml=True)
    own = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' says: ' + m['content'] + '<|im_end|>' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant says: ' }}{% endif %}")
    (run / "model" / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    tok = Tokenizer.from_file(str(run / "model" / "tokenizer.json"))
    want = tok.encode("<|im_start|>user says: Hi<|im_end|><|im_start|>assistant says: ").ids
    assert _chat_prompt_tokens(run) == len(want)
    assert len(want) != len(tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").ids)


@pytest.mark.slow
def test_smollm2_is_served_by_its_name_in_its_own_template(tmp_path: Path) -> None:
    """`fedlm serve smollm2`, as a new user starts it, answers the openai client that asks for model
    "smollm2" (it was served as the GGUF file's stem, and the name typed got 404), with the prompt in
    SmolLM2's own template from the GGUF header (its default system turn included), not plain ChatML."""
    from fedlm.data.chat import ChatTemplate
    from fedlm.pretrained import chat_template_of, load_pretrained

    _, tokenizer_text = load_pretrained("smollm2", share_frozen=True)
    assert tokenizer_text is not None
    tok = Tokenizer.from_str(tokenizer_text)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with live_server(create_app("smollm2", threads=1), timeout=120) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        reply = client.chat.completions.create(model="smollm2", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    template = chat_template_of("smollm2")
    assert template is not None and "You are a helpful AI assistant named SmolLM" in template
    tok_file = tmp_path / "tokenizer.json"
    tok_file.write_text(tokenizer_text)
    own = ChatTemplate.from_text(template, tok_file).render(messages, add_generation_prompt=True)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(tok.encode(own).ids)
    assert "named SmolLM" in own and own.endswith("<|im_start|>assistant\n")
