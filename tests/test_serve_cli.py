"""`fedlm serve` as a user runs it: a subprocess, an API key file, int8, the openai client."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.serve_support import SERVE, serve_process, tiny_model_dir


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_fedlm_serve_subprocess(tmp_path: Path, quantize: str) -> None:
    run = tiny_model_dir(tmp_path)
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-cli\n")
    name = ["--model-name", "tuned"] if quantize == "int8" else []  # the run folder's name, or the one given
    with serve_process(run, "--api-key-file", str(key_file), "--quantize", quantize,
                       "--threads", "1", *name) as (base, _):
        client = OpenAI(base_url=f"{base}/v1", api_key="sk-cli", max_retries=0)
        resp = client.completions.create(model=name[1] if name else "run", prompt="The silos", max_tokens=5)
        assert resp.usage is not None and resp.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.slow
def test_fedlm_serve_bad_model_path_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([*SERVE, str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "no such file or directory" in proc.stdout + proc.stderr


def test_fedlm_serve_on_a_port_in_use_says_so_and_exits_2(tmp_path: Path) -> None:
    """A port another process listens on: one line naming it, exit 2, and no server started."""
    run = tiny_model_dir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*SERVE, str(run), "--port", str(port), "--threads", "1"],
                              capture_output=True, text=True, timeout=60)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert out.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in "
                                "use; stop what holds the port or pick another --port / --host"]
