"""prepare_silo end to end: a folder of good and bad files gives every good document, a card
listing each bad file with its reason, a sha256 that matches the file, progress callbacks,
no half-written silo when interrupted, and UserError when nothing survives."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlm.data import prepare as prepare_mod
from fedlm.data.prepare import prepare_silo
from fedlm.errors import UserError

PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good "
         "fortune, must be in want of a wife. ")
POEM = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
OTHER = {
    "beta": "Call me Ishmael. Some years ago, never mind how long precisely, having little money.",
    "gamma": "The Zen of Python says that explicit is better than implicit, and simple is good.",
    "delta": "A fracture of the neck of the femur is treated surgically in most older patients.",
    "epsilon": "The licensee may copy, modify and distribute the software under these terms.",
    "zeta": "Now is the winter of our discontent made glorious summer by this sun of York.",
}


def _good(root: Path) -> dict[str, str]:
    """Good files of every format; returns a marker word expected in each one's output."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(f"alpha {PROSE}Write to jane.doe@example.com today.")
    (root / "sub" / "b.md").write_text(f"# Beta\n\nbeta {OTHER['beta']}")
    (root / "c.rst").write_text(f"Gamma\n=====\n\ngamma {OTHER['gamma']}\n\n.. code-block:: python\n\n"
                                "   x = [i ** 2 for i in range(10)]\n")
    (root / "d.jsonl").write_text(
        json.dumps({"text": f"delta {OTHER['delta']}"}) + "\n{broken\n" + json.dumps({"text": POEM}) + "\n")
    (root / "e.csv").write_text('id,text\n1,"epsilon ' + OTHER['epsilon'] + '"\n')
    (root / "f.txt").write_bytes(("zeta " + OTHER["zeta"]).encode("utf-16"))
    (root / "g.txt").write_bytes(("身份证11010519491231002X。" + POEM * 6).encode("gbk"))
    return {"a.txt": "alpha", "sub/b.md": "beta", "c.rst": "gamma", "d.jsonl": "delta",
            "e.csv": "epsilon", "f.txt": "zeta", "g.txt": "床前"}


def _bad(root: Path) -> dict[str, str]:
    """Bad files; returns the expected start of each one's reason."""
    (root / "bin.txt").write_bytes(bytes(range(256)) * 64)
    (root / "empty.md").write_bytes(b"")
    (root / "nocol.csv").write_text("id,body\n1,hello there friend\n")
    (root / "loop").symlink_to(root)
    (root / "x1.txt").symlink_to(root / "x2.txt")
    (root / "x2.txt").symlink_to(root / "x1.txt")
    return {"bin.txt": "binary", "empty.md": "empty file", "nocol.csv": "no column 'text'",
            "loop": "symlink loop", "x1.txt": "symlink loop", "x2.txt": "symlink loop"}


def _read(ws: Path, silo: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (ws / "silos" / silo / "docs.jsonl").open()]


def test_good_and_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    want = _good(src)
    bad = _bad(src)
    progress: list[tuple[int, int]] = []
    card = prepare_silo([src, tmp_path / "missing"], silo="s1", workspace=tmp_path / "ws",
                        on_progress=lambda d, t: progress.append((d, t)))
    docs = _read(tmp_path / "ws", "s1")
    by_source: dict[str, str] = {}
    for d in docs:
        by_source[d["source"]] = by_source.get(d["source"], "") + d["text"]
    for source, marker in want.items():
        assert marker in by_source[source], source
    assert "<EMAIL>" in by_source["a.txt"] and "jane.doe" not in by_source["a.txt"]
    assert "<CN_ID>" in by_source["g.txt"]
    assert any(d["text"] == POEM.replace("，", ",") for d in docs)  # NFKC: full-width comma
    reasons = {Path(e["path"]).name: e["reason"] for e in card["errors"]}
    for name, reason in bad.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert reasons["missing"] == "does not exist"
    assert any("line 2" in e["reason"] and "not valid JSON" in e["reason"]
               for e in card["errors"] if e["path"].endswith("d.jsonl"))
    assert card["documents_out"] == len(docs) == 8
    assert card["pii"] == {"CN_ID": 1, "EMAIL": 1}
    assert card["encodings"]["utf-16"] == 1 and "gb18030" in card["encodings"] or \
        any(k.startswith("gb") for k in card["encodings"])
    assert set(card["languages"]) == {"latin", "cjk"}
    data = (tmp_path / "ws" / "silos" / "s1" / "docs.jsonl").read_bytes()
    assert card["sha256"] == hashlib.sha256(data).hexdigest()
    assert card["bytes_out"] == sum(len(d["text"].encode()) for d in docs)
    assert json.loads((tmp_path / "ws" / "silos" / "s1" / "card.json").read_text()) == card
    assert progress and progress[-1][0] == progress[-1][1] > 0
    for key in ("silo", "sources", "documents_in", "bytes_in", "duplicates_removed", "filtered",
                "near_dup_threshold"):
        assert key in card


