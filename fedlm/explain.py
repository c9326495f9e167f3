"""A model's predictions made visible: surprisal, attention, attributions, logit lens, provenance.

    result = explain("runs/fed", "The patient was given")          # a dict of the keys below
    result = explain(model, text, tokenizer=Path("tok.json"))      # a loaded Transformer
    fragment = html_fragment(result)                               # for a page of one's own
    page = html_page(result)                                       # `fedlm explain --html OUT`

MODEL is what the CLI takes: a run directory, a fedlm model directory or a Hugging Face Llama
export of one (`fedlm export`), loaded by `fedlm.pretrained.load_model`. TEXT is read as a
document: after one "<|endoftext|>", as every document but a split's first follows one in the
shards, so every token of TEXT gets a prediction and bits/byte is over TEXT's own bytes.

The result's keys:
- `tokens` (T strings, the leading "<|endoftext|>" first), `token_ids`;
- `surprisal_bits`: T - 1 floats, -log2 p(tokens[i+1] | tokens[:i+1]); `alternatives`: per
  predicted token the model's top 5 ({"token", "id", "prob"}); `total_bits`, `bytes`,
  `bits_per_byte` (the quantities `fedlm eval` sums over a split);
- `attention`: layers × heads × T × T probabilities, row = query, causal, rows sum to 1;
- `attributions`: integrated gradients (captum's `LayerIntegratedGradients` over the input
  embeddings, from TEXT blanked to spaces, `baseline_id`) of f = log2 p(`target` after TEXT):
  `target`, `target_id`, `scores` (T, one per input token, bits), `f_x`, `f_baseline`,
  `completeness_error` = |Σ scores − (f_x − f_baseline)| / |f_x − f_baseline|, `steps` (the
  path points: `IG_STEPS` midpoints, refined while that error is over 1%) and `method`
  ("riemann_middle", or "trapezoid" once refined, or "segmented" where that missed);
- `logit_lens`: per layer {"layer", "tokens", "ids", "probs"}, the top prediction at each
  position read through the final norm and head after that layer (the last is the output);
- `provenance` (silo → bits/byte of TEXT) and `provenance_models` ("personalised" or
  "local-only") when MODEL is a federated run with personalised models, or a demo output's
  federated run beside its local-only baselines.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlm.data.tokenizer import (
    CHAR_TO_BYTE,
    END_TOKENS,
    eos_id,
    load_tokenizer,
    token_byte_lengths,
)
from fedlm.errors import UserError
from fedlm.model import Transformer
from fedlm.modelio import find_model_dir
from fedlm.pretrained import load_model

TOP_K = 5
IG_STEPS = 32
"""Integrated gradients' first step count: points of captum's midpoint rule along the path."""
IG_MAX_STEPS = 513
COMPLETENESS = 0.01
"""The rule refines until the attributions add up to f(x) − f(baseline) within this fraction."""
IG_TOKENS_PER_PASS = 2048
"""Path points × tokens per forward and backward pass of the attributions: bounds their memory,
and passes this small ran faster on CPU than one pass over every point (their activations stay
in cache)."""
LN2 = math.log(2.0)


def explain(
    model: str | Path | Transformer,
    text: str,
    target: str | None = None,
    *,
    tokenizer: Path | None = None,
    steps: int = IG_STEPS,
) -> dict[str, Any]:
    """Everything `fedlm explain` shows about `model` reading `text` (keys in the module docstring).

    `model`: a path as the CLI takes it (run, model directory or HF export), or a loaded
    `Transformer` with `tokenizer` (its tokenizer.json); provenance needs a path.
    `target`: the token whose prediction after `text` is attributed (text that encodes to one
    token, e.g. " the"); default: the model's most likely next token.
    """
    net, tok_path, run_dir = _load(model, tokenizer)
    tok = load_tokenizer(tok_path)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in TEXT is text, as in the shards
    ids = _encode(tok, text, context=net.cfg.max_seq_len)
    target_id = None if target is None else _target_id(tok, target)
    was_training = net.training
    net.eval()
    try:
        views, next_id = _forward_views(net, tok, ids)
        target_id = next_id if target_id is None else target_id
        attributed = attributions(net, ids, target_id, blank_id=_blank_id(tok), steps=steps)
    finally:
        net.train(was_training)
    result: dict[str, Any] = {"model": "model" if isinstance(model, Transformer) else str(model), "text": text,
                              "token_ids": ids, "tokens": [_token_text(tok, i) for i in ids], **views,
                              "attributions": attributed | {"target": _token_text(tok, target_id)}}
    if run_dir is not None:
        result |= provenance(run_dir, text)
    return result


def _load(model: str | Path | Transformer, tokenizer: Path | None) -> tuple[Transformer, Path, Path | None]:
    """The model, its tokenizer.json and its run directory (None: not inside a run)."""
    if isinstance(model, Transformer):
        if tokenizer is None:
            raise UserError("explain: a loaded model needs tokenizer=PATH (its tokenizer.json)")
        return model, tokenizer, None
    model_dir = find_model_dir(Path(model))
    net, found = load_model(model_dir)
    tok_path = tokenizer or found
    if tok_path is None:
        raise UserError(f"{model_dir}: no tokenizer.json beside the model; explain needs it")
    return net, tok_path, model_dir.parent if model_dir.name == "model" else None


def _encode(tok: Any, text: str, *, context: int) -> list[int]:
    """[EOS] + TEXT's ids; UserError for an empty text or one longer than the model's context."""
    if not text.strip():
        raise UserError("TEXT is empty; give the text to explain, e.g. fedlm explain RUN \"The patient was\"")
    ids = [eos_id(tok), *tok.encode(text, add_special_tokens=False).ids]
    if len(ids) > context:
        raise UserError(f"TEXT is {len(ids) - 1} tokens, and with the leading end-of-text token that is more than the "
                        f"model's context of {context} tokens; shorten it to at most {context - 1} tokens")
    return ids


def _blank_id(tok: Any) -> int:
    """The token of one space, the attributions' baseline (every byte-level vocabulary has it)."""
    got = tok.encode(" ", add_special_tokens=False).ids
    if len(got) != 1:
        raise UserError("the model's tokenizer has no single token for a space, which the attributions' "
                        "baseline needs; it is not a byte-level BPE tokenizer")
    return int(got[0])


