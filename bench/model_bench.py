"""Model speed: fedlm's `small` preset against `transformers.LlamaForCausalLM`, side by side.

    python -m bench.model_bench [--quick]          # or: from bench.model_bench import run; run()

Both models hold the identical config and weights (fedlm's exported to Hugging Face's
names and loaded with `from_pretrained`) and run at the same precision, batch and threads:

- training tokens/s at batch 8 x 256, fp32 and bf16 autocast, each step forward + backward +
  AdamW; the two models alternate run by run and each figure is a median of repeated runs
  after warm-up (plus fedlm under `torch.compile` in bf16, marked as such);
- model FLOPs utilisation (MFU) of those runs against a square-matmul peak (fp32 and bf16)
  measured in the same call;
- decode tokens/s, prompt 32, 128 greedy new tokens, fp32 and fedlm's int8 copy, against
  `generate(use_cache=True, do_sample=False)`: at batch 1 `fedlm.generate.generate`, at
  batch 16 the serving engine (`fedlm.serve.engine`, all 16 prompts in one batch).

Threads: `torch.set_num_threads(1)` for everything here, on purpose. The machine has two
cores shared with other work, where two OpenMP threads run several times slower than one
(see shared/notes/cpu.md); one thread gives both models the same, steadiest core.
Times are CPU seconds of this process (`time.process_time`), which a neighbour's load does
not inflate the way it inflates wall time; wall-time figures are reported beside them.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

THREADS = 1
VOCAB = 8192
BATCH, SEQ = 8, 256
PROMPT, NEW_TOKENS = 32, 128
BATCH_DECODE = 16
TARGET_TRAIN = 1.3
TARGET_MFU = 0.5
TARGET_DECODE = 2.0


# ---------------------------------------------------------------------------------------
# timing


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def _median_pair(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def matmul_peak(dtype: torch.dtype, *, n: int = 2048, reps: int = 5) -> float:
    """Median GFLOP/s (per CPU second) of an n x n @ n x n matmul in `dtype`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: pick the kernel, fault the pages in
    cpu = [_timed(lambda: torch.mm(a, b))[0] for _ in range(reps)]
    return 2 * n**3 / statistics.median(cpu) / 1e9


# ---------------------------------------------------------------------------------------
# the two models


