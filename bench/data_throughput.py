"""Data throughput: MB/s of `prepare` per stage and end to end, on given folders or the corpus.

    from bench.data_throughput import run
    run()                                  # the bundled corpus, extracted to a temp dir
    run({"mine": [Path("raw/")]})          # your own folders

MB/s are input megabytes (10**6 bytes of decoded text) per second of the stage's own time.
Run it with OMP_NUM_THREADS=1 on a quiet machine: it measures one core.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def run(folders: dict[str, list[Path]] | None = None, workspace: Path | None = None) -> dict[str, Any]:
    """Prepare each silo of `folders` (default: the bundled corpus); return MB/s per stage."""
    from fedlm.data.prepare import STAGES, prepare_silo

    with tempfile.TemporaryDirectory(prefix="fedlm-bench-") as tmp:
        if folders is None:
            from fedlm.corpus import extract

            folders = {silo: [p] for silo, p in extract(Path(tmp) / "raw").items()}
        ws = workspace or Path(tmp) / "ws"
        totals = dict.fromkeys(STAGES, 0.0)
        per_silo: dict[str, dict[str, float]] = {}
        mb_all = wall_all = 0.0
        for silo, sources in folders.items():
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            card = prepare_silo(sources, silo=silo, workspace=ws, timings=timings)
            wall = time.perf_counter() - t0
            mb = card["bytes_in"] / 1e6
            mb_all += mb
            wall_all += wall
            for k, v in timings.items():
                totals[k] += v
            per_silo[silo] = {"mb": round(mb, 3), "end_to_end_mb_s": round(mb / wall, 2)}
        return {
            "prepare_mb": round(mb_all, 3),
            "prepare_end_to_end_mb_s": round(mb_all / wall_all, 2),
            "prepare_stage_mb_s": {k: round(mb_all / v, 1) for k, v in totals.items() if v > 0},
            "per_silo": per_silo,
        }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