def _target_id(tok: Any, target: str) -> int:
    """The one token `target` encodes to; UserError naming what it encodes to otherwise."""
    got = tok.encode(target, add_special_tokens=False).ids
    if len(got) != 1:
        pieces = " + ".join(repr(_token_text(tok, i)) for i in got) or "nothing"
        raise UserError(f"--target {target!r} is {len(got)} tokens ({pieces}), not one; give one token "
                        "of the model's vocabulary (mind the leading space, e.g. ' the')")
    return int(got[0])


def _token_text(tok: Any, idx: int) -> str:
    """A token as the text it stands for; one that is part of a character as its bytes, ⟨e4 b8⟩."""
    piece = tok.id_to_token(idx)
    if piece is None or any(c not in CHAR_TO_BYTE for c in piece) or piece in END_TOKENS:
        return str(piece)  # a special token, or a tokenizer that is not byte-level
    raw = bytes(CHAR_TO_BYTE[c] for c in piece)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"⟨{raw.hex(' ')}⟩"


@torch.no_grad()
def _forward_views(net: Transformer, tok: Any, ids: list[int]) -> tuple[dict[str, Any], int]:
    """Surprisal, alternatives, attention and the logit lens from one forward through the model, and
    the model's most likely token after the text."""
    idx = torch.tensor([ids])
    hidden: list[Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _a, out: hidden.append(out)) for block in net.layers]
    attention: list[Tensor] = []
    try:
        logits = net(idx, attention=attention)[0].float()  # (T, V)
    finally:
        for h in hooks:
            h.remove()
    logp = torch.log_softmax(logits, dim=-1)  # (T, V)
    bits = -logp[:-1].gather(1, idx[0, 1:, None])[:, 0] / LN2  # (T-1,)
    top = logp[:-1].topk(TOP_K, dim=-1)
    n_bytes = int(token_byte_lengths(tok)[ids[1:]].sum())
    total = float(bits.double().sum())
    probs = torch.stack(attention)[:, 0].double().numpy()  # (L, H, T, T)
    views = {
        "surprisal_bits": bits.tolist(),
        "alternatives": [[{"token": _token_text(tok, int(i)), "id": int(i), "prob": float(math.exp(v))}
                          for v, i in zip(vs.tolist(), js.tolist(), strict=True)]
                         for vs, js in zip(top.values, top.indices, strict=True)],
        "total_bits": total,
        "bytes": n_bytes,
        "bits_per_byte": total / max(n_bytes, 1),
        "attention": np.round(probs, 7).tolist(),
        "logit_lens": _lens(net, tok, hidden),
    }
    return views, int(logits[-1].argmax())