def test_unreadable_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text(PROSE)
    (src / "secret.txt").write_text(PROSE + " secret")
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for a user
        import fedlm.data.readers as readers

        real = readers._read_bytes

        def deny(path: Path) -> bytes:
            if path.name == "secret.txt":
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(readers, "_read_bytes", deny)
    else:
        (src / "secret.txt").chmod(0)
    card = prepare_silo([src], silo="s", workspace=tmp_path / "ws")
    assert card["documents_out"] == 1
    assert card["errors"] == [{"path": str(src / "secret.txt"),
                               "reason": "permission denied: cannot read it"}]


def test_dedup_and_filters_counted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    words = (PROSE * 4).split()
    (src / "1.txt").write_text(" ".join(words))
    (src / "2.txt").write_text(" ".join(words).upper())  # exact after normalising case
    edited = list(words)
    edited[10] = "changed"
    (src / "3.txt").write_text(" ".join(edited))  # near duplicate
    (src / "4.txt").write_text("tiny")
    (src / "5.txt").write_text("#$%^&*()!@#$%^&*()_+{}|:<>?~" * 10)
    (src / "6.txt").write_text(("the same line again and again\n" * 30) + "end")
    card = prepare_silo([src], silo="s", workspace=tmp_path / "ws")
    assert card["documents_out"] == 1
    assert card["duplicates_removed"] == {"exact": 1, "near": 1}
    assert card["filtered"] == {"repeated_lines": 1, "symbols": 1, "too_short": 1}


def test_nothing_prepared_raises_and_leaves_no_silo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"silo 'z': no document was prepared.*empty file"):
        prepare_silo([src, tmp_path / "nope"], silo="z", workspace=tmp_path / "ws")
    assert not (tmp_path / "ws" / "silos" / "z").exists()
    assert not any((tmp_path / "ws" / "silos").iterdir())


def test_interrupted_prepare_keeps_old_silo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception midway (as Ctrl-C), after batches were already written, leaves the
    previous silo intact and no temp dirs."""
    src = tmp_path / "src"
    _good(src)
    ws = tmp_path / "ws"
    first = prepare_silo([src], silo="s", workspace=ws)
    (ws / "silos" / "s" / "train.bin").write_bytes(b"stale shard")
    calls = 0
    real = prepare_mod._process

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    # batches span files: one document per batch makes the third batch come midway
    monkeypatch.setattr(prepare_mod, "_BATCH_DOCS", 1)
    monkeypatch.setattr(prepare_mod, "_process", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_silo([src], silo="s", workspace=ws, replace=True)
    assert calls == 3
    assert json.loads((ws / "silos" / "s" / "card.json").read_text()) == first
    assert sorted(p.name for p in (ws / "silos").iterdir()) == ["s"]
    monkeypatch.setattr(prepare_mod, "_process", real)
    again = prepare_silo([src], silo="s", workspace=ws, replace=True)
    assert again["sha256"] == first["sha256"]  # deterministic (and one batch = many batches)
    assert not (ws / "silos" / "s" / "train.bin").exists()  # re-prepare replaces the silo


@pytest.mark.slow
def test_50mb_single_line_is_split_not_fatal(tmp_path: Path) -> None:
    """A 50 MB file of one line: processed in bounded pieces, reported, in reasonable time."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text(PROSE)
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
             "incididunt ut labore et dolore magna aliqua ").split()
    chunk = " ".join(f"{w}{i % 997}" for i, w in enumerate(words * 400))
    line = (chunk + " ") * (50_000_000 // (len(chunk) + 1) + 1)
    (src / "huge.txt").write_text(line)
    del line
    t0 = time.perf_counter()
    card = prepare_silo([src], silo="s", workspace=tmp_path / "ws")
    elapsed = time.perf_counter() - t0
    huge = [e["reason"] for e in card["errors"] if e["path"].endswith("huge.txt")]
    assert len(huge) == 1 and "split into" in huge[0]
    assert card["bytes_in"] > 50_000_000
    assert card["documents_out"] >= 2  # ok.txt and at least one piece of the huge line
    assert elapsed < 60, elapsed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=4))
