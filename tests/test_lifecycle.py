"""A run's life: checkpoints that survive a kill at any step, one live run per run folder.

The kill tests kill a real process (SIGKILL, nothing runs after it) at the point named, then
resume, and compare the final global weights bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedlm.config import config_to_toml
from fedlm.errors import UserError
from fedlm.federation.deploy import (
    free_port,
    start_superlink,
    start_supernode,
    stop,
    wait_superlink,
)
from fedlm.federation.runner import FLOWER_ENV, run_federated
from fedlm.fileio import atomic_dir, recover_dir, recover_strays, write_json
from fedlm.runlock import FLOWER_RUN, live_run
from tests.test_federation import make_ws, rounds, tiny_cfg, weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ws(tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def reference(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 3-round in-process run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_federated(tiny_cfg(ws), out)
    return out


# A child process that runs the federated config and SIGKILLs itself at the `at`-th call of
# os.replace whose source or target is the checkpoint folder, before it renames (2: round 2's
# swap not begun, its complete temp left; 3: between the swap's renames, the old copy moved aside).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import fedlm.fileio as fileio
    from tests.test_federation import tiny_cfg
    from fedlm.federation.runner import run_federated

    ws, out, at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    calls = []
    real = os.replace

    def replace(src, dst):
        if "checkpoint" in (Path(src).name + Path(dst).name) and not Path(dst).name.endswith(".json"):
            calls.append(src)
            if len(calls) == at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    fileio.os.replace = replace  # type: ignore[attr-defined]
    run_federated(tiny_cfg(ws), out)
""")


