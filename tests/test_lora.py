"""LoRA: adapters only train and travel, merge equals W + (alpha/r)·B·A, a run over a base model
keeps its adapters (loaded merged into the base, which is checked), a merged save is read by
transformers, bad targets and non-Llama HF dirs fail before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlm.config import ModelConfig, load_config
from fedlm.errors import UserError
from fedlm.federation.runner import run_federated
from fedlm.federation.task import wire_names
from fedlm.hf import export_hf
from fedlm.lora import (
    adapter_names,
    apply_lora,
    merge_lora,
    merged_state,
    num_trainable,
    plain_model,
)
from fedlm.model import Transformer
from fedlm.modelio import save_model
from fedlm.pretrained import base_reference, load_model
from fedlm.train import build_model


def _tiny(vocab: int = 512) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(preset="tiny", vocab_size=vocab, max_seq_len=64))


def _perturb_adapters(model: Transformer) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_apply_lora_starts_exact_and_trains_only_adapters() -> None:
    model = _tiny()
    x = torch.randint(0, 512, (2, 16))
    ref = model(x)
    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"])
    assert torch.equal(model(x), ref)  # B = 0: the adapted model is the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_names(model)) and trainable
    # hand count: per layer r·(in + out) for each target
    c = model.cfg
    per_layer = 8 * ((c.d_model + 3 * c.d_model) + 2 * c.d_model + (c.d_model + 2 * c.d_ff) + (c.d_ff + c.d_model))
    assert num_trainable(model) == c.n_layers * per_layer


def test_merge_equals_hand_computed_weights_and_logits() -> None:
    model = _tiny()
    base_w = model.state_dict()["layers.0.attn.wqkv.weight"].clone()
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["wqkv", "w2"])
    _perturb_adapters(model)
    state = model.state_dict()
    A, B = state["layers.0.attn.wqkv.lora_A.default.weight"], state["layers.0.attn.wqkv.lora_B.default.weight"]
    merged = merged_state(model)
    torch.testing.assert_close(merged["layers.0.attn.wqkv.weight"], base_w + (8.0 / 4) * B @ A)
    plain = merge_lora(model).eval()
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(plain(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_bad_target_names_it_and_lists_modules() -> None:
    with pytest.raises(UserError, match=r"'q_proj' matches no Linear module.*w13.*wqkv"):
        apply_lora(_tiny(), rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "q_proj"])


def test_saved_model_is_merged_and_loads_in_transformers(tmp_path: Path) -> None:
    """A LoRA model saves merged (plain_model); load_model and transformers' Llama give the same logits."""
    transformers = pytest.importorskip("transformers")
    model = _tiny()
    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"])
    _perturb_adapters(model)
    model.eval()
    with pytest.raises(ValueError, match="merge its LoRA adapters first"):
        save_model(model, tmp_path / "m")  # a model directory never holds adapters
    assert not (tmp_path / "m").exists()
    save_model(plain_model(model), tmp_path / "m")
    assert not any("lora" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    loaded, _ = load_model(tmp_path / "m")
    x = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    export_hf(loaded, tmp_path / "hf", tokenizer_path=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)


def _base_model(ws: Path, out: Path) -> Path:
    """A fresh tiny model saved with the workspace's tokenizer: the frozen base of a LoRA run."""
    from fedlm.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(ws / "tokenizer.json").get_vocab_size()
    torch.manual_seed(3)
    save_model(Transformer(ModelConfig(preset="tiny", vocab_size=vocab, max_seq_len=64)), out,
               tokenizer_path=ws / "tokenizer.json")
    return out


def test_federated_lora_sends_adapters_only_and_keeps_the_base(workspace: Path, tmp_path: Path) -> None:
    """Only adapters cross the wire and live in the round checkpoint; the saved model is base + merged
    adapters: non-target weights equal the base exactly; int8 adapters are a small share of fp32."""
    base = _base_model(workspace, tmp_path / "base")
    sent: list[int] = []

    def tap(direction: str, node: int, objects: dict[str, bytes]) -> None:
        if direction == "up":
            sent.append(sum(len(b) for b in objects.values()))

    common = [f"data.workspace={json.dumps(str(workspace))}", "train.mode=federated",
              f"train.init_from={json.dumps(str(base))}", "federation.rounds=2", "federation.local_steps=2",
              "train.batch_size=4", "train.seq_len=32", "model.max_seq_len=64"]
    cfg = load_config(None, [*common, "lora.rank=4", "federation.compression=int8"])
    run_federated(cfg, tmp_path / "run", on_wire=tap)
    global_names = set(load_file(str(tmp_path / "run" / "checkpoint" / "global.safetensors")))
    assert global_names and all(".lora_" in n for n in global_names)
    assert set(load_file(str(tmp_path / "run" / "model" / "adapters.safetensors"))) == global_names
    tuned, _ = load_model(tmp_path / "run")
    ref, _ = load_model(base)
    t, r = tuned.state_dict(), ref.state_dict()
    assert torch.equal(t["tok_emb.weight"], r["tok_emb.weight"]) and torch.equal(t["norm.weight"], r["norm.weight"])
    assert not torch.equal(t["layers.0.attn.wqkv.weight"], r["layers.0.attn.wqkv.weight"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    up = [s["bytes_up"] for row in rows for s in row["silos"].values()]
    full = 4 * sum(p.numel() for p in ref.parameters())
    assert max(up) < 0.1 * full  # int8 adapters at rank 4 of a 0.8 M-parameter model: ~2.5%
    assert sent and max(sent) <= max(up) + 1024


def test_lora_model_wire_names_are_adapters(workspace: Path, tmp_path: Path) -> None:
    base = _base_model(workspace, tmp_path / "base")
    cfg = load_config(None, [f"data.workspace={json.dumps(str(workspace))}", f"train.init_from={json.dumps(str(base))}",
                             "lora.rank=2", "model.max_seq_len=64", "train.seq_len=32"])
    model = build_model(cfg)
    assert wire_names(model) == adapter_names(model)


def test_bad_target_and_non_llama_fail_before_training(workspace: Path, tmp_path: Path) -> None:
    base = _base_model(workspace, tmp_path / "base")
    sets = [f"data.workspace={json.dumps(str(workspace))}", "model.max_seq_len=64", "train.seq_len=32"]
    cfg = load_config(None, [*sets, f"train.init_from={json.dumps(str(base))}", "lora.rank=2",
                             'lora.targets=["wqkv", "gate_proj"]'])
    with pytest.raises(UserError, match="gate_proj"):
        build_model(cfg)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    cfg = load_config(None, [*sets, f"train.init_from={json.dumps(str(gpt2))}", "lora.rank=2"])
    with pytest.raises(UserError, match="not a Llama-family model"):
        run_federated(load_config(None, [*sets, f"train.init_from={json.dumps(str(gpt2))}", "lora.rank=2",
                                         "train.mode=federated"]), tmp_path / "run")
    with pytest.raises(UserError, match="no such file or directory"):
        build_model(load_config(None, [*sets, 'train.init_from="nowhere/model"']))


def test_seeded_build_ignores_the_global_rng(workspace: Path, tmp_path: Path) -> None:
    """A run's fresh weights and LoRA A's come from its seed alone, whatever else draws from torch's
    process-wide RNG meanwhile (a silo thread of another run, say): both engines and every silo agree."""
    import threading

    sets = [f"data.workspace={json.dumps(str(workspace))}", "model.preset=tiny", "model.max_seq_len=64",
            "train.seq_len=32", "train.seed=7", "lora.rank=2"]
    cfg = load_config(None, sets)
    torch.manual_seed(0)
    ref = build_model(cfg).state_dict()
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.manual_seed(1)
            torch.randn(256)

    noisy = threading.Thread(target=draw, daemon=True)
    noisy.start()
    try:
        builds = [build_model(load_config(None, sets)).state_dict() for _ in range(3)]
    finally:
        stop.set()
        noisy.join()
    assert any(".lora_A." in n for n in ref)
    for state in builds:
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[n], ref[n]) for n in ref)


def _hand_merged(base_dir: Path, adapters: dict[str, torch.Tensor], scale: float) -> Transformer:
    """The reference: the base model with W += scale · B @ A done by hand for every adapted module."""
    from fedlm.modelio import load_fedlm_dir

    model = load_fedlm_dir(base_dir)
    state = model.state_dict()
    with torch.no_grad():
        for name, a in adapters.items():
            if ".lora_A." in name:
                module = name.split(".lora_A.")[0]
                b = adapters[name.replace(".lora_A.", ".lora_B.")]
                state[f"{module}.weight"].add_(scale * b @ a)
    return model.eval()


class _Stop(Exception):
    pass


def test_lora_run_keeps_adapters_loads_merged_and_resumes_bitwise(workspace: Path, tmp_path: Path) -> None:
    """A LoRA run over a base model stores its adapters (not the base again) in model/ and the
    checkpoint; load_model gives the base with W + (alpha/r)·B·A merged (computed by hand); a run
    stopped at its checkpoint and resumed ends with bitwise-equal adapters."""
    from fedlm.train import train

    base = _base_model(workspace, tmp_path / "base")
    sets = [f"data.workspace={json.dumps(str(workspace))}", f"train.init_from={json.dumps(str(base))}",
            "lora.rank=4", "lora.alpha=8.0", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=2",
            "train.steps=6", "train.checkpoint_every=3", "train.threads=1", "train.eval_batches=1"]
    cfg = load_config(None, sets)
    train(cfg, tmp_path / "ref")
    model_dir = tmp_path / "ref" / "model"
    assert not (model_dir / "model.safetensors").exists()
    adapters = load_file(str(model_dir / "adapters.safetensors"))
    assert adapters and all(".lora_" in n for n in adapters)
    assert set(load_file(str(tmp_path / "ref" / "checkpoint" / "model.safetensors"))) == set(adapters)
    lora = json.loads((model_dir / "config.json").read_text())["lora"]
    assert lora["base"] == str(base.resolve()) and (lora["rank"], lora["alpha"]) == (4, 8.0)
    loaded, tok = load_model(tmp_path / "ref")
    assert tok == model_dir / "tokenizer.json"
    x = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _hand_merged(base, adapters, 8.0 / 4)(x), rtol=1e-5, atol=1e-5)

    def stop_at_checkpoint(step: int, total: int, row: dict) -> None:
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, tmp_path / "run", on_step=stop_at_checkpoint)
    train(load_config(tmp_path / "run" / "config.toml"), tmp_path / "run", resume=True)
    got = load_file(str(tmp_path / "run" / "model" / "adapters.safetensors"))
    assert got.keys() == adapters.keys() and all(torch.equal(got[n], adapters[n]) for n in adapters)


