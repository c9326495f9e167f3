"""`fedlm plan`: what a run will cost each silo — parameters, FLOPs, memory, time, bytes — before it starts.

    plan = plan_run(load_config("fed.toml"))             # calibrates a few real steps on train.device here
    plan = plan_run(cfg, device_flops=50e12)              # or: time from a given FLOP/s per silo
    print(json.dumps(plan.to_json()))
    fitted, changes = fit_limits(cfg, memory_limit=2 * 2**30, time_limit=30.0)   # `--set` lines that fit

Everything but the time comes from the config and the model's shapes alone (no weights are
loaded: `train.init_from` is read for its config.json or GGUF header). The formulas, per token:

- FLOPs (training): 6·N + 12·L·T·(H·D)  (PaLM's appendix B form: N = parameters used in a
  matmul, the head included, the embedding lookup not; the attention term counts the full
  T×T score and value matmuls, forward + backward = 3 × forward). Backward is 2 × forward
  for trainable matrices; a frozen matrix (LoRA) skips its weight gradient, so it costs
  4·N instead of 6·N, plus the adapters' own 6·r·(in + out). Activation checkpointing
  recomputes each block's forward during the backward, less its last matmul (w2; PyTorch's
  non-reentrant checkpoint stops recomputing once the saved tensors are back).
- Memory per silo: the runtime's fixed cost (measured once here), fp32 weights (4 B/param), gradients and AdamW's two moments for the
  trainable parameters (4 + 8 B), AdamW's foreach temporary (4 B) (fedsgd: no AdamW on the silo), the global weights a silo
  receives and the update it sends (federated), the tensors autograd saves per layer per
  token (counted tensor by tensor for this architecture, below), and the logits: log-softmax
  output, its gradient and the incoming gradient, B·T·V·4 B each (bf16 adds the bf16 logits
  and a bf16 copy of every matmul weight).
- Time: real optimizer steps of this model (random weights, same width, vocabulary,
  precision, batch, LoRA and share of tokens that are loss targets: a chat silo's answers
  only, `target_share`) on `train.device`, the silos of a round stepping at once on
  threads of their own as the in-process engine runs them (one torch thread each on a CPU),
  so contention is measured, not assumed; cut to 1 and 7 layers and extrapolated linearly
  in the layers (`calibrate_step_seconds`), × local_steps (cyclic: the silos train one after
  another, × S). Or FLOPs / `device_flops` when given.
- Device memory: `train.device`'s total and free memory (`fedlm.device.device_memory`),
  with a note when a silo's peak would not fit in what is free.
- Round overhead: the round's bytes at `ROUND_OVERHEAD_BYTES_PER_S` plus its arrays, each silo's
  and the server's, at `ROUND_OVERHEAD_S_PER_ARRAY` (`round_overhead_seconds`).
- Bytes per round: the update's arrays (LoRA: adapters only) under federation.compression —
  none 4 B/value, fp16 2, int8 1 + one fp32 scale per 256 values, topk ⌈f·n⌉ × (4 B value
  + 4 B int32 index) per array; secure aggregation sends 4 B (uint32) per value. Down: the
  global arrays in fp32. Cyclic adds the AdamW state passed on both ways: two fp32 moments per
  trained value and the step. Payload only (Flower's framing adds ~200 B per array).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedlm.config import Config, ModelConfig
from fedlm.errors import UserError
from fedlm.resolve import resolve_model, resolve_silos
from fedlm.shapes import Params, count_params

CHINCHILLA_TOKENS_PER_PARAM = 20
ADAMW_BYTES = 8  # two fp32 moments per trainable parameter
TOPK_VALUE_BYTES, TOPK_INDEX_BYTES = 4, 4  # fp32 value, int32 index
INT8_BLOCK = 256  # values per fp32 scale (fedlm.federation.codecs; tests/test_plan.py checks them equal)
ROUND_OVERHEAD_BYTES_PER_S = 400e6  # serialise + copy + checkpoint, measured by bench/plan_bench.py
ROUND_OVERHEAD_S_PER_ARRAY = 1.0e-3
"""A round's fixed cost per array, per silo and once more on the server: encode and decode, Flower's
(de)serialising and hashing, loading, checking, averaging, the server step and the checkpoint each
touch every array; a LoRA update is 240 small arrays (SmolLM2, r = 8), where this term, not the
bytes, is the overhead. Measured by bench/plan_bench.py (its SmolLM2 LoRA fedsgd round case)."""
RUNTIME_BYTES = {"fp32": 84 * 2**20, "bf16": 94 * 2**20}
"""A training process's fixed cost above its pre-model RSS (torch's kernels paged in, allocator arenas):
measured with a 5 k-parameter model by bench/plan_bench.py (torch 2.13 CPU, one thread)."""


# ---------------------------------------------------------------------------------------
# parameters, LoRA adapters and what crosses the wire


def update_bytes(sizes: dict[str, int], compression: str, topk_fraction: float, *, secure: bool = False) -> int:
    """Payload bytes of one update (arrays of `sizes` values) under the codec."""
    n = sum(sizes.values())
    if secure:
        return 4 * n  # masked uint32 integers
    if compression == "none":
        return 4 * n
    if compression == "fp16":
        return 2 * n
    if compression == "int8":  # one fp32 scale per block of INT8_BLOCK values of each array
        return n + 4 * sum(-(-s // INT8_BLOCK) for s in sizes.values())
    if compression == "topk":
        kept = sum(min(s, max(1, math.ceil(topk_fraction * s))) for s in sizes.values())
        return kept * (TOPK_VALUE_BYTES + TOPK_INDEX_BYTES)
    raise ValueError(f"unknown compression {compression!r}")


# ---------------------------------------------------------------------------------------
# FLOPs and memory per token


def flops_per_token(mc: ModelConfig, p: Params, *, seq_len: int, checkpointing: bool) -> float:
    """Training FLOPs per token (forward + backward, + recompute under checkpointing)."""
    hd = mc.n_heads * mc.head_dim
    attn_fwd = 4 * mc.n_layers * seq_len * hd  # q·kᵀ and p·v, full T×T
    trainable_mm = p.matmul - p.frozen_matmul
    total: float = 6 * trainable_mm + 4 * p.frozen_matmul + 6 * p.adapters + 3 * attn_fwd
    if checkpointing:
        w2 = mc.n_layers * mc.d_ff * mc.d_model
        block_mm = p.matmul - mc.d_model * mc.vocab_size
        total += 2 * (block_mm - w2) + attn_fwd + 2 * p.adapters * (1 - w2 / max(1, block_mm))
    return float(total)


def layer_activation_bytes(mc: ModelConfig, precision: str) -> float:
    """Bytes autograd keeps per layer per token (checked tensor by tensor in tests/test_plan.py).

    fp32: two RMSNorms keep x, rsqrt, x̂ and the output (3d+1 each); attention keeps the
    fused qkv output, rotated q and k, its output and a log-sum-exp per head; the MLP keeps
    the fused gate/up output, silu(gate) and the product. bf16 autocast: the residual and
    the norms stay fp32, matmul inputs/outputs are bf16 copies.
    """
    d, hd, kvd, f = mc.d_model, mc.n_heads * mc.head_dim, mc.n_kv_heads * mc.head_dim, mc.d_ff
    if precision == "bf16":
        return 20 * d + 8 + 6 * hd + 6 * kvd + 8 * f
    return 4 * (6 * d + 2 + 3 * hd + 3 * kvd + mc.n_heads + 4 * f)


def memory_breakdown(mc: ModelConfig, p: Params, cfg: Config, *, federated: bool) -> dict[str, int]:
    """Peak bytes per silo by component; "peak" = static + the largest transient phase."""
    tc = cfg.train
    tokens = tc.batch_size * tc.seq_len  # one micro-batch
    bf16 = tc.precision == "bf16"
    d, v, L = mc.d_model, mc.vocab_size, mc.n_layers
    layer = layer_activation_bytes(mc, tc.precision)
    if tc.activation_checkpointing:  # each block keeps its fp32 input; one block is recomputed at a time
        acts = tokens * (L * 4 * d + layer)
    else:
        acts = tokens * L * layer
    final_norm = tokens * ((10 if bf16 else 12) * d + 12)
    logits = tokens * v * (4 * 3 + (2 if bf16 else 0))  # log-softmax out, its grad, grad in (+ bf16 logits)
    casts = 2 * p.matmul if bf16 else 0  # autocast's bf16 weight copies, held for the backward
    wire = sum(p.wire.values()) * 4
    cyclic = federated and cfg.federation.strategy == "cyclic"
    fedsgd = federated and cfg.federation.strategy == "fedsgd"  # the silo computes a gradient; AdamW is the server's
    comp = {
        "runtime": RUNTIME_BYTES[tc.precision],
        "weights": 4 * p.total,
        "optimizer": 0 if fedsgd else ADAMW_BYTES * p.trainable,
        # cyclic: the AdamW state received and the one passed on (two fp32 moments each)
        "global_and_update": 2 * wire + (4 * wire if cyclic else 0) if federated else 0,
        "activations": int(acts + final_norm + casts),
        "logits": int(logits),
        "gradients": 4 * p.trainable,
    }
    head_grad = 4 * v * d if not p.frozen_matmul else 0
    fb = comp["activations"] + comp["logits"] + head_grad
    step = comp["gradients"] + (0 if fedsgd else 4 * p.trainable)  # foreach AdamW's sqrt temporary
    comp["peak"] = comp["runtime"] + comp["weights"] + comp["optimizer"] + comp["global_and_update"] + max(fb, step)
    return comp


# ---------------------------------------------------------------------------------------
# time: calibrate a few real steps here, or divide by a device's FLOP/s


MAX_TIMED_SILOS = 8
"""Most silo replicas a calibration steps at once (memory: each holds its adapters or weights and AdamW)."""
CALIBRATION_DEPTHS = (1, 7)
"""Layers of the cut-down models a calibration times; a deeper model's step is extrapolated. The
per-layer slope's noise is multiplied by (layers - 1) / (7 - 1) in the extrapolation: with 1 and 3
layers, three calibrations of SmolLM2 LoRA (3 silos on 2 cores) put its step at 2.39-3.02 s, with
1 and 7 at 2.61-2.75 s, against 2.73 s for the whole 30 layers timed the same way."""
CALIBRATION_STEPS = 3  # timed steps per model after a warm-up step; the median is kept


def calibrate_step_seconds(mc: ModelConfig, cfg: Config, *, threads: int, concurrent: int = 1,
                           device: str = "cpu") -> float:
    """Wall seconds of one optimizer step (grad_accum micro-batches) of this model on `device` while
    `concurrent` silos step at once, each on a thread of its own, as the in-process engine runs them
    (so their contention for the cores, the GIL and memory bandwidth is in the figure).

    Every layer costs the same, so the model is timed cut to 1 and to 7 layers (same width,
    vocabulary, precision, batch and LoRA), their steps interleaved so that both see the same
    load, and the step is extrapolated linearly in the layers: a 30-layer model is planned from
    8 layers' work, in seconds rather than a minute.
    """
    depths = [mc.n_layers] if mc.n_layers <= max(CALIBRATION_DEPTHS) else list(CALIBRATION_DEPTHS)
    times = _time_steps([dataclasses.replace(mc, n_layers=k) for k in depths], cfg, threads=threads,
                        concurrent=concurrent, device=device)
    if len(depths) == 1:
        return times[0] * cfg.train.grad_accum
    (d0, d1), (t0, t1) = depths, times
    per_layer = max(0.0, (t1 - t0) / (d1 - d0))
    return (t0 + (mc.n_layers - d0) * per_layer) * cfg.train.grad_accum


def _time_steps(mcs: list[ModelConfig], cfg: Config, *, threads: int, concurrent: int, device: str,
                steps: int = CALIBRATION_STEPS) -> list[float]:
    """Median wall seconds per micro-batch step of each model in `mcs`, `concurrent` replicas of it
    stepping together; the models take turns, step by step."""
    import threading

    import torch

    from fedlm.device import resolve_device, synchronize
    from fedlm.train import train_step

    tc = cfg.train
    on = resolve_device(device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            share = target_share(cfg)  # the loss mask's density: chat silos train on their answers only
            replicas = [_replicas(mc, cfg, on, concurrent, share) for mc in mcs]  # [model][silo]
        start = threading.Barrier(concurrent)
        walls: list[list[list[float]]] = [[[] for _ in range(concurrent)] for _ in mcs]

        def run(i: int) -> None:
            for k in range(steps + 1):  # the first step is a warm-up: allocations, kernels chosen
                for m, per_model in enumerate(replicas):
                    model, opt, (x, y) = per_model[i]
                    start.wait()
                    t0 = time.perf_counter()
                    train_step(model, opt, lambda x=x, y=y: (x, y), lr=1e-4, grad_accum=1,  # type: ignore[misc]
                               grad_clip=tc.grad_clip, precision=tc.precision)
                    synchronize(on)
                    if k:
                        walls[m][i].append(time.perf_counter() - t0)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(concurrent)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(old)
    # a step of the round ends when its slowest silo's does
    return [statistics.median(max(w[k] for w in per_silo) for k in range(steps)) for per_silo in walls]


def _replicas(mc: ModelConfig, cfg: Config, device: Any, n: int, share: float) -> list[tuple[Any, Any, Any]]:
    """n silos' (model, AdamW, batch) of shape `mc` on `device`, a `share` of each batch's tokens loss
    targets; under LoRA they share one frozen base, as the silos of one process do
    (`load_pretrained(share_frozen=True)`)."""
    import copy

    import torch

    from fedlm.data.chatshards import IGNORE
    from fedlm.lora import apply_lora
    from fedlm.model import Transformer
    from fedlm.train import make_optimizer

    tc = cfg.train
    base = Transformer(mc).to(device)
    base.activation_checkpointing = tc.activation_checkpointing
    if cfg.lora.rank:
        base.requires_grad_(False)
    out = []
    for _ in range(n):
        memo: dict[int, object] = {id(p): p for p in base.parameters()} if cfg.lora.rank else {}
        model = copy.deepcopy(base, memo)
        if cfg.lora.rank:
            apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                       targets=cfg.lora.targets)
        batch = torch.randint(0, mc.vocab_size, (tc.batch_size, tc.seq_len + 1))
        y = batch[:, 1:].masked_fill(torch.rand(tc.batch_size, tc.seq_len) >= share, IGNORE)
        out.append((model.train(), make_optimizer(model, tc), (batch[:, :-1], y)))
    return out


def target_share(cfg: Config) -> float:
    """The share of the silos' training tokens that are loss targets: 1 for raw text; for a chat silo
    its answers' tokens only (its loss mask), which is all the head and the loss compute for."""
    from fedlm.data.shards import open_chat

    ws = Path(cfg.data.workspace)
    targets = tokens = 0
    for name, n in silo_tokens(cfg).items():
        try:
            chat = open_chat(ws / "silos" / name, "train")
        except (UserError, OSError):  # not sharded yet
            return 1.0
        if chat is None:  # raw text: every token is a target
            targets, tokens = targets + (n or 0), tokens + (n or 0)
        else:
            targets, tokens = targets + int(np.count_nonzero(chat.mask)), tokens + len(chat.mask)
    return targets / tokens if tokens else 1.0


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """A run's predicted cost; `to_json()` is what `fedlm plan --json` prints."""

    mode: str
    model: dict[str, Any]
    params_total: int
    params_trainable: int
    flops_per_token: float
    flops_formula: str
    tokens_per_step: int
    flops_per_step: float
    flops_per_round: float
    rounds: int
    seconds_per_step: float | None
    seconds_per_round: float | None
    seconds_total: float | None
    time_source: str
    peak_memory_bytes: dict[str, int]
    memory: dict[str, int]
    bytes_up_per_round: dict[str, int]
    bytes_down_per_round: dict[str, int]
    silo_tokens: dict[str, int | None]
    tokens_per_round: int
    tokens_total: int
    compute_optimal_tokens: int
    device: str = ""
    device_memory_bytes: dict[str, int] = field(default_factory=dict)
    """The device's "total" and "free" memory (`fedlm.device.device_memory`), empty when not here."""
    notes: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def silo_tokens(cfg: Config) -> dict[str, int | None]:
    """{silo: train tokens from its meta.json} (None when not sharded yet)."""
    ws = Path(cfg.data.workspace)
    try:
        names = resolve_silos(ws, cfg.data.silos, local=False)
    except UserError:  # no silos prepared yet: plan the model alone
        names = []
    out: dict[str, int | None] = {}
    for name in names:
        try:
            meta = json.loads((ws / "silos" / name / "meta.json").read_text(encoding="utf-8"))
            out[name] = int(meta["tokens"]["train"])
        except (OSError, ValueError, KeyError, TypeError):
            out[name] = None
    return out


