"""`fedlm demo`: the whole flow on the bundled corpus, with no network.

extract the corpus -> prepare each silo -> agree a tokenizer privately -> shard -> train
federated, centralised (pooled) and local-only with the same token budget -> personalise the
federated model on each silo -> evaluate every model on every silo -> value each silo's
contribution and gain (a small federated run valued by retraining, `VALUE_SIZE`) -> print the
tables, write OUT/summary.json -> generate a sample.

Budgets are equal by construction, counted in training sequences (tokens):
- federated: rounds × local_steps × silo_batch sequences from each silo (fedsgd: one
  gradient of silo_batch sequences per silo and round, one AdamW step on their mean);
- centralised: the same sequences from the silos pooled, in steps of batch_size (the
  local-only runs' step size: more, smaller steps, the strongest use of those tokens measured);
- local-only: each silo's federated sequences in steps of batch_size, plus
  personalise_steps steps: the same per-silo compute as federated + personalised.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from fedlm.config import Config, load_config
from fedlm.corpus import SILOS, extract
from fedlm.data.prepare import prepare_silo
from fedlm.data.shards import shard_silo
from fedlm.data.tokenizer import agree_tokenizer, end_token_id, load_tokenizer
from fedlm.evaluate import evaluate_silo
from fedlm.federation.runner import run_federated
from fedlm.fileio import write_json
from fedlm.generate import generate
from fedlm.plan import plan_run
from fedlm.pretrained import load_model
from fedlm.progress import console, progress_bar, status
from fedlm.report import write_report
from fedlm.train import personalise, train
from fedlm.value.run import summary_lines, value_run, value_table


@dataclass(frozen=True)
class DemoSize:
    vocab_size: int
    strategy: str
    rounds: int
    local_steps: int
    silo_batch: int  # sequences per silo and local step in the federated run
    personalise_steps: int
    server_lr: float
    batch_size: int  # sequences per step of the centralised, local-only and personalising runs
    seq_len: int
    eval_tokens: int  # per silo and model; the same prefix of each validation split for all
    baseline_lr: float | None = None
    """The peak lr of the centralised, local-only and personalising runs (their min_lr in the same
    ratio); None: the federated run's."""

    @property
    def silo_steps(self) -> int:
        """The federated run's sequences per silo, in steps of batch_size."""
        return self.rounds * self.local_steps * self.silo_batch // self.batch_size


# fedsgd with one local step of silo_batch sequences: a silo's fixed budget of sequences buys the
# most sequential optimizer steps this way, and more, smaller steps use the same tokens best
# (fewer, larger rounds and FedAvg's averaged local steps were tried and did worse).
QUICK = DemoSize(vocab_size=1024, strategy="fedsgd", rounds=48, local_steps=1, silo_batch=4, personalise_steps=16,
                 server_lr=1.0, batch_size=8, seq_len=64, eval_tokens=4096)
FULL = DemoSize(vocab_size=4096, strategy="fedsgd", rounds=600, local_steps=1, silo_batch=2, personalise_steps=30,
                server_lr=1.0, batch_size=8, seq_len=128, eval_tokens=32768)


def prepare_workspace(out: Path, *, vocab_size: int, epsilon: float = 8.0) -> Path:
    """Extract the bundled corpus and build a sharded workspace with a privately agreed tokenizer."""
    ws = out / "workspace"
    raw = extract(out / "raw")
    for silo in SILOS:
        with progress_bar(f"prepare {silo}", unit="bytes") as update:
            card = prepare_silo([raw[silo]], silo=silo, workspace=ws, on_progress=update, replace=True)
        console.print(f"  {silo}: {card['documents_out']} documents, {card['bytes_out']:,} bytes, "
                      f"{sum(card['pii'].values())} PII replaced, "
                      f"{sum(card['duplicates_removed'].values())} duplicates removed")
    with progress_bar("tokenizer") as update:
        agree_tokenizer(ws, vocab_size=vocab_size, epsilon=epsilon, on_progress=update)  # secret noise
    console.print(f"  tokenizer agreed from DP pre-token counts (ε = {epsilon} per silo)")
    for silo in SILOS:
        with progress_bar(f"shard {silo}", unit="bytes") as update:
            shard_silo(ws, silo, on_progress=update)
    return ws


