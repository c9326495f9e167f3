"""What a report reads: a run directory's rounds log, config and JSON records (or a demo's output)."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlm.errors import UserError


@dataclass
class RunData:
    """What a report reads from a run directory (and a demo's summary beside it)."""

    run_dir: Path
    rounds: list[dict[str, Any]]
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] | None = None  # a demo's summary.json: bits/byte of every model on every silo
    privacy: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    value: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None

    @property
    def silos(self) -> list[str]:
        names = self.summary.get("silos") or sorted({s for r in self.rounds for s in r.get("silos") or {}})
        return [str(s) for s in names]


def read_json_file(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; a corrupt one is bad input naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore or delete it and rerun `fedlm report`") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; restore or delete it and rerun `fedlm report`")
    return data


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """Every row of a rounds.jsonl, strictly: a report must not quietly leave a round out."""
    rows = []
    for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {no}: not a JSON object ({e.msg}); "
                            f"repair or delete that line, or resume the run (`fedlm train --resume`)") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int) or not isinstance(row.get("silos"), dict):
            raise UserError(f"{path} line {no}: not a round row (needs \"round\" and \"silos\"); "
                            f"repair or delete that line")
        rows.append(row)
    return rows


def find_run(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """(the federated run directory, the demo's summary) for a run directory or a demo's output."""
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; pass a federated run directory (or a demo's output)")
    demo = read_json_file(path / "summary.json")
    if demo is None or "models" not in demo:
        return path, None
    run = path / "runs" / "federated"
    if not run.is_dir():  # moved or renamed: the path the demo recorded
        run = Path(demo["models"].get("federated", {}).get("run_dir", run))
    return run, demo


def load_run(path: Path) -> RunData:
    """Read everything a report shows; UserError for a directory without rounds or with a corrupt file."""
    run_dir, demo = find_run(path)
    rounds_path = run_dir / "rounds.jsonl"
    rounds = read_rounds(rounds_path) if rounds_path.is_file() else []
    if not rounds:
        raise UserError(f"{rounds_path}: no rounds (missing or empty); `fedlm report` needs a federated run's "
                        f"directory with at least one round done (`fedlm train` with train.mode = \"federated\")")
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{run_dir / 'config.toml'}: missing or not TOML ({e}); the run directory is damaged") from None
    value = read_json_file(run_dir / "value.json")
    if value is None and demo is not None and isinstance(demo.get("value"), dict) and "silos" in demo["value"]:
        value = demo["value"]
    return RunData(run_dir=run_dir, rounds=rounds, config=config, summary=read_json_file(run_dir / "summary.json") or {},
                   demo=demo, privacy=read_json_file(run_dir / "privacy.json"),
                   audit=read_json_file(run_dir / "audit.json"), value=value,
                   plan=read_json_file(run_dir / "plan.json"))
