"""The `fedlm` command as a user meets it: --help everywhere, one-line errors with exit 2, and the
README's step-by-step commands run exactly as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedlm.corpus import extract

ROOT = Path(__file__).resolve().parents[1]
FEDLM = [sys.executable, "-m", "fedlm.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def fedlm(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDLM, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args",
    [[], ["data"], ["data", "prepare"], ["data", "tokenizer"], ["data", "shard"], ["train"], ["eval"],
     ["generate"], ["export"], ["demo"], ["data", "counts"], ["data", "canaries"], ["node"], ["superlink"], ["serve"], ["plan"],
     ["audit"], ["report"], ["explain"], ["personalise"]],
)
def test_every_command_has_help(args: list[str]) -> None:
    """In this process (typer's runner; the subprocess path is test_bad_input_is_one_line_exit_2's)."""
    from typer.testing import CliRunner

    from fedlm.cli import app

    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def _assert_one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    _assert_one_line_error(fedlm("train", str(bad)), "train.stepz")
    _assert_one_line_error(fedlm("train", str(tmp_path / "none.toml")), "none.toml")
    ledger = tmp_path / "ws/silos/x/.secrets/ledger.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"lifetime": {"releases": [1]}}')
    _assert_one_line_error(fedlm("silo", "spent", "--workspace", str(tmp_path / "ws"), "--silo", "x"),
                           "ledger.json is corrupt (ledger 'lifetime'")
    _assert_one_line_error(fedlm("silo", "spent", "--workspace", str(tmp_path / "ws"), "--silo", "y"), "no such silo")
    _assert_one_line_error(fedlm("personalise", str(tmp_path / "none"), "--workspace", str(tmp_path), "--silo", "a"),
                           "none/config.toml: not found")
    _assert_one_line_error(fedlm("eval", str(tmp_path / "nomodel"), "--data", str(tmp_path)), "nomodel")
    _assert_one_line_error(fedlm("data", "shard", "--workspace", str(tmp_path / "empty")), "empty")
    r = fedlm("--debug", "train", str(bad))
    assert r.returncode != 0 and "Traceback" in r.stderr


def _readme_block(after: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    m = re.search(rf"```{lang}\n(.*?)```", text[start:], re.S)
    assert m, f"no {lang} block after {after!r} in README.md"
    return m.group(1)


@pytest.mark.slow
def test_readme_step_by_step_commands_run(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command of README's "Using it step by step" runs as written, on inputs of the shapes it names.

    Through the CLI's `main` in this process, from the folder the commands name (the subprocess path
    is test_bad_input_is_one_line_exit_2's); `fedlm serve` runs as its own process."""
    from tests.test_multimachine import fedlm_here

    monkeypatch.chdir(tmp_path)
    raw = extract(tmp_path / "raw", ["medical", "legal", "literature"])
    # the README's example inputs: a folder of notes, a JSONL of letters, a folder of contracts
    (tmp_path / "notes").mkdir()
    for i, p in enumerate(sorted(raw["literature"].rglob("*.txt"))[:6]):
        (tmp_path / "notes" / f"note{i}.txt").write_text(p.read_text()[:30_000])
    medical = sorted(raw["medical"].rglob("*.*"))[0]
    lines = medical.read_text().splitlines()[:3000]
    with open(tmp_path / "letters.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps({"text": line}) + "\n")
    (tmp_path / "contracts").mkdir()
    for p in sorted(raw["legal"].rglob("*.txt"))[:120]:
        (tmp_path / "contracts" / p.name).write_text(p.read_text())
    (tmp_path / "run.toml").write_text(_readme_block("A minimal `run.toml`", "toml"))

    for line in _readme_block("Using it step by step", "sh").splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("fedlm "):
            continue
        args = shlex.split(line)[1:]
        r = fedlm_here(capfd, *args)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
        if "--json" in args:
            result = json.loads(r.stdout)
            assert set(result) == {"perplexity", "bits_per_byte", "token_accuracy", "tokens"}
            assert result["bits_per_byte"] < 4.0
        if args[0] == "generate":
            assert r.stdout.startswith("The patient") and len(r.stdout) > len("The patient") + 10
    assert (tmp_path / "hf-model" / "config.json").exists()

    # then "Federated training, privacy, compute and serving", in the same folder
    (tmp_path / "fed.toml").write_text(_readme_block("## Federated training, privacy", "toml"))
    (tmp_path / "key.txt").write_text("s3cret-key\n")
    for line in _readme_block("## Federated training, privacy", "sh").splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("fedlm "):
            continue
        args = shlex.split(line)[1:]
        if args[0] == "serve":
            _serve_and_query(args, cwd=tmp_path)
            continue
        r = fedlm_here(capfd, *args)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
        if args[0] == "train":  # a federated run says how to see it on one page
            assert f"report: fedlm report {args[args.index('--out') + 1]}" in r.stdout, r.stdout
        if args[0] == "audit":
            report = json.loads(r.stdout)
            assert "clinic" in json.dumps(report) and "auc" in json.dumps(report).lower()
    rounds = (tmp_path / "runs" / "fed" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 10 and all(json.loads(x)["completed"] for x in rounds)
    privacy = json.loads((tmp_path / "runs" / "fed-dp" / "privacy.json").read_text())
    assert privacy["mode"] == "record"
    # what the runs took from a silo, by its own records: the DP run's ε, as the run states it
    (spent,) = [shlex.split(x)[1:] for x in _readme_block("What runs have taken from a silo", "sh").splitlines()
                 if x.strip()]
    r = fedlm_here(capfd, *spent)
    assert r.returncode == 0 and "silo clinic: no privacy.toml" in r.stdout, r.stdout
    assert (f"all runs on its data together: record-level ε = {privacy['silos']['clinic']['epsilon']:.3f} at δ = "
            f"{privacy['delta']:g}") in r.stdout, r.stdout
    # `fedlm report runs/fed-dp` (after the audit, which keeps its results in the run): ε per silo and the audit
    page = (tmp_path / "runs" / "fed-dp" / "report.html").read_text()
    assert '<section id="privacy">' in page and "<h3>Audit</h3>" in page
    assert f'data-silo="clinic" data-key="epsilon" data-value="{privacy["silos"]["clinic"]["epsilon"]!r}"' in page


def _serve_and_query(args: list[str], *, cwd: Path) -> None:
    """Run `fedlm serve` as written (on a free port) and talk to it with the real openai client."""
    import socket
    import time

    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(port) if prev == "--port" else a for prev, a in zip(["", *args[:-1]], args, strict=True)]
    proc = subprocess.Popen([*FEDLM, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            try:
                models = client.models.list()
                break
            except Exception:
                assert time.monotonic() < deadline, "fedlm serve did not come up"
                time.sleep(0.5)
        name = models.data[0].id
        out = client.completions.create(model=name, prompt="The patient", max_tokens=8, temperature=0)
        assert out.choices[0].text and out.usage is not None and out.usage.completion_tokens > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
