"""Helpers for the serving tests: a tiny random model with a real BPE tokenizer, a live server.

    model_dir = tiny_model_dir(tmp_path)
    with live_server(create_app(model_dir)) as base_url:   # uvicorn on a free 127.0.0.1 port
        ...
    with serve_process(model_dir, "--threads", "1") as (base_url, proc):   # `fedlm serve`
        ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fedlm.config import ModelConfig
from fedlm.model import Transformer
from fedlm.modelio import save_model

TEXT = (
    "The silos train one model together without moving their text. "
    "Each round the server averages the updates, and the model learns a little more. "
    "Héllo wörld — naïve café, 東京 and emoji 🙂 keep the byte-level tokenizer honest.\n"
) * 20


def train_tokenizer(out: Path, *, vocab_size: int = 400, chatml: bool = False) -> Path:
    """A byte-level BPE trained on TEXT with <|endoftext|> (and ChatML's tokens if asked)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chatml else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_model_dir(tmp: Path, *, max_seq_len: int = 128, chatml: bool = False, seed: int = 0,
                   n_kv_heads: int = 4) -> Path:
    """RUN/model with a random tiny Transformer and its tokenizer; returns RUN."""
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(tmp, chatml=chatml)
    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=vocab, max_seq_len=max_seq_len,
                                    n_kv_heads=n_kv_heads))
    save_model(model, tmp / "run" / "model", tokenizer_path=tokenizer)
    return tmp / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(app: FastAPI, *, ready: bool = True, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn on a thread; yield its base URL; always stop it."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        if ready:
            wait_ready(base, timeout=timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_ready(base: str, *, timeout: float = 30.0) -> None:
    """Poll /health until 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/health").status_code == 200:
            return
        time.sleep(0.05)
    raise RuntimeError("the model did not load in time")


SERVE = [sys.executable, "-c", "from fedlm.cli import main; main()", "serve"]


@contextmanager
def serve_process(run: Path, *args: str, timeout: float = 120.0
                  ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`fedlm serve RUN ARGS` on a free 127.0.0.1 port, healthy; yield (base URL, process).

    Its output goes to a file (a pipe nobody reads would block it); the process is stopped
    however the block ends (SIGTERM, then SIGKILL).
    """
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*SERVE, str(run), "--port", str(port), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"fedlm serve exited {proc.returncode}: "
                                     f"{log.read().decode(errors='replace')}")
            assert time.monotonic() < deadline, "fedlm serve did not become healthy"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
