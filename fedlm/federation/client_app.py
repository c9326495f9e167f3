"""The Flower ClientApp: one silo's side of a round, a thin wrapper over `fedlm.federation.task`.

    [tool.flwr.app.components] clientapp = "fedlm.federation.client_app:app"

The silo is named by the node: `--node-config 'workspace="WS" silo="NAME"'` on a SuperNode,
or the node config the in-process Grid gives each virtual node. The handlers (message types
in `fedlm.federation.messages`):

- `query`: before round 1, open the silo's shards against the run's tokenizer hash, check the
  run against the silo's own privacy.toml (`silo_privacy`) and, under record-level DP, plan
  its DP-SGD, refusing a budget that cannot fit; reply with the silo's name and token counts,
  or an error saying why.
- `train`: train `federation.local_steps` steps from the message's global weights; reply
  with the update (local − global, in wire names, under federation.compression) and numeric
  metrics (loss, num_tokens, train_seconds). Nothing else leaves the silo: no text, no
  token ids, no file names. Refused for a run with secure aggregation, whose updates leave only
  through `secagg_input`.
- `evaluate`: after the last round, score the run's starting and final global weights on the
  silo's own validation split; reply with the two losses only (under SecAgg only which is
  larger), so the server can say which silos the run left worse off.
- `train.secagg_setup|keys|input|unmask`: secure aggregation (`fedlm.federation.secagg`); a
  round's input is unmasked inside one set of survivors only (`silo_privacy.pin_secure_sum`).
  `secagg_input` trains as `train` does, checks the update itself (the server cannot), and
  replies with it masked and quantised instead. The silo's secrets between stages live in
  `Context.state` (the only state that survives between messages on the deployment engine).
  Under SecAgg the loss and seconds travel only inside the masked sum, and the silo applies
  its own privacy policy to what the server asks (`fedlm.federation.silo_privacy`).
- `evaluate.value`: score the models of a valuation on the silo's validation split; reply with
  one bits-per-byte number per model (`fedlm.federation.valuation`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedlm.data.shards import open_split
from fedlm.errors import UserError
from fedlm.federation import codecs, secagg, trust
from fedlm.federation.hops import mark
from fedlm.federation.messages import (
    TrainRequest,
    evaluate_reply,
    from_records,
    query_config,
    query_reply,
    read_evaluate_request,
    read_train_request,
    to_records,
    train_reply,
)
from fedlm.federation.packing import packed_replies
from fedlm.federation.robust import check_update
from fedlm.federation.silo_privacy import (
    SiloPrivacy,
    expected_clip_range,
    own_privacy,
    pin_secure_sum,
    release_id,
    requires_secure_aggregation,
)
from fedlm.federation.task import (
    check_run,
    check_silo,
    encode_update,
    silo_dir,
    silo_record_plan,
    train_silo,
    validate_silo,
)
from fedlm.federation.valuation import score_reply

app = ClientApp(mods=[packed_replies])  # a deployed message's arrays travel packed


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Check this silo's shards before round 1; reply with its name and token counts."""
    path = silo_dir(context.node_config)
    sha, cfg = query_config(msg)
    counts = check_silo(path, tokenizer_sha256=sha)
    if cfg is not None:
        own_privacy(cfg, path)  # a run this silo's privacy.toml refuses is refused before round 1
        check_run(cfg, path)  # and one whose base model it has no copy of, or that asks more work than it allows
    if cfg is not None and cfg.privacy.mode == "record":  # refuse a DP budget that cannot fit
        plan = silo_record_plan(cfg, path, open_split(path, "train", expect_tokenizer_sha256=sha))
        counts.update(dp_noise_multiplier=plan.noise_multiplier, dp_sample_rate=plan.sample_rate)
    return query_reply(msg, silo=path.name, counts=counts)


def _train(req: TrainRequest, context: Context) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train this silo from the request's global weights: (update in wire names, metrics);
    under cyclic weight transfer `req.carry` becomes the AdamW state to pass on."""
    return train_silo(req.arrays, cfg=req.cfg, config_text=req.config_text, round_idx=req.round_idx,
                      path=silo_dir(context.node_config), tokenizer_sha256=req.tokenizer_sha256,
                      node_id=context.node_id, carry=req.carry)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this silo from the global weights; reply with the update and metrics (and, cyclic,
    the AdamW state for the next silo)."""
    mark("client", "handler start")
    req = read_train_request(msg)
    if req.cfg.federation.secure_aggregation:  # its updates go only into the secure sum (`secagg_input`)
        raise UserError(f"silo {silo_dir(context.node_config).name!r}: an update in clear was asked for a run "
                        "with federation.secure_aggregation = true; refused")
    update, metrics = _train(req, context)
    payload = encode_update(update, cfg=req.cfg, path=silo_dir(context.node_config), run_id=req.run_id,
                            round_idx=req.round_idx)
    reply = train_reply(msg, payload, metrics, carry=req.carry)
    mark("client", "handler end")
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """After the last round: the validation loss of the run's starting and final weights on this
    silo's own val split (only the two numbers; under secure aggregation only which is larger)."""
    req, start = read_evaluate_request(msg)
    before, after = validate_silo([start, req.arrays], cfg=req.cfg, config_text=req.config_text,
                                  path=silo_dir(context.node_config), tokenizer_sha256=req.tokenizer_sha256,
                                  node_id=context.node_id)
    secure = req.cfg.federation.secure_aggregation or requires_secure_aggregation(silo_dir(context.node_config))
    return evaluate_reply(msg, start=before, final=after, verdict_only=secure)


