"""`fedlm report RUN`: a federated run on one self-contained HTML page.

    path = write_report(Path("runs/fed"))                  # -> runs/fed/report.html
    path = write_report(Path("demo-out"), Path("r.html"))  # a demo's output: its federated run + baselines

`rundata` reads the run (strictly: bad input names its file and line), `sections` turns it
into the page's sections, `markup` holds the HTML and SVG helpers, `page` puts the page
together with the samples and the explain panel.

The page runs no script of its own and fetches nothing: its figures are inline SVG drawn by matplotlib,
its tables plain HTML, and a Content-Security-Policy forbids any request. Each section
appears only where the run has its data:

- the config in brief (RUN/config.toml, RUN/summary.json);
- loss per round, global and per silo; bytes per round and cumulative MB; round time split
  into compute (the slowest silo's training) and overhead; dropped silos and rejected
  updates; ε spent per silo per round (all from RUN/rounds.jsonl);
- privacy (RUN/privacy.json) and the audit (RUN/audit.json, which `fedlm audit RUN` writes);
- bits/byte per silo against the baselines (a demo's summary.json);
- `fedlm plan`'s prediction against what the rounds measured (RUN/plan.json, else the plan
  of RUN/config.toml without a timing calibration);
- contributions, gains and payouts (RUN/value.json, `fedlm value`);
- sample generations of the global model from fixed prompts (never a silo's text: whoever
  holds the run may not see the silos' data), and the explain panel for the first of them.

Per-silo numbers carry `data-silo`, `data-key` and `data-value` (the exact float) so that a
reader (or a test) can check them against the JSON files.
"""

from fedlm.report.page import write_report
from fedlm.report.rundata import RunData, load_run

__all__ = ["RunData", "load_run", "write_report"]
