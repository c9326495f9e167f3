"""The Flower ClientApp: one silo's side of a round, a thin wrapper over `fedlm.train.local_update`.

    [tool.flwr.app.components] clientapp = "fedlm.federation.client_app:app"

The silo is named by the node: `--node-config 'workspace="WS" silo="NAME"'` on a SuperNode,
or the node config the in-process Grid gives each virtual node. Message types:

- `query`: before round 1 the server asks each silo to open its shards against the run's
  tokenizer hash; the reply names the silo and counts its tokens (or is an error saying why).
- `train`: load the global weights from the message, train `federation.local_steps` steps on
  the silo's train split from them, reply with the update (local − global; an ArrayRecord
  keyed by the model's parameter names) and numeric metrics (loss, num_tokens,
  train_seconds). Nothing else leaves the silo: no text, no token ids, no file names.
- `train.secagg_setup`, `train.secagg_keys`, `train.secagg_input`, `train.secagg_unmask`:
  the four stages of secure aggregation (`fedlm.federation.secagg`) when
  `federation.secure_aggregation` is on. `secagg_input` trains as `train` does, checks the
  update itself (the server cannot), and replies with it masked and quantised instead.
  The silo's secrets between stages live in `Context.state` (kept on the node; the only
  state that survives between messages on the deployment engine).

The data order is seeded from (train.seed, silo, round), so a silo's update depends only on
the global weights and the round, on either engine and after a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlm.config import Config, TrainConfig, build_config
from fedlm.data.shards import open_split
from fedlm.errors import UserError
from fedlm.federation import codecs, secagg
from fedlm.federation.robust import check_update
from fedlm.model import Transformer
from fedlm.privacy.client_dp import clip_update, noise_like
from fedlm.privacy.dpsgd import RecordPlan, num_records, plan_record_dp
from fedlm.train import SiloBatches, build_model, local_update, silo_gradient

app = ClientApp()

_MODELS: dict[tuple[int, str], Transformer] = {}  # (node, config) -> model, reused in one process
_MODELS_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------
# helpers shared with the server (fedlm.federation.runner)


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
    """The data-order seed of `silo` in round `round_idx` (stable across processes, unlike hash())."""
    digest = hashlib.sha256(f"{seed}/{silo}/{round_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def federated_train_config(cfg: Config) -> TrainConfig:
    """The local trainer's config in a federated run: its lr schedule spans rounds × local steps."""
    total = cfg.federation.rounds * cfg.federation.local_steps
    return dataclasses.replace(cfg.train, steps=total, warmup_steps=min(cfg.train.warmup_steps, total))


def silo_dir(nc: Mapping[str, str | int | float | bool]) -> Path:
    """WS/silos/NAME from the node config's `workspace` and `silo`."""
    if "workspace" not in nc or "silo" not in nc:
        raise UserError(
            "this SuperNode has no silo: start it with --node-config 'workspace=\"WS\" silo=\"NAME\"' "
            "(`fedlm node --workspace WS --silo NAME`)"
        )
    path = Path(str(nc["workspace"])) / "silos" / str(nc["silo"])
    if not path.is_dir():
        raise UserError(f"silo {nc['silo']!r}: no directory {path}; run `fedlm data prepare` there first")
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


def _model(node_id: int, config_text: str, cfg: Config) -> Transformer:
    with _MODELS_LOCK:
        model = _MODELS.get((node_id, config_text))
        if model is None:
            if len(_MODELS) > 64:
                _MODELS.clear()
            model = build_model(cfg, cfg.model.vocab_size)  # seeded weights, from a generator of its own
            _MODELS[(node_id, config_text)] = model
        return model


