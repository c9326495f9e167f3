"""The bundled demo corpus: six silos of real text, one `<silo>.tar.xz` each, in this folder.

Each archive holds one folder named for its silo with raw files in their source formats
(.txt, .rst, .csv, .jsonl), so the data readers are exercised as on real input. What each
silo holds, where it comes from and under which licence: SOURCES.md beside this file. The
archives are rebuilt from registry packages by `scripts/build_corpus.py`.

    from fedlm.corpus import SILOS, extract
    folders = extract(Path("ws/raw"))            # {"legal": Path("ws/raw/legal"), ...}
    files = extract_qa(Path("ws/qa"))            # {"legal": Path("ws/qa/legal.jsonl"), ...}

Beside the archives, `qa/<silo>.jsonl` holds a few hundred question-answer conversations per
silo (OpenAI-style `messages`), cut from the same texts by `scripts/build_qa.py`
(qa/SOURCES.md): the instruction-tuning data of `fedlm demo --assistant`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from fedlm.errors import UserError
from fedlm.fileio import atomic_dir, atomic_path

SILOS: tuple[str, ...] = ("legal", "medical", "technical", "literature", "drama", "chinese")
"""The silo names, in the order the demo uses them."""


def archive(silo: str) -> resources.abc.Traversable:
    """The packaged archive of one silo (works from a source tree and an installed wheel)."""
    _check([silo])
    return resources.files(__name__).joinpath(f"{silo}.tar.xz")


def extract(dest: Path, silos: Sequence[str] | None = None) -> dict[str, Path]:
    """Extract the chosen silos (default: all) into `dest/<silo>/`; return the folder per silo.

    Each folder is replaced as a whole (built beside it, then renamed), so an interrupted
    extraction never leaves a half-filled silo. Members are checked by tarfile's "data"
    filter: no absolute paths, links out of the folder, devices or odd permissions.
    """
    chosen = list(SILOS if silos is None else silos)
    _check(chosen)
    dest = Path(dest)
    out: dict[str, Path] = {}
    for silo in chosen:
        target = dest / silo
        with archive(silo).open("rb") as fh, tarfile.open(fileobj=fh, mode="r:xz") as tf:
            with atomic_dir(target) as tmp:
                tmp.chmod(0o755)  # mkdtemp makes it private; the silo folder is ordinary data
                try:
                    tf.extractall(tmp, filter=_strip_prefix(silo))
                except tarfile.FilterError as exc:
                    raise UserError(
                        f"corpus archive {silo}.tar.xz: unsafe member ({exc}); "
                        "rebuild it with scripts/build_corpus.py"
                    ) from exc
        out[silo] = target
    return out


def extract_qa(dest: Path, silos: Sequence[str] | None = None) -> dict[str, Path]:
    """Copy the chosen silos' (default: all) question-answer files to `dest/<silo>.jsonl`
    (each written atomically); return the file per silo."""
    chosen = list(SILOS if silos is None else silos)
    _check(chosen)
    Path(dest).mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for silo in chosen:
        target = Path(dest) / f"{silo}.jsonl"
        with atomic_path(target) as tmp:
            tmp.write_bytes(resources.files(__name__).joinpath("qa", f"{silo}.jsonl").read_bytes())
        out[silo] = target
    return out


def _check(silos: Sequence[str]) -> None:
    for silo in silos:
        if silo not in SILOS:
            raise UserError(f"unknown corpus silo {silo!r}: choose from {', '.join(SILOS)}")


def _strip_prefix(silo: str) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """A tar filter that drops the leading `<silo>/` and then applies the "data" filter."""
    prefix = f"{silo}/"

    def keep(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if member.name.rstrip("/") == silo:
            return None  # the top folder itself: `atomic_dir` made it
        if not member.name.startswith(prefix):
            raise UserError(
                f"corpus archive {silo}.tar.xz: member {member.name!r} is outside {prefix}; "
                "rebuild it with scripts/build_corpus.py"
            )
        return tarfile.data_filter(member.replace(name=member.name[len(prefix) :]), path)

    return keep
