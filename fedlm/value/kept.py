"""What a valuation has retrained so far, kept in RUN/.value-progress.json until value.json is written.

    kept = Kept.open(run_dir)
    coalitions = kept.game(fingerprint(cfg, rounds=2, local_steps=5, beneficiaries=b), start, tokens)
    coalitions.get("a+b")                          # {"bits_per_byte": {...}, "privacy": {...} | None, "retrained": True}
    kept.add(fp, "a+b", bits_per_byte, privacy, retrained=True)   # written (atomically, fsynced) at once
    kept.remove()                                  # once value.json is written

A retrained coalition costs its members minutes to hours of compute, and each score of its model
counts against every beneficiary's `max_scored_models`. A valuation stopped midway (a silo's budget,
a lost node, Ctrl-C) used to throw all of it away, so the same command again retrained and had
scored every coalition anew. Now the same command goes on where it stopped. (Its DP releases were
never charged twice: a silo's noise is named by the request, so the same round asked again is the
same release.) A coalition's scores are reused only under the same game: the same resolved config
(seed included), budget and beneficiaries, and the same start-model scores and token counts from
every beneficiary (a silo whose validation split changed scores the start model differently, which
starts the game afresh). A kept coalition's releases (its privacy.json) are kept with it, so
value.json's privacy still counts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedlm.config import Config, config_to_toml
from fedlm.errors import UserError
from fedlm.fileio import write_json

NAME = ".value-progress.json"
TOLERANCE = 1e-6  # bits/byte: a start score within this of the kept one is the same split's


def fingerprint(cfg: Config, *, rounds: int, local_steps: int, beneficiaries: list[str]) -> str:
    """The game a coalition's scores belong to: what retrains it and who scores it."""
    what = {"config": config_to_toml(cfg), "rounds": rounds, "local_steps": local_steps,
            "beneficiaries": sorted(beneficiaries)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _same(kept: Any, start: dict[str, float]) -> bool:
    """The start model's scores match: to well within a changed split's effect, and past the last bits that
    another thread count (a SuperNode restarted with other settings) can move."""
    return isinstance(kept, dict) and kept.keys() == start.keys() and all(
        isinstance(kept[j], float) and abs(kept[j] - x) <= TOLERANCE for j, x in start.items())


class Kept:
    """RUN/.value-progress.json: {fingerprint: {"start", "tokens", "coalitions": {key: entry}}}."""

    def __init__(self, path: Path, body: dict[str, Any]) -> None:
        self.path, self.body = path, body
        self.resumed = 0  # coalitions this call took from the file instead of retraining

    @classmethod
    def open(cls, run_dir: Path) -> Kept:
        path = run_dir / NAME
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet; or, written atomically, broken by hand: start afresh
            body = {}
        return cls(path, body if isinstance(body, dict) else {})

    def game(self, fp: str, start: dict[str, float], tokens: dict[str, int]) -> dict[str, Any]:
        """The coalitions kept for game `fp`, emptied when the beneficiaries' start scores or tokens differ."""
        game = self.body.get(fp)
        if not isinstance(game, dict) or game.get("tokens") != tokens or not _same(game.get("start"), start):
            game = self.body[fp] = {"start": start, "tokens": tokens, "coalitions": {}}
        return game["coalitions"]

    def add(self, fp: str, key: str, bits_per_byte: dict[str, float], privacy: dict[str, Any] | None, *,
            retrained: bool) -> None:
        """Keep coalition `key`'s scores (`retrained`: for a model retrained here, not the run's own)."""
        self.body[fp]["coalitions"][key] = {"bits_per_byte": bits_per_byte, "privacy": privacy,
                                            "retrained": retrained}
        write_json(self.path, self.body)

    @property
    def coalitions(self) -> int:
        """Retrained coalitions kept, over every game in the file."""
        return sum(bool(c.get("retrained")) for g in self.body.values() if isinstance(g, dict)
                   for c in g.get("coalitions", {}).values())

    @contextlib.contextmanager
    def said_on_stop(self) -> Iterator[None]:
        """A UserError or Ctrl-C that stops the valuation says what is kept and how to go on."""
        try:
            yield
        except (UserError, KeyboardInterrupt) as e:
            if not self.coalitions:
                raise
            kept = (f"the {self.coalitions} coalitions retrained so far are kept in {self.path}: the same command "
                    "again goes on from there")
            raise type(e)(f"{e} ({kept})" if str(e) else kept) from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
