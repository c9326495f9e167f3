"""`fedlm demo --assistant`: a consortium's assistant, tuned federatedly from a pretrained chat model.

extract the bundled QA silos (fedlm/corpus/qa) -> prepare each as a chat silo -> install
SmolLM2-135M-Instruct's tokenizer and chat template -> shard (the held-out questions are each
silo's val split) -> train LoRA adapters federated, centralised, local-only and personalised
with the main demo's equal budgets (`fedlm.demo.run_all`) -> score every model's answers on the
held-out questions (answer bits per byte and greedy exact match) -> print the comparison,
write OUT/summary.json -> answer one held-out question before and after.

The base model and the federated and centralised models are scored on every silo; a
local-only or personalised model on its own silo (the one it was made for). The federated
run is `fedsgd` (every round, each silo sends one int8 gradient of the adapters on its batch
and the server takes one AdamW step on their mean): the same sequential steps as a silo
training alone, on the six silos' questions at once, at a learning rate scaled to that larger
batch (`federated_lr`). Each run's `model/` holds its adapters and
names its base (`fedlm.lora.save_adapters`); loading it merges them into the base, so `fedlm
serve OUT/runs/federated` answers with them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from fedlm.corpus import SILOS, extract_qa
from fedlm.data.chat import ChatTemplate
from fedlm.data.prepare import prepare_silo
from fedlm.data.shards import open_chat, open_split, shard_silo
from fedlm.data.tokenizer import load_tokenizer, tokenizer_hash
from fedlm.demo import DemoSize, fresh_runs, run_all
from fedlm.device import native_bf16
from fedlm.evaluate import answer_metrics, greedy_answers, held_out_questions, paired_exact_test
from fedlm.fileio import write_json
from fedlm.model import Transformer
from fedlm.presets import preset_sets
from fedlm.pretrained import SMOLLM2, load_model, load_pretrained, resolve, write_model_tokenizer
from fedlm.progress import console, progress_bar
from fedlm.resolve import init_from_shape
from fedlm.shapes import array_sizes


@dataclass(frozen=True)
class AssistantSize:
    rounds: int  # fedsgd rounds = each silo's sequential steps
    silo_batch: int  # windows per silo and round (and per step of every other run)
    personalise_steps: int
    seq_len: int  # a window: one or more whole conversations from a conversation's start
    lr: float  # of a step on one silo's windows (local-only, centralised, personalising)
    questions: int  # held-out questions scored per silo and model (0: the whole val split)
    max_new_tokens: int  # of a greedy answer (the longest reference answer is ~20 tokens)


# One window per silo and round buys the most sequential steps for a silo's budget of windows
# (the main demo's finding, `fedlm.demo`): a window holds about two conversations.
QUICK = AssistantSize(rounds=10, silo_batch=1, personalise_steps=2, seq_len=192, lr=2e-3, questions=8,
                      max_new_tokens=16)
BENCH = AssistantSize(rounds=10, silo_batch=1, personalise_steps=2, seq_len=192, lr=2e-3, questions=20,
                      max_new_tokens=16)
"""The size bench/assistant_bench.py measures issue 16's targets at: QUICK's training, scored on 20
held-out questions per silo and model (QUICK's 8 rank models in steps of 0.125, too coarsely).
Scoring costs about as much as training here (each question's prompt is read whole)."""
FULL = AssistantSize(rounds=48, silo_batch=2, personalise_steps=8, seq_len=192, lr=2e-3, questions=0,
                     max_new_tokens=24)
SIZES = {"quick": QUICK, "bench": BENCH, "full": FULL}
SCORE_DTYPE = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
"""The weights' dtype when the demo scores its models: bf16 on a CPU with bf16 units, where it scores
~2.5x faster than fp32 (answer bits per byte within ~1%); fp32 on another, where emulated bf16
scored a silo 5x slower (23 against 4.7 CPU s, an AVX2 EPYC)."""
VAL_FRACTION = 0.2
"""Share of each QA silo held out (a hash of each conversation): ~40-60 questions per silo."""
PRESET = "smollm2-lora"
"""Model, LoRA shape, strategy (fedsgd), int8 updates and precision: fedlm/presets/smollm2-lora.toml."""
SAMPLE_SILO = "drama"
ALPHA = 0.05
"""A model beats another on a silo beyond chance when the paired exact test on its held-out questions
gives p below this (`evaluate.paired_exact_test`): with ~20-70 questions a silo, one or two answers
either way are noise."""


def prepare_workspace(out: Path) -> Path:
    """The six QA silos prepared and sharded with SmolLM2's tokenizer and chat template."""
    ws = out / "workspace"
    files = extract_qa(out / "qa")
    for silo in SILOS:
        card = prepare_silo([files[silo]], silo=silo, workspace=ws, replace=True)
        console.print(f"  {silo}: {card['documents_out']} conversations "
                      f"({card['documents_in'] - card['documents_out']} removed by cleaning)")
    write_model_tokenizer(ws, SMOLLM2)
    for silo in SILOS:
        with progress_bar(f"shard {silo}", unit="bytes") as update:
            shard_silo(ws, silo, val_fraction=VAL_FRACTION, on_progress=update)
    return ws


def assistant_sets(ws: Path, size: AssistantSize, *, seed: int) -> list[str]:
    """The federated run's config (the smollm2-lora preset and this size) as `section.key=value`
    overrides; `run_all` derives the centralised, local-only and personalising runs from it."""
    lr = federated_lr(size)
    sets = {
        "data.workspace": str(ws), "train.seq_len": size.seq_len, "train.batch_size": size.silo_batch,
        "train.steps": size.rounds, "train.lr": lr, "train.min_lr": lr / 10,
        "train.warmup_steps": max(1, size.rounds // 10), "train.checkpoint_every": size.rounds,
        "train.log_every": max(1, size.rounds // 8), "train.seed": seed,
        "federation.rounds": size.rounds, "federation.personalise_steps": size.personalise_steps,
        "train.eval_batches": 1,  # the demo scores every model's answers itself (`score_all`)
    }
    return preset_sets(PRESET) + [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def federated_lr(size: AssistantSize) -> float:
    """The federated run's peak lr: a fedsgd step is AdamW on the mean gradient of every silo's
    windows, a batch len(SILOS) times the other runs' (one silo's windows), so it takes Adam's
    square-root batch scaling of their lr (at their lr, the federated model trailed the centralised
    one's answer bits per byte far more: BENCHMARKS.md, "Assistant")."""
    return size.lr * math.sqrt(len(SILOS))


def demo_size(size: AssistantSize) -> DemoSize:
    """The budget `run_all` splits among the runs (vocabulary and eval length are unused here)."""
    return DemoSize(vocab_size=0, strategy="fedsgd", rounds=size.rounds, local_steps=1,
                    silo_batch=size.silo_batch, personalise_steps=size.personalise_steps, server_lr=1.0,
                    batch_size=size.silo_batch, seq_len=size.seq_len, eval_tokens=0, baseline_lr=size.lr)


def score(model: Transformer, ws: Path, silos: list[str], size: AssistantSize) -> dict[str, dict[str, Any]]:
    """Answer bits per byte and exact match of `model` on the held-out questions of `silos`, and which
    questions it answered exactly ("matches", in the split's order: what `paired_exact_test` compares)."""
    bpb: dict[str, float] = {}
    em: dict[str, float] = {}
    matches: dict[str, list[bool]] = {}
    for silo in silos:
        m = answer_metrics(model, ws / "silos" / silo, model_tokenizer=ws / "tokenizer.json",
                           max_questions=size.questions, max_new_tokens=size.max_new_tokens, details=True)
        bpb[silo], em[silo] = float(m["answer_bits_per_byte"]), float(m["exact_match"])
        matches[silo] = [bool(row["match"]) for row in m["answers"]]
    bpb["mean"], em["mean"] = float(np.mean(list(bpb.values()))), float(np.mean(list(em.values())))
    return {"bits_per_byte": bpb, "exact_match": em, "matches": matches}


def score_all(runs: dict[str, Path], ws: Path, size: AssistantSize) -> dict[str, dict[str, Any]]:
    """Every model's scores: base, federated and centralised on all silos, the others on their own."""
    models: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, str, list[str]]] = [("base", str(resolve(SMOLLM2)), list(SILOS))]
    todo += [(name, str(path), list(SILOS) if ":" not in name else [name.split(":", 1)[1]])
             for name, path in runs.items()]
    with progress_bar("evaluate", unit="models") as update:
        for i, (name, run_dir, silos) in enumerate(todo):
            model = load_pretrained(SMOLLM2)[0] if name == "base" else load_model(Path(run_dir))[0]
            models[name] = {"run_dir": run_dir, **score(model.to(SCORE_DTYPE).eval(), ws, silos, size)}
            update(i + 1, len(todo))
    return models


def communication(run_dir: Path) -> dict[str, float]:
    """MB each silo sent over the run against sending the full fp32 model every round."""
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    sent: dict[str, float] = {}
    for r in rounds:
        for silo, row in r.get("silos", {}).items():
            sent[silo] = sent.get(silo, 0.0) + float(row.get("bytes_up", 0.0))
    params = sum(array_sizes(init_from_shape(str(run_dir))).values())  # the full model's, from its config.json
    full = 4.0 * params * len(rounds)
    per_silo = float(np.mean(list(sent.values()))) if sent else 0.0
    return {"rounds": len(rounds), "mb_sent_per_silo": per_silo / 1e6, "mb_full_fp32_per_silo": full / 1e6,
            "share_of_full_fp32": per_silo / full if full else 0.0}


def findings(models: dict[str, dict[str, Any]], comm: dict[str, float]) -> dict[str, Any]:
    """The comparisons the assistant demo exists to show (issue 16's targets beside them)."""
    em = {name: m["exact_match"] for name, m in models.items()}
    bpb = {name: m["bits_per_byte"] for name, m in models.items()}
    fed = em["federated"]
    paired = {s: paired_exact_test(models["federated"]["matches"][s], models[f"local:{s}"]["matches"][s])
              for s in SILOS}
    return {
        "federated_beats_base_em": [s for s in SILOS if fed[s] > em["base"][s]],
        "federated_beats_local_em": [s for s in SILOS if fed[s] > em[f"local:{s}"][s]],
        "federated_vs_local_em_test": paired,  # a_only: questions only the federated model got right
        "federated_beats_local_em_significant": [s for s, t in paired.items()
                                                 if t["p"] < ALPHA and t["a_only"] > t["b_only"]],
        "local_beats_federated_em_significant": [s for s, t in paired.items()
                                                 if t["p"] < ALPHA and t["b_only"] > t["a_only"]],
        "personalised_beats_local_em": [s for s in SILOS if f"personalised:{s}" in em
                                        and em[f"personalised:{s}"][s] > em[f"local:{s}"][s]],
        "federated_vs_centralised_bpb": bpb["federated"]["mean"] / bpb["centralised"]["mean"],
        "communication_share_of_full_fp32": comm["share_of_full_fp32"],
    }


def print_table(models: dict[str, dict[str, Any]], found: dict[str, Any], comm: dict[str, float]) -> None:
    """Per silo: exact match and answer bits per byte of each kind of model on its held-out questions."""
    table = Table(title="held-out questions: exact match/answer bits per byte (higher/lower is better)")
    kinds = ("base", "local", "centralised", "federated", "personalised")
    table.add_column("silo", no_wrap=True)
    for kind in kinds:  # cells without spaces: the table fits 80 columns (a log file's width) unwrapped
        table.add_column(kind, justify="right", no_wrap=True)

    def cell(name: str, silo: str) -> str:
        m = models.get(name)
        if m is None or silo not in m["exact_match"]:
            return "—"
        return f"{m['exact_match'][silo]:.2f}/{m['bits_per_byte'][silo]:.2f}"

    for silo in SILOS:
        table.add_row(silo, *(cell(f"{k}:{silo}" if k in ("local", "personalised") else k, silo) for k in kinds))
    def mean_cell(kind: str) -> str:
        if kind not in ("local", "personalised"):
            return cell(kind, "mean")
        own = [(models[f"{kind}:{s}"], s) for s in SILOS if f"{kind}:{s}" in models]
        if not own:
            return "—"
        return (f"{np.mean([m['exact_match'][s] for m, s in own]):.2f}/"
                f"{np.mean([m['bits_per_byte'][s] for m, s in own]):.2f}")

    row = [mean_cell(k) for k in kinds]
    table.add_row("mean", *row)
    console.print(table)
    n = len(SILOS)
    console.print(f"federated beats base exact match on {len(found['federated_beats_base_em'])} of {n} silos "
                  f"(target {n}); beats local-only on {len(found['federated_beats_local_em'])} of {n} (target ≥ 4)")
    wins, losses = found["federated_beats_local_em_significant"], found["local_beats_federated_em_significant"]
    console.print(f"  beyond chance (paired exact test on the same questions, p < {ALPHA:g}): federated better "
                  f"on {len(wins)}{_named(wins)}, local-only on {len(losses)}{_named(losses)} of {n} silos")
    console.print(f"federated / centralised answer bits per byte = {found['federated_vs_centralised_bpb']:.3f} "
                  "(target ≤ 1.10)")
    console.print(f"sent per silo: {comm['mb_sent_per_silo']:.1f} MB over {comm['rounds']} rounds = "
                  f"{100 * comm['share_of_full_fp32']:.2f}% of the full fp32 model each round "
                  f"({comm['mb_full_fp32_per_silo']:.0f} MB; target ≤ 1%)")


def _named(silos: list[str]) -> str:
    return f" ({', '.join(silos)})" if silos else ""


def sample(ws: Path, runs: dict[str, Path], silo: str = SAMPLE_SILO) -> dict[str, str]:
    """The first held-out question of `silo`, answered greedily by the base and federated models."""
    silo_dir = ws / "silos" / silo
    tokens = open_split(silo_dir, "val", expect_tokenizer_sha256=tokenizer_hash(ws / "tokenizer.json"))
    chat = open_chat(silo_dir, "val")
    assert chat is not None
    ids, _, answer = held_out_questions(tokens, chat)[0]
    tok = load_tokenizer(ws / "tokenizer.json")
    prompt = ids[: ids.size - answer.size]
    stop = {0, int(answer[-1])}
    out = {"silo": silo, "question": _user_turn(tok.decode(prompt.tolist(), skip_special_tokens=False)),
           "reference": tok.decode(answer.tolist(), skip_special_tokens=True).strip()}
    for name in ("base", "federated"):
        model = load_pretrained(SMOLLM2)[0] if name == "base" else load_model(runs[name])[0]
        got = greedy_answers(model.eval(), [prompt], max_new_tokens=32, stop_ids=stop)[0]
        out[name] = tok.decode(got, skip_special_tokens=True).strip()
    return out


def _user_turn(rendered: str) -> str:
    """The last user turn's text of a ChatML-rendered prompt."""
    return rendered.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]


def run_assistant(out: Path, *, quick: bool = False, seed: int = 1337,
                  size: AssistantSize | None = None) -> dict[str, Any]:
    """The whole assistant demo into OUT (at `size`, else QUICK or FULL); returns (and writes)
    OUT/summary.json's content."""
    clock = _Clock()
    size = size or (QUICK if quick else FULL)
    fresh_runs(out)
    ws = prepare_workspace(out)
    ChatTemplate.load(ws, what="the assistant demo")  # the tokenizer came with its chat template
    clock.mark("data")
    runs = run_all(assistant_sets(ws, size, seed=seed), out / "runs", demo_size(size))
    for run_dir in runs.values():  # only --resume reads a checkpoint (the adapters and AdamW state)
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    clock.mark("train")
    models = score_all(runs, ws, size)
    comm = communication(runs["federated"])
    found = findings(models, comm)
    clock.mark("evaluate")
    s = sample(ws, runs)
    clock.mark("sample")
    summary: dict[str, Any] = {
        "models": models, "findings": found, "communication": comm, "quick": quick, "seed": seed,
        "model": SMOLLM2, "size": size.__dict__, "score_dtype": str(SCORE_DTYPE).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(), **clock.summary(), "run_seconds": run_seconds(runs), "sample": s}
    write_json(out / "summary.json", summary)
    print_table(models, found, comm)
    console.print(f"[bold]held-out question ({s['silo']}):[/] {s['question']}", highlight=False)
    console.print(f"  reference: {s['reference']}\n  base:      {s['base']}\n  federated: {s['federated']}",
                  highlight=False)
    console.print(f"assistant demo finished in {summary['seconds']:.0f} s ({summary['cpu_seconds']:.0f} CPU s, "
                  f"load average {summary['load_average']:.1f}) -> {out / 'summary.json'}; "
                  f"serve it: fedlm serve {out / 'runs' / 'federated'}")
    return summary


def run_seconds(runs: dict[str, Path]) -> dict[str, float]:
    """Each run's training seconds: the federated rounds' sum, the others' training loop."""
    out = {}
    for name, run_dir in runs.items():
        if name == "federated":
            rows = (run_dir / "rounds.jsonl").read_text().splitlines()
            out[name] = sum(float(json.loads(r)["seconds"]) for r in rows if r.strip())
        else:
            out[name] = float(json.loads((run_dir / "summary.json").read_text())["seconds"])
    return out


class _Clock:
    """Wall and CPU seconds (this process, all its threads) of the demo's phases: the machine may be shared."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.last = (self.t0, self.c0)
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[phase], self.cpu[phase] = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now

    def summary(self) -> dict[str, Any]:
        return {"seconds": time.perf_counter() - self.t0, "cpu_seconds": time.process_time() - self.c0,
                "phase_seconds": self.wall, "phase_cpu_seconds": self.cpu, "load_average": os.getloadavg()[0]}
