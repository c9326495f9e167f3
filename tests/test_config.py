"""Config: TOML overrides, --set, errors that name the key, and a resolved config that round-trips."""

from pathlib import Path

import pytest

from fedlm.config import MODEL_PRESETS, load_config, save_config
from fedlm.errors import UserError


def test_defaults_and_preset_fill_sizes() -> None:
    cfg = load_config()
    assert cfg.model.preset == "tiny"
    assert cfg.model.d_model == MODEL_PRESETS["tiny"]["d_model"]
    assert cfg.model.n_kv_heads == cfg.model.n_heads


def test_toml_overrides_and_set(tmp_path: Path) -> None:
    p = tmp_path / "run.toml"
    p.write_text('[model]\npreset = "small"\nn_layers = 3\n[train]\nlr = 1e-3\n')
    cfg = load_config(p, ["train.lr=5e-4", "train.precision=bf16", 'data.silos=["a", "b"]'])
    assert cfg.model.d_model == MODEL_PRESETS["small"]["d_model"]
    assert cfg.model.n_layers == 3  # explicit key beats the preset
    assert cfg.train.lr == 5e-4  # --set beats the file
    assert cfg.train.precision == "bf16"
    assert cfg.data.silos == ["a", "b"]


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.n_kv_heads=2", "train.steps=7", "data.workspace=w s"])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


@pytest.mark.parametrize(
    ("text", "sets", "needle"),
    [
        ("[train]\nlrr = 1\n", [], "train.lrr"),
        ("[trian]\nlr = 1\n", [], "[trian]"),
        ("", ["train.steps=-1"], "train.steps"),
        ("", ["train.lr=abc"], "train.lr"),
        ("", ["train.precision=fp8"], "train.precision"),
        ("", ["model.n_heads=3"], "model.d_model"),
        ("", ["train.seq_len=4096"], "train.seq_len"),
        ("", ["steps=3"], "section.key=value"),
        ("[train\n", [], "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, sets: list[str], needle: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(p, sets)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
