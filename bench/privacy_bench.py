"""Privacy–utility table: no DP vs record-level ε ∈ {8, 3, 1} vs client-level ε ∈ {8, 3}.

    .venv/bin/python -m bench.privacy_bench [--quick] [key=value ...]   # table; writes bench-privacy.json
    result = run(quick=False)                                            # for bench/run.py

The Secret Sharer setting (Carlini et al. 2019) on the bundled corpus, federated, with the
usual recipe for private language models: a starting model pretrained on public text (the
bundled "literature" silo, in no row's federation), then fine-tuned federated by three silos
(FedAvg), one of them ("legal") small and seen for many epochs, with random canaries planted
in its training documents once and 10 times (several canaries per repeat count, so the
exposure is a mean, not one draw). The tokenizer is agreed before the canaries are planted, so
it cannot have learnt their digits. Every row starts from the same pretrained model and trains
for the same rounds on about the same number of records per round and silo (batch × local
steps: 240). The no-DP and client-level rows train on batches of 16 × 15 local steps at lr 3e-3;
the record-level (DP-SGD) rows on a large expected batch of 120 records × 2 local steps at lr
1e-2 (see below for why). Every row is measured on:

- validation bits/byte: the mean over the three silos' held-out splits;
- canary exposure: exact rank of each canary's log-perplexity among C random candidate
  secrets of the same format, exposure = log2(C+1) − log2(rank) (chance: E = 1/ln 2 ≈ 1.44
  bits, 95% quantile log2(20) ≈ 4.3 bits; a memorised canary reaches log2(C+1));
- membership inference on the canary silo: the loss attack (AUC, TPR at 1% FPR) and the
  attack calibrated by a reference model fine-tuned from the same start on the other two
  silos only;
- slowdown: CPU seconds of the whole federated run relative to no DP (CPU time of this
  process, so other jobs on a shared machine do not stretch it), leaving out Opacus's one-time
  search for the noise multiplier (planning, not training; seconds for a silo with a high
  sampling rate);
- DP-SGD throughput: tokens per CPU second of one silo's local training, DP-SGD vs plain
  AdamW at the same (expected) batch size, interleaved, for the issue's ≥ 0.5× target.

Why the record-level rows train on large batches (Li et al. 2022, "Large language models can be
strong differentially private learners"; De et al. 2022). The Gaussian noise on a step's gradient
sum has norm z·C·√d (d ≈ 0.8 M weights) against a clipped signal of at most B·C (every per-sample
gradient is clipped: their norms are 4–24 against clip C = 1, and AdamW is invariant to C's scale,
so the clip is no lever). At a fixed number of records per round, a batch B times larger takes B
times fewer steps, and the noise multiplier z the target ε needs grows much more slowly than B
(z is set by the sampling rate q = B/N and the step count), so the signal-to-noise ratio of the
whole run, ∝ B·√steps / z, grows with B. For the two large silos (≈1,000 records) z goes from
0.57 at B = 16 × 150 steps to 0.78 at B = 120 × 20 steps (B/z: 28 → 154); the canary silo (131
records) gets little from it (q = 0.92, no amplification by sampling: z 1.25 → 2.65). Fewer steps
then want a larger learning rate. Short runs of the ε = 8 row (with the no-DP row of the same code:
2.887 bits/byte, pretrained start 4.03; B × local steps, lr → mean val bits/byte, ratio):
16 × 15, 3e-3 (the no-DP row's setting) → 3.680, 1.275×; 48 × 5, 1e-2 → 3.617, 1.253×; 80 × 3, 3e-3 →
3.708; 80 × 3, 1e-2 → 3.584, 1.241×; 120 × 2 at lr 6e-3, 1e-2, 1.5e-2, 3e-2 → 3.639, 3.583, 3.581,
3.735, so 120 × 2 at 1e-2 (another train.seed: 3.589 vs no DP 2.891, 1.24× again; the full run
reproduces 3.583, 1.24×: a small margin under 1.25×). 128 × 2 (7% more records): 3.579; 120 × 3
(1.5× the records and compute): 3.550, 1.23×. Its warm-up is scaled with its steps (1 of 20, as 10
of 150). Averaging the server's global models over the last 2–5 rounds, or an EMA of them
(post-processing, no ε cost), was worse (3.585–3.601): the cosine schedule already shrinks the last
rounds' steps and the model is still improving. Adam's second-moment correction for DP noise
(DP-AdamBC, Tang et al. 2023; not tried) fits poorly here: each round starts a fresh AdamW (local
training is stateless), so the second moment is one or two noisy gradients squared, and taking
the known noise variance off it leaves mostly its floor. The same large batch for every row does not work:
the no-DP row needs its many small steps to memorise the 10× canaries that the exposure target
is measured against (batch 64 × 4 steps for every row: exposure of no DP falls to 1.6–5.7 bits).
Tried before, at batch 16 × 15, with the models' older random init (pretrained start 3.92, no DP
2.753, this setting 3.602: 1.31×; ratios against that no-DP row): lr 1e-2 and 1e-3 worse
than 3e-3; batch 32 for every row 1.32×; the PRV accountant (6% less noise at the same ε) 1.30×,
at 1.7× the run time (its ε takes ~3 s per round and silo): RDP kept; DP-LoRA r = 16 1.32–1.36×.
A DP-SGD step on B = 120 costs about 7.5 steps on B = 16, so the record rows' CPU time is that of
DP-SGD at the same records (the slowdown column); the throughput target is measured separately
at the same batch (`dp_throughput`).

Record-level rows use δ = 1e-5 (< 1/N for every silo's N records; fedlm refuses otherwise),
and a record is one window of seq_len tokens: a canary repeated 10 times is in 10 records, so
its protection is group privacy (about 10·ε), which is why its exposure is measured, not
assumed. Client-level DP protects a whole silo, and with three silos δ must be < 1/3: those
rows use δ = 0.1, a weak guarantee by construction (three silos are too few for client-level
DP; the table shows what its noise costs).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

SILOS = ("legal", "technical", "drama")
CANARY_SILO = "legal"
PUBLIC_SILO = "literature"  # public text the shared starting model is pretrained on (in no row's federation)
REPEATS = (1, 10)

# The targets at ε = 8 (δ = 1e-5), and DP-SGD's throughput.
TARGET_BPB_RATIO = 1.25
TARGET_EXPOSURE_DROP = 3.0
TARGET_MIA_AUC = 0.55
TARGET_THROUGHPUT = 0.5
WARMUP_STEPS = 10  # of every row's learning-rate schedule (the record rows' scaled to their steps)


@dataclass(frozen=True)
class Settings:
    """What one benchmark run trains and measures (the same for every configuration)."""

    silo_bytes: dict[str, int] = field(default_factory=lambda: {"legal": 24_000, "technical": 150_000,
                                                                "drama": 150_000})
    """Bytes of text taken per silo (whole documents in file order until the size is reached)."""
    doc_chars: dict[str, int] = field(default_factory=lambda: {"legal": 400, "technical": 8_000,
                                                               "drama": 8_000})
    """Each document is cut to this many characters (many short canary hosts in the canary silo)."""
    val_fraction: dict[str, float] = field(default_factory=lambda: {"legal": 0.4, "technical": 0.2,
                                                                   "drama": 0.2})
    """Held-out share of each silo's documents (the canary silo's val split is the MIA's non-members)."""
    rounds: int = 10
    local_steps: int = 15
    batch_size: int = 16
    seq_len: int = 64
    vocab_size: int = 512
    model: str = "tiny"
    lr: float = 3e-3
    dp_lr: float = 1e-2
    """Learning rate of the record-level (DP-SGD) rows; 0: the same as `lr`."""
    dp_batch_size: int = 120
    """Expected batch of the record-level rows (Poisson sampling rate = this / a silo's records); 0: `batch_size`.
    It may not exceed the smallest silo's records (131 in the canary silo)."""
    dp_local_steps: int = 2
    """Local steps per round of the record-level rows (same rounds); 0: `local_steps`."""
    dp_warmup_steps: int = -1
    """Warm-up steps of the record-level rows; -1: the no-DP rows' share of the run (10 of rounds × local_steps)."""
    dp_lora_rank: int = 0
    """LoRA rank of the record-level rows (only the adapters train under DP-SGD); 0: all weights train."""
    candidates: int = 10_000
    per_repeat: int = 3
    delta: float = 1e-5
    accountant: str = "rdp"
    """Record-level rows' accountant (Opacus's "rdp" or "prv"; PRV: ~6% less noise at the same ε, but
    ~3 s per ε computed, every round and silo, against RDP's 0.1 s)."""
    client_delta: float = 0.1
    throughput_steps: int = 6
    pretrain_bytes: int = 300_000
    """Public text (PUBLIC_SILO) the starting model of every row is pretrained on; 0: start from random."""
    pretrain_steps: int = 250
    pretrain_lr: float = 3e-3


