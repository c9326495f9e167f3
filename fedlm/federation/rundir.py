"""A federated run's directory: its config, round checkpoint, rounds log and summary; no Flower here.

    prepare_run_dir(cfg, Path("runs/fed"), resume=False)    # checks, writes config.toml
    save_round(run_dir / "checkpoint", global_state=w, optimizer=opt, rounds_done=3)
    summary = write_summary(run_dir, cfg, silos, rounds_run=2)

RUN/config.toml is the resolved config; RUN/checkpoint/ holds the global weights, the server
optimiser's state and the number of rounds done, replaced atomically after every round;
RUN/rounds.jsonl has one row per round (numbered from 1); RUN/summary.json sums up the
whole run from those rows, across resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlm.config import Config, check_resume_config, save_config
from fedlm.errors import UserError
from fedlm.federation.strategies import ServerAdamW, ServerOptimizer
from fedlm.fileio import atomic_dir, recover_strays, write_json

RoundCallback = Callable[[int, int, dict[str, Any]], None]
"""Called after each round with (round, rounds, the rounds.jsonl row); rounds count from 1."""

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Set wherever a run's Flower code runs: no telemetry, no update check, no `uv sync` of a multi-GB torch."""


def prepare_run_dir(cfg: Config, out_dir: Path, *, resume: bool) -> None:
    """Check `out_dir` for a new run or a resume, and write the (resolved) config there."""
    ckpt = out_dir / "checkpoint"
    recover_strays(out_dir)  # a kill inside an atomic write: the previous copy, no temporaries
    has_ckpt = ckpt.exists()
    if resume:
        if not has_ckpt:
            raise UserError(f"{out_dir}: no round checkpoint to resume from; run without --resume")
        check_resume_config(cfg, out_dir / "config.toml")
    elif has_ckpt:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.toml")


def save_round(ckpt_dir: Path, *, global_state: dict[str, torch.Tensor], optimizer: ServerOptimizer | ServerAdamW,
               rounds_done: int) -> None:
    """Global weights, server optimiser state and the number of rounds done, replaced atomically (a
    LoRA run's base is pinned in its config.toml: train.init_sha256)."""
    with atomic_dir(ckpt_dir) as tmp:
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / "global.safetensors"))
        save_file({k: v.contiguous() for k, v in optimizer.state_dict().items()},
                  str(tmp / "server_optimizer.safetensors"))
        write_json(tmp / "state.json", {"round": rounds_done})


def load_round(ckpt_dir: Path, *, optimizer: ServerOptimizer | ServerAdamW) -> tuple[dict[str, torch.Tensor], int]:
    """Restore what save_round wrote; returns (global weights, rounds done)."""
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
        weights = load_file(str(ckpt_dir / "global.safetensors"))
        optimizer.load_state_dict(load_file(str(ckpt_dir / "server_optimizer.safetensors")))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt_dir}: round checkpoint is missing or corrupt ({e}); start without --resume") from None
    return weights, int(state["round"])


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of RUN/rounds.jsonl (none before round 1)."""
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_summary(run_dir: Path, cfg: Config, silos: list[str], *, rounds_run: int) -> dict[str, Any]:
    """RUN/summary.json for the whole run, from its rounds log (every session's rounds after a resume).

    rounds: planned; rounds_completed: rounds whose update was applied; rounds_run: the rounds
    this session ran (fewer after a resume); seconds: the rounds' time over all sessions; loss:
    the last completed round's token-weighted mean training loss."""
    rows = read_rounds(run_dir)
    done = [r for r in rows if r.get("completed")]
    fed = cfg.federation
    summary = {
        "mode": "federated", "engine": fed.engine, "rounds": fed.rounds, "rounds_completed": len(done),
        "rounds_run": rounds_run, "silos": silos, "strategy": fed.strategy,
        "loss": float(done[-1]["loss"]) if done else float("nan"),
        "seconds": sum(float(r["seconds"]) for r in rows),
    }
    write_json(run_dir / "summary.json", summary)
    return summary
