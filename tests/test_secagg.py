"""Secure aggregation: masks cancel, one masked update looks like uniform noise to the server,
the sum equals plain FedAvg within the stated quantisation error, dropouts are recovered, too
few survivors is a clear error, and the attacks of issue 19 (a server asking for t = 1, a
second masked input or a second unmask; a silo wrapping the sum) are refused."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedlm.federation.secagg import (
    SecAggError,
    SecAggServer,
    _apply_masks,
    _pack_share,
    _pk_bytes,
    _shared_key,
    _sk_from_bytes,
    _unpack_share,
    check_sum_norm,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
    flatten,
    key_statement,
    prg,
    run_secagg_round,
    split_metrics,
    sum_norm_bound,
    unflatten,
    with_metrics,
)


def _updates(n: int, dim: int, seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"silo{i}": (scale * rng.standard_normal(dim)).astype(np.float32) for i in range(n)}


def _plain_sum(updates: dict[str, np.ndarray], silos: list[str]) -> np.ndarray:
    return np.sum([updates[s].astype(np.float64) for s in silos], axis=0)


def test_flatten_unflatten_round_trip() -> None:
    u = {"b": torch.randn(3), "a.w": torch.randn(2, 4), "c": torch.randn(1, 1, 2)}
    vec = flatten(u)
    assert vec.dtype == np.float32 and vec.shape == (13,)
    assert np.array_equal(vec[:8], u["a.w"].numpy().reshape(-1))  # sorted name order
    back = unflatten(vec, {k: tuple(v.shape) for k, v in u.items()})
    assert all(torch.equal(back[k], u[k]) for k in u)
    with pytest.raises(ValueError):
        unflatten(vec[:-1], {k: tuple(v.shape) for k, v in u.items()})


@pytest.mark.parametrize("size", [1, 7, 65536, 200_001])
def test_prg_is_the_aes_ctr_keystream(size: int) -> None:
    """The blockwise PRG equals one-shot AES-256-CTR from `cryptography`."""
    key = bytes(range(32))
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(enc.update(bytes(4 * size)), dtype="<u4")
    assert np.array_equal(prg(key, size), ref)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(3, 5),
    dim=st.integers(1, 300),
    bits=st.integers(12, 32),
    seed=st.integers(0, 2**16),
)
def test_masks_cancel_exactly(n: int, dim: int, bits: int, seed: int) -> None:
    """Property: the unmasked sum is exactly the sum of the silos' quantised values.

    The reference quantises each update in numpy by the stated rule, round(x / step), so any
    mask residue (even one unit mod 2^bits) would show up as a difference.
    """
    ups = _updates(n, dim, seed, scale=0.3)
    total, st_ = run_secagg_round(ups, clip_range=1.0, bits=bits)
    step = 1.0 / ((2 ** (bits - 1) - 1) // (2 * n))
    assert st_["step"] == step
    q = sum(
        np.rint(np.clip(u.astype(np.float64), -1, 1) / step).astype(np.int64) for u in ups.values()
    )
    np.testing.assert_array_equal(np.rint(total / step).astype(np.int64), q)
    assert np.abs(total - q * step).max() <= 1e-9 * max(1.0, np.abs(total).max())


def _stages_until_keys_shared(silos: list[str], *, dim: int
                              ) -> tuple[SecAggServer, dict[str, dict], dict[str, dict]]:
    """Run stages 0-1 by hand; return the server, client states and each silo's share request."""
    server = SecAggServer(silos, dim=dim, clip_range=1.0)
    req = server.setup_request()
    states, replies = {}, {}
    for s in silos:
        states[s], replies[s] = client_setup(s, req)
    req = server.receive_setup(replies)
    for s in silos:
        states[s], replies[s] = client_share_keys(states[s], req)
    return server, states, server.receive_share_keys(replies)


def _stages_until_masked(
    updates: dict[str, np.ndarray],
) -> tuple[SecAggServer, dict[str, dict], dict[str, dict]]:
    """Run stages 0-2 by hand; return the server, client states and masked replies."""
    silos = sorted(updates)
    server, states, reqs = _stages_until_keys_shared(silos, dim=next(iter(updates.values())).size)
    replies = {}
    for s in silos:
        states[s], replies[s] = client_masked_input(states[s], reqs[s], updates[s])
    return server, states, replies


