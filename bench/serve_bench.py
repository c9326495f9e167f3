"""Serving benchmark: batching throughput, time to first token, int8 vs fp32 (issue 6's targets).

    from bench.serve_bench import run
    run()                          # builds a briefly trained "small" model on the corpus
    run(model=Path("runs/demo"))   # or measures your model (also: FEDLM_BENCH_MODEL=DIR)

Targets: 16 concurrent streaming clients reach >= 4x one client's tokens/s; time to first
token at batch 1 <= 2x one forward pass of the prompt; int8 decodes >= 1.5x faster than fp32
with bits/byte within 2%; under 32 concurrent ~1 MB prompts a small request answers within
1 s and the server's memory returns to within 20% of its level before (issue 15). The server runs in a subprocess with one torch thread; the clients
(httpx, asyncio) run here. Medians of repeated trials; the machine is shared, so noisy.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 200
DECODE_TOKENS = 64
CLIENTS = 16
QUANT_TRIALS = 5  # interleaved fp32/int8 decode trials; medians
FLOOD, FLOOD_CHARS = 32, 999_000  # ~1 MB prompts, each body just under the default limit


def run(model: Path | None = None, *, train_seconds: float = 30.0) -> dict[str, Any]:
    """Measure everything; returns a flat dict of numbers and pass/fail against the targets."""
    import torch

    torch.set_num_threads(1)
    env_model = os.environ.get("FEDLM_BENCH_MODEL")
    model = model or (Path(env_model) if env_model else None)
    with tempfile.TemporaryDirectory(prefix="fedlm-serve-bench-") as tmp:
        text = _corpus_text(Path(tmp))
        held_out = text[-200_000:]
        info: dict[str, Any] = {}
        if model is None:
            model, info = _bench_model(Path(tmp), text[:-200_000], train_seconds=train_seconds)
        out: dict[str, Any] = {"model": str(model), **info}
        out.update(_quantization(model, held_out))
        out.update(_http(model, held_out))
    out["target_batching_4x"] = out["concurrent_speedup"] >= 4.0
    out["target_ttft_2x_forward"] = out["ttft_over_forward"] <= 2.0
    out["target_int8_1_5x"] = out["int8_decode_speedup"] >= 1.5
    out["target_int8_bpb_2pct"] = abs(out["int8_bpb_change"]) <= 0.02
    out["target_flood_small_1s"] = out["flood_small_max_s"] <= 1.0
    out["target_flood_rss_20pct"] = out["flood_rss_after_mb"] <= 1.2 * out["flood_rss_before_mb"]
    return out


def _corpus_text(tmp: Path) -> str:
    """The literature silo of the bundled corpus as one string (public-domain novels)."""
    from fedlm.corpus import extract

    folder = extract(tmp / "raw", ["literature"])["literature"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def _bench_model(tmp: Path, text: str, *, train_seconds: float) -> tuple[Path, dict[str, Any]]:
    """A "small" model with a 4096-token BPE, trained for `train_seconds` on `text`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fedlm.config import ModelConfig
    from fedlm.model import Transformer
    from fedlm.modelio import save_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)],
                            trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp / "tokenizer.json"))
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="small", vocab_size=tok.get_vocab_size(),
                                    max_seq_len=512))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    seq, batch, steps, loss = 128, 8, 0, float("nan")
    start = time.perf_counter()
    model.train()
    while time.perf_counter() - start < train_seconds:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss_t = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        steps, loss = steps + 1, loss_t.item()
    save_model(model.eval(), tmp / "run" / "model", tokenizer_path=tmp / "tokenizer.json")
    return tmp / "run", {"train_steps": steps, "train_loss": round(loss, 3)}


def _bits_per_byte(model: Any, ids: list[int], n_bytes: int, seq: int) -> float:
    """Summed next-token NLL (bits) over windows of `seq`, divided by the text's UTF-8 bytes."""
    import torch

    nll, scored = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, seq):
            window = torch.tensor([ids[s : s + seq + 1]])
            logits = model(window[:, :-1])
            nll += float(torch.nn.functional.cross_entropy(
                logits[0].float(), window[0, 1:], reduction="sum"))
            scored += window.shape[1] - 1
    # bytes in proportion to the tokens scored (all but the first)
    return nll / math.log(2) / (n_bytes * scored / len(ids))