QUICK = Settings(silo_bytes={"legal": 16_000, "technical": 30_000, "drama": 30_000}, rounds=4, local_steps=10,
                 candidates=2_000, per_repeat=2, throughput_steps=3, pretrain_bytes=100_000, pretrain_steps=60,
                 dp_batch_size=80, dp_local_steps=2)  # 160 records a round, as 16 × 10; the canary silo has 96


def configs(s: Settings) -> list[tuple[str, list[str]]]:
    """(row name, config overrides) for every row of the table."""
    rows: list[tuple[str, list[str]]] = [("no DP", ["privacy.mode=none"])]
    dp_extra = [f"train.lr={s.dp_lr}", f"train.min_lr={s.dp_lr / 10}"] if s.dp_lr else []
    dp_steps = s.dp_local_steps or s.local_steps
    if s.dp_batch_size:
        dp_extra.append(f"train.batch_size={s.dp_batch_size}")
    if s.dp_local_steps:
        dp_extra.append(f"federation.local_steps={s.dp_local_steps}")
    warmup = s.dp_warmup_steps if s.dp_warmup_steps >= 0 else round(WARMUP_STEPS * dp_steps / s.local_steps)
    if warmup != WARMUP_STEPS:
        dp_extra.append(f"train.warmup_steps={warmup}")
    if s.dp_lora_rank:
        dp_extra.append(f"lora.rank={s.dp_lora_rank}")
    for eps in (8, 3, 1):
        rows.append((f"record ε={eps}", ["privacy.mode=record", f"privacy.target_epsilon={eps}",
                                         f"privacy.delta={s.delta}", f"privacy.accountant={s.accountant}", *dp_extra]))
    for eps in (8, 3):
        rows.append((f"client ε={eps}", ["privacy.mode=client", f"privacy.target_epsilon={eps}",
                                         f"privacy.delta={s.client_delta}"]))
    return rows


