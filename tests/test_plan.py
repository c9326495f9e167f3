"""`fedlm plan` against references: real models' parameter counts, FlopCounterMode, autograd's
saved tensors, the update codecs' payloads, and a measured silo (peak RSS, seconds per step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from fedlm.cli import app
from fedlm.config import ModelConfig, load_config
from fedlm.errors import UserError
from fedlm.federation.task import wire_names
from fedlm.model import Transformer
from fedlm.plan import (
    ADAMW_BYTES,
    ROUND_OVERHEAD_BYTES_PER_S,
    ROUND_OVERHEAD_S_PER_ARRAY,
    fit_limits,
    flops_per_token,
    layer_activation_bytes,
    parse_bytes,
    plan_run,
    round_overhead_seconds,
    update_bytes,
)
from fedlm.shapes import count_params

SHAPES = [
    {},  # tiny, tied
    {"tie_embeddings": False},
    {"n_kv_heads": 2, "d_ff": 200},  # grouped-query attention
    {"n_kv_heads": 2, "qkv_bias": True},  # Qwen2's attention
]


def _cfg(*sets: str) -> object:
    return load_config(None, ["data.silos=['a','b','c']", "model.vocab_size=512", "model.max_seq_len=64",
                              "train.seq_len=64", "train.batch_size=2", "train.mode=federated", *sets])


def _model(mc: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(mc)


@pytest.mark.parametrize("shape", SHAPES)
def test_params_equal_a_real_models(shape: dict) -> None:
    """params_total = sum(p.numel()) of the built model (a tied embedding once)."""
    mc = ModelConfig(preset="tiny", vocab_size=512, **shape)
    cfg = _cfg(*(f"model.{k}={json.dumps(v)}" for k, v in shape.items()))
    p = count_params(mc, cfg)  # type: ignore[arg-type]
    model = _model(mc)
    assert p.total == p.trainable == sum(t.numel() for t in model.parameters())


def test_lora_params_equal_fedlm_lora() -> None:
    """With lora.rank = 8, trainable = the adapters fedlm.lora injects; total = base + adapters."""
    lora = pytest.importorskip("fedlm.lora")
    mc = ModelConfig(preset="tiny", vocab_size=512, n_kv_heads=2)
    cfg = _cfg("lora.rank=8", "model.n_kv_heads=2")
    p = count_params(mc, cfg)  # type: ignore[arg-type]
    model = lora.apply_lora(_model(mc), rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"])
    assert p.trainable == sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p.total == sum(t.numel() for t in model.parameters())


def _counted_flops(model: torch.nn.Module, B: int, T: int) -> int:
    x = torch.randint(0, model.cfg.vocab_size, (B, T))  # type: ignore[union-attr]
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the math path's matmuls are counted (full T×T)
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ckpt", [False, True])
def test_flops_per_token_equal_flop_counter(shape: dict, ckpt: bool) -> None:
    """6N + 12·L·T·(H·D) (+ checkpointing's recompute) = FlopCounterMode on a real step, exactly."""
    B, T = 2, 32
    mc = ModelConfig(preset="tiny", vocab_size=512, max_seq_len=T, **shape)
    cfg = _cfg(*(f"model.{k}={json.dumps(v)}" for k, v in shape.items()))
    model = _model(mc).train()
    model.activation_checkpointing = ckpt
    want = _counted_flops(model, B, T) / (B * T)
    got = flops_per_token(mc, count_params(mc, cfg), seq_len=T, checkpointing=ckpt)  # type: ignore[arg-type]
    assert got == pytest.approx(want, rel=1e-9)


def test_lora_flops_within_3_percent() -> None:
    """LoRA: frozen matrices skip their weight gradient (4N), adapters cost 6·r·(in+out)."""
    lora = pytest.importorskip("fedlm.lora")
    B, T = 2, 32
    mc = ModelConfig(preset="tiny", vocab_size=512, max_seq_len=T)
    cfg = _cfg("lora.rank=8")
    model = lora.apply_lora(_model(mc), rank=8, alpha=16.0, dropout=0.0, targets=["wqkv", "wo", "w13", "w2"]).train()
    want = _counted_flops(model, B, T) / (B * T)
    got = flops_per_token(mc, count_params(mc, cfg), seq_len=T, checkpointing=False)  # type: ignore[arg-type]
    assert got == pytest.approx(want, rel=0.03)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kv", [4, 2])
def test_activation_bytes_equal_autograds_saved_tensors(precision: str, kv: int) -> None:
    """Bytes per layer per token = the storages autograd saves for one more layer (weights excluded)."""
    B, T = 2, 32

    def saved(n_layers: int) -> int:
        mc = ModelConfig(preset="tiny", vocab_size=512, max_seq_len=T, n_layers=n_layers, n_kv_heads=kv)
        model = _model(mc).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params and not (t.dtype == torch.bfloat16 and t.dim() == 2
                                                   and t.shape[0] != B * T):  # autocast's weight copies
                seen[s.data_ptr()] = s.nbytes()
            return t

        x = torch.randint(0, 512, (B, T))
        # autocast itself: `lm_loss` runs bf16 steps in fp32 on a CPU without bf16 units
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x, targets=x)
        return sum(seen.values())

    per_layer = (saved(2) - saved(1)) / (B * T)
    mc = ModelConfig(preset="tiny", vocab_size=512, n_kv_heads=kv)
    # the log-sum-exp per head is kept in fp32 (bf16 shares its storage accounting with the output)
    assert layer_activation_bytes(mc, precision) == pytest.approx(per_layer, abs=4 * mc.n_heads + 4)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk"])