def _lens(net: Transformer, tok: Any, hidden: list[Tensor]) -> list[dict[str, Any]]:
    """After each layer, the top next-token prediction at each position through the final norm and head."""
    out = []
    for layer, h in enumerate(hidden, start=1):
        p = torch.softmax(net.lm_head(net.norm(h))[0].float(), dim=-1)  # (T, V)
        prob, top = p.max(dim=-1)
        out.append({"layer": layer, "ids": top.tolist(), "probs": prob.tolist(),
                    "tokens": [_token_text(tok, int(i)) for i in top]})
    return out


def target_log2_prob(logits: Tensor, target_id: int) -> Tensor:
    """f for the attributions: log2 p(target) at the last position, one per row of logits (B, T, V)."""
    return torch.log_softmax(logits[:, -1].float(), dim=-1)[:, target_id] / LN2


def attributions(net: Transformer, ids: list[int], target_id: int, *, blank_id: int, steps: int = IG_STEPS,
                 max_steps: int = IG_MAX_STEPS, tolerance: float = COMPLETENESS) -> dict[str, Any]:
    """Integrated gradients of log2 p(target | ids) over the input embeddings, per input token.

    The baseline is the text blanked: the leading "<|endoftext|>" kept (so its score is 0) and
    every other token the space `blank_id`. Not "<|endoftext|>" throughout: a trained model
    treats that token as a document boundary, and its output then turns abruptly part way
    along the path from baseline to text, where a quadrature of affordable steps misses it
    (on the demo's model the scores' sum then missed f(x) − f(baseline) by more than the gap).

    The quadrature is captum's midpoint rule on `steps` points (`method` "riemann_middle"). Even
    from spaces f tends to turn over a short stretch of the path, wherever enough of the text
    has faded in: evenly spaced points resolve that stretch with fewer gradients than
    Gauss-Legendre (captum's default), whose points crowd at the ends. While the scores miss
    f(x) − f(baseline) by more than `tolerance` of it, the rule refines to the trapezoid rule
    on twice the intervals (`method` "trapezoid"), which reuses every gradient already taken:
    the trapezoid rule on n intervals averaged with the midpoint rule on the same n intervals
    is the trapezoid rule on 2n. So n midpoints, then n + 1 ends, then 2n midpoints, ...,
    until `max_steps` points (`_refine`; it stops early once even first-order convergence would still
    miss there); where that misses, the path is cut where f changes (`_segmented`).
    `steps` in the result counts the points the scores come from.
    """
    from captum.attr import LayerIntegratedGradients  # imports matplotlib: only when explaining

    idx = torch.tensor([ids])
    base = torch.tensor([ids[:1] + [blank_id] * (len(ids) - 1)])

    def f(x: Tensor) -> Tensor:
        return target_log2_prob(net(x, last_only=True), target_id)

    with torch.no_grad():
        f_x, f_b = float(f(idx)[0]), float(f(base)[0])
    gap = max(abs(f_x - f_b), 1e-12)
    lig = LayerIntegratedGradients(f, net.tok_emb)
    per_pass = max(1, IG_TOKENS_PER_PASS // len(ids))

    def rule(method: str, n: int) -> Tensor:
        """Each token's score (T,) under one of captum's rules on n points, in float64."""
        attr = lig.attribute(idx, baselines=base, n_steps=n, method=method, internal_batch_size=per_pass)
        return attr[0].sum(-1).detach().double()  # each token's embedding, summed over its C dims

    def error(s: Tensor) -> float:
        return abs(float(s.sum()) - (f_x - f_b)) / gap

    can_cut = max_steps >= IG_SEGMENTS * 2
    scores, method, points = _refine(rule, error, steps, max_steps, tolerance, hopeless=can_cut)
    if error(scores) > tolerance and can_cut:
        cut, cut_points = _segmented(net, idx, base, f, error, max_steps=max_steps, per_pass=per_pass,
                                     tolerance=tolerance)
        if error(cut) < error(scores):
            scores, method, points = cut, "segmented", cut_points
    return {
        "target_id": int(target_id),
        "scores": scores.tolist(),
        "f_x": f_x,
        "f_baseline": f_b,
        "completeness_error": error(scores),
        "steps": points,
        "method": method,
        "baseline_id": blank_id,
    }


def _refine(rule: Callable[[str, int], Tensor], error: Callable[[Tensor], float], n: int, max_points: int,
            tolerance: float, *, hopeless: bool = False) -> tuple[Tensor, str, int]:
    """(scores, method, points): `rule`'s midpoints on n intervals, then, while they miss by more than
    `tolerance`, the trapezoid rule on twice the intervals, reusing every gradient taken (n midpoints,
    n + 1 ends, 2n midpoints, ...) while its points fit `max_points`. `hopeless`: stop early once even
    first-order convergence from here would still miss at `max_points` (f turns too sharply for these
    rules: the caller then cuts the path)."""
    scores, method, points = rule("riemann_middle", n), "riemann_middle", n
    if error(scores) > tolerance and 2 * n + 1 <= max_points:
        # captum's riemann_trapezoid weighs its n + 1 points 1/(n + 1) (the ends half that), which
        # sums to n/(n + 1): the trapezoid rule proper (weights 1/n) is (n + 1)/n times it
        ends = rule("riemann_trapezoid", n + 1) * ((n + 1) / n)
        scores, method, points, n = (ends + scores) / 2, "trapezoid", 2 * n + 1, 2 * n
        while error(scores) > tolerance and 2 * n + 1 <= max_points:
            if hopeless and error(scores) * points / max_points > tolerance:
                break
            scores, points, n = (scores + rule("riemann_middle", n)) / 2, 2 * n + 1, 2 * n
    return scores, method, points


IG_SEGMENTS = 32
"""Segments of the path when no even rule met the tolerance (`_segmented`)."""
IG_PROBES = 1025
"""Points where `_segmented` reads f along the path (forward passes only) to place its segments."""
SEGMENTED_POINTS = 4
"""`_segmented` refines up to this many times max_steps gradient points. On the model in its docstring,
32 segments of 16 midpoints missed the gap by 1.0%, of 64 by 0.07%; 64 segments of 64 by 0.02%."""
SEGMENT_STEPS = 8
"""Midpoints per segment that `_segmented` starts from (then the trapezoid rule on 16, 32, ... intervals)."""


def _segmented(net: Transformer, idx: Tensor, base: Tensor, f: Callable[[Tensor], Tensor],
               error: Callable[[Tensor], float], *, max_steps: int, per_pass: int, tolerance: float
               ) -> tuple[Tensor, int]:
    """(scores, points): integrated gradients with the path cut into IG_SEGMENTS pieces of equal change in f,
    each integrated by captum, all refined together (`_refine`: SEGMENT_STEPS midpoints each, then the
    trapezoid rule on twice as many intervals, ...) until the scores add up within `tolerance`, or up to
    SEGMENTED_POINTS × max_steps points; the pieces' attributions add up to the whole path's.

    For when f turns too sharply for an even rule of `points`: on one quick demo's model, f rose 3.5 of
    its 5.2 bits over 0.2% of the path, between the 513 points' spacing, and their scores missed
    f(x) - f(baseline) by 47% (these segments: 0.07%). f is read at IG_PROBES even points (forward passes, no gradients); the
    cuts go where its change, plus an even share of the gap, crosses each k / IG_SEGMENTS of the total."""
    from captum.attr import IntegratedGradients

    with torch.no_grad():
        ex, eb = net.tok_emb(idx), net.tok_emb(base)
    held: dict[str, Tensor] = {}
    hook = net.tok_emb.register_forward_hook(lambda _m, _i, _o: held["e"])

    def g(emb: Tensor) -> Tensor:  # f with the token embeddings given
        held["e"] = emb
        return f(idx.expand(emb.shape[0], -1))

    try:
        probes = torch.linspace(0, 1, IG_PROBES, dtype=torch.float64)
        with torch.no_grad():
            fs = torch.cat([g(eb + a.float()[:, None, None] * (ex - eb)) for a in probes.split(per_pass)]).double()
        change = (fs.diff().abs() + (fs[-1] - fs[0]).abs() / (IG_PROBES - 1)).clamp(min=1e-12)
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), change.cumsum(0)]) / change.sum()
        marks = torch.linspace(0, 1, IG_SEGMENTS + 1, dtype=torch.float64)[1:-1]
        at = torch.searchsorted(cum, marks).clamp(1, IG_PROBES - 1)  # cum[at - 1] < mark <= cum[at]
        frac = (marks - cum[at - 1]) / (cum[at] - cum[at - 1])
        cuts = [0.0, *((probes[at - 1] + frac * (probes[at] - probes[at - 1])).tolist()), 1.0]
        pieces = [(lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False) if hi > lo]
        ig = IntegratedGradients(g)

        def rule(method: str, n: int) -> Tensor:  # one rule on every piece, summed
            total = torch.zeros(idx.shape[1], dtype=torch.float64)
            for lo, hi in pieces:
                attr = ig.attribute(eb + hi * (ex - eb), baselines=eb + lo * (ex - eb), n_steps=n, method=method,
                                    internal_batch_size=per_pass)
                total += attr[0].sum(-1).detach().double()
            return total

        most = SEGMENTED_POINTS * max_steps // IG_SEGMENTS + 1
        scores, _, points = _refine(rule, error, SEGMENT_STEPS, most, tolerance)
        return scores, points * len(pieces)
    finally:
        hook.remove()


