"""The Flower ServerApp: the rounds loop of `fedlm.federation.rounds.run_rounds` behind `@app.main()`.

    [tool.flwr.app.components] serverapp = "fedlm.federation.server_app:app"
    flwr run fedlm/federation/flwr_app LINK --run-config 'run-dir="/abs/RUN" resume=false'

The run directory (on the SuperLink's machine) already holds the resolved config.toml,
written by `run_federated`; the ServerApp writes rounds.jsonl, checkpoint/, model/ and
summary.json there, or error.json with the one-line message when the run fails on bad
input (a silo with no shards, a tokenizer mismatch, too few SuperNodes), so the process
that submitted the run can report it.

`serve(job)` makes a ServerApp of the same frame (`run_job`) around another job on a run directory,
over the same silos: valuation's (`fedlm.value.app`) retrains and scores a finished run there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlm.config import Config, load_config
from fedlm.errors import UserError
from fedlm.federation.polls import shorten_object_pull_retries
from fedlm.federation.replies import deployed
from fedlm.federation.rounds import run_rounds
from fedlm.fileio import write_json
from fedlm.privacy.randomness import refuse_across_organisations
from fedlm.runlock import exit_with_parent, hold

Job = Callable[[Grid, Config, Path, Context], None]


def run_job(grid: Grid, context: Context, job: Job, *, error_file: str = "error.json") -> None:
    """Run `job(grid, config, run_dir, context)` on the run directory the run config names (`run-dir`,
    holding config.toml), over the deployment engine's grid, holding the run folder's lock; on bad
    input write the one-line message to RUN/`error_file` for the submitter."""
    logging.basicConfig(level=logging.INFO)
    shorten_object_pull_retries()  # replies are handed out before their objects have all arrived
    torch.set_num_threads(1)  # as in process: the server's arithmetic is the same bit for bit
    run_dir = Path(str(context.run_config["run-dir"]))
    # the coordinator's record of the run (nodes given no work, dropped silos) beside its rounds
    logging.getLogger("fedlm").addHandler(logging.FileHandler(run_dir / "server.log"))
    try:
        cfg = load_config(run_dir / "config.toml")
        refuse_across_organisations(cfg.privacy.insecure_reproducible_noise, where="the deployed Flower engine")
        exit_with_parent()  # the lock must not outlive the SuperLink that runs this
        with hold(run_dir, engine="flower", run_id=context.run_id):
            job(deployed(grid), cfg, run_dir, context)
    except UserError as e:
        write_json(run_dir / error_file, {"error": str(e)})
        raise


def serve(job: Job, *, error_file: str = "error.json") -> ServerApp:
    """A ServerApp whose main is `run_job(grid, context, job, error_file=error_file)`."""
    other = ServerApp()

    @other.main()
    def job_main(grid: Grid, context: Context) -> None:
        run_job(grid, context, job, error_file=error_file)

    return other


def _rounds(grid: Grid, cfg: Config, run_dir: Path, context: Context) -> None:
    run_rounds(grid, cfg, run_dir, resume=bool(context.run_config.get("resume", False)))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated rounds the run directory's config.toml describes."""
    run_job(grid, context, _rounds)
