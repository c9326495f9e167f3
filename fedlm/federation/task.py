"""One silo's work in a federated round, and the model facts both sides share; no Flower here.

    names = wire_names(model)                      # the arrays that travel (tied once, LoRA: adapters)
    update, metrics = train_silo(global_arrays, cfg=cfg, config_text=text, round_idx=0, path=silo,
                                 tokenizer_sha256=sha)
    payload = encode_update(update, cfg=cfg, path=silo, run_id=run_id, round_idx=0)

The Flower ClientApp (`client_app.py`) and the server's rounds (`rounds.py`) both build on
this module, as Flower's own examples keep their apps thin over a plain-PyTorch `task.py`.

Rounds are numbered from 1 wherever they are shown or sent (rounds.jsonl, logs, the wire's
"round"); `round_idx` = round − 1 is only the index that seeds a silo's data order and
places its steps on the learning-rate schedule, so a silo's update depends only on the
global weights and the round, on either engine and after a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedlm.config import Config, TrainConfig
from fedlm.data.shards import open_chat, open_split
from fedlm.device import resolve_device
from fedlm.errors import UserError
from fedlm.federation import codecs
from fedlm.federation.silo_privacy import (
    POLICY_FILE,
    WORK_LIMITS,
    SiloPrivacy,
    charge_scores,
    work_limits,
)
from fedlm.model import Transformer
from fedlm.pretrained import model_digest, resolve
from fedlm.privacy.client_dp import clip_update
from fedlm.privacy.dpsgd import RecordPlan, num_records, plan_record_dp
from fedlm.resolve import init_from_shape
from fedlm.shapes import count_params
from fedlm.train import SiloBatches, build_model, load_global, local_update, silo_gradient, val_loss

log = logging.getLogger(__name__)
_MODELS: dict[tuple[int, str], Transformer] = {}  # (node, config) -> model, reused in one process
_MODELS_LOCK = threading.Lock()
_PLANS: dict[tuple[str, str, int], RecordPlan] = {}  # the noise search is slow: once per run and silo


# ---------------------------------------------------------------------------------------
# what both sides agree on: the arrays that travel, the seeds, the local schedule


def wire_names(model: torch.nn.Module) -> list[str]:
    """The state-dict names that travel: a tied array (embedding = head) only once; only the
    trainable ones (LoRA adapters) when some are frozen (a LoRA base, the same on every silo)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    names = []
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            if name not in frozen:
                names.append(name)
    return names