def text_bits_per_byte(net: Transformer, tok_path: Path, text: str) -> float:
    """Bits per byte of TEXT (read as a document, after "<|endoftext|>") under one model."""
    tok = load_tokenizer(tok_path)
    tok.encode_special_tokens = True
    ids = _encode(tok, text, context=net.cfg.max_seq_len)
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.tensor([ids]))[0].float(), dim=-1)
    bits = float(-logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).double().sum()) / LN2
    return bits / max(int(token_byte_lengths(tok)[ids[1:]].sum()), 1)


def provenance_models(run_dir: Path) -> tuple[str, dict[str, Path]]:
    """The per-silo models a federated run's provenance reads: its personalised models, else a
    demo output's local-only baselines beside it; ("", {}) when there are none."""
    if not (run_dir / "rounds.jsonl").is_file():
        return "", {}
    personal = {d.name.removeprefix("personalised-"): d for d in sorted(run_dir.glob("personalised-*"))
                if (d / "model").is_dir()}
    if personal:
        return "personalised", personal
    if (run_dir.parent.parent / "summary.json").is_file():  # demo-out/runs/federated
        local = {d.name.removeprefix("local-"): d for d in sorted(run_dir.parent.glob("local-*"))
                 if (d / "model").is_dir()}
        if local:
            return "local-only", local
    return "", {}