def build_models(*, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """fedlm `small` (vocab 8192, context 256) and a LlamaForCausalLM with its config and weights."""
    import transformers

    from fedlm.config import ModelConfig
    from fedlm.hf import export_hf
    from fedlm.model import Transformer

    torch.manual_seed(seed)
    ours = Transformer(ModelConfig(preset="small", vocab_size=VOCAB, max_seq_len=SEQ))
    with tempfile.TemporaryDirectory(prefix="fedlm-model-bench-") as tmp:
        export_hf(ours, Path(tmp) / "hf", tokenizer_path=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "hf", attn_implementation="sdpa", dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    return ours, hf


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention (6 x layers x T x d).

    The matmul parameters are every Linear's weights (the tied head counted once, as the
    head matmul; the embedding lookup does no matmul). Attention's QKᵀ and AV cost
    2 x 2 x T x d per token and layer forward, halved for the causal mask, tripled for
    forward + backward.
    """
    from fedlm.model import Transformer

    assert isinstance(model, Transformer)
    cfg = model.cfg
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * linear + 6 * cfg.n_layers * SEQ * cfg.n_heads * cfg.head_dim


# ---------------------------------------------------------------------------------------
# training


def _ours_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, targets=y)


def _hf_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # What transformers' own ForCausalLMLoss does: fp32 logits, mean cross-entropy.
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def _train_step_fn(model: nn.Module, loss_fn: Callable[..., torch.Tensor], bf16: bool,
                   batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], object]:
    """A closure running one forward + backward + AdamW step on the next batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    model.train()
    state = {"i": 0}

    def step() -> None:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_throughput(ours: nn.Module, hf: nn.Module, *, bf16: bool, runs: int, warmup: int,
                     batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Tokens per CPU second (and per wall second) of each model, alternating step by step."""
    steps = {"fedlm": _train_step_fn(ours, _ours_loss, bf16, batches),
             "hf": _train_step_fn(hf, _hf_loss, bf16, batches)}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    for r in range(runs):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for k in order:
            samples[k].append(_timed(steps[k]))
    out: dict[str, float] = {}
    tokens = BATCH * SEQ
    for k, s in samples.items():
        cpu, wall = _median_pair(s)
        out[f"{k}_tok_s"] = tokens / cpu
        out[f"{k}_tok_s_wall"] = tokens / wall
    return out


def compiled_throughput(model: nn.Module, *, runs: int, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        budget_s: float = 180.0) -> dict[str, Any]:
    """fedlm under `torch.compile` in bf16: tokens/s after compiling, or why it was skipped."""
    compiled: Any = torch.compile(model)
    step = _train_step_fn(compiled, _ours_loss, True, batches)
    t0 = time.perf_counter()
    try:
        step()
        step()  # a second call: recompiles (if any) happen here
    except Exception as e:  # noqa: BLE001 - any compiler failure is reported, not fatal
        return {"skipped": f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    compile_s = time.perf_counter() - t0
    if compile_s > budget_s:
        return {"skipped": f"compile took {compile_s:.0f} s (> {budget_s:.0f} s budget)",
                "compile_s": compile_s}
    cpu, wall = _median_pair([_timed(step) for _ in range(runs)])
    return {"tok_s": BATCH * SEQ / cpu, "tok_s_wall": BATCH * SEQ / wall, "compile_s": compile_s}


# ---------------------------------------------------------------------------------------
# decoding


def _decode_ours(model: nn.Module, prompt: list[int]) -> Callable[[], object]:
    from fedlm.generate import generate

    def go() -> None:
        out = list(generate(model, prompt, max_new_tokens=NEW_TOKENS, temperature=0))  # type: ignore[arg-type]
        assert len(out) == NEW_TOKENS

    return go


def _decode_engine(model: nn.Module, prompts: list[list[int]]) -> Callable[[], object]:
    """fedlm's batched decoding: the serving engine with all prompts in one batch (no HTTP)."""
    import threading

    from tokenizers import Tokenizer, models

    from fedlm.serve.engine import Engine, SamplingParams

    # A word-level vocabulary of VOCAB names: the engine detokenizes every step, as it serves.
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))

    def go() -> None:
        engine = Engine(model, tokenizer, max_batch=len(prompts))  # type: ignore[arg-type]
        engine.start()
        try:
            done = threading.Semaphore(0)
            for p in prompts:
                engine.submit(p, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
                              lambda e: done.release() if e.finish_reason else None)
            for _ in prompts:
                assert done.acquire(timeout=600)
        finally:
            engine.stop()

    return go


def _decode_hf(model: nn.Module, prompts: list[list[int]]) -> Callable[[], object]:
    ids = torch.tensor(prompts)  # (B, PROMPT): equal lengths, no padding

    def go() -> None:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,  # type: ignore[operator]
                                 do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == PROMPT + NEW_TOKENS

    return go


def decode_throughput(ours: nn.Module, hf: nn.Module, *, runs: int) -> dict[str, float]:
    """New tokens per CPU second (and wall) of greedy decoding, fedlm fp32 and int8 against
    transformers fp32: at batch 1 `generate`, at batch BATCH_DECODE the serving engine."""
    from fedlm.generate import quantize_int8

    ours.eval()
    hf.eval()
    int8 = quantize_int8(ours)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, VOCAB, (BATCH_DECODE, PROMPT), generator=g).tolist()
    fns = {"fedlm": _decode_ours(ours, prompts[0]), "hf": _decode_hf(hf, prompts[:1]),
           "fedlm_int8": _decode_ours(int8, prompts[0]),
           "b16_fedlm": _decode_engine(ours, prompts), "b16_hf": _decode_hf(hf, prompts),
           "b16_fedlm_int8": _decode_engine(int8, prompts)}
    for fn in fns.values():
        fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(runs):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            samples[k].append(_timed(fns[k]))
    out: dict[str, float] = {}
    for k, s in samples.items():
        cpu, wall = _median_pair(s)
        rows = BATCH_DECODE if k.startswith("b16_") else 1
        out[f"{k}_tok_s"] = rows * NEW_TOKENS / cpu
        out[f"{k}_tok_s_wall"] = rows * NEW_TOKENS / wall
    for pre in ("", "b16_"):
        out[f"{pre}ratio"] = out[f"{pre}fedlm_tok_s"] / out[f"{pre}hf_tok_s"]
        out[f"{pre}ratio_wall"] = out[f"{pre}fedlm_tok_s_wall"] / out[f"{pre}hf_tok_s_wall"]
        out[f"{pre}int8_ratio"] = out[f"{pre}fedlm_int8_tok_s"] / out[f"{pre}hf_tok_s"]
    return out


