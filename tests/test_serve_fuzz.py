"""Fuzz the server from its own OpenAPI spec (schemathesis): no input may produce a 5xx.

Schemathesis generates valid and invalid bodies for every operation and sends them to a real
uvicorn server with the API key; the server answers each with a non-5xx status. Bounded:
a fixed number of examples per operation and small generation limits, so it ends by itself
in seconds. A good request after the run shows the server still serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from fedlm.serve.app import Limits, create_app
from tests.serve_support import live_server, tiny_model_dir

torch.set_num_threads(1)
KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per operation and mode: bounded, so the run ends by itself in seconds
LIMITS = Limits(max_prompt_tokens=32, max_tokens=8, max_n=4, max_body_bytes=100_000,
                max_concurrent=8, max_batch=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run: Path = tiny_model_dir(tmp_path_factory.mktemp("fuzz"), max_seq_len=64)
    with live_server(create_app(run, api_key=KEY, limits=LIMITS)) as base:
        yield base


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(server: str, mode: GenerationMode) -> None:
    """Valid (positive) and invalid (negative) bodies for every operation: never a 5xx."""
    spec = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    # The server knows one model; saying so lets valid bodies reach generation (else all 404).
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        spec["components"]["schemas"][name]["properties"]["model"] = {"enum": ["run"]}
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=server, headers=AUTH, checks=[not_a_server_error],
                                   timeout=20)

        fuzz()


@pytest.mark.slow  # it checks what test_no_server_errors left: the two run together
def test_server_still_serves_after_fuzzing(server: str) -> None:
    resp = httpx.post(f"{server}/v1/completions", headers=AUTH,
                      json={"model": "run", "prompt": "The silos", "max_tokens": 4})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 1
    # The fuzzing reached generation (some 200s), and nothing anywhere answered 5xx.
    metrics = httpx.get(f"{server}/metrics", headers=AUTH).text
    counts = [line for line in metrics.splitlines() if line.startswith("fedlm_requests_total")]
    assert any('endpoint="/v1/chat/completions",status="200"' in line for line in counts), counts
    assert not any('status="5' in line for line in counts), counts

