"""Update codecs: what a silo sends instead of its fp32 update, and how the server undoes it.

    payload = encode(update, codec="int8")                   # on the silo, before sending
    update = decode(payload, codec="int8", expected=shapes)  # on the server (ValueError if malformed)
    payload, residual = with_feedback(update, residual, codec="topk", topk_fraction=0.1)

An update is `dict[str, Tensor]` (local − global, fp32). A payload is a dict of tensors too
(it travels in the same ArrayRecord), so the bytes logged per silo per round are the
compressed bytes. The codecs and their exact error bounds, per coordinate x of the update:

- none: x as fp32; exact.
- fp16: x rounded to nearest fp16; |x̂ − x| <= 2^-11·|x| for 2^-14 <= |x| <= 65504, and
  <= 2^-25 below (subnormals); beyond 65504 it is inf, which the server rejects as non-finite.
- int8: the flattened tensor in blocks of `INT8_BLOCK` = 256 values, each with its fp32
  scale s = max|x| / 127 over the block; q = round-to-nearest(x / s) in [-127, 127] (ties to
  even; deterministic, so both engines agree bitwise); x̂ = q·s, |x̂ − x| <= s/2 (up to the
  fp32 rounding of q·s). Cost: 1 byte per value + 4 bytes per 256 values (≈ 25.4% of fp32).
- topk: per tensor, the k = ceil(topk_fraction · numel) coordinates of largest |x| (at least
  one), sent as int32 indices (ascending) and fp32 values; the rest is dropped. Cost: 8 bytes
  per kept value (20% of fp32 at topk_fraction = 0.1).

Error feedback (`with_feedback`, used for topk): the silo adds the residual it kept from its
previous round to the update, sends the codec's version of that sum and keeps what was not sent:
residual' = (update + residual) − decode(payload). Summed over rounds, what was sent plus the
final residual equals the sum of the true updates, so nothing is lost, only delayed. On the
deployment engine each message runs in a fresh process, so the residual lives on disk in the
silo's workspace (`ResidualStore`: WS/silos/NAME/.fedlm/residual.safetensors), stamped with
the run and the round; the in-process engine uses the same path. A round the server drops does
not give the silo its mass back (as in standard error feedback).

With secure aggregation the silo decodes its own payload before masking ("decode before
masking"): SecAgg then quantises the decoded values to its own integers, so the codec's error
and top-k's error feedback apply but the bytes are SecAgg's (its bits per coordinate are the
compression there). With client-level DP (clip on the silo, noise on the aggregate),
`clip_payload` rescales the payload so that its decoded update has norm <= the clip: the codec
runs after clipping and the bound is kept exactly (int8 and fp16 alone could overshoot by their
rounding, top-k with error feedback by the residual it adds back).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlm.fileio import atomic_path

Codec = Literal["none", "fp16", "int8", "topk"]
Update = dict[str, Tensor]

INT8_BLOCK = 256
"""Values per int8 scale."""
SCALE, INDEX, VALUE = "#scale", "#idx", "#val"
"""Suffixes of the extra arrays in a payload: int8 scales, top-k indices and values."""


def _int8_encode(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.detach().float().flatten()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % INT8_BLOCK)).view(-1, INT8_BLOCK)  # (nb, 256)
    scale = blocks.abs().amax(dim=1) / 127.0  # (nb,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.flatten()[:n].clone(), scale


def _int8_decode(q: Tensor, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = math.prod(shape)
    nb = -(-n // INT8_BLOCK)
    if q.dtype != torch.int8 or q.numel() != n or scale.numel() != nb or not scale.is_floating_point():
        raise ValueError(f"int8 payload of {q.numel()} {q.dtype} values / {scale.numel()} scales "
                         f"does not fit shape {shape}")
    blocks = torch.nn.functional.pad(q.float().flatten(), (0, nb * INT8_BLOCK - n)).view(nb, INT8_BLOCK)
    return (blocks * scale.float()[:, None]).flatten()[:n].view(shape)


def topk_count(numel: int, fraction: float) -> int:
    """Coordinates top-k keeps of a tensor: ceil(fraction · numel), at least 1."""
    return min(numel, max(1, math.ceil(fraction * numel)))


def encode(update: Update, *, codec: Codec, topk_fraction: float = 0.1) -> Update:
    """The payload a silo sends for `update` (see the module docstring for each codec)."""
    out: Update = {}
    for name, t in update.items():
        t = t.detach()
        if codec == "none":
            out[name] = t.float().contiguous()
        elif codec == "fp16":
            out[name] = t.to(torch.float16).contiguous()
        elif codec == "int8":
            out[name], out[name + SCALE] = _int8_encode(t)
        elif codec == "topk":
            flat = t.float().flatten()
            k = topk_count(flat.numel(), topk_fraction)
            idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            out[name + INDEX] = idx.to(torch.int32)
            out[name + VALUE] = flat[idx].clone()
        else:
            raise ValueError(f"unknown codec {codec!r}")
    return out


def decode(payload: Update, *, codec: Codec, expected: dict[str, tuple[int, ...]]) -> Update:
    """The fp32 update a payload stands for; ValueError if it does not fit `expected` names/shapes."""
    suffixes = {"none": [""], "fp16": [""], "int8": ["", SCALE], "topk": [INDEX, VALUE]}[codec]
    want = {name + s for name in expected for s in suffixes}
    if set(payload) != want:
        extra, missing = sorted(set(payload) - want), sorted(want - set(payload))
        raise ValueError(f"{codec} payload: unexpected arrays {extra[:3]}, missing {missing[:3]}")
    out: Update = {}
    for name, shape in expected.items():
        shape = tuple(shape)
        if codec in ("none", "fp16"):
            t = payload[name]
            dtype = torch.float32 if codec == "none" else torch.float16
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
            out[name] = t.float()
        elif codec == "int8":
            out[name] = _int8_decode(payload[name], payload[name + SCALE], shape)
        else:
            idx, val = payload[name + INDEX], payload[name + VALUE]
            n = math.prod(shape)
            if idx.dtype != torch.int32 or idx.dim() != 1 or val.shape != idx.shape \
                    or not val.is_floating_point():
                raise ValueError(f"{name}: top-k payload needs int32 indices and float values of one length")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{name}: top-k index out of range for shape {shape}")
            dense = torch.zeros(n, dtype=torch.float32)
            dense[idx.long()] = val.float()
            out[name] = dense.view(shape)
    return out


def payload_bytes(payload: Update) -> int:
    """Bytes of the payload's tensor data (the wire adds a small per-array header)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def with_feedback(update: Update, residual: Update | None, *, codec: Codec,
                  topk_fraction: float = 0.1) -> tuple[Update, Update]:
    """Encode update + residual; return (payload, new residual = what was not sent)."""
    acc = {k: t.detach().float() + (residual[k] if residual is not None else 0.0) for k, t in update.items()}
    payload = encode(acc, codec=codec, topk_fraction=topk_fraction)
    sent = decode(payload, codec=codec, expected={k: tuple(t.shape) for k, t in acc.items()})
    return payload, {k: acc[k] - sent[k] for k in acc}


