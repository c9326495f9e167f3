"""Secure aggregation (SecAgg, Bonawitz et al. 2017): the server learns only the sum of the
sampled silos' updates, never one silo's update, and still unmasks the sum when silos drop out.

Built on Flower's primitives (`flwr.common.secure_aggregation`: ECDH shared keys, Fernet
encryption, Shamir shares) under the Message API, because Flower's own SecAgg+ runs only on
the legacy API and costs ×19 per round in process. Messages are plain dicts of bytes, str,
int, float, lists of those, and numpy arrays, so the runtime carries them in Flower messages
(ConfigRecord / ArrayRecord) and the tests drive the protocol without Flower's runtime.

    total, stats = run_secagg_round({"a": va, "b": vb, "c": vc}, clip_range=1.0)  # in memory

The runtime calls the stages one message at a time instead (`run_secagg_round` is the
reference for the order). The client's state between stages is a dict of the same plain
types, because on Flower's deployment engine every message starts a fresh client process and
only `Context.state` survives:

    server = SecAggServer(silos, dim=vec.size, clip_range=c)            # t = n // 2 + 1
    0 setup:   req = server.setup_request()                        -> every silo
               st, rep = client_setup(silo, req)                   <- {c_pk, s_pk}
    1 keys:    req = server.receive_setup(replies)                 -> every silo (all public keys)
               st, rep = client_share_keys(st, req)                <- encrypted Shamir shares
    2 input:   reqs = server.receive_share_keys(replies)           -> each silo its own shares
               st, rep = client_masked_input(st, reqs[silo], update, weight=w)  <- masked vector
    3 unmask:  req = server.receive_masked_inputs(replies)         -> survivors
               rep = client_unmask(st, req)                        <- shares of b / of s_sk
               total = server.receive_unmask(replies)              # sum of w * update, fp64

Stage 2 carries the training update, so the runtime can train and mask in one message and no
silo has to keep its update between messages.

Masking. Each silo u quantises its (weighted) update to integers mod 2^bits and adds a
self mask PRG(b_u) and, for every peer v, +PRG(s_uv) if u sorts before v else −PRG(s_uv),
where s_uv is the ECDH key of u's and v's mask key pairs. The pairwise masks cancel in the
sum; the server removes the self masks of the silos whose vectors arrived (from t shares of
b_u) and, for a silo that dropped after sharing keys, rebuilds its pairwise masks from t
shares of its mask secret key. An honest silo never reveals both b_u and s_sk_u of the same
silo. It enforces its own rules, whatever the server asks: a threshold t that is a majority
of at least 3 silos, bits in [8, 32], the clip range its own config implies, one masked input
and one unmask answer per round, and no unmasking with fewer than max(t, 3) survivors (with
2, each could read the other's update off the sum).

Keys bound to identities. Across organisations each silo signs its round public keys with
its registered node key (the SuperNode key the coordinator bound to its name), and each silo
checks every listed silo's signature against its own copy of the registry (`pinned`): a
server that substitutes its own keys for a peer's, to decrypt the shares sent to it, or adds
a silo of its own, is refused before any share leaves. Not implemented: Bonawitz's round 3
consistency check (a server that tells silos different survivor lists).

The PRG is AES-256 in counter mode (`fedlm.privacy.randomness.prg`) keyed by the 32-byte
secret (a real CSPRNG), fresh keys every round.

Quantisation. With n silos at setup, each value is clipped to ±clip_range and rounded to the
nearest multiple of step = clip_range / qmax, qmax = (2^(bits−1) − 1) // (2n), as a signed
integer; the sum of up to n such integers fills at most half the signed range, so it decodes
exactly, and a sum beyond that half can only come from a silo that sent a wrapped input: it
is refused (`_decode`). The server also bounds the decoded sum's norm (`check_sum_norm`).
Error bound (returned in the stats): |decoded sum − Σ w_i x_i| <= survivors * step / 2 per
coordinate when nothing was clipped ("stochastic" rounding: < survivors * step, unbiased).
Choose clip_range = federation.max_update_norm when it is set: a coordinate of an update can
never exceed the update's L2 norm, so an accepted update is never clipped.

Weighting. Silo u masks w_u * x_u with a public weight w_u <= 1 (so the clip range holds), and
the server divides the unmasked sum by Σ w_u over the silos whose vectors arrived. The weight
must be public and fixed by the server, never a silo's report: the server cannot see the
weight a silo applies inside its mask, so a silo that reports a small weight and masks with a
large one shrinks the divisor and scales up everyone's update. The federated rounds give every
silo w_u = 1, the tokens the plan gives each silo per round (`exchanges.secagg_round`).
"""

from __future__ import annotations

import base64
import math
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)

from fedlm.errors import UserError
from fedlm.federation.silo_privacy import MIN_SURVIVORS
from fedlm.privacy.randomness import CHUNK, KeyStream, prg  # noqa: F401  (secagg.prg: the masks' PRG)