def test_a_changed_or_missing_base_is_named(workspace: Path, tmp_path: Path) -> None:
    """Adapters are never merged into another base than theirs, and never resumed over one."""
    from fedlm.train import train

    base = _base_model(workspace, tmp_path / "base")
    cfg = load_config(None, [f"data.workspace={json.dumps(str(workspace))}", f"train.init_from={json.dumps(str(base))}",
                             "lora.rank=2", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=2",
                             "train.steps=4", "train.checkpoint_every=2", "train.threads=1", "train.eval_batches=1"])

    def stop(step: int, total: int, row: dict) -> None:
        if step == 2:
            raise _Stop

    train(cfg, tmp_path / "ref")
    with pytest.raises(_Stop):
        train(cfg, tmp_path / "run", on_step=stop)
    load_model(tmp_path / "ref")  # the base as it was: loads
    torch.manual_seed(4)  # another base at the same place, the same shape
    save_model(Transformer(ModelConfig(preset="tiny", vocab_size=load_model(base)[0].cfg.vocab_size,
                                       max_seq_len=64)), base, tokenizer_path=workspace / "tokenizer.json")
    with pytest.raises(UserError, match="not the one these adapters were trained on"):
        load_model(tmp_path / "ref")
    with pytest.raises(UserError, match="train.init_sha256 = .* pins another model than train.init_from"):
        train(load_config(tmp_path / "run" / "config.toml"), tmp_path / "run", resume=True)
    import shutil

    shutil.rmtree(base)
    with pytest.raises(UserError, match="fedlm export"):
        load_model(tmp_path / "ref")


