"""After a federated run's last round: did the run leave each silo better or worse off, on data it never trained on?

    record = validate_silos(link, run_dir, start=start_state, final=global_state, config=config)

Each silo scores the run's starting and final global weights on its own validation split
(`evaluate` messages: the same windows for both, so the two losses compare) and replies
with the two numbers only; under secure aggregation, where the server learns no per-silo
loss, only which of the two is larger. The result goes to RUN/validation.json, which
`outcome.amend_summary` turns into summary.json's `worse_than_start`:

    {"silos": {"a": {"val_loss_start": 4.1, "val_loss_final": 3.2}, "b": {"worse": 1.0}},
     "missing": {"c": "failed: ..."}}

A silo that does not answer is named in "missing" with the reason; it does not stop the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedlm.federation.exchanges import Link
from fedlm.federation.messages import evaluate_request, read_validation
from fedlm.federation.outcome import VALIDATION
from fedlm.fileio import write_json

log = logging.getLogger("fedlm.federation")


def validate_silos(link: Link, run_dir: Path, *, start: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                   config: ConfigRecord) -> dict[str, Any]:
    """Ask every silo for its validation losses of `start` and `final`; write and return RUN/validation.json."""
    first, last = ArrayRecord(start), ArrayRecord(final)
    msgs = {silo: evaluate_request(first, last, config, node) for silo, node in link.node_of.items()}
    replies = link.grid.send_and_receive(list(msgs.values()), timeout=link.timeout)
    got: dict[str, dict[str, float]] = {}
    missing: dict[str, str] = {}
    for reply in replies:
        silo = link.silo_of(reply.metadata.src_node_id)
        if silo is None or silo in got:
            continue
        values = read_validation(reply)
        if isinstance(values, str):
            missing[silo] = values
        else:
            got[silo] = values
    for silo in link.node_of:
        if silo not in got and silo not in missing:
            missing[silo] = f"timeout: no reply within {link.timeout:g} s"
    for silo, why in sorted(missing.items()):
        log.warning("silo %s: no validation loss (%s)", silo, why)
    record = {"silos": dict(sorted(got.items())), "missing": dict(sorted(missing.items()))}
    write_json(run_dir / VALIDATION, record)
    return record