def test_one_masked_update_is_uniform_noise_to_the_server() -> None:
    """The server's view of one silo is uniform mod 2^32 and uncorrelated with its update,
    both as received and after the server removed that silo's self mask at unmasking."""
    dim = 50_000
    ramp = np.linspace(-0.9, 0.9, dim, dtype=np.float32)  # a very structured update
    ups = {"a": ramp, "b": np.zeros(dim, np.float32), "c": -ramp}
    server, states, replies = _stages_until_masked(ups)
    y = replies["a"]["masked"]
    assert y.dtype == np.uint32 and y.shape == (dim,)
    after_unmask = y - prg(states["a"]["b"], dim)  # what the server can compute once b_a is known
    for view in (y, after_unmask):
        u = view.astype(np.float64) / 2**32
        assert stats.kstest(u, "uniform").pvalue > 1e-3
        counts = np.bincount(view >> 24, minlength=256)  # top byte: 256 equal buckets
        assert stats.chisquare(counts).pvalue > 1e-3
        assert abs(np.corrcoef(u, ramp)[0, 1]) < 0.03
    # whereas without masks the quantised ramp is anything but uniform
    plain = np.rint(ramp / server.step).astype(np.int64).astype(np.uint32)
    assert stats.kstest(plain.astype(np.float64) / 2**32, "uniform").pvalue < 1e-6
    # and the protocol still finishes with the right sum
    unmask_req = server.receive_masked_inputs(replies)
    total = server.receive_unmask({s: client_unmask(states[s], unmask_req) for s in ups})
    assert np.abs(total - _plain_sum(ups, list(ups))).max() <= 3 * server.step / 2


def test_weighted_aggregate_equals_plain_fedavg_within_the_stated_bound() -> None:
    """Silos mask w_i * x_i with public weights w_i = tokens_i / max tokens; the server divides
    by the survivors' weight sum; the result is numpy.average within error_bound / weight_sum."""
    ups = _updates(4, 20_000, seed=1, scale=0.05)
    tokens = {"silo0": 4096, "silo1": 1024, "silo2": 2048, "silo3": 3000}
    w = {s: t / max(tokens.values()) for s, t in tokens.items()}
    total, st_ = run_secagg_round(ups, weights=w, clip_range=0.5)
    assert st_["clipped_values"] == 0
    fedavg = total / st_["weight_sum"]
    silos = sorted(ups)
    ref = np.average(
        np.stack([ups[s] for s in silos]).astype(np.float64),
        axis=0,
        weights=[tokens[s] for s in silos],
    )
    err = np.abs(fedavg - ref).max()
    assert err <= st_["error_bound"] / st_["weight_sum"] * (1 + 1e-6)
    assert st_["error_bound"] < 1e-8  # 32 bits, 4 silos, clip 0.5


