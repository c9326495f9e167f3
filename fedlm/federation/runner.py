"""Federated runs: `fedlm train` with train.mode = "federated", on either engine.

    summary = run_federated(load_config("fed.toml"), Path("runs/fed"))               # in process
    summary = run_federated(cfg, Path("runs/fed"), resume=True)                       # after a stop
    summary = run_federated(cfg, out, superlink="10.0.0.5:9092", root_certificates=ca)  # engine flower

The parts, top to bottom: this entry point resolves and checks the config and prepares the
run directory (`rundir`); the rounds loop (`rounds.run_rounds`, the ServerApp's body) runs
over a Flower Grid, in this process (`grid.InProcessGrid`) or on Flower's deployment engine
(`deploy.run_on_flower`); each round's exchange with the silos is in `exchanges`, the
messages both sides read and write in `messages`, and a silo's own work in the Flower-free
`task`, which the ClientApp (`client_app`) wraps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlm.config import Config
from fedlm.federation.client_app import app as default_app
from fedlm.federation.deploy import run_on_flower
from fedlm.federation.grid import InProcessGrid, WireTap
from fedlm.federation.outcome import amend_summary
from fedlm.federation.rounds import run_rounds
from fedlm.federation.rundir import FLOWER_ENV, RoundCallback, prepare_run_dir
from fedlm.resolve import resolve_config, resolve_silos
from fedlm.runlock import hold, refuse_if_live

__all__ = ["FLOWER_ENV", "RoundCallback", "run_federated"]


def run_federated(
    cfg: Config, out_dir: Path, *, resume: bool = False, on_round: RoundCallback | None = None,
    superlink: str | None = None, root_certificates: Path | None = None, insecure: bool = False,
    client_app: ClientApp | Callable[[Message, Context], Message] | None = None, on_wire: WireTap | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    """Run a federated config on its engine; writes `out_dir` and returns the summary.

    engine "inprocess": every silo of `cfg.data.workspace` trains in this process (one torch
    thread each). engine "flower": starts a SuperLink and one SuperNode per silo on 127.0.0.1,
    or uses the running SuperLink `superlink` (HOST:PORT, with `root_certificates` or
    `insecure`), and submits the run with `flwr run`. `client_app` and `on_wire` are for
    tests (a silo that misbehaves; a tap on every message) and apply in process only, as does
    `validate=False` (no RUN/validation.json: for runs whose model is judged otherwise, such as
    valuation's coalitions).
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    cfg = resolve_config(cfg)  # checks the config again: its fields may have changed since it was built
    refuse_if_live(out_dir)  # one live run per run folder
    prepare_run_dir(cfg, out_dir, resume=resume)
    if cfg.federation.engine == "flower":
        return run_on_flower(cfg, out_dir, resume=resume, on_round=on_round, superlink=superlink,
                             root_certificates=root_certificates, insecure=insecure)
    silos = resolve_silos(Path(cfg.data.workspace), cfg.data.silos)
    nodes = {i + 1: {"workspace": str(Path(cfg.data.workspace)), "silo": s} for i, s in enumerate(silos)}
    grid = InProcessGrid(client_app or default_app, nodes, on_wire=on_wire)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with hold(out_dir, engine="inprocess"):
            return amend_summary(out_dir, run_rounds(grid, cfg, out_dir, resume=resume, on_round=on_round,
                                                       validate=validate))
    finally:
        grid.close()
        torch.set_num_threads(threads)