def test_update_bytes_equal_the_codecs_payload(codec: str) -> None:
    """Bytes up per round = payload_bytes(encode(update)) of fedlm's codecs, LoRA adapters only."""
    codecs = pytest.importorskip("fedlm.federation.codecs")
    mc = ModelConfig(preset="tiny", vocab_size=500)  # sizes not multiples of 256
    for sets in ([], ["lora.rank=8"]):
        cfg = _cfg("model.vocab_size=500", *sets)
        p = count_params(mc, cfg)  # type: ignore[arg-type]
        update = {name: torch.randn(n) for name, n in p.wire.items()}
        payload = codecs.encode(update, codec=codec, topk_fraction=0.07)
        assert update_bytes(p.wire, codec, 0.07) == codecs.payload_bytes(payload)


def test_lora_int8_is_under_one_percent_of_full_fp32() -> None:
    """SmolLM2-shaped model, LoRA r = 8 + int8: bytes per round <= 1% of the full fp32 update."""
    mc = ModelConfig(preset="custom", d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                     vocab_size=49152, max_seq_len=2048)
    full = count_params(mc, _cfg())  # type: ignore[arg-type]
    lora = count_params(mc, _cfg("lora.rank=8"))  # type: ignore[arg-type]
    assert update_bytes(lora.wire, "int8", 0.1) <= 0.01 * update_bytes(full.wire, "none", 0.1)
    assert full.total == 134_515_008  # SmolLM2-135M, tied embedding once


def test_workspace_vocab_and_silo_tokens(workspace: Path) -> None:
    """vocab_size from the workspace tokenizer; each silo's tokens from its meta.json (= its train.bin)."""
    from fedlm.data.shards import open_split
    from fedlm.data.tokenizer import load_tokenizer

    cfg = load_config(None, [f"data.workspace={json.dumps(str(workspace))}", "train.mode=federated"])
    plan = plan_run(cfg, calibrate=False)
    assert plan.model["vocab_size"] == load_tokenizer(workspace / "tokenizer.json").get_vocab_size()
    for silo, n in plan.silo_tokens.items():
        assert n == len(open_split(workspace / "silos" / silo, "train"))
    assert plan.compute_optimal_tokens == 20 * plan.params_total


def test_cyclic_adds_the_adamw_state_each_way_and_the_silos_turns(workspace: Path) -> None:
    """Cyclic: the bytes each way grow by the state a real AdamW passes on; a round takes every silo's turn."""
    from fedlm.train import build_model, make_optimizer, optimizer_state, train_step

    sets = [f"data.workspace={json.dumps(str(workspace))}", "train.mode=federated", "model.tie_embeddings=false",
            "train.batch_size=2", "train.seq_len=16"]
    avg = plan_run(load_config(None, sets), device_flops=1e9)
    cfg = load_config(None, [*sets, 'federation.strategy="cyclic"'])
    cyc = plan_run(cfg, device_flops=1e9)
    model = build_model(cfg)
    optimizer = make_optimizer(model, cfg.train)
    x = torch.zeros(2, 16, dtype=torch.long)
    train_step(model, optimizer, lambda: (x, x), lr=1e-3, grad_accum=1, grad_clip=1.0, precision="fp32")
    passed_on = sum(t.numel() * t.element_size() for t in optimizer_state(model, optimizer).values())
    silos = len(cyc.silo_tokens)
    for a, c in ((avg.bytes_up_per_round, cyc.bytes_up_per_round), (avg.bytes_down_per_round, cyc.bytes_down_per_round)):
        assert all(c[s] - a[s] == passed_on for s in a)
    up, down = max(cyc.bytes_up_per_round.values()), max(cyc.bytes_down_per_round.values())
    overhead = round_overhead_seconds(len(wire_names(model)), silos, up=up, down=down)
    train_s = cyc.seconds_per_round - overhead  # type: ignore[operator]
    assert train_s == pytest.approx(silos * cfg.federation.local_steps * cyc.seconds_per_step)


