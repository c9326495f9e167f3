"""Readers: every format and encoding is read; every bad file is reported with a reason and
never costs the good ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedlm.data.readers import (
    FileReport,
    decode,
    discover,
    line_ranges,
    read_documents,
    split_long,
)

PROSE = "The quick brown fox jumps over the lazy dog. " * 3
ZH = "床前明月光，疑是地上霜。举头望明月，低头思故乡。这是一首很有名的唐诗，几乎每个中国孩子都会背诵。"


def _docs(path: Path, **kw: str) -> tuple[list[str], FileReport]:
    files, errors = discover([path])
    assert not errors and len(files) == 1
    report = FileReport()
    return list(read_documents(files[0], report, **kw)), report


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_utf_encodings(tmp_path: Path, encoding: str) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes((PROSE + ZH).encode(encoding))
    docs, report = _docs(p)
    assert docs == [PROSE + ZH]


def test_gbk_and_latin1_are_detected(tmp_path: Path) -> None:
    text_zh = ZH * 8
    (tmp_path / "gbk.txt").write_bytes(text_zh.encode("gbk"))
    fr = "Le garçon a mangé une crème brûlée très sucrée à côté de l'hôtel. " * 10
    (tmp_path / "latin1.txt").write_bytes(fr.encode("latin-1"))
    assert decode(text_zh.encode("gbk"))[0] == text_zh
    assert decode(fr.encode("latin-1"))[0] == fr


def test_binary_and_empty_are_errors(tmp_path: Path) -> None:
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ValueError, match="binary"):
        decode((tmp_path / "bin.txt").read_bytes())
    (tmp_path / "empty.txt").write_bytes(b"")
    files, _ = discover([tmp_path / "empty.txt"])
    with pytest.raises(ValueError, match="empty"):
        list(read_documents(files[0], FileReport()))


def test_jsonl_keeps_good_lines_and_reports_bad_ones(tmp_path: Path) -> None:
    lines = [json.dumps({"body": f"document {i} {PROSE}"}) for i in range(10)]
    lines[2] = "{not json"
    lines[3] = '{"body": '
    lines[7] = json.dumps({"other": "x"})
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    docs, report = _docs(p, text_field="body")
    assert [d.split()[1] for d in docs] == ["0", "1", "4", "5", "6", "8", "9"]
    assert any("lines 3-4: not valid JSON" in e for e in report.errors)
    assert any("line 8: no string field 'body'" in e for e in report.errors)


def test_csv_column_and_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text('id,content\n1,"hello, world\nsecond line"\n2,plain\n')
    docs, _ = _docs(p, text_column="content")
    assert docs == ["hello, world\nsecond line", "plain"]
    files, _ = discover([p])
    with pytest.raises(ValueError, match="no column 'text'.*'id', 'content'"):
        list(read_documents(files[0], FileReport()))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two doc"], "n": [1, 2]}), tmp_path / "x.parquet")
    docs, report = _docs(tmp_path / "x.parquet")
    assert docs == ["one doc", "two doc"]


def test_discovery_recursive_symlink_loop_missing(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.md").write_text(PROSE)
    (tmp_path / "a" / "y.rst").write_text(PROSE)
    (tmp_path / "a" / "b" / "up").symlink_to(tmp_path / "a")  # a loop through a folder
    (tmp_path / "a" / "l1.txt").symlink_to(tmp_path / "a" / "l2.txt")  # a loop of file links
    (tmp_path / "a" / "l2.txt").symlink_to(tmp_path / "a" / "l1.txt")
    (tmp_path / "a" / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "a" / ".git").mkdir()
    files, errors = discover([tmp_path / "a", tmp_path / "nope"])
    assert sorted(f.rel for f in files) == ["b/x.md", "y.rst"]
    reasons = {Path(e.path).name: e.reason for e in errors}
    assert reasons["nope"] == "does not exist"
    assert reasons["up"].startswith("symlink loop")
    assert reasons["l1.txt"] == reasons["l2.txt"] == "symlink loop"
    assert "unsupported file type '.png'" in reasons["pic.png"]


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "secret.txt"
    p.write_text(PROSE)
    if os.geteuid() == 0:  # root reads anything: make the read itself fail as it would
        import fedlm.data.readers as readers

        def deny(path: Path) -> bytes:
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(readers, "_read_bytes", deny)
    else:
        p.chmod(0)
    files, _ = discover([p])
    with pytest.raises(PermissionError):
        list(read_documents(files[0], FileReport()))


def test_split_long_and_line_ranges() -> None:
    text = ("word " * 50_000).strip()
    pieces = split_long(text, 10_000)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 10_000
    assert split_long("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert line_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