def plan_run(cfg: Config, *, device_flops: float | None = None, calibrate: bool = True,
             _timer: dict[tuple[Any, ...], float] | None = None) -> Plan:
    """Predict the run's cost per silo and per round (see the module docstring for the formulas)."""
    mc = resolve_model(cfg)
    cfg = _as_stepped(cfg)
    if cfg.train.seq_len > mc.max_seq_len:
        raise UserError(f"train.seq_len ({cfg.train.seq_len}) exceeds the model's context ({mc.max_seq_len})")
    tc, fed = cfg.train, cfg.federation
    p = count_params(mc, cfg)
    silos = silo_tokens(cfg)
    if not silos:
        raise UserError(f"{cfg.data.workspace}: no silos; list them in data.silos or prepare the workspace")
    federated = tc.mode == "federated"
    fpt: float = flops_per_token(mc, p, seq_len=tc.seq_len, checkpointing=tc.activation_checkpointing)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    n_silos = len(silos)
    cyclic = federated and fed.strategy == "cyclic"
    sampled, rounds, steps_per_silo, concurrent = _schedule(cfg, n_silos)
    tokens_per_round = sampled * steps_per_silo * tokens_per_step
    mem = memory_breakdown(mc, p, cfg, federated=federated)
    up, down = _wire_bytes(p, cfg, cyclic=cyclic)
    step_s, source, wall_factor = _step_seconds(
        cfg, mc, fpt * tokens_per_step, device_flops=device_flops, calibrate=calibrate,
        _timer=_timer, concurrent=concurrent)
    if tc.mode == "local-only":
        wall_factor = float(n_silos)  # the baseline trains the silos one after another
    round_s = total_s = None
    if step_s is not None:
        overhead = round_overhead_seconds(len(p.wire), sampled, up=up, down=down) if federated else 0.0
        turns = sampled if cyclic else 1  # cyclic: one silo after another
        round_s = steps_per_silo * step_s * wall_factor * turns + overhead
        total_s = round_s * rounds
    optimal = CHINCHILLA_TOKENS_PER_PARAM * p.total
    notes = _notes(cfg, silos, tokens_read=tokens_per_round * rounds, params=p.total, optimal=optimal)
    device, device_mem = _device_memory(cfg, needed=device_flops is None)
    if device_mem and mem["peak"] > device_mem["free"]:
        notes.append(f"a silo's peak ({_fmt_bytes(mem['peak'])}) exceeds the {_fmt_bytes(device_mem['free'])} free "
                     f"on {device} now: see `fedlm plan --memory-limit` for changes that fit")
    return Plan(
        mode=tc.mode, model={k: getattr(mc, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                                                         "vocab_size", "tie_embeddings")},
        params_total=p.total, params_trainable=p.trainable, flops_per_token=fpt,
        flops_formula="6·N_trainable + 4·N_frozen + 6·N_lora + 12·L·T·(H·D) (+ recompute with checkpointing)",
        tokens_per_step=tokens_per_step, flops_per_step=fpt * tokens_per_step,
        flops_per_round=fpt * tokens_per_round, rounds=rounds, seconds_per_step=step_s,
        seconds_per_round=round_s, seconds_total=total_s, time_source=source,
        peak_memory_bytes={s: mem["peak"] for s in silos}, memory=mem,
        bytes_up_per_round={s: up if federated else 0 for s in silos},
        bytes_down_per_round={s: down if federated else 0 for s in silos},
        silo_tokens=silos, tokens_per_round=tokens_per_round, tokens_total=tokens_per_round * rounds,
        compute_optimal_tokens=optimal, device=device, device_memory_bytes=device_mem, notes=notes,
    )