def _decode_rate(served: Any, tokenizer: Any, prompts: list[list[int]]) -> tuple[float, float]:
    """Engine-direct greedy decode of prompts decoded together (no HTTP): tokens per second of
    wall time and of this process's CPU time (one torch thread, so CPU time is the engine's
    work and does not stretch when other jobs share the cores)."""
    import threading

    from fedlm.serve.engine import Engine, SamplingParams

    engine = Engine(served, tokenizer, max_batch=len(prompts))
    engine.start()
    try:
        left = threading.Semaphore(0)
        start, cpu = time.perf_counter(), time.process_time()
        for p in prompts:
            engine.submit(p, SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0),
                          lambda e: left.release() if e.finish_reason else None)
        for _ in prompts:
            left.acquire()
        tokens = len(prompts) * DECODE_TOKENS
        return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)
    finally:
        engine.stop()


def _size(model: Any) -> int:
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _quantization(model_dir: Path, held_out: str) -> dict[str, Any]:
    """fp32 vs int8: decode tokens/s (batch 1 and 16), weight bytes, bits/byte on held-out text."""
    from tokenizers import Tokenizer

    from fedlm.pretrained import load_model
    from fedlm.serve.engine import quantize_int8

    model, tok_path = load_model(model_dir)
    assert tok_path is not None
    tok = Tokenizer.from_file(str(tok_path))
    q = quantize_int8(model)
    ids = tok.encode(held_out[:60_000]).ids
    n_bytes = len(tok.decode(ids).encode("utf-8"))
    prompt = ids[:32]
    out: dict[str, Any] = {}
    models = {"fp32": model, "int8": q}
    batches = {"b1": [prompt], "b16": [ids[i * 32 : i * 32 + 32] for i in range(16)]}
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {(n, b): [] for n in models for b in batches}
    for _ in range(QUANT_TRIALS):  # fp32 and int8 alternate, so a change of load hits both alike
        for b, prompts in batches.items():
            for name, m in models.items():
                rates[name, b].append(_decode_rate(m, tok, prompts))
    for (name, b), got in rates.items():
        out[f"{name}_decode_tok_s_{b}"] = round(statistics.median(w for w, _ in got), 1)
        out[f"{name}_decode_cpu_tok_s_{b}"] = round(statistics.median(c for _, c in got), 1)
    for name, m in models.items():
        out[f"{name}_bytes"] = _size(m)
        out[f"{name}_bits_per_byte"] = round(_bits_per_byte(m, ids, n_bytes, 256), 4)
    out["int8_decode_speedup"] = round(out["int8_decode_tok_s_b1"] / out["fp32_decode_tok_s_b1"], 2)
    out["int8_decode_cpu_speedup"] = round(out["int8_decode_cpu_tok_s_b1"] / out["fp32_decode_cpu_tok_s_b1"], 2)
    out["int8_size_ratio"] = round(out["int8_bytes"] / out["fp32_bytes"], 3)
    out["int8_bpb_change"] = round(out["int8_bits_per_byte"] / out["fp32_bits_per_byte"] - 1, 4)
    return out


