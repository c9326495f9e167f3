"""Sharding throughput: MB/s of `shard_silo` over every silo of a prepared workspace.

    python -m bench.shard_throughput WS      # or: from bench.shard_throughput import run; run(WS)

MB are UTF-8 megabytes (1e6 bytes) of document text. If WS has no tokenizer.json, one is
trained from exact counts (vocab 4096) first and timed separately. `tokenizers`' own thread
pool is turned off while timing, so the figure is one core's (tiktoken already runs on one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run(workspace: Path | str) -> dict:
    """Shard every silo of `workspace`; return MB/s overall and per silo (wall and CPU time)."""
    from fedlm.data.shards import list_silos, shard_silo
    from fedlm.data.tokenizer import agree_tokenizer

    workspace = Path(workspace)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        result: dict = {"workspace": str(workspace)}
        if not (workspace / "tokenizer.json").is_file():
            t = time.perf_counter()
            agree_tokenizer(workspace, vocab_size=4096)
            result["tokenizer_seconds"] = round(time.perf_counter() - t, 3)
        per_silo = {}
        total_mb = wall = cpu = 0.0
        for silo in list_silos(workspace):
            w, c = time.perf_counter(), time.process_time()
            meta = shard_silo(workspace, silo)
            w, c = time.perf_counter() - w, time.process_time() - c
            mb = (meta["bytes"]["train"] + meta["bytes"]["val"]) / 1e6
            per_silo[silo] = {"mb": round(mb, 3), "seconds": round(w, 3),
                              "mb_per_s": round(mb / w, 2), "encoder": meta["encoder"]}
            total_mb, wall, cpu = total_mb + mb, wall + w, cpu + c
        result.update(
            shard_mb=round(total_mb, 3),
            shard_seconds=round(wall, 3),
            shard_mb_per_s=round(total_mb / wall, 2) if wall else None,
            shard_mb_per_cpu_s=round(total_mb / cpu, 2) if cpu else None,
            silos=per_silo,
        )
        return result
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1]), indent=2))