def _as_stepped(cfg: Config) -> Config:
    """`cfg` with train.precision as its steps run on train.device here (bf16 is fp32 on a CPU
    without bf16 units: `fedlm.device.step_precision`); as it is when the device is not here."""
    from fedlm.device import step_precision

    try:
        stepped = step_precision(_device(cfg), cfg.train.precision)
    except UserError:
        return cfg
    precision: Literal["fp32", "bf16"] = "bf16" if stepped == "bf16" else "fp32"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def round_overhead_seconds(arrays: int, sampled: int, *, up: int, down: int) -> float:
    """A federated round's seconds beside the silos' steps: its bytes (each sampled silo's update up
    and the global arrays down, the checkpoint once) and its arrays (each silo's and the server's)."""
    return ((sampled * (up + down) + down) / ROUND_OVERHEAD_BYTES_PER_S
            + (sampled + 1) * arrays * ROUND_OVERHEAD_S_PER_ARRAY)


def _schedule(cfg: Config, n_silos: int) -> tuple[int, int, int, int]:
    """(silos trained per round, rounds, steps per silo per round, silos training at once)."""
    from fedlm.federation.strategies import num_sampled

    tc, fed = cfg.train, cfg.federation
    if tc.mode == "federated":
        sampled = num_sampled(n_silos, fed.fraction)
        return sampled, fed.rounds, fed.local_steps, 1 if fed.strategy == "cyclic" else sampled
    if tc.mode == "local-only":
        return n_silos, 1, tc.steps, 1
    return 1, 1, tc.steps, 1  # centralised: one process trains the pooled silos