def provenance(run_dir: Path, text: str) -> dict[str, Any]:
    """Which silo's text TEXT looks like: its bits/byte under each silo's own model (lower: closer)."""
    kind, models = provenance_models(run_dir)
    if not models:
        return {}
    bpb = {}
    for silo, d in models.items():
        net, tok_path = load_model(d)
        if tok_path is None:
            continue
        bpb[silo] = text_bits_per_byte(net, tok_path, text)
    return {"provenance": bpb, "provenance_models": kind}


# ---------------------------------------------------------------------------------------
# HTML: one fragment with no script, no network (inline CSS, SVG, PNG data URIs)

_CSS = """
.fx{font:14px/1.5 system-ui,sans-serif;color:#222;max-width:62rem}
.fx h3{margin:.2em 0}.fx h4{margin:1.2em 0 .3em}
.fx .tx{white-space:pre-wrap;font-family:ui-monospace,monospace;line-height:1.9;word-break:break-word}
.fx .tx span{border-radius:2px;padding:1px 0}
.fx .eot{color:#999;font-size:80%}
.fx table{border-collapse:collapse;font-size:12px}
.fx td,.fx th{border:1px solid #ddd;padding:1px 5px;white-space:pre;font-family:ui-monospace,monospace}
.fx td.hit{font-weight:bold;background:#e8f4e8}
.fx .scroll{overflow-x:auto}
.fx .attn>input{display:none}
.fx .grid label{display:inline-block;min-width:3.2em;text-align:center;border:1px solid #bbb;
  margin:1px;cursor:pointer;font-size:12px;border-radius:3px}
.fx .maps figure{display:none;margin:.5em 0}
.fx .maps img{image-rendering:pixelated;border:1px solid #ccc}
"""


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _shown(token: str) -> str:
    """A token as it reads inside running text; the end-of-text marker as a small sign."""
    return '<span class="eot">⟨eot⟩</span>' if token in END_TOKENS else _esc(token)