# ---------------------------------------------------------------------------------------
# the benchmark


def _batches(n: int, *, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def _train_section(ours: nn.Module, hf: nn.Module, *, bf16: bool, runs: int, warmup: int,
                   batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Throughputs with fresh copies of the weights, so the optimizer starts equal for both."""
    import copy

    return train_throughput(copy.deepcopy(ours), copy.deepcopy(hf), bf16=bf16, runs=runs,
                            warmup=warmup, batches=batches)


def run(quick: bool = False, *, compile: bool = True) -> dict[str, Any]:
    """Measure everything; returns a dict of numbers, ratios and target checks (see module doc)."""
    from fedlm.model import num_params

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        runs = 3 if quick else 5
        warmup = 1 if quick else 2
        ours, hf = build_models()
        batches = _batches(4)
        fpt = flops_per_token(ours)
        res: dict[str, Any] = {
            "threads": THREADS, "params": num_params(ours), "flops_per_token": fpt,
            "batch": BATCH, "seq": SEQ, "vocab": VOCAB, "runs": runs,
        }
        peak_fp32 = matmul_peak(torch.float32)
        peak_bf16 = matmul_peak(torch.bfloat16)
        for name, bf16 in (("fp32", False), ("bf16", True)):
            t = _train_section(ours, hf, bf16=bf16, runs=runs, warmup=warmup, batches=batches)
            peak = peak_bf16 if bf16 else peak_fp32
            res[f"train_{name}"] = {
                **t,
                "ratio": t["fedlm_tok_s"] / t["hf_tok_s"],
                "ratio_wall": t["fedlm_tok_s_wall"] / t["hf_tok_s_wall"],
                "fedlm_mfu": t["fedlm_tok_s"] * fpt / 1e9 / peak,
                "hf_mfu": t["hf_tok_s"] * fpt / 1e9 / peak,
            }
        # the peak again after the training runs: report the median of before and after
        peak_fp32 = statistics.median([peak_fp32, matmul_peak(torch.float32)])
        peak_bf16 = statistics.median([peak_bf16, matmul_peak(torch.bfloat16)])
        res["peak_gflops_fp32"], res["peak_gflops_bf16"] = peak_fp32, peak_bf16
        for name, peak in (("fp32", peak_fp32), ("bf16", peak_bf16)):
            t = res[f"train_{name}"]
            t["fedlm_mfu"] = t["fedlm_tok_s"] * fpt / 1e9 / peak
            t["hf_mfu"] = t["hf_tok_s"] * fpt / 1e9 / peak
        if compile and not quick:
            import copy

            c = compiled_throughput(copy.deepcopy(ours), runs=runs, batches=batches)
            if "tok_s" in c:
                c["mfu"] = c["tok_s"] * fpt / 1e9 / peak_bf16
                c["ratio_vs_hf_bf16"] = c["tok_s"] / res["train_bf16"]["hf_tok_s"]
            res["train_bf16_compiled"] = c
        d = decode_throughput(ours, hf, runs=runs)
        res["decode"] = d
        res["targets"] = {
            "train_fp32_1_3x": res["train_fp32"]["ratio"] >= TARGET_TRAIN,
            "train_bf16_1_3x": res["train_bf16"]["ratio"] >= TARGET_TRAIN,
            "bf16_mfu_50pct": res["train_bf16"]["fedlm_mfu"] >= TARGET_MFU,
            "decode_2x": d["ratio"] >= TARGET_DECODE,
        }
        return res
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
