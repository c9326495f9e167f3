"""`train.device`: its resolution on this machine, what lives on the device (checked on "meta",
torch's shape-only device, since the tests run on CPU), and that updates leave it for the wire.

The CUDA path itself is run by bench/gpu_check.py on a machine with a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlm import device as dev
from fedlm.config import load_config
from fedlm.errors import UserError
from fedlm.model import KVCache
from fedlm.train import (
    SiloBatches,
    build_model,
    lm_loss,
    local_update,
    make_optimizer,
    silo_gradient,
)

META = torch.device("meta")
LORA = ["model.vocab_size=256", "model.max_seq_len=32", "train.seq_len=16", "train.batch_size=2",
        "lora.rank=4"]


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"cuda:2.*sees 2 GPU\(s\).*CUDA_VISIBLE_DEVICES"):
        dev.resolve_device("cuda:2")
    assert dev.resolve_device("cpu") == torch.device("cpu")  # asked for, the CPU even beside a GPU


def test_a_device_this_machine_lacks_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    with pytest.raises(UserError, match=r'train.device = .cuda. but .*use train.device = "auto" or train.device = "cpu"'):
        dev.resolve_device("cuda")
    with pytest.raises(UserError, match=r"--device mps but .*not available.*use --device auto or --device cpu"):
        dev.resolve_device("mps", key="--device")
    with pytest.raises(UserError, match=r"train.device = 'gpu' is not a device; use \"auto\""):
        load_config(None, ["train.device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cli_refuses_cuda_without_cuda_before_training(tmp_path: Path) -> None:
    """`fedlm train` exits 2 with one line naming train.device, before it reads any data."""
    (tmp_path / "run.toml").write_text('[train]\nmode = "federated"\ndevice = "cuda"\n')
    r = subprocess.run([sys.executable, "-m", "fedlm.cli", "train", "run.toml", "--out", "run"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "train.device = 'cuda'" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


class _Stop(Exception):
    pass


def test_model_lora_kv_cache_batches_and_optimizer_state_sit_on_the_device() -> None:
    """Placed on "meta" (torch's shape-only device), a LoRA model's every parameter and buffer,
    its KV cache, the batch a training step feeds it and AdamW's state are all there."""
    cfg = load_config(None, LORA)
    model = build_model(cfg, device=META)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert any(".lora_A." in n for n in tensors)
    assert {t.device for t in tensors.values()} == {META}
    assert dev.module_device(model) == META
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    assert {t.device for t in (*cache.k, *cache.v, cache.pos, cache.valid)} == {META}

    fed: list[torch.device] = []

    def record(_: torch.nn.Module, args: tuple[torch.Tensor], kwargs: dict[str, torch.Tensor]) -> None:
        fed.extend([args[0].device, kwargs["targets"].device])
        raise _Stop  # meta has no autocast state for the forward to query: the inputs are what is checked

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    x = torch.randint(0, 256, (2, 16))  # batches are cut on the CPU, from the shards
    with pytest.raises(_Stop):
        lm_loss(model, x, x, "bf16")
    handle.remove()
    assert fed == [META, META]

    optimizer = make_optimizer(model, cfg.train)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert states and {t.device for t in states} == {META}


def test_updates_cross_the_wire_from_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """local_update and silo_gradient hand back CPU tensors made by `to_cpu` (the one way off the
    device), not views of the model's parameters or gradients."""
    import fedlm.train as train_mod

    made: list[int] = []
    real = train_mod.to_cpu

    def recording(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = real(tensors)
        made.extend(id(t) for t in out.values())
        return out

    monkeypatch.setattr(train_mod, "to_cpu", recording)
    cfg = load_config(None, ["model.vocab_size=256", "model.max_seq_len=32", "train.seq_len=16",
                             "train.batch_size=2", "train.device=cpu"])
    model = build_model(cfg)
    start = {n: t.detach().clone() for n, t in model.state_dict().items()}
    tokens = np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint16)
    data = SiloBatches([tokens], torch.ones(1), torch.Generator().manual_seed(0))
    for update, _ in (local_update(model, start, data, cfg.train, first_step=0, steps=1),
                      silo_gradient(model, start, data, cfg.train)):
        assert update and all(id(t) in made and t.device.type == "cpu" for t in update.values())
        params = {p.data_ptr() for p in model.parameters()}
        assert not params & {t.data_ptr() for t in update.values()}


def test_device_memory_reads_this_machine() -> None:
    total, free = dev.device_memory(torch.device("cpu"))
    assert 0 < free <= total
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    assert total == meminfo["MemTotal"]


@pytest.mark.slow
def test_readme_pretrained_commands_run_and_a_gguf_file_is_a_model(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """README's "Pretrained models and devices" commands as written (through the CLI's `main` in this
    process): the base SmolLM2 is measured on a silo before any tuning (`fedlm eval smollm2`), and its
    .gguf file, named by path, is the same model (the same bits/byte); `fedlm plan` on SmolLM2 LoRA
    reports the device's memory."""
    import json
    import shlex

    from fedlm.corpus import extract
    from fedlm.hf import smollm2_gguf_path
    from tests.test_cli import _readme_block
    from tests.test_multimachine import fedlm_here

    monkeypatch.chdir(tmp_path)

    raw = extract(tmp_path / "raw", ["legal"])
    (tmp_path / "contracts").mkdir()
    for p in sorted(raw["legal"].rglob("*.txt"))[:40]:
        (tmp_path / "contracts" / p.name).write_text(p.read_text()[:6000])
    (tmp_path / "fed.toml").write_text(_readme_block("## Federated training, privacy", "toml"))
    results = {}
    for line in _readme_block("## Pretrained models and devices", "sh").splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("fedlm "):
            continue
        args = shlex.split(line)[1:]
        r = fedlm_here(capfd, *args, *(["--json"] if args[0] == "plan" else []))
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
        results[args[0]] = r.stdout
    base = json.loads(results["eval"])
    assert set(base) >= {"perplexity", "bits_per_byte", "token_accuracy", "tokens"} and base["bits_per_byte"] < 2.0
    plan = json.loads(results["plan"])
    assert plan["device"] and 0 < plan["device_memory_bytes"]["free"] <= plan["device_memory_bytes"]["total"]
    assert plan["model"]["n_layers"] == 30 and plan["seconds_per_round"] > 0
    monkeypatch.setattr("fedlm.pretrained._LOADED", {})  # as in a new process: the file is loaded again
    r = fedlm_here(capfd, "eval", str(smollm2_gguf_path()), "--data", "ws-smollm2/silos/lawfirm", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["bits_per_byte"] == pytest.approx(base["bits_per_byte"], rel=1e-6)


def test_bf16_autocasts_only_where_the_device_computes_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU without bf16 units a "bf16" step is the fp32 step, bit for bit; with them it is autocast."""
    from fedlm.config import ModelConfig
    from fedlm.model import Transformer
    from fedlm.train import lm_loss

    model = Transformer(ModelConfig(preset="tiny", vocab_size=256, max_seq_len=32), seed=0)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    fp32 = lm_loss(model, x, x, "fp32")
    monkeypatch.setattr(dev, "_cpu_bf16", lambda: False)
    assert dev.step_precision(torch.device("cpu"), "bf16") == "fp32"
    assert torch.equal(lm_loss(model, x, x, "bf16"), fp32)
    monkeypatch.setattr(dev, "_cpu_bf16", lambda: True)
    assert dev.step_precision(torch.device("cpu"), "bf16") == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(x, targets=x)
    assert torch.equal(lm_loss(model, x, x, "bf16"), autocast) and not torch.equal(autocast, fp32)
