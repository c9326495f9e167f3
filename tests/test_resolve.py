"""One resolver for what a config leaves open (the model's shape, the silos), shared by training,
the federated runner and `fedlm plan`; builders that read the config and change nothing in it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fedlm.config import ModelConfig, load_config
from fedlm.data.tokenizer import load_tokenizer
from fedlm.errors import UserError
from fedlm.model import Transformer
from fedlm.modelio import save_model
from fedlm.plan import plan_run
from fedlm.resolve import resolve_config, resolve_model, resolve_silos
from fedlm.train import build_model


def _sets(ws: Path, *more: str) -> list[str]:
    return [f"data.workspace={json.dumps(str(ws))}", "model.max_seq_len=64", "train.seq_len=32", *more]


def test_vocab_comes_from_the_tokenizer_and_builders_change_nothing(workspace: Path) -> None:
    cfg = load_config(None, _sets(workspace))
    before = copy.deepcopy(cfg)
    vocab = load_tokenizer(workspace / "tokenizer.json").get_vocab_size()
    model = build_model(cfg)
    assert cfg == before and cfg.model.vocab_size == 0  # the builder is pure
    resolved = resolve_config(cfg)
    assert cfg == before and resolved.model == model.cfg and resolved.model.vocab_size == vocab
    assert resolve_config(resolved) == resolved  # a run's saved config.toml resolves to itself
    assert plan_run(cfg, device_flops=1e12).model["vocab_size"] == vocab  # plan works it out the same way
    with pytest.raises(UserError, match=f"model.vocab_size = {vocab + 1} but the workspace tokenizer has {vocab}"):
        resolve_model(load_config(None, _sets(workspace, f"model.vocab_size={vocab + 1}")))


def test_init_from_shape_is_the_loaded_models(workspace: Path, tmp_path: Path) -> None:
    """train.init_from: the shape read from the model's config.json is the one the loaded model has,
    and the one plan and the run's config.toml record, whatever cfg.model said."""
    vocab = load_tokenizer(workspace / "tokenizer.json").get_vocab_size()
    shape = ModelConfig(preset="custom", d_model=64, n_layers=3, n_heads=4, d_ff=160, vocab_size=vocab,
                        max_seq_len=64)
    torch.manual_seed(0)
    save_model(Transformer(shape), tmp_path / "base", tokenizer_path=workspace / "tokenizer.json")
    cfg = load_config(None, _sets(workspace, f"train.init_from={json.dumps(str(tmp_path / 'base'))}"))
    assert resolve_model(cfg) == shape != cfg.model
    assert build_model(cfg).cfg == shape
    assert plan_run(cfg, device_flops=1e12).model["d_model"] == 64


def test_one_silo_resolver(workspace: Path, tmp_path: Path) -> None:
    """data.silos, or every prepared silo; a named silo must be prepared here unless it is another
    machine's (a coordinator's view); a workspace with none says how to prepare one."""
    every = resolve_silos(workspace, [])
    assert every and every == sorted(every)
    assert resolve_silos(workspace, [every[0]]) == [every[0]]
    with pytest.raises(UserError, match="data.silos: silo 'elsewhere' not found"):
        resolve_silos(workspace, ["elsewhere"])
    assert resolve_silos(workspace, ["elsewhere"], local=False) == ["elsewhere"]
    with pytest.raises(UserError, match="no prepared silos.*fedlm data prepare"):
        resolve_silos(tmp_path / "empty", [])