def _heat(value: float, scale: float, *, hue: int) -> str:
    """A background colour: white at 0, full `hue` at `scale` and above."""
    light = 100 - 55 * min(abs(value) / scale, 1.0) if scale > 0 else 100
    return f"hsl({hue},85%,{light:.0f}%)"


def _surprisal_html(r: dict[str, Any]) -> str:
    bits, alts, tokens = r["surprisal_bits"], r["alternatives"], r["tokens"]
    scale = max(max(bits, default=1.0), 1.0)
    spans = []
    for tok, b, alt in zip(tokens[1:], bits, alts, strict=True):
        tip = f"{b:.2f} bits; top {TOP_K}: " + ", ".join(f"{a['token']!r} {a['prob']:.1%}" for a in alt)
        spans.append(f'<span style="background:{_heat(b, scale, hue=0)}" title="{_esc(tip)}">{_shown(tok)}</span>')
    rows = "".join(
        f"<tr><td>{_esc(repr(t))}</td><td>{b:.2f}</td><td>"
        + ", ".join(f"{_esc(repr(a['token']))} {a['prob']:.1%}" for a in alt) + "</td></tr>"
        for t, b, alt in zip(tokens[1:], bits, alts, strict=True))
    return (f"<h4>Surprisal</h4><p>Each token coloured by its surprisal, −log₂ p, white 0 bits to red "
            f"{scale:.1f} bits; hover for the model's top {TOP_K}. Total {r['total_bits']:.2f} bits over "
            f"{r['bytes']} bytes: {r['bits_per_byte']:.4f} bits/byte.</p>"
            f'<p class="tx">{"".join(spans)}</p><details><summary>Per token</summary><div class="scroll">'
            f"<table><tr><th>token</th><th>bits</th><th>top {TOP_K}</th></tr>{rows}</table></div></details>")