def _wire_bytes(p: Params, cfg: Config, *, cyclic: bool) -> tuple[int, int]:
    """(bytes up, bytes down) per silo and federated round."""
    fed = cfg.federation
    up = update_bytes(p.wire, fed.compression, fed.topk_fraction, secure=fed.secure_aggregation)
    down = 4 * sum(p.wire.values())
    if cyclic:  # the AdamW state travels with the weights, both ways: two fp32 moments and the step
        carried = 2 * down + 4
        up, down = up + carried, down + carried
    return up, down


def _step_seconds(cfg: Config, mc: ModelConfig, flops_per_step: float, *,
                  device_flops: float | None, calibrate: bool,
                  _timer: dict[tuple[Any, ...], float] | None,
                  concurrent: int) -> tuple[float | None, str, float]:
    """(seconds per step or None, where that figure comes from, wall-clock factor for silos
    sharing the cores), from `device_flops`, else a calibration run (memoised in `_timer`)."""
    tc = cfg.train
    federated = tc.mode == "federated"
    if device_flops:
        return flops_per_step / device_flops, f"device_flops={device_flops:.3g}", 1.0
    if not calibrate:
        return None, "none", 1.0
    threads = 1 if federated else (tc.threads or _default_threads())
    device = _device(cfg)
    # as many replicas as silos train at once (each is a thread of the in-process engine, and a busy
    # machine shares its cores out by thread); past MAX_TIMED_SILOS, the rest are taken to queue
    timed = max(1, min(concurrent, MAX_TIMED_SILOS))
    key = (repr(mc), tc.precision, tc.activation_checkpointing, tc.batch_size, tc.seq_len, tc.grad_accum,
           cfg.lora.rank, tuple(cfg.lora.targets), threads, timed, str(device))
    if _timer is not None and key in _timer:
        step_s = _timer[key]
    else:
        step_s = calibrate_step_seconds(mc, cfg, threads=threads, concurrent=timed, device=str(device))
        if _timer is not None:
            _timer[key] = step_s
    from fedlm.device import describe

    where = f"{threads} thread(s) per silo, {cores()} core(s)" if device.type == "cpu" else describe(device)
    return step_s, f"calibrated on {device}: {timed} silo(s) stepping at once, {where}", concurrent / timed