@pytest.mark.parametrize("bits", [32, 24, 16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_error_bound_holds_for_each_rounding_and_width(bits: int, rounding: str) -> None:
    ups = _updates(3, 5000, seed=bits, scale=0.2)
    total, st_ = run_secagg_round(ups, clip_range=1.0, bits=bits, rounding=rounding, seed=3)  # type: ignore[arg-type]
    err = np.abs(total - _plain_sum(ups, sorted(ups))).max()
    assert err <= st_["error_bound"] * (1 + 1e-6)
    assert st_["error_bound"] == pytest.approx(
        3 * (0.5 if rounding == "nearest" else 1.0) * st_["step"]
    )


def test_clipping_is_counted_and_bounded() -> None:
    ups = {
        "a": np.array([2.0, -3.0, 0.5], np.float32),
        "b": np.zeros(3, np.float32),
        "c": np.zeros(3, np.float32),
    }
    total, st_ = run_secagg_round(ups, clip_range=1.0)
    assert st_["clipped_values"] == 2
    np.testing.assert_allclose(total, [1.0, -1.0, 0.5], atol=st_["error_bound"])


@pytest.mark.parametrize("dropped", ["silo0", "silo1", "silo3"])
def test_one_of_four_dropping_after_masking_is_recovered(dropped: str) -> None:
    """A silo that shared keys but whose masked vector never arrives: the server rebuilds its
    pairwise masks from the other silos' shares; the sum is the other three's, exactly."""
    ups = _updates(4, 10_000, seed=5)
    total, st_ = run_secagg_round(ups, dropouts_after_masking={dropped}, clip_range=1.0)
    kept = [s for s in sorted(ups) if s != dropped]
    assert st_["counted"] == kept and st_["dropped"] == [dropped] and st_["threshold"] == 3
    assert np.abs(total - _plain_sum(ups, kept)).max() <= st_["error_bound"] * (1 + 1e-6)
    assert st_["error_bound"] == pytest.approx(3 * 0.5 * st_["step"])


@pytest.mark.parametrize("dropped", ["silo0", "silo1", "silo2"])
def test_one_of_three_dropping_after_masking_is_refused(dropped: str) -> None:
    """Attack 5: with 3 silos and one dropout after masking, the sum of the other two would let
    each survivor read the other's update off it. The server refuses to unmask it, and so does
    every honest survivor when a server asks anyway."""
    ups = _updates(3, 1000, seed=5)
    with pytest.raises(SecAggError, match="2 of 3 silos sent masked updates, fewer than the threshold 3"):
        run_secagg_round(ups, dropouts_after_masking={dropped}, clip_range=1.0)
    _server, states, _ = _stages_until_masked(ups)
    survivors = [s for s in sorted(ups) if s != dropped]
    for s in survivors:
        with pytest.raises(SecAggError, match="fewer than the threshold 3; not unmasking"):
            client_unmask(states[s], {"survivors": survivors})


def test_a_silo_vanishing_at_unmask_still_counts() -> None:
    """Its masked vector arrived; its self mask comes from the other silos' shares of b."""
    ups = _updates(3, 10_000, seed=6)
    total, st_ = run_secagg_round(ups, dropouts_at_unmask={"silo1"}, clip_range=1.0)
    assert st_["counted"] == sorted(ups)
    assert np.abs(total - _plain_sum(ups, sorted(ups))).max() <= st_["error_bound"] * (1 + 1e-6)


def test_six_silos_two_dropped_with_threshold_four() -> None:
    ups = _updates(6, 3000, seed=7)
    total, st_ = run_secagg_round(ups, dropouts_after_masking={"silo2", "silo5"}, clip_range=1.0)
    kept = ["silo0", "silo1", "silo3", "silo4"]
    assert st_["threshold"] == 4 and st_["counted"] == kept
    assert np.abs(total - _plain_sum(ups, kept)).max() <= st_["error_bound"] * (1 + 1e-6)


def test_fewer_survivors_than_the_threshold_is_a_clear_error() -> None:
    ups = _updates(3, 100, seed=8)
    with pytest.raises(
        SecAggError, match=r"1 of 3 silos sent masked updates, fewer than the threshold 3"
    ):
        run_secagg_round(ups, dropouts_after_masking={"silo0", "silo2"}, clip_range=1.0)
    with pytest.raises(
        SecAggError, match=r"answered the unmask request, fewer than the threshold 3"
    ):
        run_secagg_round(ups, threshold=3, dropouts_at_unmask={"silo1"}, clip_range=1.0)


def test_an_honest_silo_refuses_to_help_unmask_one_silo() -> None:
    """A silo never unmasks with fewer than t survivors, nor when counted as dropped itself, nor
    twice (attack 6: a second answer to another survivor list would give both b and s_sk of one
    silo); for each peer it reveals either the share of b or of the mask key, never both."""
    ups = _updates(4, 50, seed=9)
    _server, states, _ = _stages_until_masked(ups)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        client_unmask(states["silo0"], {"survivors": ["silo0"]})
    with pytest.raises(SecAggError, match="counts this silo as dropped"):
        client_unmask(states["silo0"], {"survivors": ["silo1", "silo2", "silo3"]})
    rep = client_unmask(states["silo0"], {"survivors": ["silo0", "silo1", "silo2"]})
    assert rep["b_src"] == ["silo0", "silo1", "silo2"] and rep["sk_src"] == ["silo3"]
    assert not set(rep["b_src"]) & set(rep["sk_src"])
    with pytest.raises(SecAggError, match="already answered the unmask request"):
        client_unmask(states["silo0"], {"survivors": ["silo0", "silo1", "silo3"]})


def test_a_server_asking_for_threshold_one_or_odd_parameters_is_refused() -> None:
    """Attack 6: with t = 1 a server could rebuild a silo's self mask from its own share alone.
    The silo checks t > n // 2 (and at least 3 silos), the bits and the clip range itself."""
    ups = _updates(3, 20, seed=13)
    silos = sorted(ups)
    server = SecAggServer(silos, dim=20, clip_range=1.0)
    evil = {**server.setup_request(), "threshold": 1}
    states, replies = {}, {}
    for s in silos:
        states[s], replies[s] = client_setup(s, evil)
    bcast = server.receive_setup(replies)
    for s in silos:
        with pytest.raises(SecAggError, match=r"threshold 1 for 3 silos is refused"):
            client_share_keys(states[s], bcast)
    for bad in ({"bits": 4}, {"bits": 33}, {"clip_range": 0.0}, {"clip_range": float("nan")}):
        with pytest.raises(SecAggError, match="refused"):
            client_setup("silo0", {**server.setup_request(), **bad})


def test_a_second_masked_input_for_one_round_is_refused() -> None:
    """Attack 6: the same masks on a second input (say zeros) would give the server the silo's
    update as the difference of the two. A silo masks once per round; and it refuses a clip
    range other than the one its own config implies."""
    ups = _updates(3, 30, seed=14)
    _, states, reqs = _stages_until_keys_shared(sorted(ups), dim=30)
    with pytest.raises(SecAggError, match="implies 0.5; refused"):
        client_masked_input(states["silo0"], reqs["silo0"], ups["silo0"], expect_clip_range=0.5)
    st_, _ = client_masked_input(states["silo0"], reqs["silo0"], ups["silo0"], expect_clip_range=1.0)
    with pytest.raises(SecAggError, match="already sent its masked input"):
        client_masked_input(st_, reqs["silo0"], np.zeros(30, np.float32))


def _malicious_round(ups: dict[str, np.ndarray], forge: Callable[[np.ndarray, float], np.ndarray]
                     ) -> tuple[SecAggServer, np.ndarray]:
    """A round where silo0 replaces its masked vector by forge(its honest vector, step)."""
    server, states, replies = _stages_until_masked(ups)
    replies["silo0"] = {"masked": forge(replies["silo0"]["masked"], server.step)}
    req = server.receive_masked_inputs(replies)
    return server, server.receive_unmask({s: client_unmask(states[s], req) for s in ups})


def test_a_wrapped_or_huge_masked_input_is_rejected() -> None:
    """Attack 7: a malicious silo wraps the modular sum (any uint32 vector is a valid-looking
    masked input). The decoded sum falls outside what honest inputs can reach and is refused;
    one that stays in range but is huge fails the norm bound n × max_update_norm."""
    dim = 2000
    ups = _updates(3, dim, seed=15, scale=0.001)  # updates of norm ~0.045; max_update_norm 0.1
    rng = np.random.default_rng(0)
    with pytest.raises(SecAggError, match="out of range"):
        _malicious_round(ups, lambda y, step: rng.integers(0, 2**32, y.size, dtype=np.uint32))
    with pytest.raises(SecAggError, match="out of range"):  # a single wrapped coordinate is enough
        _malicious_round(ups, lambda y, step: y + np.eye(1, y.size, 7, dtype=np.uint32)[0] * np.uint32(2**31))
    # huge but in range: +1.0 on every coordinate (the clip range), added to the silo's masked vector
    server, total = _malicious_round(ups, lambda y, step: y + np.uint32(round(1.0 / step)))
    bound = sum_norm_bound(weight_sum=3, max_norm=0.1, noise_std=0.0, dim=dim, error_bound=3 * server.step)
    assert check_sum_norm(total, bound) is not None and "exceeds" in str(check_sum_norm(total, bound))
    honest, st_ = run_secagg_round(ups, clip_range=1.0)
    assert check_sum_norm(honest, bound) is None


@pytest.mark.parametrize(
    ("silos", "threshold", "bits", "needle"),
    [
        (["a"], None, 32, "at least 3 silos"),
        (["a", "b"], None, 32, "at least 3 silos"),
        (["a", "b", "c", "d"], 2, 32, "threshold 2 must be in (2, 4]"),
        (["a", "b", "c"], 4, 32, "threshold 4"),
        (["a", "b", "c"], None, 40, "bits = 40"),
    ],
)
def test_bad_parameters_are_named(
    silos: list[str], threshold: int | None, bits: int, needle: str
) -> None:
    with pytest.raises(SecAggError) as e:
        SecAggServer(silos, dim=4, clip_range=1.0, threshold=threshold, bits=bits)
    assert needle in str(e.value)


def test_tampered_messages_are_refused() -> None:
    ups = _updates(3, 10, seed=10)
    silos = sorted(ups)
    server = SecAggServer(silos, dim=10, clip_range=1.0)
    req = server.setup_request()
    states, replies = {}, {}
    for s in silos:
        states[s], replies[s] = client_setup(s, req)
    bcast = server.receive_setup(replies)
    swapped = {**bcast, "c_pk": [bcast["c_pk"][1], bcast["c_pk"][0], bcast["c_pk"][2]]}
    with pytest.raises(SecAggError, match="wrong public key"):
        client_share_keys(states["silo0"], swapped)
    dup = {**bcast, "s_pk": [bcast["s_pk"][0]] * 3}
    with pytest.raises(SecAggError, match="not distinct"):
        client_share_keys(states["silo0"], dup)
    for s in silos:
        states[s], replies[s] = client_share_keys(states[s], bcast)
    reqs = server.receive_share_keys(replies)
    with pytest.raises(SecAggError, match="update has 9 values"):
        client_masked_input(states["silo0"], reqs["silo0"], np.zeros(9, np.float32))
    with pytest.raises(SecAggError, match="non-finite"):
        client_masked_input(states["silo0"], reqs["silo0"], np.full(10, np.nan, np.float32))
    misrouted = {"src": reqs["silo0"]["src"], "ciphertexts": reqs["silo1"]["ciphertexts"]}
    with pytest.raises(SecAggError, match="addressed to someone else"):
        client_masked_input(states["silo0"], misrouted, ups["silo0"])
    forged = {
        "src": reqs["silo0"]["src"],
        "ciphertexts": [b"x" + c[1:] for c in reqs["silo0"]["ciphertexts"]],
    }
    with pytest.raises(SecAggError, match="does not decrypt"):
        client_masked_input(states["silo0"], forged, ups["silo0"])


def test_round_stats_report_bytes_and_seconds() -> None:
    ups = _updates(3, 1000, seed=11)
    _, st_ = run_secagg_round(ups, clip_range=1.0)
    for s in ups:
        assert st_["bytes_up"][s] >= 4 * 1000  # the masked vector
        assert st_["bytes_down"][s] > 0 and st_["client_seconds"][s] > 0
    assert st_["server_seconds"] > 0


def _through_flower_records(msg: dict) -> dict:
    """Carry a message as the runtime does: ConfigRecord + ArrayRecord, through protobuf."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from flwr.common import serde

    arrays = {k: v for k, v in msg.items() if isinstance(v, np.ndarray)}
    rd = RecordDict({"c": ConfigRecord({k: v for k, v in msg.items() if k not in arrays})})
    if arrays:
        rd["a"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    back = serde.recorddict_from_proto(serde.recorddict_to_proto(rd))
    out = dict(back.config_records["c"])
    if arrays:
        out.update({k: a.numpy() for k, a in back.array_records["a"].items()})
    return out


def test_messages_and_client_state_survive_flower_records() -> None:
    """Every message and the client state between stages are legal Flower records, and the
    protocol gives the same result when each one crosses protobuf (as on the deployment engine)."""
    ups = _updates(4, 500, seed=12)
    silos = sorted(ups)
    server = SecAggServer(silos, dim=500, clip_range=1.0)
    wire = _through_flower_records
    req = wire(server.setup_request())
    states, replies = {}, {}
    for s in silos:
        st_, rep = client_setup(s, req)
        states[s], replies[s] = wire(st_), wire(rep)
    req = wire(server.receive_setup(replies))
    for s in silos:
        st_, rep = client_share_keys(states[s], req)
        states[s], replies[s] = wire(st_), wire(rep)
    reqs = server.receive_share_keys(replies)
    masked = {}
    for s in silos:
        st_, rep = client_masked_input(states[s], wire(reqs[s]), ups[s])
        states[s] = wire(st_)
        if s != "silo2":  # and one dropout after masking
            masked[s] = wire(rep)
    req = wire(server.receive_masked_inputs(masked))
    total = server.receive_unmask({s: wire(client_unmask(states[s], req)) for s in masked})
    assert np.abs(total - _plain_sum(ups, ["silo0", "silo1", "silo3"])).max() <= 1.5 * server.step * (1 + 1e-6)


def test_metrics_travel_only_as_a_secure_sum() -> None:
    """Attack 8: loss and seconds ride as extra masked coordinates; the server gets their
    weighted means to within the quantisation step, and nothing per silo."""
    ups = _updates(3, 100, seed=16)
    losses = {"silo0": 2.5, "silo1": 3.25, "silo2": 4.0}
    w = {"silo0": 1.0, "silo1": 0.5, "silo2": 0.25}
    vecs = {s: with_metrics(ups[s], {"loss": losses[s], "train_seconds": 1.5}, clip_range=1.0) for s in ups}
    total, st_ = run_secagg_round(vecs, weights=w, clip_range=1.0)
    upd, means = split_metrics(total, 100, weight_sum=sum(w.values()), clip_range=1.0)
    ref = sum(w[s] * losses[s] for s in ups) / sum(w.values())
    assert means["loss"] == pytest.approx(ref, abs=1e-3) and means["train_seconds"] == pytest.approx(1.5, abs=1e-3)
    assert np.abs(upd - sum(w[s] * ups[s].astype(np.float64) for s in ups)).max() <= st_["error_bound"] * 1.01


# ---------------------------------------------------------------------------------------
# round keys bound to the silos' registered node keys (issue 19's leftover)


def _mitm_setup(sign: bool) -> tuple[dict, dict, dict, SecAggServer, dict]:
    """Stage 0 of three silos (round 4); with `sign`, each signs its round keys with its node key.
    Returns (states, stage 0 replies, pinned registry as each silo holds it, server, node keys)."""
    silos = ["a", "b", "c"]
    node_keys = {s: ec.generate_private_key(ec.SECP384R1()) for s in silos}
    pinned = {s: k.public_key() for s, k in node_keys.items()}
    server = SecAggServer(silos, dim=50, clip_range=1.0)
    states, replies = {}, {}
    for s in silos:
        states[s], replies[s] = client_setup(s, server.setup_request(), round_no=4,
                                             signing_key=node_keys[s] if sign else None)
    return states, replies, pinned, server, node_keys


def _substitute(bcast: dict, victim_peers: list[str], signer: ec.EllipticCurvePrivateKey | None
                ) -> tuple[dict, dict[str, ec.EllipticCurvePrivateKey]]:
    """The server's broadcast with its own encryption keys in place of `victim_peers`' (signed with
    `signer`, its own key, when given): the victim then encrypts its shares for those peers to the server."""
    fake = {p: ec.generate_private_key(ec.SECP384R1()) for p in victim_peers}
    out = {k: list(v) for k, v in bcast.items()}
    for p, sk in fake.items():
        j = out["silos"].index(p)
        out["c_pk"][j] = _pk_bytes(sk)
        if signer is not None and "sig" in out:
            out["sig"][j] = signer.sign(key_statement(p, 4, out["c_pk"][j], out["s_pk"][j]),
                                        ec.ECDSA(hashes.SHA384()))
    return out, fake


def test_a_server_substituting_round_keys_reads_an_unbound_silo_and_is_refused_by_a_bound_one() -> None:
    """Man in the middle: the server tells silo a that b's and c's encryption keys are its own. Unbound,
    a encrypts its shares of b_a and s_sk_a to the server, which combines them (t = 2), rebuilds all
    of a's masks and reads a's update exactly. Bound, a checks each listed silo's signature against its
    own copy of the registry and refuses before any share leaves: for keys the server signs with its
    own key, for a silo it adds, and for signatures replayed from another round."""
    update = np.random.default_rng(3).uniform(-0.5, 0.5, 50).astype(np.float32)
    # the attack works on an unbound round
    states, replies, _, server, _ = _mitm_setup(sign=False)
    tampered, fake = _substitute(server.receive_setup(replies), ["b", "c"], None)
    st_a, shared = client_share_keys(states["a"], tampered)
    b_shares, sk_shares = [st_a["share_b"][0]], [st_a["share_sk"][0]]  # a keeps its own share; take the others
    for dst, ct in zip(shared["dst"], shared["ciphertexts"], strict=True):
        plain = decrypt(_shared_key(fake[dst], tampered["c_pk"][0]), bytes(ct))
        _, _, b_sh, sk_sh = _unpack_share(plain)
        b_shares.append(b_sh)
        sk_shares.append(sk_sh)
    b_a, s_sk_a = combine_shares(b_shares[1:]), combine_shares(sk_shares[1:])
    assert b_a == states["a"]["b"] and s_sk_a == states["a"]["s_sk"]
    # a's stage 2 inbox: shares the server makes up, encrypted with the keys a believes are b's and c's
    inbox = {"src": ["b", "c"], "ciphertexts": [
        encrypt(_shared_key(fake[p], tampered["c_pk"][0]), _pack_share(j, 0, b"x" * 8, b"y" * 8))
        for j, p in ((1, "b"), (2, "c"))]}
    _, masked = client_masked_input(st_a, inbox, update)
    y = masked["masked"].copy()
    masks = [(b_a, -1)] + [(base64.urlsafe_b64decode(_shared_key(_sk_from_bytes(s_sk_a), tampered["s_pk"][j])), -1)
                           for j in (1, 2)]  # a sorts first: it added +PRG(s_ab), +PRG(s_ac)
    _apply_masks(y, masks)
    read = y.view(np.int32) * server.step
    assert np.max(np.abs(read - update)) <= server.step / 2 + 1e-9  # a's update, to the quantisation step

    # bound: every variant of the substitution is refused by a
    states, replies, pinned, server, node_keys = _mitm_setup(sign=True)
    honest = server.receive_setup(replies)
    own = ec.generate_private_key(ec.SECP384R1())  # the server's key, not in any silo's registry
    for signer in (None, own):
        tampered, _ = _substitute(honest, ["b", "c"], signer)
        with pytest.raises(SecAggError, match=r"round keys of 'b' are not signed by its registered key"):
            client_share_keys(states["a"], tampered, pinned=pinned)
    sybil = {k: list(v) for k, v in honest.items()}
    extra = ec.generate_private_key(ec.SECP384R1())
    sybil["silos"].append("mallory")
    sybil["c_pk"].append(_pk_bytes(extra))
    sybil["s_pk"].append(_pk_bytes(ec.generate_private_key(ec.SECP384R1())))
    sybil["sig"].append(own.sign(key_statement("mallory", 4, sybil["c_pk"][-1], sybil["s_pk"][-1]),
                                 ec.ECDSA(hashes.SHA384())))
    with pytest.raises(SecAggError, match="'mallory', which is not in this silo's registry"):
        client_share_keys(states["a"], sybil, pinned=pinned)
    unsigned = {k: v for k, v in honest.items() if k != "sig"}
    with pytest.raises(SecAggError, match="no signatures"):
        client_share_keys(states["a"], unsigned, pinned=pinned)
    replay = {**states["a"], "round": 5}  # b's and c's keys signed for round 4, offered in round 5
    with pytest.raises(SecAggError, match="not signed by its registered key"):
        client_share_keys(replay, honest, pinned=pinned)
    # the honest broadcast passes every silo's check, and the round sums as before
    for s in ("a", "b", "c"):
        client_share_keys(states[s], honest, pinned=pinned)
    assert set(node_keys) == set(pinned)
