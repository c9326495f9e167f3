"""The ServerApp of `fedlm value --superlink`: `fedlm.value.deployed.serve_job` in the training
ServerApp's frame (`fedlm.federation.server_app.serve`).

    [tool.flwr.app.components] serverapp = "fedlm.value.app:app"     (fedlm/value/flwr_app)
"""

from __future__ import annotations

from fedlm.federation.server_app import serve
from fedlm.value.deployed import ERROR, serve_job

app = serve(lambda grid, cfg, run_dir, context: serve_job(grid, run_dir), error_file=ERROR)
