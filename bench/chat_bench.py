"""Instruction data (issue 16 items 1 and 3): what conversations cost beside raw text, and the scrubber's
held-out Maestro cards.

    python -m bench.chat_bench            # or: python -m bench.run --only chat

Measures, each against its reference in the same call, on SmolLM2-135M-Instruct's tokenizer and
chat template (the model is loaded once to install them):

- prepare: CPU seconds for N question-answer records read as conversations vs the same words
  as plain text documents;
- shard: CPU seconds to render + tokenise the conversations in the model's template with the
  loss mask vs tokenising the same words as raw text;
- training: a tiny model's train_step on answer-masked chat windows vs unmasked windows of the
  same shape (the mask's overhead in the loss);
- evaluation: SmolLM2's batched greedy answers (`answer_metrics`) vs `fedlm.generate` row by
  row (the same tokens, checked);
- PII: planted held-out Maestro cards that leak, and wrong-check-digit lookalikes caught.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

N_RECORDS = 2000
QUESTIONS = ["Which play is the line '{}' from?", "Name the code for '{}'.", "Who wrote '{}'?"]


def _records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    out = []
    for i in range(n):
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16))) + f" {i}"
        out.append({"messages": [{"role": "system", "content": "Answer in a few words."},
                                 {"role": "user", "content": rng.choice(QUESTIONS).format(phrase)},
                                 {"role": "assistant", "content": f"Answer {i % 97}"}]})
    return out


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def _pipeline(tmp: Path, n: int) -> dict[str, Any]:
    from fedlm.data.chat import flat_text
    from fedlm.data.prepare import prepare_silo
    from fedlm.data.shards import shard_silo
    from fedlm.pretrained import write_model_tokenizer

    records = _records(n)
    chat_src, text_src = tmp / "qa.jsonl", tmp / "text.jsonl"
    chat_src.write_text("".join(json.dumps(r) + "\n" for r in records))
    text_src.write_text("".join(json.dumps({"text": flat_text(r["messages"])}) + "\n" for r in records))
    ws = tmp / "ws"
    write_model_tokenizer(ws, "smollm2")
    prep_chat, _ = _cpu(lambda: prepare_silo([chat_src], silo="qa", workspace=ws))
    prep_text, _ = _cpu(lambda: prepare_silo([text_src], silo="text", workspace=ws))
    shard_text, _ = _cpu(lambda: shard_silo(ws, "text", engine="tokenizers"))
    shard_chat, meta = _cpu(lambda: shard_silo(ws, "qa"))
    return {"records": n, "prepare_chat_cpu_s": prep_chat, "prepare_text_cpu_s": prep_text,
            "prepare_ratio": prep_chat / prep_text, "shard_chat_cpu_s": shard_chat, "shard_text_cpu_s": shard_text,
            "shard_ratio": shard_chat / shard_text, "conversations_per_cpu_s": n / shard_chat,
            "answer_tokens": meta["chat"]["answer_tokens"], "workspace": ws}


def _train_overhead(ws: Path, repeats: int) -> dict[str, float]:
    from fedlm.config import ModelConfig, TrainConfig
    from fedlm.data.shards import open_chat, open_split
    from fedlm.model import Transformer
    from fedlm.train import SiloBatches, make_optimizer, train_step

    silo = ws / "silos" / "qa"
    tokens = open_split(silo, "train")
    chat = open_chat(silo, "train")
    vocab = int(tokens.max()) + 1
    model = Transformer(ModelConfig(preset="custom", d_model=128, n_layers=2, n_heads=4, n_kv_heads=4,
                                    d_ff=352, vocab_size=max(vocab, 49152), max_seq_len=128), seed=0)
    tc = TrainConfig(batch_size=8, seq_len=128, precision="fp32")
    opt = make_optimizer(model, tc)
    masked = SiloBatches([tokens], torch.ones(1), torch.Generator().manual_seed(0), [chat], ["qa"])
    plain = SiloBatches([tokens], torch.ones(1), torch.Generator().manual_seed(0), [None], ["qa"])
    times: dict[str, list[float]] = {"masked": [], "plain": []}
    for _ in range(repeats):  # interleaved, so both sides see the same load
        for name, data in (("masked", masked), ("plain", plain)):
            t0 = time.process_time()
            train_step(model, opt, lambda d=data: d.next(8, 128), lr=1e-3, grad_accum=1, grad_clip=1.0,
                       precision="fp32")
            times[name].append(time.process_time() - t0)
    m, p = float(np.median(times["masked"])), float(np.median(times["plain"]))
    return {"masked_step_cpu_s": m, "plain_step_cpu_s": p, "ratio": m / p}


def _eval_speed(ws: Path, questions: int) -> dict[str, Any]:
    from fedlm.data.shards import open_chat, open_split
    from fedlm.evaluate import answer_metrics, greedy_answers, held_out_questions
    from fedlm.generate import generate
    from fedlm.pretrained import load_pretrained

    silo = ws / "silos" / "qa"
    model, _ = load_pretrained("smollm2", share_frozen=True)  # loaded once already, by the tokenizer step
    model.eval()
    whole, got = _cpu(lambda: answer_metrics(model, silo, max_questions=questions, max_new_tokens=12))
    convs = held_out_questions(open_split(silo, "val"), open_chat(silo, "val"))[:questions]  # type: ignore[arg-type]
    prompts = [ids[: ids.size - ans.size] for ids, _, ans in convs]
    end = int(convs[0][2][-1])
    batched, answers = _cpu(lambda: greedy_answers(model, prompts, max_new_tokens=12, stop_ids={0, end}))

    def rows() -> list[list[int]]:
        out = []
        for p in prompts:
            row = []
            for t in generate(model, p.tolist(), max_new_tokens=12, temperature=0.0, eos_id=0):
                if t == end:
                    break
                row.append(t)
            out.append(row)
        return out

    single, reference = _cpu(rows)
    return {"model": "SmolLM2-135M-Instruct", "questions": got["n"], "answer_metrics_cpu_s": whole,
            "greedy_batched_cpu_s": batched, "greedy_row_by_row_cpu_s": single, "speedup": single / batched,
            "same_answers": answers == reference, "exact_match_base": got["exact_match"],
            "answer_bits_per_byte_base": got["answer_bits_per_byte"]}


def _maestro(n: int) -> dict[str, int]:
    from fedlm.data.pii import luhn_ok, scrub

    rng = random.Random(4242)
    leaked = wrong_caught = 0
    for i in range(n):
        length = 12 + i % 8
        body = rng.choice(["50", *map(str, range(56, 70))]) + "".join(rng.choice("0123456789") for _ in range(length - 3))
        card = next(body + d for d in "0123456789" if luhn_ok(body + d))
        shown = card if i % 2 else " ".join(card[j:j + 4] for j in range(0, len(card), 4))
        leaked += scrub(f"Paid with {shown} yesterday.")[1]["CARD"] != 1
        wrong = shown[:-1] + str((int(shown[-1]) + 1) % 10)
        wrong_caught += scrub(f"Paid with {wrong} yesterday.")[1]["CARD"] != 0
    return {"planted": n, "leaked": leaked, "wrong_check_digit_caught": wrong_caught}


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedlm-bench-chat-") as tmp:
        pipe = _pipeline(Path(tmp), 500 if quick else N_RECORDS)
        ws = pipe.pop("workspace")
        train = _train_overhead(ws, 5 if quick else 15)
        evals = _eval_speed(ws, 16 if quick else 32)
    return {"pipeline": pipe, "train": train, "eval": evals, "maestro": _maestro(400 if quick else 2000)}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1, default=str))
