"""Evaluation: perplexity, bits per byte, next-token accuracy over a silo's whole validation split,
and on a chat silo the answers themselves.

Bits per byte divides the summed negative log-likelihood (in bits) by the UTF-8 bytes of the
predicted tokens, so models with different tokenizers compare on the same text.

    answer_metrics(model, WS / "silos" / "qa")   # {"answer_bits_per_byte", "exact_match", "n", ...}

On a chat silo's held-out conversations (its val split), `answer_metrics` scores the
assistant's tokens only, each conversation read from its start (answer bits per byte: the
answers' NLL in bits over their UTF-8 bytes; the end-of-turn token counts in the NLL, zero
bytes), and lets the model answer each last question greedily: exact match is the share of
answers equal to the reference after `normalise_answer` (case, whitespace, punctuation).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedlm.data.chatshards import ChatIndex
from fedlm.data.shards import iter_eval_windows, open_chat, open_split
from fedlm.data.tokenizer import eos_id, load_tokenizer, token_byte_lengths, tokenizer_hash
from fedlm.device import module_device
from fedlm.errors import UserError
from fedlm.model import KVCache, Transformer

MAX_EVAL_CONTEXT = 1024
"""Longest window `evaluate_silo` scores: a pretrained model's whole context (SmolLM2: 8192
tokens) would make each window's (T, V) logits gigabytes, and a silo's text is scored the same."""
MAX_LOGITS = 2**27
"""Logits a batch of windows may hold (512 MiB in fp32): fewer windows a batch for large vocabularies."""


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    *,
    seq_len: int,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Score every token of `tokens` (after the first of each window) with `model`."""
    was_training = model.training
    model.eval()
    device = module_device(model)  # the windows go where the model is; the sums come back as numbers
    byte_len = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
    nll = 0.0
    correct = 0
    count = 0
    n_bytes = 0
    done = 0
    for x, y in iter_eval_windows(tokens, seq_len=seq_len, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x).float()  # (B, T, V)
        mask = y >= 0  # windows shorter than seq_len are padded with -1 targets
        target = y.clamp(min=0)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(y)
        nll += float(loss[mask].sum())
        correct += int((logits.argmax(-1) == y)[mask].sum())
        count += int(mask.sum())
        n_bytes += int(byte_len[target][mask].sum())
        done += x.numel()
        if on_progress is not None:
            on_progress(min(done, len(tokens)), len(tokens))
    model.train(was_training)
    if count == 0:
        raise UserError("nothing to evaluate: the validation split has fewer than 2 tokens")
    return {
        "perplexity": math.exp(nll / count) if nll / count < 700 else math.inf,  # a diverged model: no overflow
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "token_accuracy": correct / count,
        "tokens": count,
    }


def check_silo_dir(silo_dir: Path) -> None:
    """UserError unless `silo_dir` is a silo, WS/silos/NAME, saying what the path is instead."""
    silo_dir = Path(silo_dir)
    guess = silo_dir.parent / "silos" / silo_dir.name
    hint = f"did you mean {guess}?" if guess.is_dir() else "give a silo, WS/silos/NAME"
    if not silo_dir.is_dir():
        raise UserError(f"{silo_dir}: no such directory, so not a silo; {hint}")
    if silo_dir.parent.name == "silos" and ((silo_dir / "meta.json").is_file() or (silo_dir / "docs.jsonl").is_file()):
        return  # a silo (open_split says so if it is not sharded yet)
    if (silo_dir / "silos").is_dir():
        names = sorted(p.name for p in (silo_dir / "silos").iterdir() if p.is_dir())
        raise UserError(f"{silo_dir}: a workspace, not a silo; give one of its silos, "
                        f"{silo_dir / 'silos' / (names[0] if names else 'NAME')} (silos: {', '.join(names) or 'none'})")
    raise UserError(f"{silo_dir}: not a silo (a silo is WS/silos/NAME, with meta.json once sharded); {hint}")