Msg = dict[str, Any]
_CURVE = ec.SECP384R1()
_SK_BYTES = 48  # a P-384 private scalar


class SecAggError(RuntimeError):
    """The protocol cannot continue: too few silos left, or a malformed or inconsistent message."""


# ---- flat vectors --------------------------------------------------------------------------


def flatten(update: dict[str, torch.Tensor]) -> np.ndarray:
    """All arrays of an update as one fp32 vector, in sorted name order (see `unflatten`)."""
    if not update:
        return np.zeros(0, dtype=np.float32)
    parts = [update[k].detach().to(torch.float32).reshape(-1).numpy() for k in sorted(update)]
    return np.concatenate(parts)


def unflatten(vec: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Cut a flat vector back into named fp32 tensors, in sorted name order (inverse of `flatten`)."""
    total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    if vec.ndim != 1 or vec.size != total:
        raise ValueError(f"vector of shape {vec.shape} does not hold {total} values")
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for name in sorted(shapes):
        size = int(np.prod(shapes[name], dtype=np.int64))
        chunk = np.ascontiguousarray(vec[pos : pos + size], dtype=np.float32)
        out[name] = torch.from_numpy(chunk.copy()).reshape(shapes[name])
        pos += size
    return out


# ---- metrics in the secure sum ---------------------------------------------------------------


def with_metrics(vec: np.ndarray, metrics: dict[str, float], *, clip_range: float) -> np.ndarray:
    """`vec` followed by one coordinate per METRICS entry, scaled into the clip range.

    Under secure aggregation a silo's loss and seconds would tell the server about its data
    and machine, so they travel masked, summed with the others' (weighted like the update):
    the server learns the round's means only. A value outside [0, METRIC_MAX] (or not finite)
    is clamped (nan: 0)."""
    extra = [float(np.clip(np.nan_to_num(metrics.get(k, 0.0)), 0.0, METRIC_MAX)) / METRIC_MAX * clip_range
             for k in METRICS]
    return np.concatenate([vec, np.asarray(extra, dtype=np.float32)])


def split_metrics(total: np.ndarray, dim: int, *, weight_sum: float, clip_range: float
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """The unmasked sum's update part and the METRICS' weighted means (inverse of `with_metrics`)."""
    means = {k: float(total[dim + i]) / clip_range * METRIC_MAX / weight_sum for i, k in enumerate(METRICS)}
    return total[:dim], means


def clear_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """What a silo sends in clear beside its masked input: the public numbers (tokens, DP-SGD plan)."""
    return {k: v for k, v in metrics.items() if k not in METRICS}


def sum_norm_bound(*, weight_sum: float, max_norm: float, noise_std: float, dim: int, error_bound: float) -> float:
    """A bound on the L2 norm of an honest unmasked sum: Σ w_i · max_norm, plus the sum's noise
    (Gaussian std `noise_std` per coordinate: exceeded with probability < e^-50), plus rounding."""
    return weight_sum * max_norm + noise_std * (math.sqrt(dim) + 10.0) + error_bound * math.sqrt(dim)


def check_sum_norm(vec: np.ndarray, bound: float) -> str | None:
    """Why an unmasked sum is refused (its norm exceeds what honest silos can send), or None."""
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if not (math.isfinite(norm) and norm <= bound):
        return (f"the unmasked sum's norm {norm:.4g} exceeds {bound:.4g}, the most the silos' bounded updates "
                "can add to: a silo sent an out-of-range input")
    return None


# ---- primitives ----------------------------------------------------------------------------


def _apply_masks(total: np.ndarray, masks: list[tuple[bytes, int]]) -> None:
    """total += sign * PRG(key) mod 2^32 for each (key, sign), block by block, in place."""
    streams = [(KeyStream(key), sign) for key, sign in masks]
    for a in range(0, total.size, CHUNK):
        b = min(a + CHUNK, total.size)
        block = total[a:b]
        for stream, sign in streams:
            if sign > 0:
                block += stream.next(b - a)
            else:
                block -= stream.next(b - a)


def _shared_key(sk: ec.EllipticCurvePrivateKey, pk_bytes: bytes) -> bytes:
    """The 32-byte ECDH+HKDF key between `sk` and a peer's public key (Flower's KDF)."""
    pk = ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, pk_bytes)
    return generate_shared_key(sk, pk)  # urlsafe base64 (Fernet key) of the 32 bytes


def _pk_bytes(sk: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return sk.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def _sk_to_bytes(sk: ec.EllipticCurvePrivateKey) -> bytes:
    return sk.private_numbers().private_value.to_bytes(_SK_BYTES, "big")


def _sk_from_bytes(b: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b, "big"), _CURVE)


KEY_BINDING = b"fedlm secagg round keys v1"
"""Domain separation for the statement a silo signs (`key_statement`): no other signature of its
node key (Flower signs each Fleet request with it) can be passed off as one over round keys."""

HEADROOM = 2
"""Each silo gets 1/(HEADROOM · n) of the signed range, so an honest sum fills at most half of it:
a wrapped input (any uint32 vector passes as masked) lands outside that half and is refused."""


def _qmax(bits: int, num_silos: int) -> int:
    return (2 ** (bits - 1) - 1) // (HEADROOM * num_silos)


def quantization_step(clip_range: float, bits: int, num_silos: int) -> float:
    """The value of one integer unit: clip_range / ((2^(bits−1) − 1) // (HEADROOM · num_silos))."""
    return clip_range / _qmax(bits, num_silos)


def _pack_share(src: int, dst: int, b_share: bytes, sk_share: bytes) -> bytes:
    # Same layout as flwr's share_keys_plaintext_concat: src, dst, len(b_share), b, sk.
    return b"".join(
        [
            src.to_bytes(8, "little"),
            dst.to_bytes(8, "little"),
            len(b_share).to_bytes(4, "little"),
            b_share,
            sk_share,
        ]
    )


def _unpack_share(p: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, n = (int.from_bytes(p[a:b], "little") for a, b in ((0, 8), (8, 16), (16, 20)))
    return src, dst, p[20 : 20 + n], p[20 + n :]


MIN_BITS = 8
METRIC_MAX = 1e4
"""Metrics (loss, seconds) ride in the secure sum as extra coordinates, clamped to [0, METRIC_MAX]."""
METRICS = ("loss", "train_seconds")


def min_survivors(num_silos: int, min_silos: int = 1) -> int:
    """The fewest masked inputs a round may be unmasked with: the threshold, 3, and min_silos."""
    return max(default_threshold(num_silos), MIN_SURVIVORS, min_silos)


def check_round_size(per_round: int) -> None:
    """Refuse secure aggregation over fewer than MIN_SURVIVORS silos a round (UserError)."""
    if per_round < MIN_SURVIVORS:
        raise UserError(
            f"federation.secure_aggregation needs at least {MIN_SURVIVORS} silos per round, the run samples "
            f"{per_round}: with 2, each silo can take its own update off the new global model and read the "
            "other's; add silos or raise federation.fraction"
        )


def _check_params(num_silos: int, threshold: int, bits: int, clip_range: float) -> None:
    if num_silos < MIN_SURVIVORS:
        raise SecAggError(f"secure aggregation needs at least {MIN_SURVIVORS} silos, got {num_silos} "
                          "(with 2, each silo could read the other's update off the sum)")
    if not num_silos // 2 < threshold <= num_silos:
        raise SecAggError(
            f"threshold {threshold} must be in ({num_silos // 2}, {num_silos}] for {num_silos} silos"
        )
    if not MIN_BITS <= bits <= 32 or _qmax(bits, num_silos) < 1:
        raise SecAggError(f"bits = {bits} cannot hold the sum of {num_silos} silos (use 8..32)")
    if not clip_range > 0:
        raise SecAggError(f"clip_range must be > 0, got {clip_range}")


def default_threshold(num_silos: int) -> int:
    """n // 2 + 1: a majority, so two disjoint groups can never both reach it."""
    return num_silos // 2 + 1


# ---- client stages -------------------------------------------------------------------------


def key_statement(silo: str, round_no: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a silo signs with its registered node key at stage 0: its name, the round and its two
    public keys for the round (each field length-prefixed, so no two statements read alike)."""
    fields = [KEY_BINDING, silo.encode(), round_no.to_bytes(8, "big"), c_pk, s_pk]
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _check_signatures(state: Msg, silos: list[str], c_pks: list[bytes], s_pks: list[bytes], sigs: list[bytes],
                      pinned: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
    """Refuse a key list in which a silo is not in this silo's pinned registry, or whose round keys
    are not signed by that silo's registered key (a server substituting keys to read the shares)."""
    me = state["silo"]
    if len(sigs) != len(silos):
        raise SecAggError(f"silo {me}: the server sent no signatures for the silos' round keys; refused "
                          "(unsigned keys could be the server's own)")
    for name, c_pk, s_pk, sig in zip(silos, c_pks, s_pks, sigs, strict=True):
        if name not in pinned:
            raise SecAggError(f"silo {me}: the round lists {name!r}, which is not in this silo's registry of "
                              "peers; refused")
        try:
            pinned[name].verify(bytes(sig), key_statement(name, int(state["round"]), c_pk, s_pk),
                                ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise SecAggError(f"silo {me}: the round keys of {name!r} are not signed by its registered key; "
                              "refused (the server may be substituting keys)") from None


def client_setup(silo: str, request: Msg, *, signing_key: ec.EllipticCurvePrivateKey | None = None,
                 round_no: int = 0) -> tuple[Msg, Msg]:
    """Stage 0: make the encryption (c) and mask (s) key pairs and the self-mask seed b; with
    `signing_key` (the silo's registered node key) sign them for round `round_no`."""
    bits, clip = int(request["bits"]), float(request["clip_range"])
    if not MIN_BITS <= bits <= 32 or not (np.isfinite(clip) and clip > 0):
        raise SecAggError(f"silo {silo}: the server asks for bits = {bits}, clip range {clip}; "
                          f"refused (bits must be in [{MIN_BITS}, 32], the clip range > 0)")
    c_sk = ec.generate_private_key(_CURVE)
    s_sk = ec.generate_private_key(_CURVE)
    state: Msg = {
        "silo": silo,
        "dim": int(request["dim"]),
        "threshold": int(request["threshold"]),
        "clip_range": float(request["clip_range"]),
        "bits": int(request["bits"]),
        "c_sk": _sk_to_bytes(c_sk),
        "s_sk": _sk_to_bytes(s_sk),
        "b": os.urandom(32),
        "round": round_no,
    }
    reply: Msg = {"c_pk": _pk_bytes(c_sk), "s_pk": _pk_bytes(s_sk)}
    if signing_key is not None:
        reply["sig"] = signing_key.sign(key_statement(silo, round_no, reply["c_pk"], reply["s_pk"]),
                                        ec.ECDSA(hashes.SHA384()))
    return state, reply


def client_share_keys(state: Msg, request: Msg, *, pinned: Mapping[str, ec.EllipticCurvePublicKey] | None = None
                      ) -> tuple[Msg, Msg]:
    """Stage 1: Shamir-share b and s_sk among all silos, each share encrypted for its holder.

    `pinned`: {silo: its registered node key}, this silo's own copy of the registry; every
    listed silo must be in it and have signed its round keys with it (`key_statement`)."""
    silos: list[str] = list(request["silos"])
    c_pks: list[bytes] = list(request["c_pk"])
    s_pks: list[bytes] = list(request["s_pk"])
    me = state["silo"]
    n, t = len(silos), state["threshold"]
    if me not in silos or len(c_pks) != n or len(s_pks) != n:
        raise SecAggError(f"silo {me}: malformed key list from the server")
    if len(set(c_pks) | set(s_pks)) != 2 * n:
        raise SecAggError(f"silo {me}: public keys are not distinct")
    if pinned is not None:
        _check_signatures(state, silos, c_pks, s_pks, list(request.get("sig", [])), pinned)
    if n < MIN_SURVIVORS or not n // 2 < t <= n:
        raise SecAggError(f"silo {me}: threshold {t} for {n} silos is refused: this silo needs at least "
                          f"{MIN_SURVIVORS} silos and a threshold in ({n // 2}, {n}] (a majority), "
                          "or the server could unmask it alone")
    c_sk = _sk_from_bytes(state["c_sk"])
    if _pk_bytes(c_sk) != c_pks[silos.index(me)]:
        raise SecAggError(f"silo {me}: the server sent a wrong public key for this silo")
    b_shares = create_shares(state["b"], t, n)
    sk_shares = create_shares(state["s_sk"], t, n)
    i = silos.index(me)
    dst, ciphertexts = [], []
    for j, peer in enumerate(silos):
        if j == i:
            continue
        key = _shared_key(c_sk, c_pks[j])
        ciphertexts.append(encrypt(key, _pack_share(i, j, b_shares[j], sk_shares[j])))
        dst.append(peer)
    state = {
        **state,
        "silos": silos,
        "c_pks": c_pks,
        "s_pks": s_pks,
        # The silo keeps its own share of its own secrets, as a peer would.
        "share_src": [me],
        "share_b": [b_shares[i]],
        "share_sk": [sk_shares[i]],
    }
    return state, {"dst": dst, "ciphertexts": ciphertexts}


def _quantize(
    x: np.ndarray, *, scale: float, qmax: int, bits: int, rounding: str, seed: int
) -> tuple[np.ndarray, int]:
    """round(clip(x * scale, ±qmax)) as uint32 two's complement mod 2^bits; and the clip count.

    scale = weight / step, so clipping at ±qmax is clipping weight * x at ±clip_range.
    Computed in fp64 blocks: exact integers up to 2^53, and the blocks stay in cache.
    """
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    gen = np.random.Generator(np.random.PCG64(seed))
    out = np.empty(x.size, dtype=np.uint32)
    v = np.empty(CHUNK, dtype=np.float64)
    u = np.empty(CHUNK, dtype=np.float64)
    iv = np.empty(CHUNK, dtype=np.int64)
    clipped = 0
    for a in range(0, x.size, CHUNK):
        m = min(a + CHUNK, x.size) - a
        vb, ib = v[:m], iv[:m]
        np.multiply(x[a : a + m], np.float64(scale), out=vb, dtype=np.float64)
        clipped += int(np.count_nonzero(np.abs(vb) > qmax))
        np.clip(vb, -qmax, qmax, out=vb)
        if rounding == "nearest":
            np.rint(vb, out=vb)
        else:  # floor(v + U[0, 1)): unbiased
            gen.random(out=u[:m])
            vb += u[:m]
            np.floor(vb, out=vb)
        np.copyto(ib, vb, casting="unsafe")
        np.copyto(out[a : a + m], ib, casting="unsafe")  # int64 -> uint32 wraps mod 2^32
    if bits < 32:
        out &= np.uint32((1 << bits) - 1)
    return out, clipped


def _check_mask_request(state: Msg, expect_clip_range: float | None) -> None:
    """Refuse a second masked input this round, and a clip range this silo's config does not imply."""
    me = state["silo"]
    if state.get("masked"):
        raise SecAggError(f"silo {me}: already sent its masked input this round; a second one is refused")
    if expect_clip_range is not None and not np.isclose(state["clip_range"], expect_clip_range, rtol=1e-9):
        raise SecAggError(f"silo {me}: the server set clip range {state['clip_range']:g}, this silo's config "
                          f"implies {expect_clip_range:g}; refused")


def _receive_shares(state: Msg, request: Msg) -> tuple[list[str], list[bytes], list[bytes]]:
    """Decrypt and check the peers' shares for this silo; return (sources, b shares, s_sk shares),
    this silo's own shares first. Refuses an unknown, repeated, undecryptable or misaddressed
    share, and fewer sources than the threshold."""
    me, silos = state["silo"], state["silos"]
    i = silos.index(me)
    c_sk = _sk_from_bytes(state["c_sk"])
    share_src, share_b, share_sk = (
        list(state["share_src"]),
        list(state["share_b"]),
        list(state["share_sk"]),
    )
    for src, ct in zip(request["src"], request["ciphertexts"], strict=True):
        if src not in silos or src == me or src in share_src:
            raise SecAggError(f"silo {me}: unexpected share from {src!r}")
        j = silos.index(src)
        try:
            plain = decrypt(_shared_key(c_sk, state["c_pks"][j]), bytes(ct))
        except InvalidToken:
            raise SecAggError(f"silo {me}: the share from {src} does not decrypt") from None
        p_src, p_dst, b_share, sk_share = _unpack_share(plain)
        if (p_src, p_dst) != (j, i):
            raise SecAggError(f"silo {me}: share from {src} is addressed to someone else")
        share_src.append(src)
        share_b.append(b_share)
        share_sk.append(sk_share)
    if len(share_src) < state["threshold"]:
        raise SecAggError(
            f"silo {me}: only {len(share_src)} silos shared keys, fewer than the threshold {state['threshold']}"
        )
    return share_src, share_b, share_sk


def _checked_update(state: Msg, update: np.ndarray, weight: float) -> np.ndarray:
    """The update as a flat fp32 vector; refuses a wrong size, non-finite values, a weight outside [0, 1]."""
    me = state["silo"]
    x = np.asarray(update, dtype=np.float32).reshape(-1)
    if x.size != state["dim"]:
        raise SecAggError(
            f"silo {me}: update has {x.size} values, the round expects {state['dim']}"
        )
    if not np.isfinite(x).all():
        raise SecAggError(f"silo {me}: update has non-finite values; check it before masking")
    if not 0 <= weight <= 1:
        raise SecAggError(f"silo {me}: weight {weight} must be in [0, 1] so the clip range holds")
    return x


def _add_masks(y: np.ndarray, state: Msg, share_src: list[str]) -> None:
    """y += PRG(b) ± PRG(s_uv) for every peer v that shared keys (+ if this silo sorts first),
    mod 2^bits, in place."""
    me, silos = state["silo"], state["silos"]
    i = silos.index(me)
    s_sk = _sk_from_bytes(state["s_sk"])
    masks = [(bytes(state["b"]), 1)]
    for peer in share_src:  # the silos that shared keys (U2), this one included
        if peer != me:
            j = silos.index(peer)
            key = base64.urlsafe_b64decode(_shared_key(s_sk, state["s_pks"][j]))
            masks.append((key, 1 if i < j else -1))
    _apply_masks(y, masks)
    if state["bits"] < 32:
        y &= np.uint32((1 << state["bits"]) - 1)


def client_masked_input(
    state: Msg,
    request: Msg,
    update: np.ndarray,
    *,
    weight: float = 1.0,
    rounding: Literal["nearest", "stochastic"] = "nearest",
    rounding_seed: int = 0,
    expect_clip_range: float | None = None,
) -> tuple[Msg, Msg]:
    """Stage 2: store the peers' shares, then send weight * update quantised and masked.

    `update` is the flat fp32 update (`flatten`); `weight` is this silo's public FedAvg weight
    (<= 1 so the clip range holds). The reply's "masked" vector is uniform noise to anyone
    without the masks' keys. A silo masks once per round: a second request is refused (the
    same masks on two inputs would give away their difference). `expect_clip_range`: the
    range this silo's own config implies; a server that set another one is refused.
    """
    _check_mask_request(state, expect_clip_range)
    share_src, share_b, share_sk = _receive_shares(state, request)
    x = _checked_update(state, update, weight)
    bits, clip, n = state["bits"], state["clip_range"], len(state["silos"])
    y, clipped = _quantize(
        x,
        scale=weight / quantization_step(clip, bits, n),
        qmax=_qmax(bits, n),
        bits=bits,
        rounding=rounding,
        seed=rounding_seed,
    )
    _add_masks(y, state, share_src)
    state = {**state, "share_src": share_src, "share_b": share_b, "share_sk": share_sk, "masked": True}
    state["clipped"] = clipped
    return state, {"masked": y}


def client_unmask(state: Msg, request: Msg) -> Msg:
    """Stage 3: reveal shares of b for the survivors and of s_sk for the dropped, never both."""
    me = state["silo"]
    survivors = list(request["survivors"])
    u2 = list(state["share_src"])
    if me not in survivors:
        raise SecAggError(f"silo {me}: the server counts this silo as dropped; not unmasking")
    if not set(survivors) <= set(u2):
        raise SecAggError(f"silo {me}: survivors {survivors} include silos that never shared keys")
    if not state.get("masked"):
        raise SecAggError(f"silo {me}: asked to unmask before it sent its masked input; refused")
    if state.get("unmasked"):  # a second answer, to another survivor list, would reveal b and s_sk of one silo
        raise SecAggError(f"silo {me}: already answered the unmask request this round; refused")
    need = max(state["threshold"], MIN_SURVIVORS)
    if len(survivors) < need:
        raise SecAggError(
            f"silo {me}: {len(survivors)} survivors, fewer than the threshold {need}; not unmasking"
        )
    state["unmasked"] = True  # in place: the caller's state records the answer
    # This silo decides who dropped from its own view, so one silo is never asked for both.
    dropped = [s for s in u2 if s not in survivors]
    pos = {s: k for k, s in enumerate(u2)}
    return {
        "b_src": survivors,
        "b_shares": [state["share_b"][pos[s]] for s in survivors],
        "sk_src": dropped,
        "sk_shares": [state["share_sk"][pos[s]] for s in dropped],
    }


# ---- server --------------------------------------------------------------------------------


class SecAggServer:
    """The server's side of one round: routes messages, then unmasks the sum and nothing else."""

    def __init__(
        self,
        silos: list[str],
        *,
        dim: int,
        clip_range: float,
        threshold: int | None = None,
        bits: int = 32,
    ) -> None:
        self.silos = sorted(silos)
        self.threshold = default_threshold(len(silos)) if threshold is None else threshold
        _check_params(len(silos), self.threshold, bits, clip_range)
        self.dim, self.clip_range, self.bits = dim, clip_range, bits
        self.u1: list[str] = []  # sent keys
        self.u2: list[str] = []  # shared keys
        self.u3: list[str] = []  # sent masked vectors
        self.s_pks: dict[str, bytes] = {}
        self.masked_sum: np.ndarray | None = None

    @property
    def step(self) -> float:
        """The quantisation step (value of one integer unit)."""
        return quantization_step(self.clip_range, self.bits, len(self.u1 or self.silos))

    def _need(self, have: list[str], what: str, at_least: int = 0) -> None:
        need = max(self.threshold, at_least)
        if len(have) < need:
            raise SecAggError(
                f"secure aggregation: {len(have)} of {len(self.silos)} silos {what}, fewer than "
                f"the threshold {need}; the round cannot be unmasked"
            )

    def setup_request(self) -> Msg:
        """Stage 0 request, the same for every silo."""
        return {
            "dim": self.dim,
            "threshold": self.threshold,
            "clip_range": self.clip_range,
            "bits": self.bits,
        }

    def receive_setup(self, replies: dict[str, Msg]) -> Msg:
        """Collect public keys; return the stage 1 broadcast (the same for every silo in it)."""
        self.u1 = sorted(s for s in replies if s in self.silos)
        self._need(self.u1, "sent keys")
        if len(self.u1) < len(self.silos):  # the quantisation step depends on n
            _check_params(len(self.u1), self.threshold, self.bits, self.clip_range)
        self.s_pks = {s: bytes(replies[s]["s_pk"]) for s in self.u1}
        out: Msg = {
            "silos": self.u1,
            "c_pk": [bytes(replies[s]["c_pk"]) for s in self.u1],
            "s_pk": [self.s_pks[s] for s in self.u1],
        }
        if any("sig" in replies[s] for s in self.u1):  # each silo checks them against its own registry
            out["sig"] = [bytes(replies[s].get("sig", b"")) for s in self.u1]
        return out

    def receive_share_keys(self, replies: dict[str, Msg]) -> dict[str, Msg]:
        """Route the encrypted shares: return each silo's stage 2 request."""
        self.u2 = sorted(s for s in replies if s in self.u1)
        self._need(self.u2, "shared keys")
        inbox: dict[str, Msg] = {s: {"src": [], "ciphertexts": []} for s in self.u2}
        for src in self.u2:
            for dst, ct in zip(replies[src]["dst"], replies[src]["ciphertexts"], strict=True):
                if dst in inbox:
                    inbox[dst]["src"].append(src)
                    inbox[dst]["ciphertexts"].append(bytes(ct))
        return inbox

    def receive_masked_inputs(self, replies: dict[str, Msg]) -> Msg:
        """Add up the masked vectors mod 2^bits; return the stage 3 request for the survivors."""
        self.u3 = sorted(s for s in replies if s in self.u2)
        self._need(self.u3, "sent masked updates", at_least=MIN_SURVIVORS)
        total = np.zeros(self.dim, dtype=np.uint32)
        for s in self.u3:
            y = np.asarray(replies[s]["masked"])
            if y.dtype != np.uint32 or y.shape != (self.dim,):
                raise SecAggError(
                    f"silo {s}: masked vector has {y.dtype} {y.shape}, expected uint32 ({self.dim},)"
                )
            total += y
        self.masked_sum = total
        return {"survivors": self.u3}

    def receive_unmask(self, replies: dict[str, Msg]) -> np.ndarray:
        """Rebuild the masks from t shares each and return the decoded sum (fp64)."""
        if self.masked_sum is None:
            raise SecAggError("secure aggregation: unmask before any masked input")
        responders = sorted(s for s in replies if s in self.u3)
        self._need(responders, "answered the unmask request")
        b_shares: dict[str, list[bytes]] = {s: [] for s in self.u3}
        sk_shares: dict[str, list[bytes]] = {s: [] for s in self.u2 if s not in self.u3}
        for r in responders:
            for src, sh in zip(replies[r]["b_src"], replies[r]["b_shares"], strict=True):
                if src in b_shares:
                    b_shares[src].append(bytes(sh))
            for src, sh in zip(replies[r]["sk_src"], replies[r]["sk_shares"], strict=True):
                if src in sk_shares:
                    sk_shares[src].append(bytes(sh))
        total = self.masked_sum.copy()
        masks: list[tuple[bytes, int]] = []
        for s, shares in b_shares.items():
            self._need_shares(s, shares)
            masks.append((combine_shares(shares[: self.threshold]), -1))
        idx = {s: k for k, s in enumerate(self.u1)}
        for s, shares in sk_shares.items():
            self._need_shares(s, shares)
            s_sk = _sk_from_bytes(combine_shares(shares[: self.threshold]))
            if _pk_bytes(s_sk) != self.s_pks[s]:
                raise SecAggError(
                    f"secure aggregation: shares of silo {s}'s mask key do not match its key"
                )
            for v in self.u3:  # survivor v added +PRG(s_vs) if v sorts first, else -PRG
                key = base64.urlsafe_b64decode(_shared_key(s_sk, self.s_pks[v]))
                masks.append((key, -1 if idx[v] < idx[s] else 1))
        _apply_masks(total, masks)
        return self._decode(total)

    def _need_shares(self, silo: str, shares: list[bytes]) -> None:
        if len(shares) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(shares)} shares for silo {silo}, fewer than the threshold {self.threshold}"
            )

    def _decode(self, total: np.ndarray) -> np.ndarray:
        """Signed integers mod 2^bits -> values: sum of the survivors' (weighted) updates.

        m honest inputs sum to at most m · qmax in magnitude; a coordinate beyond that means a
        silo sent a wrapped or out-of-range input, and the sum is refused."""
        if self.bits == 32:
            signed = total.view(np.int32)  # two's complement, no copy
        else:
            total &= np.uint32((1 << self.bits) - 1)
            signed = total.astype(np.int64)
            signed[signed >= 1 << (self.bits - 1)] -= 1 << self.bits
        limit = len(self.u3) * _qmax(self.bits, len(self.u1 or self.silos))
        if int(np.abs(signed.astype(np.int64)).max(initial=0)) > limit:
            raise SecAggError("secure aggregation: the unmasked sum is out of range (a silo sent a wrapped "
                              "or out-of-range masked input); the round is refused")
        return signed * self.step


# ---- one-call driver -----------------------------------------------------------------------


def _nbytes(msg: Msg) -> int:
    """Rough wire size of a message: array bytes plus bytes/str payloads (no framing)."""
    total = 0
    for v in msg.values():
        items = v if isinstance(v, list) else [v]
        for x in items:
            if isinstance(x, np.ndarray):
                total += x.nbytes
            elif isinstance(x, (bytes, bytearray)):
                total += len(x)
            elif isinstance(x, str):
                total += len(x.encode())
            else:
                total += 8
    return total


class _Meter:
    """What an in-memory round costs: seconds on the server, seconds and bytes up/down per silo."""

    def __init__(self, silos: list[str]) -> None:
        self.up = dict.fromkeys(silos, 0)
        self.down = dict.fromkeys(silos, 0)
        self.t_client = dict.fromkeys(silos, 0.0)
        self.t_server = 0.0

    def server(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        self.t_server += time.perf_counter() - t0
        return out

    def client(self, silo: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.t_client[silo] += time.perf_counter() - t0
        return out


def _run_key_stages(server: SecAggServer, silos: list[str], meter: _Meter) -> tuple[dict[str, Msg], dict[str, Msg]]:
    """Stages 0 and 1 in memory: return each silo's state and each silo's stage 2 request."""
    states: dict[str, Msg] = {}
    replies: dict[str, Msg] = {}
    req = meter.server(server.setup_request)
    for s in silos:
        meter.down[s] += _nbytes(req)
        states[s], replies[s] = meter.client(s, client_setup, s, req)
        meter.up[s] += _nbytes(replies[s])
    req = meter.server(server.receive_setup, replies)
    replies = {}
    for s in server.u1:
        meter.down[s] += _nbytes(req)
        states[s], replies[s] = meter.client(s, client_share_keys, states[s], req)
        meter.up[s] += _nbytes(replies[s])
    return states, meter.server(server.receive_share_keys, replies)


def _run_mask_stage(
    server: SecAggServer,
    states: dict[str, Msg],
    reqs: dict[str, Msg],
    updates: dict[str, np.ndarray],
    w: dict[str, float],
    meter: _Meter,
    *,
    dropouts: set[str] | frozenset[str],
    rounding: Literal["nearest", "stochastic"],
    seed: int,
) -> Msg:
    """Stage 2 in memory (updates `states`); a silo in `dropouts` masks but its reply is lost.
    Return the stage 3 request."""
    replies: dict[str, Msg] = {}
    for k, s in enumerate(server.u2):
        meter.down[s] += _nbytes(reqs[s])
        states[s], rep = meter.client(
            s,
            client_masked_input,
            states[s],
            reqs[s],
            updates[s],
            weight=w[s],
            rounding=rounding,
            rounding_seed=seed * 1_000_003 + k,
        )
        if s not in dropouts:
            replies[s] = rep
            meter.up[s] += _nbytes(rep)
    return meter.server(server.receive_masked_inputs, replies)


def _run_unmask_stage(server: SecAggServer, states: dict[str, Msg], req: Msg, meter: _Meter,
                      dropouts: set[str] | frozenset[str]) -> np.ndarray:
    """Stage 3 in memory: the survivors not in `dropouts` answer; return the decoded sum."""
    replies: dict[str, Msg] = {}
    for s in server.u3:
        meter.down[s] += _nbytes(req)
        if s not in dropouts:
            replies[s] = meter.client(s, client_unmask, states[s], req)
            meter.up[s] += _nbytes(replies[s])
    return meter.server(server.receive_unmask, replies)


def run_secagg_round(
    updates: dict[str, np.ndarray],
    *,
    weights: dict[str, float] | None = None,
    dropouts_after_masking: set[str] | frozenset[str] = frozenset(),
    dropouts_at_unmask: set[str] | frozenset[str] = frozenset(),
    threshold: int | None = None,
    clip_range: float = 1.0,
    bits: int = 32,
    seed: int = 0,
    rounding: Literal["nearest", "stochastic"] = "nearest",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run one whole round in memory; return (Σ weight * update over the counted silos, stats).

    `dropouts_after_masking`: silos that shared their keys but whose masked vector never
    arrives; their update is not in the sum and their pairwise masks are rebuilt from shares.
    `dropouts_at_unmask`: silos whose masked vector arrived but that vanish before unmasking;
    their update is in the sum and their self mask comes from the others' shares.
    stats: survivors, counted silos, quantisation step, error bound, seconds per side,
    bytes up/down per silo. `seed` drives stochastic rounding only (keys are always fresh).
    """
    silos = sorted(updates)
    dim = int(next(iter(updates.values())).size)
    w = {s: 1.0 for s in silos} if weights is None else dict(weights)
    server = SecAggServer(silos, dim=dim, clip_range=clip_range, threshold=threshold, bits=bits)
    meter = _Meter(silos)
    states, reqs = _run_key_stages(server, silos, meter)
    req = _run_mask_stage(server, states, reqs, updates, w, meter,
                          dropouts=dropouts_after_masking, rounding=rounding, seed=seed)
    total = _run_unmask_stage(server, states, req, meter, dropouts_at_unmask)
    per_value = 0.5 if rounding == "nearest" else 1.0
    stats = {
        "silos": silos,
        "counted": list(server.u3),
        "dropped": [s for s in silos if s not in server.u3],
        "threshold": server.threshold,
        "bits": bits,
        "clip_range": clip_range,
        "step": server.step,
        "error_bound": len(server.u3) * per_value * server.step,
        "clipped_values": sum(int(states[s].get("clipped", 0)) for s in server.u3),
        "weight_sum": sum(w[s] for s in server.u3),
        "server_seconds": meter.t_server,
        "client_seconds": meter.t_client,
        "bytes_up": meter.up,
        "bytes_down": meter.down,
    }
    return total, stats