_RULES = {"riemann_middle": "midpoint", "trapezoid": "trapezoid", "segmented": "segmented"}


def _attributions_html(r: dict[str, Any]) -> str:
    a = r["attributions"]
    scores = a["scores"]
    scale = max((abs(s) for s in scores), default=1.0) or 1.0
    spans = "".join(
        f'<span style="background:{_heat(s, scale, hue=0 if s > 0 else 220)}" title="{s:+.3f} bits">'
        f"{_shown(t)}</span>" for t, s in zip(r["tokens"], scores, strict=True))
    return (f"<h4>Attributions for the next token {_esc(repr(a['target']))}</h4>"
            f"<p>Integrated gradients over the input embeddings (captum, {a['steps']} points along the path, "
            f"{_RULES[a['method']]} rule, from the text "
            f"blanked to spaces) of log₂ p({_esc(repr(a['target']))}) = {a['f_x']:.3f} "
            f"(baseline {a['f_baseline']:.3f}). Red raised it, blue lowered it, up to {scale:.3f} bits. "
            f"Completeness error {a['completeness_error']:.2%} of the gap.</p><p class=\"tx\">{spans}</p>")


def _lens_html(r: dict[str, Any], last: int = 12) -> str:
    tokens = r["tokens"]
    cols = range(max(0, len(tokens) - last), len(tokens))
    head = "".join(f"<th>{_esc(repr(tokens[c]))}</th>" for c in cols)
    rows = []
    for entry in r["logit_lens"]:
        cells = []
        for c in cols:
            hit = c + 1 < len(tokens) and entry["ids"][c] == r["token_ids"][c + 1]
            cells.append(f'<td{" class=hit" if hit else ""}>{_esc(repr(entry["tokens"][c]))} '
                         f"{entry['probs'][c]:.0%}</td>")
        rows.append(f"<tr><th>layer {entry['layer']}</th>{''.join(cells)}</tr>")
    return (f"<h4>Logit lens</h4><p>The top next-token prediction after each layer, read through the "
            f"final norm and head, at the last {len(cols)} positions (the last layer is the model's output; "
            f"bold: the token that follows in the text).</p><div class=\"scroll\"><table><tr><th>after</th>"
            f"{head}</tr>{''.join(rows)}</table></div>")


def _provenance_html(r: dict[str, Any]) -> str:
    bpb: dict[str, float] = r.get("provenance") or {}
    if not bpb:
        return ""
    top, best = max(bpb.values()), min(bpb, key=lambda k: bpb[k])
    bars = []
    for i, (silo, v) in enumerate(sorted(bpb.items(), key=lambda kv: kv[1])):
        w = 260 * v / top if top > 0 else 0
        fill = "#c0392b" if silo == best else "#95a5a6"
        bars.append(f'<text x="0" y="{i * 22 + 15}">{_esc(silo)}</text>'
                    f'<rect x="110" y="{i * 22 + 3}" width="{w:.1f}" height="16" fill="{fill}"/>'
                    f'<text x="{115 + w:.1f}" y="{i * 22 + 15}">{v:.3f}</text>')
    return (f"<h4>Provenance</h4><p>Bits/byte of the text under each silo's {_esc(r['provenance_models'])} "
            f"model: the lowest, {_esc(best)}, finds it least surprising.</p>"
            f'<svg width="430" height="{22 * len(bpb) + 4}" font-size="12" role="img" '
            f'aria-label="bits per byte per silo">{"".join(bars)}</svg>')