def evaluate_silo(
    model: Transformer,
    model_tokenizer: Path | None,
    silo_dir: Path,
    *,
    split: str = "val",
    batch_size: int = 8,
    max_tokens: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Evaluate on a silo's shards; the model's tokenizer must be the one the shards were made with.

    `max_tokens` > 0 scores only the split's first max_tokens targets (the same prefix for every
    model, so comparisons stay fair).
    """
    tok_path = _silo_tokenizer(silo_dir, model_tokenizer)
    tokens = open_split(silo_dir, split, expect_tokenizer_sha256=tokenizer_hash(tok_path))  # type: ignore[arg-type]
    if max_tokens > 0:
        tokens = tokens[: max_tokens + 1]
    token_bytes = token_byte_lengths(load_tokenizer(tok_path))
    seq_len, rows = eval_windows(model, batch_size)
    return evaluate_tokens(model, tokens, token_bytes, seq_len=seq_len, batch_size=rows,
                           on_progress=on_progress)


def eval_windows(model: Transformer, batch_size: int = 8) -> tuple[int, int]:
    """(window length, windows a batch) a split is scored in: the model's context up to
    MAX_EVAL_CONTEXT, and at most `batch_size` windows whose logits fit MAX_LOGITS."""
    seq_len = min(int(model.cfg.max_seq_len), MAX_EVAL_CONTEXT)
    return seq_len, max(1, min(batch_size, MAX_LOGITS // (seq_len * int(model.cfg.vocab_size))))


def _silo_tokenizer(silo_dir: Path, model_tokenizer: Path | None) -> Path:
    """The silo's workspace tokenizer, checked to be the model's (UserError if not)."""
    check_silo_dir(silo_dir)
    tok_path = Path(silo_dir).parent.parent / "tokenizer.json"
    if model_tokenizer is not None and tokenizer_hash(model_tokenizer) != tokenizer_hash(tok_path):
        raise UserError(
            f"{silo_dir}: its shards use {tok_path}, not the model's tokenizer ({model_tokenizer}); "
            "evaluate on a workspace sharded with the model's tokenizer"
        )
    return tok_path


# ---------------------------------------------------------------------------------------
# answers: a chat silo's held-out questions


MATCH_SLACK = 8
"""A greedy answer stops once its normalised text is this many characters longer than the
reference's: no continuation can match then. Appending text never shortens a normalised answer
(NFKC composes an appended mark into the character before it, one for two; punctuation and
whitespace are only dropped where they are), except that a character whose UTF-8 bytes are
split across tokens decodes as up to 3 replacement characters until its last byte comes."""


def normalise_answer(text: str) -> str:
    """An answer as exact match compares it: NFKC, case-folded, punctuation dropped, whitespace
    runs made one space."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def held_out_questions(tokens: np.ndarray, chat: ChatIndex) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per conversation of a split: (ids, mask, answer) where answer = the ids of its last
    assistant turn (end-of-turn token included) and ids[:len(ids) - len(answer)] its prompt."""
    out = []
    for a, b in zip(chat.starts[:-1].tolist(), chat.starts[1:].tolist(), strict=True):
        ids = np.asarray(tokens[a:b], dtype=np.int64)
        mask = np.asarray(chat.mask[a:b]).astype(bool)
        end = ids.size
        while end > 0 and not mask[end - 1]:
            end -= 1  # the EOS after the conversation (and any trailing untrained text)
        if end == 0:
            continue  # a text document, not a conversation
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        out.append((ids[:end], mask[:end], ids[start:end]))
    return out


@torch.no_grad()
def answer_nll(model: Transformer, convs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
               token_bytes: np.ndarray, *, batch_size: int = 8) -> tuple[float, int]:
    """(NLL in nats, UTF-8 bytes) of the assistant tokens of `convs`, each read from its start
    (right-padded batches: a causal model's earlier positions never see the padding)."""
    ctx = int(model.cfg.max_seq_len)
    nll, n_bytes = 0.0, 0
    for i in range(0, len(convs), batch_size):
        rows = [(ids[:ctx], mask[:ctx]) for ids, mask, _ in convs[i:i + batch_size]]
        T = max(ids.size for ids, _ in rows)
        x = torch.zeros((len(rows), T), dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for r, (ids, mask) in enumerate(rows):
            x[r, :ids.size] = torch.from_numpy(ids)
            target = torch.from_numpy(ids[1:])
            y[r, :ids.size - 1] = torch.where(torch.from_numpy(mask[1:]), target, torch.full_like(target, -100))
        device = model.tok_emb.weight.device
        logits = model(x.to(device)).float()  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum")  # -100 skipped
        nll += float(loss)
        n_bytes += int(token_bytes[y[y >= 0].numpy()].sum())
    return nll, n_bytes


@torch.no_grad()
def greedy_answers(model: Transformer, prompts: list[np.ndarray], *, max_new_tokens: int,
                   stop_ids: set[int], batch_size: int = 8, give_up: GiveUp | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt until a stop id (not included), max_new_tokens or
    `give_up`, batched: prompts left-padded, one prefill, then one forward per new token, all
    through the model's forward and KV cache (rows decode as each would alone)."""
    device = model.tok_emb.weight.device
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i:i + batch_size]
        T = max(p.size for p in group)
        idx = torch.zeros((len(group), T), dtype=torch.long, device=device)
        real = torch.zeros((len(group), T), dtype=torch.bool, device=device)
        for r, p in enumerate(group):
            idx[r, T - p.size:] = torch.from_numpy(p)
            real[r, T - p.size:] = True
        cache = KVCache.for_model(model, batch_size=len(group), max_len=T + max_new_tokens)
        logits = model(idx, cache=cache, pad_mask=real, last_only=True)[:, -1]  # (B, V)
        out += _decode(model, cache, logits, max_new_tokens=max_new_tokens, stop_ids=stop_ids, give_up=give_up,
                       first_row=i)
    return out


GiveUp = Callable[[int, list[int]], bool]
"""give_up(row, tokens so far): whether row `row` (of all prompts) may stop before a stop id."""


def _decode(model: Transformer, cache: KVCache, logits: torch.Tensor, *, max_new_tokens: int,
            stop_ids: set[int], give_up: GiveUp | None = None, first_row: int = 0) -> list[list[int]]:
    """Greedy tokens of each row of `cache`, the first chosen from `logits` (B, V), until a stop id
    (not included), max_new_tokens, or `give_up(first_row + r, tokens)`."""
    answers: list[list[int]] = [[] for _ in range(logits.shape[0])]
    done = [False] * logits.shape[0]
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                if t in stop_ids:
                    done[r] = True
                else:
                    answers[r].append(t)
                    done[r] = give_up is not None and give_up(first_row + r, answers[r])
        if all(done) or step + 1 == max_new_tokens:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return answers


@torch.no_grad()
def score_answers(model: Transformer, convs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  token_bytes: np.ndarray, *, max_new_tokens: int, stop_ids: set[int], batch_size: int = 8,
                  give_up: GiveUp | None = None) -> tuple[float, int, list[list[int]]]:
    """`answer_nll` and `greedy_answers` of the last answers' prompts in one prefill per batch:
    each conversation is read whole (right-padded, into a KV cache), its assistant tokens scored
    from those logits; then each row's cache is cut back to its prompt, and the greedy answer
    starts from the logits at the prompt's last token. Conversations that do not fit the context
    with max_new_tokens after their prompt take the two passes."""
    ctx = int(model.cfg.max_seq_len)
    if any(max(ids.size, ids.size - ans.size + max_new_tokens) > ctx for ids, _, ans in convs):
        nll, n_bytes = answer_nll(model, convs, token_bytes, batch_size=batch_size)
        prompts = [ids[:ids.size - ans.size][-(ctx - max_new_tokens):] for ids, _, ans in convs]
        return nll, n_bytes, greedy_answers(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                            batch_size=batch_size, give_up=give_up)
    device = model.tok_emb.weight.device
    nll, n_bytes, out = 0.0, 0, []
    for i in range(0, len(convs), batch_size):
        group = convs[i:i + batch_size]
        T = max(ids.size for ids, _, _ in group)
        x = torch.zeros((len(group), T), dtype=torch.long)
        y = torch.full((len(group), T), -100, dtype=torch.long)
        real = torch.zeros((len(group), T), dtype=torch.bool)
        for r, (ids, mask, _) in enumerate(group):
            x[r, :ids.size], real[r, :ids.size] = torch.from_numpy(ids), True
            target = torch.from_numpy(ids[1:])
            y[r, :ids.size - 1] = torch.where(torch.from_numpy(mask[1:]), target, torch.full_like(target, -100))
        prompt_len = torch.tensor([ids.size - ans.size for ids, _, ans in group], device=device)
        cache = KVCache.for_model(model, batch_size=len(group),
                                  max_len=max(T, int(prompt_len.max()) + max_new_tokens))
        logits = model(x.to(device), cache=cache, pad_mask=real.to(device)).float()  # (B, T, V)
        nll += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        n_bytes += int(token_bytes[y[y >= 0].numpy()].sum())
        first = logits[torch.arange(len(group), device=device), prompt_len - 1]  # (B, V): the answer's first token
        cache.valid &= torch.arange(cache.max_len, device=device)[None, :] < prompt_len[:, None]  # back to the prompts
        cache.pos.copy_(prompt_len)
        out += _decode(model, cache, first, max_new_tokens=max_new_tokens, stop_ids=stop_ids, give_up=give_up,
                       first_row=i)
    return nll, n_bytes, out


def answer_metrics(
    model: Transformer,
    silo_dir: Path,
    *,
    model_tokenizer: Path | None = None,
    split: str = "val",
    max_questions: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    details: bool = False,
) -> dict[str, Any]:
    """Answer bits/byte and greedy exact match over a chat silo's held-out conversations.

    Returns {"answer_bits_per_byte", "exact_match", "n" (questions), "answer_bytes"}, and with
    `details` "answers": per question {"prompt" (as the model read it, special tokens shown),
    "reference", "answer", "match"}. `max_questions` > 0 takes the split's first that many (the
    same for every model). UserError when the silo holds no conversations."""
    tok_path = _silo_tokenizer(silo_dir, model_tokenizer)
    tokens = open_split(silo_dir, split, expect_tokenizer_sha256=tokenizer_hash(tok_path))  # type: ignore[arg-type]
    chat = open_chat(silo_dir, split)  # type: ignore[arg-type]
    if chat is None:
        raise UserError(f"{silo_dir}: not a chat silo (its shards hold no conversations); answer metrics "
                        "need instruction data: `fedlm data prepare` a messages/prompt-response/Alpaca file")
    convs = held_out_questions(tokens, chat)
    if max_questions > 0:
        convs = convs[:max_questions]
    if not convs:
        raise UserError(f"{silo_dir}: the {split} split holds no conversation; re-shard with a larger --val-fraction")
    tok = load_tokenizer(tok_path)
    token_bytes = token_byte_lengths(tok)
    was_training = model.training
    model.eval()
    special = set(tok.get_added_tokens_decoder())
    stop = {eos_id(tok)} | {int(ans[-1]) for _, _, ans in convs if int(ans[-1]) in special}  # end of text, of turn
    references = [tok.decode(ans.tolist(), skip_special_tokens=True) for _, _, ans in convs]
    longest = [len(normalise_answer(r)) + MATCH_SLACK for r in references]

    def cannot_match(row: int, tokens: list[int]) -> bool:
        return len(normalise_answer(tok.decode(tokens, skip_special_tokens=True))) > longest[row]

    nll, n_bytes, got = score_answers(model, convs, token_bytes, max_new_tokens=max_new_tokens, stop_ids=stop,
                                      batch_size=batch_size, give_up=cannot_match)
    ctx = int(model.cfg.max_seq_len)
    prompts = [ids[:ids.size - ans.size][-(ctx - max_new_tokens):] for ids, _, ans in convs]
    model.train(was_training)
    rows: list[dict[str, Any]] = []
    for row, (g, prompt, reference) in enumerate(zip(got, prompts, references, strict=True)):
        answer = tok.decode(g, skip_special_tokens=True)
        rows.append({"prompt": tok.decode(prompt.tolist(), skip_special_tokens=False), "reference": reference,
                     "answer": answer + (" …" if cannot_match(row, g) else ""),  # stopped: it could not match
                     "match": normalise_answer(answer) == normalise_answer(reference)})
    out: dict[str, Any] = {"answer_bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
                           "exact_match": sum(bool(r["match"]) for r in rows) / len(rows), "n": len(rows),
                           "answer_bytes": n_bytes}
    if details:
        out["answers"] = rows
    return out


def paired_exact_test(a: list[bool], b: list[bool]) -> dict[str, float]:
    """Do two models' exact matches on the same questions differ by more than chance? McNemar's exact
    test: only the questions exactly one model got right tell them apart (`a_only`, `b_only`); were
    the models equally good, each such question would be either's with probability 1/2, so `p` is
    the two-sided binomial tail of the smaller count. {"a_only", "b_only", "p"}."""
    if len(a) != len(b):
        raise ValueError(f"paired test of {len(a)} against {len(b)} answers: score both on the same questions")
    a_only = sum(x and not y for x, y in zip(a, b, strict=True))
    b_only = sum(y and not x for x, y in zip(a, b, strict=True))
    n = a_only + b_only
    # a binomial tail is a short exact sum (math.comb), not worth adding scipy for
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return {"a_only": float(a_only), "b_only": float(b_only), "p": min(1.0, 2 * tail)}