def expand_state(model: torch.nn.Module, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict for `model` from its wire arrays (tied names filled from their twin;
    frozen weights that do not travel, a LoRA base, from the model itself)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    owner: dict[tuple[int, tuple[int, ...]], str] = {}
    full = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        src = owner.setdefault(key, name)
        full[name] = t if src in frozen else arrays[src]
    return full


def round_seed(seed: int, silo: str, round_idx: int) -> int:
    """The data-order seed of `silo` in round `round_idx` + 1 (stable across processes, unlike hash())."""
    digest = hashlib.sha256(f"{seed}/{silo}/{round_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def federated_train_config(cfg: Config) -> TrainConfig:
    """The local trainer's config in a federated run: its lr schedule spans rounds × local steps."""
    total = cfg.federation.rounds * cfg.federation.local_steps
    return dataclasses.replace(cfg.train, steps=total, warmup_steps=min(cfg.train.warmup_steps, total))


def planned_tokens(cfg: Config) -> int:
    """Tokens a silo trains on per round by the config (the public reference for update weights)."""
    tc = cfg.train
    return cfg.federation.local_steps * tc.grad_accum * tc.batch_size * tc.seq_len


# ---------------------------------------------------------------------------------------
# the silo: its directory, its shards, its local training, what it sends


def silo_dir(node_config: Mapping[str, str | int | float | bool]) -> Path:
    """WS/silos/NAME from a node's `workspace` and `silo` settings."""
    if "workspace" not in node_config or "silo" not in node_config:
        raise UserError(
            "this SuperNode has no silo: start it with --node-config 'workspace=\"WS\" silo=\"NAME\"' "
            "(`fedlm node --workspace WS --silo NAME`)"
        )
    path = Path(str(node_config["workspace"])) / "silos" / str(node_config["silo"])
    if not path.is_dir():
        raise UserError(f"silo {node_config['silo']!r}: no directory {path}; run `fedlm data prepare` there first")
    return path


def check_silo(path: Path, *, tokenizer_sha256: str) -> dict[str, int | float]:
    """Open a silo's train and val shards against the run's tokenizer; their token counts."""
    try:
        train = open_split(path, "train", expect_tokenizer_sha256=tokenizer_sha256)
        val = open_split(path, "val", expect_tokenizer_sha256=tokenizer_sha256)
    except UserError as e:
        raise UserError(f"silo {path.name!r}: {e}") from None
    if len(train) == 0:
        raise UserError(f"silo {path.name!r}: no training tokens; run `fedlm data shard --silo {path.name}`")
    return {"train_tokens": len(train), "val_tokens": len(val)}


def silo_record_plan(cfg: Config, path: Path, tokens: np.ndarray) -> RecordPlan:
    """This silo's DP-SGD plan over every round it could take part in (UserError if it cannot fit)."""
    key = (repr(cfg), str(path), len(tokens))
    if key not in _PLANS:
        _PLANS[key] = plan_record_dp(
            num_records=num_records(len(tokens), cfg.train.seq_len), batch_size=cfg.train.batch_size,
            steps=cfg.federation.rounds * cfg.federation.local_steps, privacy=cfg.privacy,
            where=f"silo {path.name!r}")
    return _PLANS[key]


def check_base(cfg: Config, silo: str) -> None:
    """Refuse to start from any model but the one the run pins (train.init_sha256), before loading it.

    The coordinator writes the run's config, so train.init_from could name any path on the silo's
    machine: a model the silo tuned on its own data, say, for the run's updates and scores to
    describe. A silo loads only a model whose bytes the coordinator already has (it pinned their
    digest). Its reply is the same whatever is at that path (nothing, a file, another model), so it
    cannot be used to look around the silo's disk; the reason is logged here, for the silo's admin."""
    spec, pin = cfg.train.init_from, cfg.train.init_sha256
    if not spec:
        return
    if not pin:
        raise UserError(f"silo {silo!r}: the run starts from train.init_from = {spec!r} without pinning it "
                        "(train.init_sha256, which a fedlm coordinator fills in); refused")
    try:
        path = resolve(spec)
        found = "a file, not a model" if path.is_file() and path.suffix != ".gguf" else model_digest(path)
    except (UserError, OSError) as e:
        found = str(e)
    if found != pin:
        log.warning("silo %s: train.init_from = %r is not the pinned model %s: %s", silo, spec, pin, found)
        raise UserError(f"silo {silo!r}: it has no model at train.init_from = {spec!r} with the run's pinned "
                        f"sha256 {pin[:12]}…; refused: install the coordinator's copy of the model there "
                        "(the same bytes; the silo's log says what it found)")


def work_asked(cfg: Config, path: Path) -> dict[str, int]:
    """What one request of the run `cfg` asks of silo `path`, in the terms of its [work] limits."""
    tc = cfg.train
    round_tokens = planned_tokens(cfg)
    if cfg.privacy.mode == "record":  # Poisson batches: the expected batch, not train.batch_size
        plan = silo_record_plan(cfg, path, open_split(path, "train"))
        round_tokens = cfg.federation.local_steps * plan.expected_batch_size * tc.seq_len
    shape = init_from_shape(tc.init_from) if tc.init_from else cfg.model  # the silo's own copy (check_base)
    return {"max_round_tokens": round_tokens, "max_run_tokens": cfg.federation.rounds * round_tokens,
            "max_eval_tokens": tc.eval_batches * tc.batch_size * tc.seq_len,
            "max_parameters": count_params(shape, cfg).total}


def check_work(cfg: Config, path: Path) -> None:
    """Refuse, before any of it is done, a run that asks more of this silo than its privacy.toml's [work]
    allows: the coordinator writes the config, so it would otherwise choose how long the silo's machine
    trains and scores for it, and how large a model it builds."""
    limits = work_limits(path)
    if not limits:
        return
    for key, ask in work_asked(cfg, path).items():
        if key in limits and ask > limits[key]:
            what, how = WORK_LIMITS[key]
            raise UserError(f"silo {path.name!r}: the run asks {ask:,} {what} ({how}); its {POLICY_FILE} allows "
                            f"{key} = {limits[key]:,}; refused: ask for less, or have the silo raise its limit")


def check_run(cfg: Config, path: Path) -> None:
    """What a silo checks of every run config it is sent, before loading anything: its base (`check_base`)
    and the work it asks (`check_work`)."""
    check_base(cfg, path.name)
    check_work(cfg, path)


def _model(node_id: int, config_text: str, cfg: Config, path: Path) -> Transformer:
    """The run's model for this node (seeded weights, from a generator of its own), built once."""
    with _MODELS_LOCK:
        model = _MODELS.get((node_id, config_text))
        if model is None:
            if len(_MODELS) > 64:
                _MODELS.clear()
            check_run(cfg, path)
            model = build_model(cfg, device=resolve_device(cfg.train.device))  # this silo's own device
            _MODELS[(node_id, config_text)] = model
        return model


def train_silo(
    global_arrays: dict[str, torch.Tensor], *, cfg: Config, config_text: str, round_idx: int,
    path: Path, tokenizer_sha256: str, node_id: int = 0, carry: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One silo's local training in round `round_idx` + 1: the update in wire names, and metrics.

    `cfg` is the run's resolved config (`config_text` its TOML). `carry`: the optimizer state
    passed on by the previous silo (cyclic), updated in place."""
    torch.set_num_threads(1)  # one thread per silo: bitwise-equal results on either engine
    model = _model(node_id, config_text, cfg, path)
    names = wire_names(model)
    data = SiloBatches.open([path], seed=0, tokenizer_sha256=tokenizer_sha256)
    data.generator.manual_seed(round_seed(cfg.train.seed, path.name, round_idx))
    fed = cfg.federation
    rules = SiloPrivacy(cfg, path, config_text=config_text, round_idx=round_idx, arrays=global_arrays)
    if cfg.privacy.mode == "record":  # secret Poisson sampling and noise, charged on the silo's own ledger
        rules.record_round(data.generator, silo_record_plan(cfg, path, data.splits[0]))
    start = expand_state(model, global_arrays)
    if fed.strategy == "fedsgd":  # one gradient at the global weights; the server steps AdamW
        update, metrics = silo_gradient(model, start, data, cfg.train)
    else:
        update, metrics = local_update(
            model, start, data, federated_train_config(cfg),
            first_step=round_idx * fed.local_steps, steps=fed.local_steps,
            prox_mu=fed.prox_mu if fed.strategy == "fedprox" else 0.0,
            dp_plan=silo_record_plan(cfg, path, data.splits[0]) if cfg.privacy.mode == "record" else None,
            carry=carry,
        )
    wire = {name: update[name].contiguous() for name in names}
    if cfg.privacy.mode == "client":  # client-level DP: this silo's influence on the sum is at most clip
        wire, _ = clip_update(wire, max_norm=cfg.privacy.clip)
    return wire, metrics


def validate_silo(weights: list[dict[str, torch.Tensor]], *, cfg: Config, config_text: str, path: Path,
                  tokenizer_sha256: str, node_id: int = 0) -> list[float]:
    """The loss (nats per token) of each set of wire arrays in `weights` on this silo's own val split.

    Every set is scored on the same windows (`val_loss`, seeded), so the values compare; nan when
    the split is shorter than one window. Only these numbers leave the silo."""
    charge_scores(path, len(weights))
    torch.set_num_threads(1)
    tokens = open_split(path, "val", expect_tokenizer_sha256=tokenizer_sha256)
    chat = open_chat(path, "val")  # a chat silo is judged on its answers, as it is trained
    model = _model(node_id, config_text, cfg, path)
    tc = cfg.train
    out = []
    for arrays in weights:  # a node handles one message at a time, as for training
        load_global(model, expand_state(model, arrays))
        out.append(val_loss(model, [tokens], batches=tc.eval_batches, batch_size=tc.batch_size,
                            seq_len=tc.seq_len, precision=tc.precision, chats=[chat]))
    return out


def encode_update(update: dict[str, torch.Tensor], *, cfg: Config, path: Path, run_id: str, round_idx: int
                  ) -> dict[str, torch.Tensor]:
    """The payload this silo sends for `update` (federation.compression; top-k keeps its error-feedback
    residual in the silo's directory; under client-level DP the payload is clipped again after coding)."""
    fed = cfg.federation
    return codecs.encode_for_send(
        update, codec=fed.compression, topk_fraction=fed.topk_fraction,
        max_norm=cfg.privacy.clip if cfg.privacy.mode == "client" else 0.0,
        store=codecs.ResidualStore(path) if fed.compression == "topk" else None,
        run_id=run_id, round_idx=round_idx,
    )
