"""A run's life: checkpoints that survive a kill at any step, one live run per run folder.

The kill tests kill a real process (SIGKILL, nothing runs after it) at the point named, then
resume, and compare the final global weights bit for bit with an uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedlm.federation.runner import run_federated
from fedlm.fileio import atomic_dir, recover_dir
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