def _device_memory(cfg: Config, *, needed: bool) -> tuple[str, dict[str, int]]:
    """(device, {"total", "free"} bytes) of `train.device` here; ("", {}) when this machine lacks it
    and the plan does not need it (`--device-flops` plans for another machine)."""
    from fedlm.device import device_memory

    try:
        device = _device(cfg)
    except UserError:
        if needed:
            raise
        return "", {}
    total, free = device_memory(device)
    return str(device), {"total": total, "free": free}


def _device(cfg: Config) -> Any:
    """The torch device the run's silos train on here (`train.device`)."""
    from fedlm.device import resolve_device

    return resolve_device(cfg.train.device)


def _notes(cfg: Config, silos: dict[str, int | None], *, tokens_read: int, params: int,
           optimal: int) -> list[str]:
    """What the plan tells the user beside its figures."""
    notes = []
    held = [t for t in silos.values() if t is not None]
    if held and cfg.train.mode == "federated":
        notes.append(f"silos hold {sum(held):,} training tokens; the run reads {tokens_read:,} "
                     f"({tokens_read / sum(held):.2f} epochs); Chinchilla-optimal for "
                     f"{params:,} parameters: {optimal:,}")
    if cfg.train.mode != "federated":
        notes.append(f"train.mode = {cfg.train.mode!r}: one 'round' is the whole run; nothing crosses a wire")
    return notes


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------
# fitting a plan to a memory limit per silo and a time limit per round