def clip_payload(payload: Update, *, codec: Codec, expected: dict[str, tuple[int, ...]],
                 max_norm: float) -> Update:
    """Rescale a payload so the L2 norm of its decoded update is <= max_norm (exactly, in fp64)."""
    decoded = decode(payload, codec=codec, expected=expected)
    norm = math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in decoded.values()))
    if not math.isfinite(norm) or norm <= max_norm:
        return payload
    # shrink a hair more for fp16, whose re-rounding may add 2^-11 relative
    c = max_norm / norm * (1 - 2.0**-9 if codec == "fp16" else 1 - 1e-6)
    out = dict(payload)
    for name in expected:
        if codec in ("none", "fp16"):
            out[name] = (payload[name].float() * c).to(payload[name].dtype)
        elif codec == "int8":
            out[name + SCALE] = payload[name + SCALE] * c
        else:
            out[name + VALUE] = payload[name + VALUE] * c
    return out


class ResidualStore:
    """A silo's error-feedback residual on disk, stamped (run id, round); the previous one kept.

    `load(run_id, round_idx)` returns the newest residual of this run written for a round before
    `round_idx` (a resumed run replays a round whose residual may already be on disk: the one
    before it is used then), else None. Writes are atomic.
    """

    def __init__(self, silo_dir: Path) -> None:
        self.current = Path(silo_dir) / ".fedlm" / "residual.safetensors"
        self.previous = self.current.with_name("residual.prev.safetensors")

    @staticmethod
    def _read(path: Path) -> tuple[Update, str, int] | None:
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path)), meta.get("run", ""), int(meta.get("round", "-1"))
        except (OSError, SafetensorError, ValueError):
            return None  # a torn or foreign file: start from no residual

    def load(self, run_id: str, round_idx: int) -> Update | None:
        best: tuple[Update, str, int] | None = None
        for got in (self._read(self.current), self._read(self.previous)):
            if got is not None and got[1] == run_id and got[2] < round_idx and (best is None or got[2] > best[2]):
                best = got
        return best[0] if best is not None else None

    def save(self, residual: Update, run_id: str, round_idx: int) -> None:
        cur = self._read(self.current)
        if cur is not None and cur[1] == run_id and cur[2] < round_idx:
            self.current.replace(self.previous)  # keep the last one for a replayed round
        with atomic_path(self.current) as tmp:
            save_file({k: v.contiguous() for k, v in residual.items()}, str(tmp),
                      metadata={"run": run_id, "round": str(round_idx)})


def encode_for_send(update: Update, *, codec: Codec, topk_fraction: float = 0.1, max_norm: float = 0.0,
                    store: ResidualStore | None = None, run_id: str = "", round_idx: int = 0) -> Update:
    """The silo's side: (with top-k) add the stored residual, encode, clip the payload to
    `max_norm` (> 0: client-level DP), and store the new residual (what was not sent)."""
    expected = {k: tuple(t.shape) for k, t in update.items()}
    feedback = codec == "topk" and store is not None
    residual = store.load(run_id, round_idx) if store is not None and feedback else None
    if residual is not None and {k: tuple(t.shape) for k, t in residual.items()} != expected:
        residual = None  # another model's residual (the run id should prevent this)
    acc = {k: t.detach().float() + (residual[k] if residual is not None else 0.0) for k, t in update.items()}
    payload = encode(acc, codec=codec, topk_fraction=topk_fraction)
    if max_norm > 0:
        payload = clip_payload(payload, codec=codec, expected=expected, max_norm=max_norm)
    if store is not None and feedback:
        sent = decode(payload, codec=codec, expected=expected)
        store.save({k: acc[k] - sent[k] for k in acc}, run_id, round_idx)
    return payload
