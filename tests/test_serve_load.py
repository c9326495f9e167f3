"""A bounded load test: 200 requests from 16 concurrent openai clients, no errors.

A mix of completions and chat, streamed and not, with small max_tokens. Every request must
succeed with its full answer, requests must have shared decode steps (batching happened),
and afterwards nothing is left in flight.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from fedlm.serve.app import Limits, create_app
from tests.serve_support import live_server, tiny_model_dir

torch.set_num_threads(1)
REQUESTS, CONCURRENCY, MAX_TOKENS = 200, 16, 6


@pytest.mark.slow
def test_200_requests_16_concurrent_no_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    run = tiny_model_dir(tmp_path, max_seq_len=64)
    app = create_app(run, api_key="k", limits=Limits(max_concurrent=CONCURRENCY, max_batch=16))
    with live_server(app) as base:
        engine = app.state.fedlm.engine
        batch_sizes: list[int] = []
        step = engine._decode_step

        def counting_step() -> None:
            batch_sizes.append(len(engine.running))
            step()

        monkeypatch.setattr(engine, "_decode_step", counting_step)
        client = OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=60)

        def one(i: int) -> tuple[str, int]:
            # temperature 0: a random tied model repeats a token, so EOS never cuts it short
            common = {"model": "run", "max_tokens": MAX_TOKENS, "temperature": 0}
            if i % 4 == 0:
                r = client.completions.create(prompt=f"request {i}", **common)  # type: ignore[call-overload]
                return r.choices[0].finish_reason, r.usage.completion_tokens
            if i % 4 == 1:
                chunks = list(client.completions.create(prompt=f"request {i}", stream=True,
                                                        **common))  # type: ignore[call-overload]
                return chunks[-1].choices[0].finish_reason, len(chunks)
            messages = [{"role": "user", "content": f"request {i}"}]
            if i % 4 == 2:
                c = client.chat.completions.create(messages=messages, **common)  # type: ignore[call-overload]
                return c.choices[0].finish_reason, c.usage.completion_tokens
            chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                         **common))  # type: ignore[call-overload]
            return chunks[-1].choices[0].finish_reason, len(chunks)

        start = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(REQUESTS)))  # re-raises any client error
        seconds = time.perf_counter() - start

        assert len(results) == REQUESTS
        assert all(reason in ("length", "stop") for reason, _ in results)
        assert all(count > 0 for _, count in results)
        assert max(batch_sizes) > 1, "requests never shared a decode step"
        # the last row leaves the batch at the engine's next step, just after its final token
        deadline = time.monotonic() + 10
        while engine.load() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.fedlm.in_flight == 0 and engine.load() == (0, 0)
        print(f"{REQUESTS} requests in {seconds:.1f}s, largest batch {max(batch_sizes)}")
