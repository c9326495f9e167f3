"""Where tensors live: `train.device` resolved to a torch device, autocast for it, and the way back.

    device = resolve_device("auto")                # CUDA, then MPS, then CPU
    device = resolve_device("cuda:1")              # UserError when this machine has no such GPU
    with autocast(device, "bf16"):                 # bf16 autocast where the device computes bf16 natively
        loss = model(x.to(device), targets=y.to(device))
    update = to_cpu(update)                        # what crosses the wire: CPU tensors only
    total, free = device_memory(device)            # what `fedlm plan` checks a run against

One place for the device, so training (centralised, local-only, a silo's round), evaluation,
generation, serving and planning pick the same one from the same spelling. The model, its
LoRA adapters, the batches, the KV cache, DP-SGD's per-sample gradients and noise and the
optimiser state sit on it; an update is moved to the CPU only to be sent, and the server's
aggregation and secure-aggregation arithmetic (exact modular integers) run on the CPU.

train.precision = "bf16" autocasts only on a device with bf16 matmul units (CUDA, MPS, a CPU
with AVX512-BF16 or AMX: `step_precision`); on another CPU bf16 is emulated, a matmul ~8x and
a SmolLM2 LoRA step ~16x slower than fp32 (an AVX2 EPYC, torch 2.13), so the step runs in fp32
there and a warning says so once.

A process uses one device. A machine with several GPUs runs one silo process per GPU,
pinned with `CUDA_VISIBLE_DEVICES` (see the README), rather than splitting one silo's steps.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from fedlm.config import check_device_spelling
from fedlm.errors import UserError

log = logging.getLogger("fedlm")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str = "auto", *, key: str = "train.device") -> torch.device:
    """The torch device `spec` names on this machine; UserError (naming `key`) when it has none such."""
    try:
        check_device_spelling(spec, key=key)
    except ValueError as e:
        raise UserError(str(e)) from None
    said = f"{key} {spec}" if key.startswith("--") else f"{key} = {spec!r}"  # as the user wrote it
    fix = (lambda alt: f"{key} {alt}") if key.startswith("--") else (lambda alt: f'{key} = "{alt}"')
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            built = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"{said} but {built} (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use {fix('auto')} or "
                            f"{fix('cpu')}, or install a CUDA build of torch on a machine with a GPU")
        index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"{said} but this process sees {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; with CUDA_VISIBLE_DEVICES set, "
                            "the visible GPUs are renumbered from 0")
        return torch.device("cuda", index)
    if spec == "mps" and not _mps_available():
        raise UserError(f"{said} but Apple's Metal (MPS) backend is not available here; "
                        f"use {fix('auto')} or {fix('cpu')}")
    return torch.device(spec)


def autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """bf16 autocast on `device`'s type when the step runs in bf16 there (`step_precision`; weights
    stay fp32), else nothing."""
    if device.type == "meta" or step_precision(device, precision) != "bf16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def step_precision(device: torch.device, precision: str) -> str:
    """The precision a step asked to run in `precision` runs in on `device`: "bf16" only where the
    device computes bf16 natively (`native_bf16`), else "fp32"."""
    if precision != "bf16" or native_bf16(device):
        return precision
    _warn_emulated_bf16(device.type)
    return "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 matmul units: a CUDA GPU that supports bf16, MPS, or a CPU with
    AVX512-BF16 or AMX (Linux's /proc/cpuinfo flags; elsewhere a CPU is taken to have none)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return _cpu_bf16()
    return device.type in ("mps", "meta")


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=4)
def _warn_emulated_bf16(kind: str) -> None:
    log.warning("train.precision = 'bf16': this %s has no bf16 matmul units (no AVX512-BF16 or AMX), where "
                "bf16 is emulated and ~8x slower; the steps run in fp32", kind.upper())


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same named tensors on the CPU, detached (a no-op copy-free view for CPU ones)."""
    return {name: t.detach().to("cpu") for name, t in tensors.items()}


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, free) bytes of the memory a process on `device` allocates from.

    CUDA: the GPU's memory as the driver reports it; MPS: Metal's recommended working set
    (and what it leaves after this process); CPU: the machine's RAM (free = MemAvailable).
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free)
    if device.type == "mps":
        total = int(torch.mps.recommended_max_memory())
        return total, total - int(torch.mps.driver_allocated_memory())
    info = _meminfo()
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total), int(info.get("MemAvailable", total))


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def describe(device: torch.device) -> str:
    """The device for people: "cuda:0 (NVIDIA H200)", "cpu (2 threads)"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing a step on an asynchronous device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
