"""`fedlm serve` as a user runs it: a subprocess, an API key file, int8, the openai client."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.serve_support import free_port, tiny_model_dir


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_fedlm_serve_subprocess(tmp_path: Path, quantize: str) -> None:
    run = tiny_model_dir(tmp_path)
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-cli\n")
    port = free_port()
    cmd = [sys.executable, "-c", "from fedlm.cli import main; main()", "serve", str(run),
           "--port", str(port), "--api-key-file", str(key_file), "--quantize", quantize,
           "--threads", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "fedlm serve did not become healthy"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        client = OpenAI(base_url=f"{base}/v1", api_key="sk-cli", max_retries=0)
        resp = client.completions.create(model="run", prompt="The silos", max_tokens=5)
        assert resp.usage is not None and resp.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_fedlm_serve_bad_model_path_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "from fedlm.cli import main; main()", "serve",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such model directory" in proc.stdout + proc.stderr
