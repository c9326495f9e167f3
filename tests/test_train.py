"""Local training: the loss falls, the schedule is right, and a killed run resumes bitwise-equal."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlm.config import ModelConfig, TrainConfig, load_config, save_config
from fedlm.errors import UserError
from fedlm.model import Transformer
from fedlm.resolve import resolve_config
from fedlm.train import lr_at, make_optimizer, train

FEDLM = [sys.executable, "-m", "fedlm.cli"]


def _cfg(ws: Path, **train: object):  # type: ignore[no-untyped-def]
    sets = [f'data.workspace="{ws}"', "model.max_seq_len=64", "train.seq_len=64", "train.batch_size=4",
            "train.threads=1", "train.warmup_steps=2", "train.log_every=1", "train.eval_batches=2"]
    sets += [f"train.{k}={v!r}".replace("'", '"') for k, v in train.items()]
    return load_config(None, sets)


def test_schedule_warmup_then_cosine() -> None:
    tc = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(60, tc) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, tc) == pytest.approx(1e-4)


def test_loss_falls_and_run_dir_describes_itself(workspace: Path, tmp_path: Path) -> None:
    cfg = _cfg(workspace, steps=40, checkpoint_every=20)
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    rows = [__import__("json").loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(512)=6.2 down by more than a nat
    assert summary["steps"] == 40
    assert (run / "model" / "model.safetensors").exists() and (run / "checkpoint" / "state.json").exists()
    assert load_config(run / "config.toml") == resolve_config(cfg)  # the resolved config repeats the run


def test_bf16_and_activation_checkpointing_train(workspace: Path, tmp_path: Path) -> None:
    summary = train(_cfg(workspace, steps=6, precision="bf16", activation_checkpointing=True,
                         grad_accum=2, checkpoint_every=6), tmp_path / "run")
    assert math.isfinite(summary["loss"])


def test_existing_run_needs_resume(workspace: Path, tmp_path: Path) -> None:
    cfg = _cfg(workspace, steps=2, checkpoint_every=2)
    train(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="--resume"):
        train(cfg, tmp_path / "run")


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    state = run / "checkpoint" / "state.json"
    deadline = time.monotonic() + timeout
    while not state.exists():
        assert proc.poll() is None, "training ended before the first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_bitwise_equal(workspace: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """A run killed (SIGKILL) or interrupted (Ctrl-C) and resumed ends bitwise-equal to an uninterrupted run."""
    cfg = _cfg(workspace, steps=150, checkpoint_every=5)
    train(cfg, tmp_path / "ref")
    config = tmp_path / "run.toml"
    save_config(cfg, config)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*FEDLM, "train", str(config), "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_checkpoint(run, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 2 and b"--resume" in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists()  # it really stopped early
    done = subprocess.run([*FEDLM, "train", str(run / "config.toml"), "--resume"], env=env,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ref = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    got = load_file(str(run / "model" / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_local_only_trains_each_silo_alone(workspace: Path, tmp_path: Path) -> None:
    from fedlm.train import train_local_only

    cfg = _cfg(workspace, steps=2, checkpoint_every=2, mode="local-only")
    summary = train_local_only(cfg, tmp_path / "runs")
    assert set(summary["runs"]) == {"drama", "legal", "technical"}
    for silo, run in summary["runs"].items():
        assert load_config(Path(run) / "config.toml").data.silos == [silo]
        assert (Path(run) / "model" / "model.safetensors").exists()


def test_personalise_fine_tunes_the_run_model_on_each_silo(workspace: Path, tmp_path: Path) -> None:
    """Each silo starts from the run's weights (not fresh ones) and trains only on its own shards."""
    from fedlm.train import personalise

    base = _cfg(workspace, steps=2, checkpoint_every=2)
    train(base, tmp_path / "run")
    cfg = load_config(None, [f'data.workspace="{workspace}"', "model.max_seq_len=64", "train.seq_len=64",
                             "train.batch_size=4", "train.threads=1", "federation.personalize_steps=6"])
    done = personalise(cfg, tmp_path / "run")
    start = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert set(done) == {"drama", "legal", "technical"}
    for silo, run in done.items():
        resolved = load_config(run / "config.toml")
        assert resolved.data.silos == [silo] and resolved.train.steps == 6
        assert resolved.train.warmup_steps == 2  # a third of the steps: the trained model is not jolted
        assert resolved.train.init_from == str(tmp_path / "run" / "model")
        got = load_file(str(run / "model" / "model.safetensors"))
        assert not torch.equal(got["tok_emb.weight"], start["tok_emb.weight"])
        assert (got["tok_emb.weight"] - start["tok_emb.weight"]).abs().max() < 0.1  # fine-tuned, not fresh


def test_weight_decay_covers_matrices_and_the_tied_embedding_not_norms() -> None:
    model = Transformer(ModelConfig(preset="tiny", vocab_size=64), seed=0)
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert any(p is model.tok_emb.weight for p in decay["params"])
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters() if "norm" in n}
