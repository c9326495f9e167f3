"""HTML and inline-SVG helpers of the report: cells that carry their exact value, tables, figures."""

from __future__ import annotations

import html
import io
import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


MB = 1e6


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(x: Any, fmt: str = ".4f", *, silo: str | None = None, key: str | None = None) -> str:
    """A table cell for a number; per-silo cells carry the exact value for checking."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return f"<td>{esc(x if x is not None else '—')}</td>"
    text = f"{x:{fmt}}" if math.isfinite(x) else str(x)
    attrs = f' data-silo="{esc(silo)}" data-key="{esc(key)}" data-value="{x!r}"' if silo is not None else ""
    return f'<td class="num"{attrs}>{text}</td>'


def table(head: list[str], rows: list[str], *, cls: str = "") -> str:
    """An HTML table from a header and rows of ready-made cells."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join(f"<tr>{r}</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def new_figure(width: float = 7.0, height: float = 3.2) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
    return fig, ax


def svg(fig: Figure, name: str, caption: str) -> str:
    """The figure as inline SVG in a <figure>; ids salted by `name` so that figures never share one."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"fedlm-{name}", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: not allowed inside HTML
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # matplotlib's RDF credits
    return f'<figure id="fig-{esc(name)}">{text}<figcaption>{esc(caption)}</figcaption></figure>'


def silo_colour(silos: list[str], silo: str) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](silos.index(silo) % 10) if silo in silos else "grey"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{esc(sid)}"><h2>{esc(title)}</h2>{body}</section>'


def participated(row: dict[str, Any], silo: str) -> bool:
    """Whether a silo's update counted in a completed round."""
    return bool(row.get("completed")) and silo in (row.get("silos") or {}) and silo not in (row.get("dropped") or {})


def ratio(measured: float | None, predicted: Any) -> str:
    if measured is None or not isinstance(predicted, (int, float)) or not predicted:
        return "<td>—</td>"
    return num(measured / predicted, ".3f")


def fnum(x: Any, default: float = float("nan")) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else default


def fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else esc(x)