@pytest.mark.parametrize("at", [2, 3])
def test_kill_inside_the_checkpoint_swap_then_resume(ws: Path, reference: Path, tmp_path: Path, at: int) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(ws), str(out), str(at)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = out / "checkpoint"
    if at == 3:  # cut between the renames: only the moved-aside old copy and the new temp remain
        assert not ckpt.exists() and list(out.glob(".checkpoint.old-*")) and list(out.glob(".checkpoint.*.tmp"))
    run_federated(tiny_cfg(ws), out, resume=True)
    assert [r["round"] for r in rounds(out)] == [1, 2, 3]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recover_dir_puts_back_the_old_copy_and_clears_strays(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    os.replace(target, tmp_path / ".ckpt.old-123")  # a swap cut after its first rename
    (tmp_path / ".ckpt.abc.tmp").mkdir()            # and the temp of a write cut earlier
    (tmp_path / ".ckpt.old-7").mkdir()
    os.utime(tmp_path / ".ckpt.old-7", (1, 1))      # an older copy of an earlier kill
    assert recover_dir(target)
    assert (target / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not recover_dir(tmp_path / "none")
    (tmp_path / ".summary.json.x1y2.tmp").write_text("{")  # an atomic_path write cut by a kill
    (tmp_path / ".model.abc.tmp").mkdir()
    recover_strays(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---------------------------------------------------------------------------------------
# one live run per run folder


def test_a_live_run_holds_its_folder(ws: Path, reference: Path, tmp_path: Path) -> None:
    """While a run writes its folder, a second run or a resume there is refused, naming the live run."""
    seen: list[dict | None] = []
    run_federated(tiny_cfg(ws, rounds=1), tmp_path / "run", on_round=lambda r, n, row: seen.append(
        live_run(tmp_path / "run")))
    assert seen and seen[0] is not None and seen[0]["pid"] == os.getpid()
    assert live_run(tmp_path / "run") is None  # released at the end

    # a deployed run's ServerApp holds `reference` (here: a lock taken in another process)
    write_json(reference / FLOWER_RUN, {"run_id": 4242, "superlink": "10.0.0.5:9092"})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fedlm.runlock import hold
        with hold(__import__("pathlib").Path({str(reference)!r}), engine="flower", run_id=4242):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"live Flower run 4242 on SuperLink 10\.0\.0\.5:9092 .*flwr stop 4242"):
            run_federated(tiny_cfg(ws), reference, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert live_run(reference) is None  # the kernel dropped the killed holder's lock


# ---------------------------------------------------------------------------------------
# honest rounds


def test_skipped_rounds_make_the_command_fail(ws: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Every update rejected (norm bound below any update): each round is printed as skipped,
    summary.json counts 0 completed rounds and `fedlm train` exits 1."""
    from tests.test_multimachine import fedlm_here

    cfg_path = tmp_path / "fed.toml"
    cfg_path.write_text(config_to_toml(tiny_cfg(ws, rounds=2, max_update_norm=1e-9)))
    r = fedlm_here(capfd, "train", str(cfg_path), "--out", str(tmp_path / "run"))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "round 1 skipped (a: rejected: norm" in r.stdout + r.stderr
    assert "federated: 0 of 2 rounds completed" in r.stdout and "2 of 2 rounds did not complete" in r.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 0 and [s["round"] for s in summary["rounds_skipped"]] == [1, 2]


def _worse_run(ws: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], name: str, **fed: object
               ) -> tuple[subprocess.CompletedProcess[str], dict]:
    """`fedlm train` with a learning rate that wrecks the model (train.lr = 1.0)."""
    from tests.test_multimachine import fedlm_here

    cfg = tiny_cfg(ws, rounds=2, **fed)
    cfg.train.lr = 1.0
    cfg_path = tmp_path / f"{name}.toml"
    cfg_path.write_text(config_to_toml(cfg))
    r = fedlm_here(capfd, "train", str(cfg_path), "--out", str(tmp_path / name))
    return r, json.loads((tmp_path / name / "summary.json").read_text())


def test_a_silo_left_worse_than_at_the_start_is_named(ws: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """A real run that makes the model worse: each silo scores the starting and the final global
    weights on its own validation split after the last round, and the silos whose loss rose are
    named on the console and in summary.json, with the two validation losses."""
    r, summary = _worse_run(ws, tmp_path, capfd, "plain")
    assert r.returncode == 0, (r.stdout, r.stderr)
    worse = summary["worse_than_start"]
    assert worse and summary["validation_missing"] == {}
    validation = json.loads((tmp_path / "plain" / "validation.json").read_text())["silos"]
    assert set(validation) == {"a", "b", "c"}
    for silo, losses in worse.items():
        assert losses == validation[silo] and losses["val_loss_final"] > losses["val_loss_start"]
        assert (f"silo {silo}: validation loss {losses['val_loss_start']:.4f} with the starting weights, "
                f"{losses['val_loss_final']:.4f} with the final ones: worse than at the start") in r.stdout + r.stderr
    # the starting loss is the initial model's on that silo's val split: the same whatever the run did
    good = run_federated(tiny_cfg(ws, rounds=1), tmp_path / "good")
    assert good["worse_than_start"] == {}
    again = json.loads((tmp_path / "good" / "validation.json").read_text())["silos"]
    assert all(again[s]["val_loss_start"] == validation[s]["val_loss_start"] for s in validation)
    assert all(again[s]["val_loss_final"] < again[s]["val_loss_start"] for s in again)


def test_worse_than_start_under_secure_aggregation_sends_only_the_verdict(
        ws: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Under SecAgg the server learns no per-silo loss: a silo says only whether it got worse."""
    r, summary = _worse_run(ws, tmp_path, capfd, "secagg", secure_aggregation=True)
    validation = json.loads((tmp_path / "secagg" / "validation.json").read_text())["silos"]
    assert set(validation) == {"a", "b", "c"} and all(set(v) == {"worse"} for v in validation.values())
    assert summary["worse_than_start"] and all(v == {} for v in summary["worse_than_start"].values())
    silo = next(iter(summary["worse_than_start"]))
    assert f"silo {silo}: its validation loss is higher with the final weights" in r.stdout + r.stderr


# ---------------------------------------------------------------------------------------
# on Flower's deployment engine (real SuperLink, SuperNodes and `fedlm train` processes)

CLI = [sys.executable, "-m", "fedlm.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, **FLOWER_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def _rows_done(run: Path) -> int:
    path = run / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_kill9_of_train_then_resume_on_flower(ws: Path, reference: Path, tmp_path: Path) -> None:
    """`fedlm train` killed with SIGKILL after round 1: the SuperLink and SuperNodes it started die
    with it, the run folder is free again, and --resume finishes the one run: rounds 1, 2, 3 once
    each and the global weights of the uninterrupted run, bit for bit."""
    cfg_path, out = tmp_path / "fed.toml", tmp_path / "run"
    cfg_path.write_text(config_to_toml(tiny_cfg(ws, engine="flower", round_timeout=120.0)))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([*CLI, "train", str(cfg_path), "--out", str(out)], env=_env(), stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _rows_done(out) >= 1 or first.poll() is not None, 400, "round 1")
        finally:
            first.kill()
            first.wait()
    _wait_for(lambda: live_run(out) is None, 60, "the killed run's ServerApp to stop")
    r = subprocess.run([*CLI, "train", str(out / "config.toml"), "--resume", "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [row["round"] for row in rounds(out)] == [1, 2, 3]
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / ".flower").exists() and not list(out.glob(".checkpoint*"))


@pytest.mark.slow
def test_a_silo_killed_and_restarted_mid_run_rejoins(ws: Path, tmp_path: Path) -> None:
    """A running SuperLink and three SuperNodes; silo b's SuperNode is killed after round 1 and
    restarted. Round 2 names b as unavailable (Flower's node-unavailable reply, not a timeout)
    and, with min_silos = 3, is skipped; b rejoins at round 3; `fedlm train` exits 1 and
    summary.json counts 3 of 4 rounds. Then a run stopped with SIGTERM is stopped on the
    SuperLink too (its ServerApp lets go of the run folder)."""
    port = free_port()
    link = f"127.0.0.1:{port}"
    logs, homes = tmp_path / "logs", tmp_path / "homes"
    procs = [start_superlink(port=port, log_path=logs / "superlink.log", flwr_home=homes / "link")]
    try:
        wait_superlink(link, insecure=True, proc=procs[0])
        nodes = {s: start_supernode(link, ws, s, port=free_port(), log_path=logs / f"{s}.log",
                                    flwr_home=homes / s, insecure=True) for s in ("a", "b", "c")}
        procs += nodes.values()
        cfg_path, out = tmp_path / "fed.toml", tmp_path / "run"
        cfg_path.write_text(config_to_toml(tiny_cfg(ws, engine="flower", rounds=4, min_silos=3,
                                                    round_timeout=150.0)))
        cmd = [*CLI, "train", str(cfg_path), "--superlink", link, "--insecure"]
        with open(tmp_path / "train.log", "w") as log:
            train = subprocess.Popen([*cmd, "--out", str(out)], env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            procs.append(train)
            _wait_for(lambda: _rows_done(out) >= 1 or train.poll() is not None, 400, "round 1")
            os.killpg(nodes["b"].pid, signal.SIGKILL)  # as a crash: no goodbye to the SuperLink
            nodes["b"].wait()
            time.sleep(5)
            procs.append(start_supernode(link, ws, "b", port=free_port(), log_path=logs / "b2.log",
                                         flwr_home=homes / "b2", insecure=True))
            assert train.wait(timeout=600) == 1, (tmp_path / "train.log").read_text()
        rows = rounds(out)
        assert [r["round"] for r in rows] == [1, 2, 3, 4]
        assert not rows[1]["completed"] and rows[1]["dropped"]["b"].startswith("failed: node unavailable"), rows[1]
        assert all(r["completed"] and not r["dropped"] and set(r["silos"]) == {"a", "b", "c"} for r in rows[2:])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds_completed"] == 3 and summary["rounds_skipped"][0]["round"] == 2
        text = (tmp_path / "train.log").read_text()
        assert "round 2 skipped (b: failed: node unavailable" in text and "1 of 4 rounds did not complete" in text

        # SIGTERM while a run is live on this SuperLink: `flwr stop` ends it there
        with open(tmp_path / "term.log", "w") as log:
            term = subprocess.Popen([*cmd, "--out", str(tmp_path / "term")], env=_env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(term)
            _wait_for(lambda: live_run(tmp_path / "term") is not None, 300, "the ServerApp to start")
            term.send_signal(signal.SIGTERM)
            assert term.wait(timeout=60) != 0
        _wait_for(lambda: live_run(tmp_path / "term") is None, 60, "the stopped run's ServerApp to end")
    finally:
        stop(procs)
