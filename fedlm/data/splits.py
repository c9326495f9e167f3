"""Which side of the train/validation split a document falls on: a hash of its text, never its position.

    side = "val" if split_hash(text, seed) < val_fraction else "train"

Shared by the raw-text and chat shard writers (shards.py, chatshards.py) and by the canary
audit, which must know where a planted document lands without sharding it.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np

Split = Literal["train", "val"]


def split_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from (seed, text): the document's place in the train/val split.

    `fedlm data shard` puts a document in val when this is below `val_fraction`, so anyone
    holding the text and the seed (the canary audit, which must plant canaries in train)
    knows the split a document lands in without sharding it. Keyed BLAKE2b: stable across
    processes, Python versions and platforms, unlike `hash()`.
    """
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                        key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def forced_sides(hashes: np.ndarray, val_fraction: float) -> np.ndarray | None:
    """Where no document fell on one side (rare: tiny silos), the split with the nearest one
    moved over; None when both sides already have a document (or can't: < 2 documents)."""
    to_val = hashes < val_fraction
    if val_fraction <= 0 or hashes.size < 2 or (to_val.any() and not to_val.all()):
        return None
    if not to_val.any():
        to_val[hashes == hashes.min()] = True
    if to_val.all():
        to_val[hashes == hashes.max()] = False
    return to_val
