"""Update codecs against their exact error bounds and numpy references; error feedback; SecAgg; DP clip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlm.config import load_config
from fedlm.errors import UserError
from fedlm.federation import codecs, secagg
from fedlm.privacy.client_dp import clip_update


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 7, generator=g) * 1e-2,
        "b": torch.randn(5, generator=g),
        "big": torch.randn(1000, generator=g) * 10.0 ** torch.randint(-8, 2, (1000,), generator=g),
    }


def _shapes(u: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in u.items()}


def test_fp16_matches_numpy_and_relative_bound() -> None:
    """fp16 is numpy's float16 rounding; |x̂ − x| <= 2^-11 |x| (normal range), <= 2^-25 (subnormal)."""
    u = _update()
    got = codecs.decode(codecs.encode(u, codec="fp16"), codec="fp16", expected=_shapes(u))
    for k, x in u.items():
        ref = x.numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[k].numpy(), ref)
        a = x.abs().double()
        err = (got[k].double() - x.double()).abs()
        normal = a >= 2.0**-14
        assert bool((err[normal] <= 2.0**-11 * a[normal]).all())
        assert bool((err[~normal] <= 2.0**-25).all())


def test_int8_blockwise_bound_and_reference() -> None:
    """int8: per block of 256, s = max|x|/127, q = round(x/s); |x̂ − x| <= s/2 (+ fp32 rounding of q·s)."""
    u = _update(1)
    payload = codecs.encode(u, codec="int8")
    got = codecs.decode(payload, codec="int8", expected=_shapes(u))
    for k, x in u.items():
        flat = x.numpy().astype(np.float64).ravel()
        pad = np.pad(flat, (0, (-flat.size) % 256)).reshape(-1, 256)
        s = np.abs(pad).max(axis=1) / 127.0  # reference scales, fp64
        np.testing.assert_allclose(payload[k + codecs.SCALE].numpy(), s, rtol=1e-6)
        s_per = np.repeat(s, 256)[: flat.size]
        err = np.abs(got[k].numpy().astype(np.float64).ravel() - flat)
        assert np.all(err <= s_per / 2 * (1 + 1e-6) + 1e-7 * np.abs(flat))
        assert payload[k].dtype == torch.int8 and int(payload[k].abs().max()) <= 127
    n = sum(x.numel() for x in u.values())
    blocks = sum(math.ceil(x.numel() / 256) for x in u.values())
    assert codecs.payload_bytes(payload) == n + 4 * blocks


def test_topk_keeps_largest_and_residual_is_exactly_the_dropped_part() -> None:
    """Top-k keeps the k largest |x| (numpy argsort), and update − sent is exactly the rest."""
    u = _update(2)
    payload, residual = codecs.with_feedback(u, None, codec="topk", topk_fraction=0.1)
    sent = codecs.decode(payload, codec="topk", expected=_shapes(u))
    for k, x in u.items():
        flat = x.numpy().ravel()
        kk = max(1, math.ceil(0.1 * flat.size))
        ref = np.sort(np.argsort(-np.abs(flat), kind="stable")[:kk])
        np.testing.assert_array_equal(payload[k + codecs.INDEX].numpy(), ref)
        kept = np.zeros(flat.size, bool)
        kept[ref] = True
        r = residual[k].numpy().ravel()
        assert np.all(r[kept] == 0) and np.array_equal(r[~kept], flat[~kept])
        assert np.array_equal(sent[k].numpy().ravel()[kept], flat[kept])
        assert np.all(sent[k].numpy().ravel()[~kept] == 0)
    assert codecs.payload_bytes(payload) == 8 * sum(max(1, math.ceil(0.1 * x.numel())) for x in u.values())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_error_feedback_sums_to_the_true_cumulative_update(rounds: int, fraction: float, seed: int) -> None:
    """Σ sent over rounds + the last residual == Σ true updates, exactly (integer-valued updates)."""
    g = torch.Generator().manual_seed(seed)
    residual = None
    total_sent = torch.zeros(40)
    total_true = torch.zeros(40)
    for _ in range(rounds):
        x = torch.randint(-1000, 1000, (40,), generator=g).float()
        payload, residual = codecs.with_feedback({"w": x}, residual, codec="topk", topk_fraction=fraction)
        total_sent += codecs.decode(payload, codec="topk", expected={"w": (40,)})["w"]
        total_true += x
    assert residual is not None
    assert torch.equal(total_sent + residual["w"], total_true)


