"""Secret randomness for every privacy mechanism: DP noise, Poisson sampling, noise shares.

    key = NoiseKey.local(silo_dir)                       # the party's own 32-byte key, kept beside its data
    g = key.torch_generator("dpsgd", run_id, round_idx)  # a torch generator no other party can rebuild
    rng = key.numpy_generator("tokenizer-counts", nonce)

Every party that adds noise or draws a private sample holds a key of its own, made with
`os.urandom` and never derived from the config (which every party holds), never sent and
never written to a run directory. A stream is named by labels (what it is for, the run, the
round, ...): HMAC-SHA-256(key, labels) keys an AES-256-CTR keystream (`prg`, the same CSPRNG
secure aggregation's masks use), and that keystream fills the *whole* 19937-bit state of torch's
Mersenne Twister or seeds numpy's PCG64 with 256 bits. Why not `manual_seed(secrets...)`:
torch's CPU generator keeps only the low 32 bits of a seed, so a seeded generator has at most
2^32 streams, which an adversary holding the config can search. The keystream itself is a
CSPRNG; the Mersenne Twister it seeds is not, but its outputs are never released raw (only
sums with the data, and DP-SGD uses Opacus's secure-mode noise against floating-point
attacks), and a fresh state is drawn for each step or round.

A silo's key lives in its own directory (`WS/silos/NAME/.secrets/noise.key`, owner-only), so
its own `--resume` draws the same streams again: a round re-run after a crash releases the
same values, not a second independent noisy copy of the same update.

`privacy.insecure_reproducible_noise = true` derives the key from the run seed instead, so a
test can compare runs bit for bit. Anyone holding the config can then subtract the noise:
it logs a loud warning every time a key is made, and a deployed (cross-organisation) run
refuses it (`refuse_across_organisations`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedlm.errors import UserError

log = logging.getLogger("fedlm.privacy")

INSECURE_WARNING = (
    "insecure reproducible noise (privacy.insecure_reproducible_noise = true, or a fixed seed): the DP "
    "noise and sampling are derived from a public number, so anyone holding the config can rebuild and "
    "subtract them; THIS HAS NO PRIVACY. Use it for bitwise tests only"
)
KEY_FILE = Path(".secrets") / "noise.key"
CHUNK = 1 << 16  # keystream values per block: the working set of one block stays in cache
_ZEROS = memoryview(bytes(4 * CHUNK))
_MT_WORDS = 624  # the Mersenne Twister's state words (torch's CPU generator)
_MT_OFFSET = 24  # where they start in torch's CPU generator state (after seed, left, seeded, next)


class KeyStream:
    """AES-256-CTR keystream read as uint32 blocks into a reused buffer (no big allocations)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("PRG key must be 32 bytes")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._raw = bytearray(4 * CHUNK + 16)  # update_into wants len(data) + 15 bytes
        self._values = np.frombuffer(self._raw, dtype="<u4", count=CHUNK)  # shares the memory

    def next(self, m: int) -> np.ndarray:
        """The next m <= 65536 values of the stream (a view valid until the next call)."""
        self._enc.update_into(_ZEROS[: 4 * m], self._raw)
        return self._values[:m]


def prg(key: bytes, size: int) -> np.ndarray:
    """`size` pseudo-random uint32 values from a 32-byte key (AES-256-CTR keystream, a CSPRNG)."""
    stream = KeyStream(key)
    out = np.empty(size, dtype=np.uint32)
    for a in range(0, size, CHUNK):
        b = min(a + CHUNK, size)
        out[a:b] = stream.next(b - a)
    return out