def train_silo(
    global_arrays: dict[str, torch.Tensor], *, cfg: Config, config_text: str, round_idx: int,
    path: Path, tokenizer_sha256: str, node_id: int = 0, carry: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One silo's local training for one round: the update in wire names, and metrics.

    `carry`: the optimizer state passed on by the previous silo (cyclic), updated in place."""
    torch.set_num_threads(1)  # one thread per silo: bitwise-equal results on either engine
    model = _model(node_id, config_text, cfg)
    names = wire_names(model)
    data = SiloBatches.open([path], seed=0, tokenizer_sha256=tokenizer_sha256)
    data.generator.manual_seed(round_seed(cfg.train.seed, path.name, round_idx))
    fed = cfg.federation
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


_PLANS: dict[tuple[str, str, int], RecordPlan] = {}  # the noise search is slow: once per run and silo


def silo_record_plan(cfg: Config, path: Path, tokens: np.ndarray) -> RecordPlan:
    """This silo's DP-SGD plan over every round it could take part in (UserError if it cannot fit)."""
    key = (repr(cfg), str(path), len(tokens))
    if key not in _PLANS:
        _PLANS[key] = _plan(cfg, path, tokens)
    return _PLANS[key]


def _plan(cfg: Config, path: Path, tokens: np.ndarray) -> RecordPlan:
    return plan_record_dp(
        num_records=num_records(len(tokens), cfg.train.seq_len), batch_size=cfg.train.batch_size,
        steps=cfg.federation.rounds * cfg.federation.local_steps, privacy=cfg.privacy,
        where=f"silo {path.name!r}")


def compress(update: dict[str, torch.Tensor], *, cfg: Config, record: ConfigRecord, path: Path
             ) -> dict[str, torch.Tensor]:
    """The payload this silo sends for `update` (federation.compression; top-k keeps its error-feedback
    residual in the silo's directory; under client-level DP the payload is clipped again after coding)."""
    fed = cfg.federation
    return codecs.encode_for_send(
        update, codec=fed.compression, topk_fraction=fed.topk_fraction,
        max_norm=cfg.privacy.clip if cfg.privacy.mode == "client" else 0.0,
        store=codecs.ResidualStore(path) if fed.compression == "topk" else None,
        run_id=str(record.get("run-id", "")), round_idx=int(record["round"]),  # type: ignore[arg-type]
    )


def _config(msg: Message) -> tuple[ConfigRecord, Config, str]:
    record = msg.content.config_records["config"]
    text = str(record["fedlm-config"])
    return record, build_config(tomllib.loads(text), "federated run config"), text


# ---------------------------------------------------------------------------------------
# the message handlers


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Check this silo's shards before round 1; reply with its name and token counts."""
    path = silo_dir(context.node_config)
    sha = str(msg.content.config_records["config"]["tokenizer-sha256"])
    counts = check_silo(path, tokenizer_sha256=sha)
    if "fedlm-config" in msg.content.config_records["config"]:  # refuse a DP budget that cannot fit
        _, cfg, _ = _config(msg)
        if cfg.privacy.mode == "record":
            plan = silo_record_plan(cfg, path, open_split(path, "train", expect_tokenizer_sha256=sha))
            counts.update(dp_noise_multiplier=plan.noise_multiplier, dp_sample_rate=plan.sample_rate)
    return Message(
        RecordDict({"silo": ConfigRecord({"silo": path.name}), "metrics": MetricRecord(dict(counts))}),
        reply_to=msg,
    )


def _train_round(msg: Message, context: Context) -> tuple[ConfigRecord, Config, dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor], dict[str, float],
                                                          dict[str, torch.Tensor] | None]:
    """Train this silo from the message's global weights: (round record, config, the global
    arrays received, update, metrics, the AdamW state to pass on (cyclic; else None)).

    Cyclic (`federation.strategy = "cyclic"`): the AdamW state the previous silo left arrives
    as the array record "optimizer" (absent for the run's first silo), so the silos' turns are
    one optimizer's run."""
    record, cfg, text = _config(msg)
    arrays = msg.content.array_records["arrays"].to_torch_state_dict()
    carry: dict[str, torch.Tensor] | None = None
    if cfg.federation.strategy == "cyclic":
        got = msg.content.array_records.get("optimizer")
        carry = got.to_torch_state_dict() if got is not None else {}
    update, metrics = train_silo(
        arrays, cfg=cfg, config_text=text, round_idx=int(record["round"]),  # type: ignore[arg-type]
        path=silo_dir(context.node_config), tokenizer_sha256=str(record["tokenizer-sha256"]),
        node_id=context.node_id, carry=carry,
    )
    return record, cfg, arrays, update, metrics, carry


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this silo from the global weights; reply with the update and metrics (and, cyclic,
    the AdamW state for the next silo)."""
    record, cfg, _, update, metrics, carry = _train_round(msg, context)
    payload = compress(update, cfg=cfg, record=record, path=silo_dir(context.node_config))
    content = RecordDict({"arrays": ArrayRecord(payload), "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    if carry is not None:
        content["optimizer"] = ArrayRecord(carry)
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------
# secure aggregation: the protocol's messages (dicts of bytes, str, numbers, lists, ndarrays)
# travel as a ConfigRecord "secagg" plus an ArrayRecord "secagg-arrays" for the ndarrays


def to_records(msg: secagg.Msg) -> RecordDict:
    """A secagg message as Flower records."""
    arrays = {k: Array(np.ascontiguousarray(v)) for k, v in msg.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in msg.items() if not isinstance(v, np.ndarray)}
    out = RecordDict({"secagg": ConfigRecord(rest)})
    if arrays:
        out["secagg-arrays"] = ArrayRecord(arrays)
    return out


def from_records(content: RecordDict) -> secagg.Msg:
    """The secagg message in a message's content (inverse of `to_records`)."""
    msg: secagg.Msg = dict(content.config_records["secagg"])
    if "secagg-arrays" in content.array_records:
        msg.update({k: a.numpy() for k, a in content.array_records["secagg-arrays"].items()})
    return msg