@functools.cache
def _palette() -> bytes:
    """matplotlib's Blues as 256 RGB triples: the heat maps' palette."""
    from matplotlib import colormaps

    return bytes(np.rint(colormaps["Blues"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8).tobytes())


def _png(matrix: np.ndarray) -> str:
    """A probability map as a PNG data URI: one byte per cell, √p on 0-255 (so that small weights
    show), indexing the Blues palette. An indexed image, written by Pillow: a byte per pixel where
    matplotlib's `imsave` writes four (RGBA), so a page holding every layer's and head's map
    stays small and quick to write."""
    from PIL import Image  # comes with matplotlib

    shade = np.rint(np.sqrt(np.clip(matrix, 0.0, 1.0)) * 255).astype(np.uint8)
    image = Image.fromarray(shade)  # mode "L", made "P" by its palette
    image.putpalette(_palette())
    buf = io.BytesIO()
    image.save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _attention_html(r: dict[str, Any], uid: str, layer: int, head: int) -> str:
    att = np.asarray(r["attention"], dtype=np.float64)  # (L, H, T, T)
    n_layers, n_heads, T = att.shape[0], att.shape[1], att.shape[2]
    layer, head = layer % n_layers, head % n_heads
    ids = [(li, hi) for li in range(n_layers) for hi in range(n_heads)]
    radios = "".join(f'<input type="radio" name="{uid}" id="{uid}-{li}-{hi}"'
                     f'{" checked" if (li, hi) == (layer, head) else ""}>' for li, hi in ids)
    grid = "<br>".join(
        f"layer {li + 1}: " + "".join(f'<label for="{uid}-{li}-{hi}">h{hi + 1}</label>' for hi in range(n_heads))
        for li in range(n_layers))
    side = T * max(1, 384 // T)  # shown at about 384 px, whole pixels per token
    maps = "".join(f'<figure class="m-{li}-{hi}"><img alt="attention, layer {li + 1}, head {hi + 1}" '
                   f'width="{side}" height="{side}" src="{_png(att[li, hi])}"><figcaption>layer {li + 1}, '
                   f"head {hi + 1}: row = the reading token, column = the token read</figcaption></figure>"
                   for li, hi in ids)
    css = "".join(f"#{uid}-{li}-{hi}:checked~.maps .m-{li}-{hi}{{display:block}}"
                  f'#{uid}-{li}-{hi}:checked~.grid label[for="{uid}-{li}-{hi}"]{{background:#2c7be5;color:#fff}}'
                  for li, hi in ids)
    return (f"<h4>Attention</h4><p>The attention probabilities of each layer and head over the "
            f"{T} tokens (causal: each row sums to 1; shade ∝ √p). Pick a layer and head:</p>"
            f'<style>{css}</style><div class="attn">{radios}<div class="grid">{grid}</div>'
            f'<div class="maps">{maps}</div></div>')


def html_fragment(result: dict[str, Any], *, layer: int = -1, head: int = 0) -> str:
    """The result as one self-contained HTML fragment (a <section>): no script, no network.

    Text coloured by surprisal, the attributions, the logit lens, provenance when present, and
    attention heat maps with `layer`/`head` (0-based; negative counts from the end) shown
    first and the others a click away (CSS radio buttons, no JavaScript).
    """
    import hashlib

    uid = "fx" + hashlib.sha1(f"{result['model']}\0{result['text']}".encode()).hexdigest()[:8]
    return (f'<section class="fx" id="{uid}"><style>{_CSS}</style>'
            f"<h3>fedlm explain: {_esc(str(result['model']))}</h3>"
            + _surprisal_html(result) + _attributions_html(result) + _lens_html(result)
            + _provenance_html(result) + _attention_html(result, uid, layer, head) + "</section>")


def html_page(result: dict[str, Any], *, layer: int = -1, head: int = 0) -> str:
    """A whole HTML page around `html_fragment` (`fedlm explain --html OUT`)."""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fedlm explain</title>'
            '<meta name="viewport" content="width=device-width,initial-scale=1"></head><body>'
            + html_fragment(result, layer=layer, head=head) + "</body></html>\n")
