"""Config: TOML overrides, --set, errors that name the key, and a resolved config that round-trips."""

from pathlib import Path

import pytest

from fedlm.config import MODEL_PRESETS, check_resume_config, config_diff, load_config, save_config
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


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (['federation.strategy="cyclic"', "federation.secure_aggregation=true"],
         ["cyclic", "federation.secure_aggregation"]),
        (['federation.strategy="cyclic"', 'federation.aggregation="median"'], ["cyclic", "federation.aggregation"]),
        (['federation.strategy="cyclic"', 'privacy.mode="record"'], ["cyclic", "privacy.mode = 'record'"]),
        (['federation.strategy="fedsgd"', "federation.local_steps=1", 'privacy.mode="record"'],
         ["fedsgd", "privacy.mode"]),
        (["federation.secure_aggregation=true", 'federation.aggregation="trimmed_mean"'],
         ["federation.aggregation", "secure aggregation"]),
        (['federation.strategy="fedprox"', 'privacy.mode="record"'], ["fedprox", "privacy.mode = 'record'"]),
    ],
)
def test_combinations_refused_when_the_config_is_read(sets: list[str], needles: list[str]) -> None:
    """Every check across sections is Config's: a combination that cannot run fails at load time,
    naming both keys, before any workspace or model is touched."""
    with pytest.raises(UserError) as e:
        load_config(None, ["train.mode=federated", *sets])
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_validate_catches_a_field_changed_after_loading() -> None:
    cfg = load_config(None, ["train.mode=federated", 'federation.strategy="cyclic"'])
    cfg.federation.secure_aggregation = True
    with pytest.raises(ValueError, match="cyclic.*secure_aggregation"):
        cfg.validate()


def test_resume_with_another_config_names_the_key(tmp_path: Path) -> None:
    """`--resume` with a changed config says which key differs, its value in the run, and the fix."""
    cfg = load_config(None, ["train.lr=1e-3", "train.steps=7"])
    save_config(cfg, tmp_path / "config.toml")
    check_resume_config(cfg, tmp_path / "config.toml")  # the same config: fine
    changed = load_config(None, ["train.lr=2e-3", "train.steps=7"])
    assert config_diff(cfg, changed) == ["train.lr"]
    with pytest.raises(UserError, match=r"config.toml: the config given to --resume changes train.lr from 0.001 "
                                        r"to 0.002; resume with `fedlm train .*config.toml --resume`"):
        check_resume_config(changed, tmp_path / "config.toml")
    two = load_config(None, ["train.lr=2e-3", "train.steps=8"])
    with pytest.raises(UserError, match=r"changes train.steps from 7 to 8, train.lr from 0.001 to 0.002;"):
        check_resume_config(two, tmp_path / "config.toml")