def test_residual_store_run_and_round_stamps(tmp_path: Path) -> None:
    """The store gives a round the newest residual of its run from an earlier round (replays too)."""
    store = codecs.ResidualStore(tmp_path / "silo")
    assert store.load("run", 0) is None
    store.save({"w": torch.ones(3)}, "run", 0)
    store.save({"w": torch.full((3,), 2.0)}, "run", 1)
    assert torch.equal(store.load("run", 2)["w"], torch.full((3,), 2.0))  # type: ignore[index]
    assert torch.equal(store.load("run", 1)["w"], torch.ones(3))  # type: ignore[index]  # round 1 replayed
    assert store.load("other run", 5) is None
    (tmp_path / "silo" / ".fedlm" / "residual.safetensors").write_bytes(b"torn")
    assert torch.equal(store.load("run", 2)["w"], torch.ones(3))  # type: ignore[index]


def test_encode_for_send_keeps_feedback_on_disk(tmp_path: Path) -> None:
    """The silo path (fresh process each round): sent + stored residual = true sum, across calls."""
    store_dir = tmp_path / "silo"
    rng = np.random.default_rng(0)
    total_true = torch.zeros(50)
    total_sent = torch.zeros(50)
    for r in range(4):
        x = torch.from_numpy(rng.integers(-100, 100, 50).astype(np.float32))
        payload = codecs.encode_for_send({"w": x}, codec="topk", topk_fraction=0.2,
                                         store=codecs.ResidualStore(store_dir), run_id="abc", round_idx=r)
        total_true += x
        total_sent += codecs.decode(payload, codec="topk", expected={"w": (50,)})["w"]
    residual = codecs.ResidualStore(store_dir).load("abc", 4)
    assert residual is not None and torch.equal(total_sent + residual["w"], total_true)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "topk"])
def test_malformed_payload_is_a_value_error(codec: codecs.Codec) -> None:
    u = {"w": torch.randn(10, 3)}
    good = codecs.encode(u, codec=codec)
    with pytest.raises(ValueError):
        codecs.decode(good, codec=codec, expected={"w": (3, 10), "x": (1,)})
    bad = dict(good)
    key = next(iter(bad))
    bad[key] = bad[key][:1] if codec != "topk" else torch.tensor([999], dtype=torch.int32)
    if codec == "topk":
        bad["w" + codecs.VALUE] = torch.ones(1)
    with pytest.raises(ValueError):
        codecs.decode(bad, codec=codec, expected={"w": (10, 3)})


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-3, 10.0), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_client_dp_update_sent_keeps_the_clip_bound(clip: float, scale: float, seed: int) -> None:
    """Client DP as a silo sends it (clip_update, then encode_for_send with the clip; compression
    is "none", the only codec the config allows with it): the decoded update's norm is <= clip."""
    g = torch.Generator().manual_seed(seed)
    update = {"w": torch.randn(64, 3, generator=g) * scale, "b": torch.randn(5, generator=g) * scale}
    clipped, _ = clip_update(update, max_norm=clip)
    payload = codecs.encode_for_send(clipped, codec="none", max_norm=clip)
    sent = codecs.decode(payload, codec="none", expected=_shapes(update))
    assert math.sqrt(sum(float(t.double().pow(2).sum()) for t in sent.values())) <= clip


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_config_refuses_client_dp_with_compression(codec: str) -> None:
    """A codec after clipping would change what the DP bound is about: the config says so, naming the key."""
    sets = ['train.mode="federated"', 'privacy.mode="client"', "privacy.target_epsilon=8.0",
            f'federation.compression="{codec}"']
    with pytest.raises(UserError, match=r"federation\.compression = .* use compression = \"none\""):
        load_config(None, sets)


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_composes_with_secagg_decode_before_masking(codec: codecs.Codec) -> None:
    """Under SecAgg each silo masks its decoded payload: the unmasked sum is Σ decoded within SecAgg's bound."""
    ups = {s: {"w": torch.randn(500, generator=torch.Generator().manual_seed(i)) * 0.01}
           for i, s in enumerate(["a", "b", "c"])}
    decoded = {s: codecs.decode(codecs.encode(u, codec=codec, topk_fraction=0.1), codec=codec,
                                expected={"w": (500,)}) for s, u in ups.items()}
    vecs = {s: secagg.flatten(d) for s, d in decoded.items()}
    total, stats = secagg.run_secagg_round(vecs, clip_range=1.0, bits=32)
    ref = np.sum([v.astype(np.float64) for v in vecs.values()], axis=0)
    assert np.max(np.abs(total - ref)) <= stats["error_bound"]
    if codec == "topk":  # the sparsity survives: only the coordinates some silo sent are non-zero
        assert np.count_nonzero(np.abs(total) > stats["error_bound"]) <= 3 * 50
