"""The report page: the sections, the sample generations and the explain panel, written atomically."""

from __future__ import annotations

import time
from pathlib import Path

from fedlm.errors import UserError
from fedlm.fileio import write_text
from fedlm.report.markup import esc, section
from fedlm.report.rundata import RunData, load_run
from fedlm.report.sections import (
    bpb_section,
    comm_section,
    config_section,
    drops_section,
    loss_section,
    plan_section,
    privacy_section,
    time_section,
    value_section,
)

PROMPTS = ("The", "In the", "It was")
"""Fixed prompts of the sample generations: model output only, no silo's text on the page."""


CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
"""No request of any kind leaves the page, and no script runs: inline styles and data: images only."""


def samples(run_dir: Path, prompts: tuple[str, ...], *, max_new_tokens: int = 40
            ) -> tuple[list[tuple[str, str]], str]:
    """(prompt, continuation) from the run's global model, seeded: the same page for the same model;
    and the first sample cut to what the explain panel can take (the context, after one EOS)."""
    from fedlm.data.tokenizer import end_token_id, load_tokenizer
    from fedlm.generate import generate
    from fedlm.pretrained import load_model

    model, tok_path = load_model(run_dir)
    if tok_path is None:
        return [], ""
    tok = load_tokenizer(tok_path)
    room = model.cfg.max_seq_len
    out = []
    for prompt in prompts:
        ids = tok.encode(prompt).ids[: room // 2]
        new = list(generate(model, ids, max_new_tokens=min(max_new_tokens, room - len(ids)), temperature=0.8,
                            top_k=50, eos_id=end_token_id(tok), seed=0))
        out.append((prompt, tok.decode(new)))
    text = "".join(out[0]) if out else ""
    ids = tok.encode(text).ids
    for cut in range(min(len(ids), room - 1), 0, -1):  # decoded text read again may take more tokens
        if len(tok.encode(text := tok.decode(ids[:cut])).ids) < room:
            break
    return out, text


def samples_section(generated: list[tuple[str, str]]) -> str | None:
    if not generated:
        return None
    items = "".join(f"<li><b>{esc(p)}</b>{esc(c)}</li>" for p, c in generated)
    return section("samples", "Sample generations",
                   "<p>The global model's continuations of fixed prompts (temperature 0.8, top-k 50, seed 0).</p>"
                   f'<ol class="samples">{items}</ol>')


def explain_section(run_dir: Path, text: str) -> str | None:
    """The explain panel (`fedlm explain`'s fragment) for one sample text."""
    from fedlm.explain import explain, html_fragment

    if not text.strip():
        return None
    try:
        fragment = html_fragment(explain(run_dir, text))
    except UserError as e:  # e.g. a text past the model's context: say so, keep the rest of the page
        return section("explain", "Explain one sample", f"<p>Not explained: {esc(e)}</p>")
    return section("explain", "Explain one sample",
                   f"<p>The first sample above, token by token (<code>fedlm explain {esc(run_dir)} TEXT</code> "
                   f"does the same for any text).</p>{fragment}")


STYLE = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1b1b1b;background:#fff;margin:0}
main{max-width:62rem;margin:0 auto;padding:1rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.8rem 0 .2rem} h2{font-size:1.25rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem} nav a{margin-right:.8rem} figure{margin:1rem 0} figure svg{max-width:100%;height:auto;display:block}
figcaption{font-size:.85rem;color:#555} table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f4f4f4} .warn{color:#a40000} .meter{font-size:1.1rem} .samples li{margin:.3rem 0}
.muted{color:#666;font-size:.85rem}
"""


def render(d: RunData, *, generated: list[tuple[str, str]], explain_html: str | None) -> str:
    """The whole page from what load_run read and the samples generated."""
    parts = [config_section(d), loss_section(d), bpb_section(d), comm_section(d), time_section(d),
             drops_section(d), privacy_section(d), plan_section(d), value_section(d), samples_section(generated),
             explain_html]
    body = [p for p in parts if p]
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in
                  ((p.split('"', 2)[1], p.split("<h2>", 1)[1].split("</h2>", 1)[0]) for p in body))
    title = f"fedlm report: {d.run_dir.name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><p class=\"muted\">{esc(d.run_dir)} · made {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"by <code>fedlm report</code></p><nav>{nav}</nav>{''.join(body)}</main></body></html>\n")


def write_report(path: Path, out: Path | None = None, *, prompts: tuple[str, ...] = PROMPTS) -> Path:
    """Read the run at `path` (or a demo's output), write its page atomically; returns where."""
    d = load_run(path)
    out = out if out is not None else path / "report.html"
    generated, text = samples(d.run_dir, prompts) if (d.run_dir / "model").is_dir() else ([], "")
    explain_html = explain_section(d.run_dir, text)
    write_text(out, render(d, generated=generated, explain_html=explain_html))
    return out
