"""`fedlm value RUN --superlink HOST:PORT`: value a run whose silos are other machines' SuperNodes.

    body = value_on_flower(Path("runs/fed"), {"method": "exact", "budget": 100.0}, superlink="127.0.0.1:9093",
                           root_certificates=Path("certs/ca.pem"))     # on the coordinator; writes runs/fed/value.json

A run trained across machines cannot be valued in process: the coordinator holds no silo's data.
So valuation runs where the run's rounds ran, as a Flower run of fedlm's valuation app (APP_DIR;
the same ClientApp as training). Its ServerApp (`fedlm.value.app`: `serve_job`) calls `value_run`
with the deployment engine's grid, so every coalition is retrained on the silos' own SuperNodes
under the run's secure aggregation and DP settings, each beneficiary scores every model on its
own validation split, and each silo trains its local-only baseline itself. What leaves a silo is
what the run's rounds let leave it, and one bits-per-byte number per model.

Both sides run on the coordinator, around the run directory: the options go to
RUN/.value-request.json, the ServerApp's progress lines to RUN/.value-progress.jsonl, and its
outcome to RUN/.value-result.json (or its one-line error to RUN/.value-error.json); value.json is
written as in process.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlm.federation.deploy import follow, run_budget, submit_run, wait_superlink
from fedlm.federation.deploy import stop_run as stop_flower_run
from fedlm.fileio import append_jsonl, write_json
from fedlm.runlock import refuse_if_live
from fedlm.value.run import Progress, load_run, value_run

if TYPE_CHECKING:
    from flwr.serverapp import Grid

REQUEST, PROGRESS, RESULT, ERROR = (".value-request.json", ".value-progress.jsonl", ".value-result.json",
                                   ".value-error.json")
APP_DIR = Path(__file__).parent / "flwr_app"
log = logging.getLogger("fedlm.federation")


def serve_job(grid: Grid, run_dir: Path) -> None:
    """The ServerApp's side: value `run_dir` as RUN/.value-request.json asks, over `grid`."""
    options = json.loads((run_dir / REQUEST).read_text())

    def progress(line: str) -> None:
        log.info("value: %s", line)
        append_jsonl(run_dir / PROGRESS, {"message": line})

    value_run(run_dir, **options, progress=progress, grid=grid)
    write_json(run_dir / RESULT, {"ok": True})


def value_on_flower(run_dir: Path, options: dict[str, Any], *, superlink: str, root_certificates: Path | None,
                    insecure: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Value `run_dir` on the federation of the running SuperLink `superlink` (its Control API, as
    `fedlm train --superlink` submits runs); returns value.json's body. `options`: `value_run`'s keywords."""
    run_dir = run_dir.resolve()
    cfg, silos = load_run(run_dir, method=options.get("method"), local=False)
    refuse_if_live(run_dir)
    wait_superlink(superlink, root_certificates=root_certificates, insecure=insecure, timeout=10.0)
    for stale in (REQUEST, PROGRESS, RESULT, ERROR):
        (run_dir / stale).unlink(missing_ok=True)
    write_json(run_dir / REQUEST, options)
    home = run_dir / ".flower-value"
    shutil.rmtree(home, ignore_errors=True)
    say = progress or (lambda _: None)
    # an upper bound, for a job that hangs: every coalition retrained (under each seed), as the run's own
    # budget each, plus the local-only baselines and the scoring
    budget = run_budget(cfg) * (2 ** len(silos) * int(options.get("seeds", 1)) + 2)
    try:
        run_id = submit_run(superlink, {"run-dir": str(run_dir), "resume": False}, flwr_home=home / "cli",
                            root_certificates=root_certificates, insecure=insecure, app_dir=APP_DIR)
        say(f"submitted to SuperLink {superlink} (Flower run {run_id}); the silos retrain and score there")
        try:
            follow(run_dir, timeout=budget, log=PROGRESS, on_row=lambda row: say(str(row["message"])), done=RESULT,
                   error=ERROR, what=lambda _: f"the valuation's ServerApp ended without a result "
                                                           f"(crashed or stopped); see {run_dir / 'server.log'}")
        except BaseException:
            stop_flower_run(superlink, run_id, flwr_home=home / "cli")
            raise
        return dict(json.loads((run_dir / "value.json").read_text()))
    finally:
        for stale in (REQUEST, PROGRESS, RESULT, ERROR):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