def build_workspace(root: Path, s: Settings, *, seed: int = 7) -> Path:
    """Trimmed bundled silos, a tokenizer agreed on them, canaries planted in CANARY_SILO, shards."""
    from fedlm.corpus import extract
    from fedlm.data.shards import shard_silo
    from fedlm.data.tokenizer import agree_tokenizer
    from fedlm.privacy.audit import plant_canaries

    public = (PUBLIC_SILO,) if s.pretrain_bytes else ()
    raw = extract(root / "raw", SILOS + public)
    ws = root / "ws"
    for silo in SILOS + public:
        d = ws / "silos" / silo
        d.mkdir(parents=True)
        docs, size = [], 0
        for path in sorted(raw[silo].rglob("*")):
            if path.suffix not in (".txt", ".rst") or not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")[: s.doc_chars.get(silo, 8_000)]
            docs.append(text)
            size += len(text.encode())
            if size >= (s.silo_bytes[silo] if silo in SILOS else s.pretrain_bytes):
                break
        with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"text": text, "source": silo}) + "\n")
    # the tokenizer first: a BPE trained on text holding the canaries could merge their digits
    agree_tokenizer(ws, vocab_size=s.vocab_size, epsilon=None)
    plant_canaries(ws / "silos" / CANARY_SILO, repeats=REPEATS, per_repeat=s.per_repeat, seed=seed,
                   val_fraction=s.val_fraction[CANARY_SILO])
    for silo in SILOS + public:
        shard_silo(ws, silo, val_fraction=s.val_fraction.get(silo, 0.1), seed=0)
    return ws


def _bits_per_byte(model: Any, tok_path: Path, ws: Path) -> dict[str, float]:
    """Validation bits/byte of each silo."""
    from fedlm.evaluate import evaluate_silo

    return {s: float(evaluate_silo(model, tok_path, ws / "silos" / s, split="val")["bits_per_byte"]) for s in SILOS}


def _base_overrides(ws: Path, s: Settings) -> list[str]:
    return [f"data.workspace={ws}", f"model.preset={s.model}", f"model.max_seq_len={s.seq_len}",
            f"train.batch_size={s.batch_size}", f"train.seq_len={s.seq_len}", f"train.lr={s.lr}",
            f"train.min_lr={s.lr / 10}", f"train.warmup_steps={WARMUP_STEPS}", "train.log_every=1000000",
            "train.checkpoint_every=1000000"]