def test_fedsgd_silos_hold_no_optimizer_state(workspace: Path) -> None:
    """fedsgd: the silo computes one gradient and AdamW runs on the server, so its memory has no
    moments and no foreach temporary; the bytes each way are FedAvg's."""
    sets = [f"data.workspace={json.dumps(str(workspace))}", "train.mode=federated", "train.batch_size=2",
            "train.seq_len=16", "federation.local_steps=1"]
    avg = plan_run(load_config(None, sets), device_flops=1e9)
    sgd = plan_run(load_config(None, [*sets, 'federation.strategy="fedsgd"']), device_flops=1e9)
    assert sgd.memory["optimizer"] == 0 and avg.memory["optimizer"] == ADAMW_BYTES * avg.params_trainable
    assert sgd.bytes_up_per_round == avg.bytes_up_per_round and sgd.bytes_down_per_round == avg.bytes_down_per_round
    assert sgd.memory["peak"] < avg.memory["peak"]


@pytest.mark.slow
def test_memory_within_25_percent_of_a_measured_silo() -> None:
    """Peak RSS of a real silo round in a subprocess (time is compared in bench/plan_bench.py, not here:
    a timed assertion on a shared machine tests the neighbours)."""
    from bench.plan_bench import measure_silo

    sets = ["model.preset=tiny", "model.vocab_size=4096", "model.max_seq_len=128", "train.seq_len=128",
            "train.batch_size=4", "train.mode=federated"]
    plan = plan_run(load_config(None, [*sets, "data.silos=['a']"]))
    measured = measure_silo(sets, steps=3)
    assert plan.memory["peak"] == pytest.approx(measured["peak_bytes"], rel=0.25)


def test_fit_limits_proposes_changes_that_fit() -> None:
    cfg = _cfg("model.vocab_size=4096", "train.batch_size=16")
    before = plan_run(cfg, calibrate=False)  # type: ignore[arg-type]
    limit = before.memory["peak"] - (before.memory["peak"] - before.memory["runtime"]) // 2
    after, changes = fit_limits(cfg, memory_limit=limit)  # type: ignore[arg-type]
    assert changes and max(after.peak_memory_bytes.values()) <= limit
    refit = plan_run(load_config(None, ["data.silos=['a','b','c']", "model.vocab_size=4096", "model.max_seq_len=64",
                                        "train.seq_len=64", "train.batch_size=16", "train.mode=federated",
                                        *changes]), calibrate=False)
    assert refit.memory["peak"] == after.memory["peak"]  # the --set lines reproduce the plan shown
    with pytest.raises(UserError, match=r"--memory-limit .* no plan fits.*per silo.*over"):
        fit_limits(cfg, memory_limit=parse_bytes("10MiB"))  # type: ignore[arg-type]


def test_bad_input_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="lora.targets: 'q_proj' matches no Linear"):
        plan_run(_cfg("lora.rank=8", "lora.targets=['q_proj']"), calibrate=False)  # type: ignore[arg-type]
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(UserError, match="not a Llama-family model"):
        plan_run(_cfg(f"train.init_from={json.dumps(str(hf))}"), calibrate=False)  # type: ignore[arg-type]


def test_cli_json_and_limits(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[data]\nsilos = ["a", "b"]\n[model]\nvocab_size = 512\nmax_seq_len = 64\n'
                      '[train]\nmode = "federated"\nseq_len = 64\nbatch_size = 2\n'
                      '[federation]\ncompression = "int8"\n')
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(config), "--json", "--device-flops", "20G"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    for key in ("params_total", "params_trainable", "flops_per_round", "seconds_per_round", "peak_memory_bytes",
                "bytes_up_per_round", "bytes_down_per_round"):
        assert key in out
    assert set(out["peak_memory_bytes"]) == set(out["bytes_up_per_round"]) == {"a", "b"}
    per_silo = out["flops_per_round"] / 2 / 20e9  # 2 silos, each on its own device
    from fedlm.train import build_model

    arrays = len(wire_names(build_model(load_config(config))))
    overhead = round_overhead_seconds(arrays, 2, up=out["bytes_up_per_round"]["a"],
                                      down=out["bytes_down_per_round"]["a"])
    assert out["seconds_per_round"] == pytest.approx(per_silo + overhead)
    res = runner.invoke(app, ["plan", str(config), "--memory-limit", "1MiB", "--device-flops", "20G"])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
    assert "memory" in str(res.exception)


