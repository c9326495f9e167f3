"""What a federated run achieved, from its rounds log and validation: rounds completed and skipped, silos left worse off.

    summary = amend_summary(run_dir, summary)   # adds the keys below to RUN/summary.json
    for line in outcome_lines(summary): print(line)

- `rounds_completed`: rounds whose update was applied; `rounds_skipped`: the others, with who
  dropped and why. A run with a skipped round did not do what its config asked: `fedlm train`
  exits non-zero.
- `worse_than_start`: silos whose validation loss under the final global weights is above
  their validation loss under the starting weights, each measured by the silo on its own val
  split after the last round (`fedlm.federation.validation`, RUN/validation.json): {silo:
  {"val_loss_start", "val_loss_final"}}, or {silo: {}} under secure aggregation, where a silo
  tells only that it got worse. `validation_missing`: the silos that gave no verdict, and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlm.fileio import write_json

VALIDATION = "validation.json"
"""Written by `fedlm.federation.validation` after the last round."""


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


def worse_silos(validation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{silo: its two validation losses (none under SecAgg)} for the silos the run left worse off."""
    worse: dict[str, dict[str, float]] = {}
    for silo, got in (validation.get("silos") or {}).items():
        if "worse" in got:
            if got["worse"] > 0:
                worse[silo] = {}
        elif got["val_loss_final"] > got["val_loss_start"]:
            worse[silo] = {k: float(got[k]) for k in ("val_loss_start", "val_loss_final")}
    return dict(sorted(worse.items()))


def _validation(run_dir: Path) -> dict[str, Any]:
    try:
        got = json.loads((run_dir / VALIDATION).read_text(encoding="utf-8"))
        return got if isinstance(got, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def amend_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Add rounds_completed, rounds_skipped and worse_than_start to `summary` and RUN/summary.json."""
    rows = _rows(run_dir)
    skipped = [{"round": r["round"], "dropped": r.get("dropped", {})} for r in rows if not r.get("completed")]
    validation = _validation(run_dir)
    summary = {**summary, "rounds_completed": sum(1 for r in rows if r.get("completed")),
               "rounds_skipped": skipped, "worse_than_start": worse_silos(validation),
               "validation_missing": validation.get("missing", {})}
    write_json(run_dir / "summary.json", summary)
    return summary


def dropouts(run_dir: Path) -> dict[str, dict[int, str]]:
    """{silo: {round: why}}: each round a silo was sampled for and sent nothing that counted."""
    out: dict[str, dict[int, str]] = {}
    for row in _rows(run_dir):
        for silo, why in (row.get("dropped") or {}).items():
            out.setdefault(silo, {})[int(row["round"])] = str(why)
    return dict(sorted(out.items()))


def outcome_lines(summary: dict[str, Any]) -> list[str]:
    """Console lines for what went wrong (none when every round completed and no silo got worse)."""
    lines = []
    for skip in summary.get("rounds_skipped", []):
        why = "; ".join(f"{s}: {w}" for s, w in sorted(skip["dropped"].items())) or "no silo sampled"
        lines.append(f"round {skip['round']} skipped ({why})")
    for silo, loss in summary.get("worse_than_start", {}).items():
        if loss:
            lines.append(f"silo {silo}: validation loss {loss['val_loss_start']:.4f} with the starting weights, "
                         f"{loss['val_loss_final']:.4f} with the final ones: worse than at the start")
        else:
            lines.append(f"silo {silo}: its validation loss is higher with the final weights than with the "
                         "starting ones: worse than at the start (under secure aggregation it sends no loss)")
    for silo, why in summary.get("validation_missing", {}).items():
        lines.append(f"silo {silo}: not validated ({why})")
    return lines


def incomplete(summary: dict[str, Any]) -> bool:
    """Whether a round of the run did not complete (the command then exits non-zero)."""
    return int(summary.get("rounds_completed", summary.get("rounds", 0))) < int(summary.get("rounds", 0))