def _secagg_state(context: Context) -> secagg.Msg:
    if "secagg" not in context.state.config_records:
        raise secagg.SecAggError("secure aggregation stage out of order: this silo has no keys for the round")
    return dict(context.state.config_records["secagg"])


@app.evaluate("value")
def value_scores(msg: Message, context: Context) -> Message:
    """Valuation: score the models sent on this silo's validation split; reply with one number each."""
    return score_reply(msg, silo_dir(context.node_config))


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    """Stage 0: fresh key pairs and self-mask seed for this round; reply with the public keys, signed
    with the silo's registered node key where it has one (`fedlm node --key`)."""
    node = context.node_config
    key = trust.load_signing_key(Path(str(node["key"]))) if "key" in node else None
    state, reply = secagg.client_setup(silo_dir(node).name, from_records(msg.content), signing_key=key,
                                       round_no=int(msg.metadata.group_id))
    context.state["secagg"] = ConfigRecord(state)
    return Message(to_records(reply), reply_to=msg)


def _pinned(context: Context) -> dict[str, ec.EllipticCurvePublicKey] | None:
    """This silo's own copy of the silo key registry (None on one machine, where no node has a key)."""
    node = context.node_config
    if "peers" in node:
        return trust.pinned_keys(Path(str(node["peers"])))
    if "key" in node:  # across organisations: never take the peers' keys on the server's word
        raise secagg.SecAggError("secure aggregation needs this silo's copy of the silo registry to check its "
                                 "peers' keys: start `fedlm node` with --peers silos.json")
    return None


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Stage 1: check the peers' round keys against this silo's registry, then Shamir-share the
    secrets, each share encrypted for its holder."""
    state, reply = secagg.client_share_keys(_secagg_state(context), from_records(msg.content),
                                            pinned=_pinned(context))
    context.state["secagg"] = ConfigRecord(state)
    return Message(to_records(reply), reply_to=msg)


@app.train("secagg_input")
def secagg_input(msg: Message, context: Context) -> Message:
    """Stage 2: train, check the update, reply with it masked (and the metrics). Every silo's weight
    is the same public one (`exchanges.secagg_round`), so nothing here is weighted by its tokens."""
    req = read_train_request(msg)
    update, metrics = _train(req, context)
    cfg = req.cfg
    # decode before masking: SecAgg quantises the decoded values (its integers are the wire format)
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    update = codecs.decode(encode_update(update, cfg=cfg, path=silo_dir(context.node_config), run_id=req.run_id,
                                         round_idx=req.round_idx), codec=cfg.federation.compression, expected=shapes)
    why = check_update(update, expected={k: tuple(v.shape) for k, v in req.arrays.items()},
                       max_norm=cfg.federation.max_update_norm)
    if why is not None:  # the reason stays here: the server learns no norm
        logging.getLogger("fedlm.federation").warning("update rejected before masking: %s", why)
        raise ValueError("update rejected before masking: it breaks federation.max_update_norm or is not finite")
    state = _secagg_state(context)
    rules = None
    if cfg.privacy.mode == "client":  # plus this silo's secret share of the noise
        if req.dp_share_std is None:
            raise ValueError("a client-level DP round without this silo's noise share (dp-share-std)")
        rules = SiloPrivacy(cfg, silo_dir(context.node_config), config_text=req.config_text,
                            round_idx=req.round_idx, arrays=req.arrays)
        update = rules.noise_share(update, share_std=req.dp_share_std, threshold=int(state["threshold"]),
                                   num_silos=len(state["silos"]))
    vector = secagg.with_metrics(secagg.flatten(update), metrics, clip_range=float(state["clip_range"]))
    state, reply = secagg.client_masked_input(state, from_records(msg.content), vector,
                                              expect_clip_range=expected_clip_range(cfg, req.dp_share_std or 0.0))
    state["release"] = rules.release if rules is not None else release_id(  # the weights hashed once a round
        req.config_text, req.round_idx, req.arrays, silo_dir(context.node_config))
    context.state["secagg"] = ConfigRecord(state)
    content = to_records(reply)
    content["metrics"] = MetricRecord(secagg.clear_metrics(metrics))  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 3: shares of the survivors' self-mask seeds and of the dropped silos' mask keys."""
    state = _secagg_state(context)
    del context.state["secagg"]  # the round's secrets are not needed again, nor a second answer
    request = from_records(msg.content)
    reply = secagg.client_unmask(state, request)
    if "release" in state:  # the same input never in two different sums (a replayed round)
        pin_secure_sum(silo_dir(context.node_config), str(state["release"]), list(request["survivors"]))
    return Message(to_records(reply), reply_to=msg)