def test_malformed_files_never_lose_good_ones(tmp_path: Path, junk: list[bytes]) -> None:
    """Property: whatever bytes sit beside it, the good document comes out."""
    # a fresh folder per example: two examples can have the same bytes (b"" and b"" + b"")
    src = Path(tempfile.mkdtemp(prefix=f"src{hashlib.md5(b''.join(junk)).hexdigest()}", dir=tmp_path))
    (src / "good.txt").write_text("keep me " + PROSE)
    for i, b in enumerate(junk):
        (src / f"junk{i}.{['txt', 'jsonl', 'csv', 'md'][i % 4]}").write_bytes(b)
    prepare_silo([src], silo="p", workspace=tmp_path / "ws", replace=True)  # one workspace across examples
    assert any(d["text"].startswith("keep me") for d in _read(tmp_path / "ws", "p"))


def _repeated_lines_reference(text: str) -> tuple[float, int]:
    """Line by line, as the definition reads: a non-empty line seen before is a repeat."""
    seen: set[str] = set()
    repeated = total = lines = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        lines += 1
        total += len(line)
        if line in seen:
            repeated += len(line)
        else:
            seen.add(line)
    return repeated / max(total, 1), lines


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.sampled_from(["", " ", "a", "a ", " a", "bb", "c c", "\t", "长文"]),
                      max_size=30))
def test_repeated_lines_ratio_matches_line_by_line(lines: list[str]) -> None:
    """Property: the counting filter agrees with the line-by-line definition, and so does the
    filter's verdict (which skips counting for documents of fewer than five newlines)."""
    from fedlm.data.clean import quality_reason, repeated_lines_ratio

    text = "\n".join(lines)
    assert repeated_lines_ratio(text) == _repeated_lines_reference(text)
    full = "x" * 20 + "\n" + text  # long enough for the length filter, no symbols
    ratio, n = _repeated_lines_reference(full)
    assert (quality_reason(full) == "repeated_lines") == (n >= 6 and ratio > 0.6)


def _normalize_reference(text: str) -> str:
    """normalize as first written: NFKC, then one regex per clean-up."""
    import unicodedata

    from fedlm.data.clean import _BLANK_RUNS, _CONTROL, _TRAILING_SPACE

    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab \t\n\r\x00\x07\x0b\x1f\x7f\x85\u200b\ufeff\u00ad"
                                                  "\u3000ＡＢ１，é中")), max_size=60))
def test_normalize_matches_plain_regex_version(text: str) -> None:
    """Property: the fast paths (byte check for controls, reversed trailing-space pattern,
    replace passes for blank runs) give exactly the one-regex-per-step result."""
    from fedlm.data.clean import normalize

    assert normalize(text) == _normalize_reference(text)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab_ \t\n.,!ß中文かな한€™\u0301\u00d7\u2028\U0001f600١")),
                    min_size=2000, max_size=3000))
def test_long_text_counts_match_regex(text: str) -> None:
    """Property: on long texts, the code-point counts of the symbol filter and the script
    guess equal the regex definitions (`[^\\w\\s]|_`, the CJK and Latin classes)."""
    from fedlm.data import clean

    nonspace = len(text) - sum(text.count(c) for c in " \t\n")
    symbols = len(re.findall(r"[^\w\s]|_", text))
    assert clean.symbol_ratio(text) == symbols / max(nonspace, 1)
    assert clean._count_symbols(text) == symbols
    cjk, latin = len(clean._CJK.findall(text)), len(clean._LATIN.findall(text))
    letters = sum(1 for c in text if c.isalpha()) if cjk + latin < len(text) // 4 else cjk + latin
    want = ("latin" if text.isascii()
            else "cjk" if cjk >= 0.3 * max(letters, 1) and cjk > 0
            else "latin" if latin >= 0.5 * max(letters, 1) else "other")
    assert clean.script_of(text) == want