def test_adapters_over_adapters_load_as_both_merged(workspace: Path, tmp_path: Path) -> None:
    """train.init_from may name a LoRA run (personalising one does): that run's base with its
    adapters merged is the new base, and loading the new run merges both, in order."""
    from fedlm.train import train

    base = _base_model(workspace, tmp_path / "base")
    common = [f"data.workspace={json.dumps(str(workspace))}", "lora.rank=2", "lora.alpha=4.0",
              "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=2", "train.steps=2",
              "train.checkpoint_every=2", "train.threads=1", "train.eval_batches=1"]
    train(load_config(None, [*common, f"train.init_from={json.dumps(str(base))}"]), tmp_path / "first")
    train(load_config(None, [*common, f"train.init_from={json.dumps(str(tmp_path / 'first' / 'model'))}",
                             "train.seed=5"]), tmp_path / "second")
    first = load_file(str(tmp_path / "first" / "model" / "adapters.safetensors"))
    second = load_file(str(tmp_path / "second" / "model" / "adapters.safetensors"))
    ref = _hand_merged(base, first, 2.0)
    state = ref.state_dict()
    with torch.no_grad():
        for name, a in second.items():
            if ".lora_A." in name:
                module = name.split(".lora_A.")[0]
                state[f"{module}.weight"].add_(2.0 * second[name.replace(".lora_A.", ".lora_B.")] @ a)
    loaded, _ = load_model(tmp_path / "second")
    x = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)


def test_federated_resume_over_a_changed_base_is_refused(workspace: Path, tmp_path: Path) -> None:
    """A federated LoRA round checkpoint holds adapters only: resuming it over another base is refused."""
    base = _base_model(workspace, tmp_path / "base")
    cfg = load_config(None, [f"data.workspace={json.dumps(str(workspace))}", "train.mode=federated",
                             f"train.init_from={json.dumps(str(base))}", "federation.rounds=1",
                             "federation.local_steps=1", "train.batch_size=2", "train.seq_len=32",
                             "model.max_seq_len=64", "lora.rank=2"])
    run_federated(cfg, tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.train.init_sha256 == base_reference(str(base))["sha256"]  # the run pins its base
    torch.manual_seed(5)  # another base at the same place, the same shape
    save_model(Transformer(ModelConfig(preset="tiny", vocab_size=load_model(base)[0].cfg.vocab_size,
                                       max_seq_len=64)), base, tokenizer_path=workspace / "tokenizer.json")
    with pytest.raises(UserError, match="the config given to --resume changes train.init_sha256"):
        run_federated(cfg, tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="train.init_sha256 = .* pins another model than train.init_from"):
        run_federated(saved, tmp_path / "run", resume=True)