def demo_sets(ws: Path, size: DemoSize, *, seed: int = 1337) -> list[str]:
    """The federated config of the demo as `section.key=value` overrides; baselines add to it."""
    steps = size.rounds * size.local_steps
    return [
        f"data.workspace={json.dumps(str(ws))}",
        "model.preset=tiny",
        "model.tie_embeddings=false",  # an untied head: better bits/byte for every model here
        f"model.max_seq_len={size.seq_len}",
        f"train.seq_len={size.seq_len}",
        f"train.batch_size={size.silo_batch}",
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 20)}",
        f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 20)}",
        f"train.seed={seed}",
        "train.mode=federated",
        f"federation.strategy={json.dumps(size.strategy)}",
        f"federation.rounds={size.rounds}",
        f"federation.local_steps={size.local_steps}",
        f"federation.personalise_steps={size.personalise_steps}",
        f"federation.server_lr={size.server_lr}",
    ]


def _with(base: list[str], **sets: Any) -> Config:
    """The config of `base` plus `section.key` overrides (JSON values are valid TOML literals)."""
    return load_config(None, base + [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _train(cfg: Config, run_dir: Path, label: str) -> Path:
    with progress_bar(label, unit="steps") as update:
        train(cfg, run_dir, on_step=lambda s, t, row: update(s, t, info=f"loss {row['loss']:.3f}"))
    return run_dir


def run_all(base: list[str], out: Path, size: DemoSize) -> dict[str, Path]:
    """Train federated, centralised, local-only and personalised models; return their run dirs."""
    cfg = load_config(None, base)
    fed, n = cfg.federation, len(SILOS)
    runs: dict[str, Path] = {}

    predicted = plan_run(cfg)  # before the run, as a user would: the report sets it against the rounds
    with progress_bar("federated", unit="rounds") as update:
        run_federated(cfg, out / "federated", on_round=lambda r, total, row: update(r, total))
    runs["federated"] = out / "federated"
    write_json(out / "federated" / "plan.json", predicted.to_json())

    lr = {} if size.baseline_lr is None else {
        "train.lr": size.baseline_lr, "train.min_lr": cfg.train.min_lr * size.baseline_lr / cfg.train.lr}

    def baseline(steps: int, **sets: Any) -> Config:
        """A centralised run of `steps` steps at the local batch, with the demo's schedule."""
        return _with(base, **{"train.mode": "centralised", "train.batch_size": size.batch_size, "train.steps": steps,
                              "train.warmup_steps": max(1, steps // 20), "train.checkpoint_every": steps,
                              "train.log_every": max(1, steps // 20)}, **lr, **sets)

    # the same sequences from the pooled silos, in steps of the local-only runs' batch
    runs["centralised"] = _train(baseline(n * size.silo_steps), out / "centralised", "centralised")
    for silo in SILOS:
        local = baseline(size.silo_steps + fed.personalise_steps, **{"data.silos": [silo]})
        runs[f"local:{silo}"] = _train(local, out / f"local-{silo}", f"local {silo}")
    if fed.personalise_steps:
        personal = _with(base, **{"train.batch_size": size.batch_size}, **lr)
        with progress_bar("personalise", unit="steps") as update:
            for silo, run_dir in personalise(personal, runs["federated"], on_step=lambda s, t, row: update(s, t)).items():
                runs[f"personalised:{silo}"] = run_dir
    return runs


def evaluate_everywhere(run_dir: Path, ws: Path, *, max_tokens: int) -> dict[str, float]:
    """Bits per byte of one model on every silo's validation split, plus the mean."""
    model, tok = load_model(run_dir)
    bpb = {silo: float(evaluate_silo(model, tok, ws / "silos" / silo, max_tokens=max_tokens)["bits_per_byte"])
           for silo in SILOS}
    bpb["mean"] = sum(bpb.values()) / len(SILOS)
    return bpb


def findings(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparisons the demo exists to show (issue targets beside them)."""
    bpb = {name: m["bits_per_byte"] for name, m in models.items()}
    local_mean = sum(bpb[f"local:{s}"]["mean"] for s in SILOS) / len(SILOS)
    out: dict[str, Any] = {
        "federated_vs_centralised": bpb["federated"]["mean"] / bpb["centralised"]["mean"],
        "federated_vs_local_only_mean": bpb["federated"]["mean"] / local_mean,
    }
    if f"personalised:{SILOS[0]}" in bpb:
        wins = [s for s in SILOS if bpb[f"personalised:{s}"][s] < bpb[f"local:{s}"][s]]
        out["personalised_beats_local_on_own_silo"] = {"count": len(wins), "of": len(SILOS), "silos": wins}
    return out


def print_table(models: dict[str, dict[str, Any]], found: dict[str, Any]) -> None:
    table = Table(title="bits per byte on each silo's validation set (lower is better)")
    table.add_column("model")
    for col in [*SILOS, "mean"]:
        table.add_column(col, justify="right")
    for name, m in models.items():
        table.add_row(name, *(f"{m['bits_per_byte'][c]:.3f}" for c in [*SILOS, "mean"]))
    console.print(table)
    console.print(f"federated / centralised = {found['federated_vs_centralised']:.3f} (target ≤ 1.10); "
                  f"federated / local-only mean = {found['federated_vs_local_only_mean']:.3f} (target ≤ 0.80)")
    if "personalised_beats_local_on_own_silo" in found:
        w = found["personalised_beats_local_on_own_silo"]
        console.print(f"personalised beats local-only on its own silo: {w['count']} of {w['of']} (target ≥ 5)")


# The valuation run: the six silos on a small model with the demo's own strategy (fedsgd: each
# round, AdamW on the mean gradient of every silo's batch, so √6 times the silos' lr, as the
# assistant demo takes), valued by retraining every coalition (`exact`: 62 short runs). A FedAvg
# run of the same per-silo steps (4 rounds of 5) left every silo worse off than training alone
# (gains of -0.11 to -2.2 bits/byte), unlike the demo's own run; this one's gains are small and
# mostly positive. `exact` is the cheapest method that agrees with itself: `rounds` retrains
# nothing, but here its order of the silos does not follow exact's, and `sampled` visits all 64
# coalitions of six silos anyway (BENCHMARKS.md, "Silo values", which compares the methods at this
# size and at a FedAvg one). Not the demo's own run: that retrained 62 times would cost 62 demo runs.
VALUE_SIZE = [
    "model.preset=custom", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=160",
    "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=2",
    "train.mode=federated", 'federation.strategy="fedsgd"', "federation.rounds=20", "federation.local_steps=1",
    f"federation.server_lr={math.sqrt(len(SILOS)):.4f}", "value.eval_tokens=1024",
]


def value_silos(ws: Path, run_dir: Path, *, seed: int) -> dict[str, Any]:
    """Each silo's contribution and gain: a small federated run, valued by retraining (`fedlm value --method exact`)."""
    cfg = load_config(None, [f"data.workspace={json.dumps(str(ws))}", *VALUE_SIZE, f"train.seed={seed}"])
    with progress_bar("value: the run", unit="rounds") as update:
        run_federated(cfg, run_dir, on_round=lambda r, total, row: update(r, total))
    with status("value") as say:
        return value_run(run_dir, method="exact", progress=say)


def fresh_runs(out: Path) -> None:
    """OUT exists and holds none of a demo's runs from an earlier call (they start afresh)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "runs").exists():
        shutil.rmtree(out / "runs")


def run_demo(out: Path, *, quick: bool = False, seed: int = 1337) -> dict[str, Any]:
    t0 = time.perf_counter()
    size = QUICK if quick else FULL
    fresh_runs(out)
    ws = prepare_workspace(out, vocab_size=size.vocab_size)
    t_data = time.perf_counter()
    runs = run_all(demo_sets(ws, size, seed=seed), out / "runs", size)
    t_train = time.perf_counter()
    models: dict[str, dict[str, Any]] = {}
    with progress_bar("evaluate", unit="models") as update:
        for i, (name, run_dir) in enumerate(runs.items()):
            models[name] = {"run_dir": str(run_dir),
                            "bits_per_byte": evaluate_everywhere(run_dir, ws, max_tokens=size.eval_tokens)}
            update(i + 1, len(runs))
    found = findings(models)
    t_eval = time.perf_counter()
    value = value_silos(ws, out / "runs" / "value", seed=seed)
    now = time.perf_counter()
    summary = {"models": models, "findings": found, "value": value, "seconds": now - t0, "quick": quick, "seed": seed,
               "phase_seconds": {"data": t_data - t0, "train": t_train - t_data, "evaluate": t_eval - t_train,
                                 "value": now - t_eval}}
    write_json(out / "summary.json", summary)
    print_table(models, found)
    console.print(value_table(value))
    console.print("(values and gains of a separate small fedsgd run, fedlm.demo.VALUE_SIZE, retrained on every "
                  "coalition: not of the federated model above)", highlight=False, soft_wrap=True)
    for line in summary_lines(value):
        console.print(line, highlight=False, soft_wrap=True)

    model, tok_path = load_model(runs["federated"])
    if tok_path is not None:
        tok = load_tokenizer(tok_path)
        prompt = "The patient"
        ids = list(generate(model, tok.encode(prompt).ids, max_new_tokens=40, temperature=0.8, top_k=50,
                            eos_id=end_token_id(tok), seed=0))
        console.print(f"[bold]sample (federated):[/] {prompt}{tok.decode(ids)}", highlight=False)
    console.print(f"demo finished in {summary['seconds']:.0f} s -> {out / 'summary.json'}")
    console.print(f"report: {write_report(out)} (open it in a browser)", highlight=False, soft_wrap=True)
    return summary