def dp_throughput(ws: Path, s: Settings) -> dict[str, float]:
    """Tokens per CPU second of local training on the canary silo: DP-SGD (secret generator,
    Opacus secure-mode noise, as the silos run it) vs plain, same batch size.

    The DP-SGD sampling rate is set so its expected batch equals the plain batch; the two
    alternate `throughput_steps` steps at a time (three times) after a warm-up, medians.
    """
    from fedlm.config import load_config
    from fedlm.data.shards import open_split
    from fedlm.privacy.dpsgd import (
        DPSGD,
        PoissonRecords,
        num_records,
        plan_record_dp,
        secret_generator,
    )
    from fedlm.privacy.randomness import NoiseKey
    from fedlm.train import build_model, make_optimizer, train_step

    cfg = load_config(overrides=[*_base_overrides(ws, s), "train.mode=federated", "privacy.mode=record",
                                 f"privacy.delta={s.delta}"])
    tc = cfg.train
    tokens = open_split(ws / "silos" / CANARY_SILO, "train")
    n = num_records(len(tokens), tc.seq_len)
    model = build_model(cfg)
    plan = plan_record_dp(num_records=n, batch_size=tc.batch_size, steps=100, privacy=cfg.privacy)
    g = secret_generator(NoiseKey.fresh(), "throughput")  # as a silo draws it: secret, full-state
    rng = np.random.default_rng(0)

    def plain_batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, len(tokens) - tc.seq_len - 1, tc.batch_size)
        chunk = torch.from_numpy(np.stack([np.asarray(tokens[i : i + tc.seq_len + 1], dtype=np.int64)
                                           for i in starts]))
        return chunk[:, :-1], chunk[:, 1:]

    def plain(steps: int) -> tuple[float, int]:
        opt = make_optimizer(model, tc)
        t0 = time.thread_time()
        for _ in range(steps):
            train_step(model, opt, plain_batch, lr=tc.lr, grad_accum=1, grad_clip=tc.grad_clip, precision="fp32")
        return time.thread_time() - t0, steps * tc.batch_size * tc.seq_len

    def private(steps: int) -> tuple[float, int]:
        records = PoissonRecords([tokens], seq_len=tc.seq_len, sample_rate=plan.sample_rate, generator=g)
        seen = 0
        with DPSGD(model, make_optimizer(model, tc), plan=plan, generator=g) as dp:
            t0 = time.thread_time()
            for _ in range(steps):
                x, y = records.next()
                seen += x.numel()
                dp.step(x, y, lr=tc.lr)
            return time.thread_time() - t0, seen

    plain(2), private(2)  # warm-up
    rates: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(3):
        for name, fn in (("plain", plain), ("dp", private)):
            sec, tok = fn(s.throughput_steps)
            rates[name].append(tok / sec)
    out = {f"{k}_tok_per_cpu_s": float(np.median(v)) for k, v in rates.items()}
    out["ratio"] = out["dp_tok_per_cpu_s"] / out["plain_tok_per_cpu_s"]
    out["batch_size"] = tc.batch_size
    out["expected_dp_batch"] = plan.sample_rate * n
    return out


@contextmanager
def _timed_noise_search() -> Iterator[list[float]]:
    """CPU seconds spent in Opacus's noise-multiplier search (once per silo and run), to leave out.

    The search is a one-time cost of planning (seconds for a silo with a high sampling rate),
    not of training; the slowdown column compares training alone. It runs in the silos'
    threads, so each call is timed with its own thread's CPU clock.
    """
    from fedlm.privacy import dpsgd

    spent = [0.0]
    search = dpsgd.record_noise_multiplier

    def timed(**kwargs: Any) -> float:
        t0 = time.thread_time()
        try:
            return search(**kwargs)
        finally:
            spent[0] += time.thread_time() - t0

    dpsgd.record_noise_multiplier = timed
    try:
        yield spent
    finally:
        dpsgd.record_noise_multiplier = search


def _exposures(canaries: list[dict[str, Any]], repeats: int) -> list[float]:
    return [c["exposure_rank"] for c in canaries if c["repeats"] == repeats]