def _http(model_dir: Path, held_out: str) -> dict[str, Any]:
    """A real server subprocess: 1 vs 16 streaming clients, and time to first token."""
    import asyncio

    import httpx
    import torch
    from tokenizers import Tokenizer

    from fedlm.pretrained import load_model

    model, tok_path = load_model(model_dir)
    assert tok_path is not None
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(held_out[:50_000]).ids
    prompt_ids = ids[:PROMPT_TOKENS]
    prompt = tok.decode(prompt_ids)
    with torch.inference_mode():
        x = torch.tensor([tok.encode(prompt).ids])
        model(x)
        forwards = []
        for _ in range(7):
            t = time.perf_counter()
            model(x)
            forwards.append(time.perf_counter() - t)
    forward = statistics.median(forwards)

    port = _free_port()
    code = ("import sys; from pathlib import Path; from fedlm.serve.app import serve_forever; "
            f"serve_forever(Path(sys.argv[1]), port={port}, threads=1, model_name='bench')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", code, str(model_dir)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the bench server did not start")
            time.sleep(0.2)

        async def stream(client: httpx.AsyncClient, text: str, max_tokens: int
                         ) -> tuple[float, int]:
            """(seconds to the first text chunk, completion tokens) of one streamed request."""
            body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "stream": True,
                    "temperature": 0, "stream_options": {"include_usage": True}}
            start, first, tokens = time.perf_counter(), math.nan, 0
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    if math.isnan(first) and '"text": ""' not in line:
                        first = time.perf_counter() - start
                    if '"usage"' in line:
                        import json

                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return first, tokens

        async def clients(n: int, rounds: int) -> float:
            async with httpx.AsyncClient(timeout=120) as client:
                start = time.perf_counter()

                async def worker(k: int) -> int:
                    total = 0
                    for r in range(rounds):
                        text = tok.decode(ids[(k * rounds + r) * 40 : (k * rounds + r) * 40 + 32])
                        total += (await stream(client, text, DECODE_TOKENS))[1]
                    return total

                tokens = sum(await asyncio.gather(*(worker(k) for k in range(n))))
                return tokens / (time.perf_counter() - start)

        async def ttft() -> list[float]:
            async with httpx.AsyncClient(timeout=120) as client:
                await stream(client, prompt, 1)  # warm up
                return [(await stream(client, prompt, 1))[0] for _ in range(7)]

        asyncio.run(clients(1, 1))  # warm up
        one = asyncio.run(clients(1, 4))
        many = asyncio.run(clients(CLIENTS, 2))
        first = statistics.median(asyncio.run(ttft()))
        flooded = flood(base, server.pid, model="bench")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "one_client_tok_s": round(one, 1),
        "concurrent_clients": CLIENTS,
        "concurrent_tok_s": round(many, 1),
        "concurrent_speedup": round(many / one, 2),
        "prompt_tokens": len(x[0]),
        "prompt_forward_ms": round(forward * 1000, 2),
        "ttft_ms": round(first * 1000, 2),
        "ttft_over_forward": round(first / forward, 2),
        **flooded,
    }


def flood(base: str, pid: int, *, model: str) -> dict[str, Any]:
    """FLOOD concurrent ~1 MB prompts while an openai client keeps sending small requests:
    the refusals' error codes, the small requests' latency, and the server's RSS before, at
    peak and after (also run by tests/test_serve_abuse.py)."""
    import json
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import psutil
    from openai import OpenAI

    bodies = [json.dumps({"model": model, "prompt": text, "max_tokens": 4}).encode()
              for text in ("x" * FLOOD_CHARS, ("the silos train one model " * 40_000)[:FLOOD_CHARS])]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    server = psutil.Process(pid)
    peak, done = [0], threading.Event()

    def small() -> float:
        start = time.perf_counter()
        client.completions.create(model=model, prompt="The silos", max_tokens=4)
        return time.perf_counter() - start

    def sample() -> None:
        while not done.is_set():
            peak.append(server.memory_info().rss)
            time.sleep(0.01)

    # The flood's bodies are encoded once and sent through one pooled client, so that the
    # measuring process spends little CPU of its own on them.
    with httpx.Client(base_url=base, timeout=120,
                      limits=httpx.Limits(max_connections=FLOOD)) as http:

        def big(i: int) -> str:
            resp = http.post("/v1/completions", content=bodies[i % 2],
                             headers={"Content-Type": "application/json"})
            return f"{resp.status_code} {resp.json()['error']['code']}"

        for _ in range(3):
            small()
        before = server.memory_info().rss
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(FLOOD) as pool:
                futures = [pool.submit(big, i) for i in range(FLOOD)]
                latencies: list[float] = []
                while not all(f.done() for f in futures) or not latencies:
                    latencies.append(small())
                answers = {f.result() for f in futures}
        finally:
            done.set()
            sampler.join()
    deadline = time.monotonic() + 10
    while (after := server.memory_info().rss) > 1.2 * before and time.monotonic() < deadline:
        time.sleep(0.2)
    return {
        "flood_answers": sorted(answers),
        "flood_small_requests": len(latencies),
        "flood_small_max_s": round(max(latencies), 3),
        "flood_small_median_s": round(statistics.median(latencies), 3),
        "flood_rss_before_mb": round(before / 2**20, 1),
        "flood_rss_peak_mb": round(max(peak) / 2**20, 1),
        "flood_rss_after_mb": round(after / 2**20, 1),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