def _candidates(cfg: Config, resource: str) -> list[list[str]]:
    """Changes to try, in order: cheapest in quality first (each a list of `section.key=value`)."""
    tc, out = cfg.train, []
    if resource == "memory":
        if not tc.activation_checkpointing:
            out.append(["train.activation_checkpointing=true"])
        if tc.precision == "fp32":
            out.append(["train.precision=\"bf16\""])
        b, a = tc.batch_size, tc.grad_accum
        while b > 1 and b % 2 == 0:  # same tokens per step, smaller micro-batches
            b, a = b // 2, a * 2
            out.append([f"train.batch_size={b}", f"train.grad_accum={a}"])
    else:
        if tc.precision == "fp32":
            out.append(["train.precision=\"bf16\""])
    if cfg.train.init_from:
        for r in (16, 8, 4, 2):
            if cfg.lora.rank == 0 or r < cfg.lora.rank:
                out.append([f"lora.rank={r}"])
    t = tc.seq_len
    while t > 32:
        t //= 2
        out.append([f"train.seq_len={t}"])
    if resource == "time" and tc.mode == "federated":
        s = cfg.federation.local_steps
        while s > 1:
            s = max(1, s // 2)
            out.append([f"federation.local_steps={s}"])
    return out


def _apply(cfg: Config, sets: list[str]) -> Config:
    from fedlm.config import _parse_set, build_config

    raw: dict[str, dict[str, Any]] = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    for item in sets:
        section, key, value = _parse_set(item)
        raw[section][key] = value
    return build_config(raw, "plan")


def fit_limits(cfg: Config, *, memory_limit: float | None = None, time_limit: float | None = None,
               device_flops: float | None = None) -> tuple[Plan, list[str]]:
    """The plan after the changes that bring peak memory per silo and seconds per round under the limits.

    Tries the changes of `_candidates` in order, keeping each that lowers the resource it is
    for, until the plan fits; returns the final plan and its `--set` lines. A limit that no
    change meets is a UserError saying which resource and by how much.
    """
    timer: dict[tuple[Any, ...], float] = {}
    need_time = time_limit is not None

    def plan_of(c: Config) -> Plan:
        return plan_run(c, device_flops=device_flops, calibrate=need_time, _timer=timer)

    current, changes = plan_of(cfg), list[str]()

    def peak(pl: Plan) -> float:
        return max(pl.peak_memory_bytes.values())

    def secs(pl: Plan) -> float:
        return float(pl.seconds_per_round or 0.0)

    for resource, limit, value in (("memory", memory_limit, peak), ("time", time_limit, secs)):
        if limit is None:
            continue
        for sets in _candidates(cfg, resource):
            if value(current) <= limit:
                break
            try:
                trial_cfg = _apply(cfg, changes + sets)
            except UserError:
                continue
            trial = plan_of(trial_cfg)
            ok_other = memory_limit is None or resource == "memory" or peak(trial) <= memory_limit
            if value(trial) < value(current) and ok_other:
                cfg, current, changes = trial_cfg, trial, _merge_sets(changes, sets)
        if value(current) > limit:
            unit = _fmt_bytes if resource == "memory" else (lambda s: f"{s:.1f} s")
            over = value(current) - limit
            raise UserError(
                f"--{resource}-limit {unit(limit)}: no plan fits; the smallest found needs {unit(value(current))} "
                f"{'per silo' if resource == 'memory' else 'per round'}, {unit(over)} ({over / limit:.0%}) over"
                f" (after {' '.join('--set ' + s for s in changes) or 'no changes'})")
    current.changes = changes
    return current, changes


def _merge_sets(old: list[str], new: list[str]) -> list[str]:
    keys = {s.split("=", 1)[0] for s in new}
    return [s for s in old if s.split("=", 1)[0] not in keys] + new


# ---------------------------------------------------------------------------------------
# units for the command line


_BYTES = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SECONDS = {"": 1, "s": 1, "ms": 1e-3, "m": 60, "min": 60, "h": 3600}
_FLOPS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(text: str, units: dict[str, float], flag: str) -> float:
    """'2GiB', '30s', '1.5e12', '100T' -> a number in base units (UserError naming the flag)."""
    s = text.strip().lower().replace("flop/s", "").replace("flops", "")
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    try:
        value, unit = float(s[:i]), s[i:].strip()
        scale = units[unit]
    except (ValueError, KeyError):
        raise UserError(f"{flag} {text!r}: expected a number with a unit ({', '.join(u for u in units if u)})") from None
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{flag} {text!r}: must be > 0")
    return value * scale


def parse_bytes(text: str) -> float:
    return parse_quantity(text, _BYTES, "--memory-limit")


def parse_seconds(text: str) -> float:
    return parse_quantity(text, _SECONDS, "--time-limit")


def parse_flops(text: str) -> float:
    return parse_quantity(text, _FLOPS, "--device-flops")


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def render(plan: Plan) -> Any:
    """A rich Table of the plan for people."""
    from rich.table import Table

    t = Table(title=f"plan ({plan.mode}, {plan.time_source})", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    m = plan.model
    t.add_row("model", f"d {m['d_model']} · {m['n_layers']} layers · {m['n_heads']}/{m['n_kv_heads']} heads · "
                       f"ff {m['d_ff']} · vocab {m['vocab_size']}")
    t.add_row("parameters (total / trainable)", f"{plan.params_total:,} / {plan.params_trainable:,}")
    t.add_row("FLOPs per token / per round", f"{plan.flops_per_token:.3g} / {plan.flops_per_round:.3g}")
    for k, v in plan.memory.items():
        t.add_row(f"memory per silo: {k}", _fmt_bytes(v))
    if plan.device_memory_bytes:
        t.add_row(f"device {plan.device}: memory free / total",
                  f"{_fmt_bytes(plan.device_memory_bytes['free'])} / {_fmt_bytes(plan.device_memory_bytes['total'])}")
    if plan.seconds_per_round is not None:
        t.add_row("seconds per step / per round / run",
                  f"{plan.seconds_per_step:.3g} / {plan.seconds_per_round:.3g} / {plan.seconds_total:.4g}")
    up, down = max(plan.bytes_up_per_round.values()), max(plan.bytes_down_per_round.values())
    t.add_row("bytes per silo per round (up / down)", f"{_fmt_bytes(up)} / {_fmt_bytes(down)}")
    known = [v for v in plan.silo_tokens.values() if v is not None]
    held = f"{sum(known):,}" if known else "? (not sharded)"
    t.add_row("tokens: run / silos hold / Chinchilla-optimal",
              f"{plan.tokens_total:,} / {held} / {plan.compute_optimal_tokens:,}")
    return t