def run(quick: bool = True, settings: Settings | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """Train each configuration and measure it; returns {"rows": [...], "settings": {...}, ...}."""
    from fedlm.config import load_config
    from fedlm.data.shards import read_meta
    from fedlm.federation.runner import run_federated
    from fedlm.pretrained import load_model
    from fedlm.privacy.audit import audit, membership_inference
    from fedlm.privacy.dpsgd import num_records
    from fedlm.train import train

    torch.set_num_threads(1)
    s = settings or (QUICK if quick else Settings())
    timings: dict[str, float] = {}
    root = Path(tempfile.mkdtemp(prefix="fedlm-privacy-bench-"))
    try:
        t0 = time.perf_counter()
        ws = build_workspace(root, s)
        records = {silo: num_records(int(read_meta(ws / "silos" / silo)["tokens"]["train"]), s.seq_len)
                   for silo in SILOS}
        timings["workspace_s"] = time.perf_counter() - t0
        start: list[str] = []
        if s.pretrain_bytes:  # the public starting model every row (and the reference) fine-tunes
            t0 = time.perf_counter()
            train(load_config(overrides=[*_base_overrides(ws, s), "train.mode=centralised",
                                         f"data.silos={PUBLIC_SILO}", f"train.steps={s.pretrain_steps}",
                                         f"train.lr={s.pretrain_lr}", f"train.min_lr={s.pretrain_lr / 10}"]),
                  root / "public")
            start = [f"train.init_from={root / 'public'}"]
            timings["pretrain_s"] = time.perf_counter() - t0
        base = [*_base_overrides(ws, s), *start, "train.mode=federated", f"data.silos={','.join(SILOS)}",
                f"federation.rounds={s.rounds}", f"federation.local_steps={s.local_steps}"]
        t0 = time.perf_counter()
        ref_cfg = load_config(overrides=[*_base_overrides(ws, s), *start, "train.mode=centralised",
                                         f"data.silos={','.join(x for x in SILOS if x != CANARY_SILO)}",
                                         f"train.steps={s.rounds * s.local_steps}"])
        train(ref_cfg, root / "reference")
        reference, _ = load_model(root / "reference")
        # the loss attack on a model that never saw the canary silo: what the train/held-out split
        # alone gives (documents differ), the floor the loss attack is read against
        baseline = membership_inference(reference, ws / "silos" / CANARY_SILO, seq_len=s.seq_len)["loss"]
        timings["reference_s"] = time.perf_counter() - t0
        rows = []
        for name, extra in configs(s):
            if only is not None and name not in only:
                continue
            cfg = load_config(overrides=base + extra)
            out = root / name.replace(" ", "_").replace("=", "")
            t0, c0 = time.perf_counter(), time.process_time()
            with _timed_noise_search() as search:
                run_federated(cfg, out)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            model, tok = load_model(out)
            assert tok is not None
            t1 = time.perf_counter()
            report = audit(model, ws, silos=[CANARY_SILO], reference=reference, candidates=s.candidates,
                           seq_len=s.seq_len)["silos"][CANARY_SILO]
            per_silo_bpb = _bits_per_byte(model, tok, ws)
            bpb = sum(per_silo_bpb.values()) / len(per_silo_bpb)
            timings[f"{name} train_s"] = seconds
            timings[f"{name} audit_s"] = time.perf_counter() - t1
            priv = json.loads((out / "privacy.json").read_text()) if (out / "privacy.json").exists() else {}
            eps = [v["epsilon"] for v in priv.get("silos", {}).values()]
            row: dict[str, Any] = {
                "config": name, "bits_per_byte": bpb, "bits_per_byte_per_silo": per_silo_bpb,
                "epsilon": max(eps, default=None),
                "delta": priv.get("delta"), "mia_auc": report["membership"]["loss"]["auc"],
                "mia_tpr_at_1pct": report["membership"]["loss"]["tpr_at_1pct_fpr"],
                "mia_calibrated_auc": report["membership"]["calibrated"]["auc"],
                "mia_calibrated_tpr_at_1pct": report["membership"]["calibrated"]["tpr_at_1pct_fpr"],
                "mia_samples": report["membership"]["members"], "seconds": seconds, "cpu_seconds": cpu,
                "search_cpu_seconds": search[0],
                "canaries": [{k: c[k] for k in ("repeats", "rank", "exposure_rank", "exposure")}
                             for c in report["canaries"]],
            }
            for r in REPEATS:
                e = _exposures(report["canaries"], r)
                row[f"exposure_{r}x"], row[f"exposure_{r}x_max"] = float(np.mean(e)), float(np.max(e))
            row["silos"] = {silo: {"epsilon": v["epsilon"], "noise_multiplier": max(v["noise_multipliers"]),
                                   "sample_rate": max(v["sample_rates"], default=None), "steps": v["steps"]}
                            for silo, v in priv.get("silos", {}).items()}
            if "noise_multiplier" in priv:  # client level: the one noise multiplier on the aggregate
                row["noise_multiplier"] = priv["noise_multiplier"]
            rows.append(row)
            print(f"  {name}: {seconds:.0f} s train, {timings[f'{name} audit_s']:.0f} s audit; bpb {bpb:.3f}, "
                  f"exposure 10x {row['exposure_10x']:.2f}", file=sys.stderr, flush=True)
        base_row = rows[0]
        for row in rows:
            row["slowdown"] = (row["cpu_seconds"] - row["search_cpu_seconds"]) / base_row["cpu_seconds"]
            row["bpb_ratio"] = row["bits_per_byte"] / base_row["bits_per_byte"]
        t0 = time.perf_counter()
        throughput = dp_throughput(ws, s)
        timings["throughput_s"] = time.perf_counter() - t0
        chance = 1 / math.log(2)
        return {"rows": rows, "settings": {**asdict(s), "records": records,
                                           "exposure_cap_bits": math.log2(s.candidates + 1),
                                           "exposure_chance_bits": chance, "mia_baseline_auc": baseline["auc"],
                                           "mia_baseline_tpr_at_1pct": baseline["tpr_at_1pct_fpr"]},
                "throughput": throughput, "timings": timings, "targets": targets(rows, throughput)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def targets(rows: list[dict[str, Any]], throughput: dict[str, float] | None) -> dict[str, bool | None]:
    """The issue's ε = 8 targets (record level) and the DP-SGD throughput target, met or not."""
    by = {r["config"]: r for r in rows}
    none, dp = by.get("no DP"), by.get("record ε=8")
    if none is None or dp is None:
        return {}
    return {
        "bpb_ratio": dp["bpb_ratio"] <= TARGET_BPB_RATIO,
        "exposure_10x_drop": none["exposure_10x"] >= TARGET_EXPOSURE_DROP * dp["exposure_10x"],
        "mia_auc": dp["mia_auc"] <= TARGET_MIA_AUC,
        "throughput": None if throughput is None else throughput["ratio"] >= TARGET_THROUGHPUT,
    }


def table(result: dict[str, Any]) -> str:
    head = f"{'config':<14}{'ε':>7}{'bits/byte':>11}{'×':>6}{'exp 1×':>8}{'exp 10×':>9}{'max 10×':>9}" \
           f"{'MIA AUC':>9}{'TPR@1%':>8}{'cal AUC':>9}{'slowdown':>10}"
    lines = [head]
    for r in result["rows"]:
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "∞"
        lines.append(f"{r['config']:<14}{eps:>7}{r['bits_per_byte']:>11.3f}{r['bpb_ratio']:>6.2f}"
                     f"{r['exposure_1x']:>8.2f}{r['exposure_10x']:>9.2f}{r['exposure_10x_max']:>9.2f}"
                     f"{r['mia_auc']:>9.3f}{r['mia_tpr_at_1pct']:>8.3f}{r['mia_calibrated_auc']:>9.3f}"
                     f"{r['slowdown']:>10.2f}")
    return "\n".join(lines)


def _settings_from_argv(argv: list[str]) -> Settings:
    s = QUICK if "--quick" in argv else Settings()
    for arg in argv:  # key=value overrides of Settings' scalar fields, for exploring
        if "=" in arg and not arg.startswith("--"):
            key, value = arg.split("=", 1)
            s = replace(s, **{key: type(getattr(s, key))(value)})
    return s


if __name__ == "__main__":
    only = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")] or None
    result = run(settings=_settings_from_argv(sys.argv[1:]), only=only)
    print(table(result))
    print(json.dumps({"timings": result["timings"], "throughput": result["throughput"],
                      "targets": result["targets"], "records": result["settings"]["records"]}, indent=1))
    from fedlm.fileio import write_json

    write_json("bench-privacy.json", result)  # atomic: a run stopped here leaves the last whole file