def test_calibration_times_one_and_seven_layers_with_the_silos_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 30-layer SmolLM2 LoRA plan times only models cut to 1 and 7 layers, with as many silos
    stepping at once as the round trains (threads, as the in-process engine runs them), and
    extrapolates the step linearly."""
    import fedlm.plan as plan_mod

    timed: list[tuple[int, int]] = []

    def fake(mcs: list[ModelConfig], cfg: object, *, threads: int, concurrent: int, device: str) -> list[float]:
        timed.extend((mc.n_layers, concurrent) for mc in mcs)
        assert threads == 1 and device == "cpu" and all(mc.d_model == 576 and mc.vocab_size == 49152 for mc in mcs)
        return [1.0 + 0.5 * mc.n_layers for mc in mcs]  # seconds: a fixed part (embedding, head) and 0.5 a layer

    monkeypatch.setattr(plan_mod, "_time_steps", fake)
    cfg = load_config(None, ["data.silos=['a','b','c']", "train.mode=federated", "train.init_from=smollm2",
                             "lora.rank=8", "train.seq_len=128", "train.batch_size=4", "train.grad_accum=2",
                             "federation.local_steps=3", "train.device=cpu"])
    plan = plan_run(cfg)
    assert sorted(timed) == [(1, 3), (7, 3)]
    assert plan.seconds_per_step == pytest.approx(2 * (1.0 + 0.5 * 30))  # grad_accum micro-batches
    up, down = plan.bytes_up_per_round["a"], plan.bytes_down_per_round["a"]
    # the bytes, and the arrays (A and B of 4 targets in 30 layers) of the 3 silos and the server
    overhead = (3 * (up + down) + down) / ROUND_OVERHEAD_BYTES_PER_S + 4 * (30 * 4 * 2) * ROUND_OVERHEAD_S_PER_ARRAY
    assert plan.seconds_per_round == pytest.approx(3 * plan.seconds_per_step + overhead)
    assert "3 silo(s) stepping at once" in plan.time_source


def test_plan_reads_the_devices_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan carries train.device's free and total memory, and says when a silo's peak does not fit."""
    import fedlm.device as dev

    plan = plan_run(_cfg(), calibrate=False)  # type: ignore[arg-type]
    total, free = dev.device_memory(torch.device("cpu"))
    assert plan.device == "cpu" and plan.device_memory_bytes["total"] == total
    assert not any("exceeds" in n for n in plan.notes)
    monkeypatch.setattr(dev, "device_memory", lambda d: (2**30, 2**20))
    tight = plan_run(_cfg(), calibrate=False)  # type: ignore[arg-type]
    assert any("exceeds the 1.00 MiB free on cpu" in n for n in tight.notes)


def test_gguf_header_reader_equals_the_gguf_library(tmp_path: Path) -> None:
    """fedlm's header reader against gguf's own reader and writer, and on the SmolLM2 file the shape
    SmolLM2-135M's config.json states."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from fedlm.hf import read_gguf_header, smollm2_gguf_path
    from fedlm.resolve import init_from_shape

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 5e5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
    w.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((3, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fields, names = read_gguf_header(path)
    ref = GGUFReader(str(path))
    assert names == [t.name for t in ref.tensors]
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        assert fields[key] == (len(value) if isinstance(value, list) else pytest.approx(value)), key
    mc = init_from_shape(str(smollm2_gguf_path()))
    assert (mc.d_model, mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.d_ff, mc.vocab_size, mc.tie_embeddings) == \
        (576, 30, 9, 3, 1536, 49152, True)


def test_calibration_runs_real_concurrent_steps() -> None:
    """The calibration trains real replicas side by side (LoRA over one shared frozen base)."""
    from fedlm.plan import calibrate_step_seconds

    cfg = _cfg("model.n_layers=5", "lora.rank=4", "train.seq_len=16")
    mc = ModelConfig(preset="tiny", n_layers=5, vocab_size=512, max_seq_len=64)
    seconds = calibrate_step_seconds(mc, cfg, threads=1, concurrent=2)  # type: ignore[arg-type]
    assert 0 < seconds < 60
