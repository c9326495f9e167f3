"""What a federated run achieved, from its rounds log: rounds completed and skipped, silos left worse off.

    summary = amend_summary(run_dir, summary)   # adds the keys below to RUN/summary.json
    for line in outcome_lines(summary): print(line)

- `rounds_completed`: rounds whose update was applied; `rounds_skipped`: the others, with who
  dropped and why. A run with a skipped round did not do what its config asked: `fedlm train`
  exits non-zero.
- `worse_than_start`: silos whose training loss in the last round they completed is above
  their loss in the first round they completed. A silo's loss in a round is measured on its
  own training batches, starting from that round's global weights, so the first round's is the
  loss of the starting model on that silo and the last one's the loss of (nearly) the final
  model. It is a training loss: the silos' validation loss is `fedlm eval`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedlm.fileio import write_json


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return rows


def worse_silos(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{silo: {"first", "last"}} for the silos whose loss rose from their first counted round to their last."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for row in rows:
        if not row.get("completed"):
            continue
        for silo, log in (row.get("silos") or {}).items():
            loss = log.get("loss")
            if silo in (row.get("dropped") or {}) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
                continue
            first.setdefault(silo, float(loss))
            last[silo] = float(loss)
    return {s: {"first": first[s], "last": last[s]} for s in sorted(last) if last[s] > first[s]}


def amend_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Add rounds_completed, rounds_skipped and worse_than_start to `summary` and RUN/summary.json."""
    rows = _rows(run_dir)
    skipped = [{"round": r["round"], "dropped": r.get("dropped", {})} for r in rows if not r.get("completed")]
    summary = {**summary, "rounds_completed": sum(1 for r in rows if r.get("completed")),
               "rounds_skipped": skipped, "worse_than_start": worse_silos(rows)}
    write_json(run_dir / "summary.json", summary)
    return summary


def outcome_lines(summary: dict[str, Any]) -> list[str]:
    """Console lines for what went wrong (none when every round completed and no silo got worse)."""
    lines = []
    for skip in summary.get("rounds_skipped", []):
        why = "; ".join(f"{s}: {w}" for s, w in sorted(skip["dropped"].items())) or "no silo sampled"
        lines.append(f"round {skip['round']} skipped ({why})")
    for silo, loss in summary.get("worse_than_start", {}).items():
        lines.append(f"silo {silo}: training loss {loss['first']:.4f} in its first round, {loss['last']:.4f} "
                     f"in its last: worse than at the start")
    return lines


def incomplete(summary: dict[str, Any]) -> bool:
    """Whether a round of the run did not complete (the command then exits non-zero)."""
    return int(summary.get("rounds_completed", summary.get("rounds", 0))) < int(summary.get("rounds", 0))
