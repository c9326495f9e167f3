"""What the `fedlm` command says when a new user tries it: each message names the right thing."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedlm import cli
from fedlm.errors import UserError
from fedlm.evaluate import check_silo_dir
from fedlm.model import Transformer
from fedlm.modelio import save_model


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def fedlm(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """`fedlm ARGS` through the real entry point (`cli.main`, its error printing included), in this
    process: the same code as the installed command without a Python start per call."""

    def run(*args: str, cwd: Path | None = None) -> Result:
        monkeypatch.setattr(sys, "argv", ["fedlm", *args])
        monkeypatch.setenv("COLUMNS", "200")
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def one_line_error(r: Result) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_tokenizer_reports_what_tokenizer_privacy_json_records(fedlm, tmp_path: Path, workspace: Path) -> None:  # type: ignore[no-untyped-def]
    """`fedlm data tokenizer` prints each silo's released pre-token count and the vocabulary it got,
    the numbers WS/tokenizer_privacy.json holds (not None, not the size asked)."""
    ws = tmp_path / "ws"
    for silo in ("legal", "drama"):
        (ws / "silos" / silo).mkdir(parents=True)
        docs = (workspace / "silos" / silo / "docs.jsonl").read_text().splitlines()[:20]
        (ws / "silos" / silo / "docs.jsonl").write_text("\n".join(docs) + "\n")
    r = fedlm("data", "tokenizer", "--workspace", str(ws), "--vocab-size", "4096", "--epsilon", "8", "--seed", "0")
    assert r.returncode == 0, r.stderr
    record = json.loads((ws / "tokenizer_privacy.json").read_text())
    for silo, rec in record["silos"].items():
        assert f"{silo}: ε = 8.0, δ = 1e-06, released {rec['released_pretokens']:,} pre-tokens" in r.stdout
    assert record["vocab_size"] < 4096  # a small text: fewer merges than asked, and the line says so
    assert f"(vocab {record['vocab_size']:,}; 4,096 asked" in r.stdout, r.stdout
    assert "None" not in r.stdout


@pytest.mark.parametrize(("toml", "expected"), [
    ("[federaton]\nrounds = 3\n", "unknown section [federaton]; known: data,"),
    ("[federation]\nroundz = 3\n", "unknown key federation.roundz; known keys of [federation]: "),
    ("[federation]\npersonalize_steps = 3\n",
     "federation.personalize_steps is now federation.personalise_steps; rename the key"),
])
def test_config_errors_keep_the_section_name(fedlm, tmp_path: Path, toml: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    """The terminal prints `[federaton]` as written (rich would take it for markup and drop it)."""
    (tmp_path / "bad.toml").write_text(toml)
    line = one_line_error(fedlm("train", str(tmp_path / "bad.toml")))
    assert expected in line and "bad.toml" in line, line


def test_eval_data_that_is_not_a_silo_says_so(fedlm, tmp_path: Path, workspace: Path) -> None:  # type: ignore[no-untyped-def]
    """`--data ws/kjv` (no silos/ in the path) is blamed on the path, with the silo it meant."""
    from fedlm.config import ModelConfig

    save_model(Transformer(ModelConfig(preset="tiny", vocab_size=512, max_seq_len=64)), tmp_path / "run" / "model",
               tokenizer_path=workspace / "tokenizer.json")
    line = one_line_error(fedlm("eval", str(tmp_path / "run"), "--data", str(workspace / "legal")))
    assert f"{workspace / 'legal'}: no such directory, so not a silo" in line and f"did you mean {workspace / 'silos' / 'legal'}" in line
    assert "tokenizer" not in line
    with pytest.raises(UserError, match=r"a workspace, not a silo; give one of its silos, .*silos/drama \(silos: "
                                        r"drama, legal, technical\)"):
        check_silo_dir(workspace)
    with pytest.raises(UserError, match="no such directory, so not a silo; give a silo, WS/silos/NAME"):
        check_silo_dir(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"not a silo \(a silo is WS/silos/NAME"):
        check_silo_dir(tmp_path)
    check_silo_dir(workspace / "silos" / "legal")


def test_prepare_refuses_to_replace_a_silo_unless_asked(fedlm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Preparing into an existing silo would drop its documents: refused, one line naming --replace."""
    (tmp_path / "many").mkdir()
    for i in range(5):
        (tmp_path / "many" / f"d{i}.txt").write_text(f"Document number {i}. " * 40 + f"Unique tail {i * 7919}.\n")
    (tmp_path / "few.txt").write_text("Only this one document is here, on its own, long enough to be kept. " * 5)
    ws = tmp_path / "ws"
    assert fedlm("data", "prepare", "many", "--silo", "a", "--workspace", "ws", cwd=tmp_path).returncode == 0
    before = (ws / "silos" / "a" / "docs.jsonl").read_bytes()
    line = one_line_error(fedlm("data", "prepare", "few.txt", "--silo", "a", "--workspace", "ws", cwd=tmp_path))
    assert "already holds silo 'a' (5 documents)" in line and "--replace" in line, line
    assert (ws / "silos" / "a" / "docs.jsonl").read_bytes() == before
    r = fedlm("data", "prepare", "few.txt", "--silo", "a", "--workspace", "ws", "--replace", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len((ws / "silos" / "a" / "docs.jsonl").read_text().splitlines()) == 1