def _secagg_state(context: Context) -> secagg.Msg:
    if "secagg" not in context.state.config_records:
        raise secagg.SecAggError("secure aggregation stage out of order: this silo has no keys for the round")
    return dict(context.state.config_records["secagg"])


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    """Stage 0: fresh key pairs and self-mask seed for this round; reply with the public keys."""
    state, reply = secagg.client_setup(silo_dir(context.node_config).name, from_records(msg.content))
    context.state["secagg"] = ConfigRecord(state)
    return Message(to_records(reply), reply_to=msg)


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir-share the secrets, each share encrypted for its holder."""
    state, reply = secagg.client_share_keys(_secagg_state(context), from_records(msg.content))
    context.state["secagg"] = ConfigRecord(state)
    return Message(to_records(reply), reply_to=msg)


@app.train("secagg_input")
def secagg_input(msg: Message, context: Context) -> Message:
    """Stage 2: train, check the update, reply with weight × update masked (and the metrics)."""
    record, cfg, arrays, update, metrics, _ = _train_round(msg, context)
    # decode before masking: SecAgg quantises the decoded values (its integers are the wire format)
    update = codecs.decode(compress(update, cfg=cfg, record=record, path=silo_dir(context.node_config)),
                           codec=cfg.federation.compression, expected={k: tuple(v.shape) for k, v in update.items()})
    why = check_update(update, expected={k: tuple(v.shape) for k, v in arrays.items()},
                       max_norm=cfg.federation.max_update_norm)
    if why is not None:
        raise ValueError(f"update rejected before masking: {why}")
    weight = metrics["num_tokens"] / float(record["weight-ref"])  # type: ignore[arg-type]
    if cfg.privacy.mode == "client":  # unweighted sum, plus this silo's share of the noise (secret seed)
        weight = 1.0
        share_std = float(record["dp-share-std"])  # type: ignore[arg-type]
        noise = noise_like(update, std=share_std, generator=torch.Generator().manual_seed(
            secrets.randbits(63)))
        update = {k: update[k].float() + noise[k] for k in update}
    state, reply = secagg.client_masked_input(
        _secagg_state(context), from_records(msg.content), secagg.flatten(update), weight=weight
    )
    context.state["secagg"] = ConfigRecord(state)
    content = to_records(reply)
    content["metrics"] = MetricRecord(metrics)  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 3: shares of the survivors' self-mask seeds and of the dropped silos' mask keys."""
    reply = secagg.client_unmask(_secagg_state(context), from_records(msg.content))
    del context.state["secagg"]  # the round's secrets are not needed again
    return Message(to_records(reply), reply_to=msg)