class NoiseKey:
    """One party's secret: the root of all its DP noise and private sampling (see the module doc)."""

    def __init__(self, key: bytes, *, insecure: bool = False) -> None:
        if len(key) != 32:
            raise ValueError("a noise key is 32 bytes")
        self._key, self.insecure = bytes(key), insecure

    def __repr__(self) -> str:  # never print the key
        return f"NoiseKey(insecure={self.insecure})"

    @classmethod
    def fresh(cls) -> NoiseKey:
        """A key for one use, never stored (e.g. the server's central noise of one round)."""
        return cls(os.urandom(32))

    @classmethod
    def local(cls, owner_dir: Path) -> NoiseKey:
        """The key kept in `owner_dir`/.secrets/noise.key (made on first use, owner-only, atomic)."""
        path = Path(owner_dir) / KEY_FILE
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # the writer's own temporary name: in one process several silos' threads may make it at once
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:  # two processes or threads may race: the first key written wins
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            key = path.read_bytes()
        if len(key) != 32:
            raise UserError(f"{path} is not a 32-byte noise key; delete it to make a new one")
        return cls(key)

    @classmethod
    def insecure_from_seed(cls, seed: int, who: str) -> NoiseKey:
        """A key anyone with the config can rebuild (privacy.insecure_reproducible_noise): warns."""
        log.warning("%s (%s)", INSECURE_WARNING, who)
        return cls(hashlib.sha256(f"fedlm-insecure-noise/{seed}/{who}".encode()).digest(), insecure=True)

    def derive(self, *labels: object) -> bytes:
        """The 32-byte key of the stream named by `labels` (HMAC-SHA-256: one-way, independent streams)."""
        msg = "\x1f".join(str(x) for x in labels).encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    def words(self, n: int, *labels: object) -> np.ndarray:
        """n uint32 words of the stream's AES-256-CTR keystream."""
        return prg(self.derive(*labels), n)

    def torch_generator(self, *labels: object) -> torch.Generator:
        """A CPU generator whose whole Mersenne Twister state is the stream's keystream."""
        return reseed(torch.Generator(), self.words(_MT_WORDS, *labels))

    def numpy_generator(self, *labels: object) -> np.random.Generator:
        """numpy's PCG64 seeded with 256 bits of the stream."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.words(8, *labels).tolist())))


def reseed(gen: torch.Generator, words: np.ndarray) -> torch.Generator:
    """Set all 624 state words of torch's CPU Mersenne Twister (manual_seed keeps only 32 bits)."""
    if words.shape != (_MT_WORDS,):
        raise ValueError(f"a Mersenne Twister state is {_MT_WORDS} words")
    template = torch.Generator().manual_seed(0).get_state()  # layout: legacy state + normal cache
    state = template.numpy().copy()
    state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS].view("<u8")[:] = words.astype(np.uint64)
    gen.set_state(torch.from_numpy(state))
    return gen


def child_generator(parent: torch.Generator, child: torch.Generator) -> torch.Generator:
    """Fill `child`'s whole state from 624 words drawn from `parent` (a stream split, no 32-bit seed).

    A CUDA or MPS generator (Philox) has no more state than its 64-bit seed (and an offset that
    seeding resets): it gets 64 bits drawn from `parent`."""
    if child.device.type != "cpu":
        hi, lo = torch.randint(0, 2**32, (2,), generator=parent, dtype=torch.int64).tolist()
        return child.manual_seed((hi << 32) | lo)
    words = torch.randint(0, 2**32, (_MT_WORDS,), generator=parent, dtype=torch.int64).numpy()
    return reseed(child, words.astype(np.uint32))


def party_key(*, insecure: bool, seed: int, who: str, owner_dir: Path | None) -> NoiseKey:
    """The noise key of the party `who`: its local key in `owner_dir` (a fresh one when None), or,
    with privacy.insecure_reproducible_noise, a key derived from the run seed (loudly warned)."""
    if insecure:
        return NoiseKey.insecure_from_seed(seed, who)
    return NoiseKey.local(owner_dir) if owner_dir is not None else NoiseKey.fresh()


def refuse_across_organisations(insecure: bool, *, where: str) -> None:
    """A deployed run spans organisations: reproducible (public) noise is refused there."""
    if insecure:
        raise UserError(
            f"privacy.insecure_reproducible_noise = true is refused on {where}: the silos and the server "
            "belong to different organisations, and any of them could rebuild the noise from the config; "
            "set it to false (it is for bitwise tests in one process)"
        )
