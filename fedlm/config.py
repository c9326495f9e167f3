"""Typed run configuration: one dataclass per section, TOML files holding only overrides.

    cfg = load_config("run.toml", overrides=["train.lr=3e-4", "model.preset=small"])
    save_config(cfg, "RUN/config.toml")   # the resolved config; load_config accepts it as is

Unknown sections or keys and bad values raise `UserError` naming the key (and file).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlm.errors import UserError
from fedlm.fileio import write_text

DEVICE_SPELLING = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
"""What `train.device` and the commands' `--device` accept (`fedlm.device` resolves them)."""
DEVICE_HELP = '"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"'


def check_device_spelling(spec: str, *, key: str = "train.device") -> None:
    """ValueError naming `key` unless `spec` is one of the accepted spellings."""
    if not DEVICE_SPELLING.fullmatch(spec):
        raise ValueError(f"{key} = {spec!r} is not a device; use {DEVICE_HELP}")


# Presets for the model's shape; explicit keys in a config override them.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # ~1.3 M parameters at vocab 4096: the tests' and the quick demo's size.
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "d_ff": 352},
    # ~17 M parameters at vocab 8192: the benchmark size.
    "small": {"d_model": 384, "n_layers": 8, "n_heads": 6, "n_kv_heads": 6, "d_ff": 1024},
}


@dataclass
class DataConfig:
    workspace: str = "workspace"
    """Workspace directory made by `fedlm data ...`: WS/tokenizer.json and WS/silos/NAME/."""
    silos: list[str] = field(default_factory=list)
    """Silos to train on; several are pooled. Empty means every silo in the workspace."""

    def __post_init__(self) -> None:
        if not self.workspace:
            raise ValueError("data.workspace must name a directory")


@dataclass
class ModelConfig:
    preset: Literal["tiny", "small", "custom"] = "tiny"
    """Shape preset; the size keys below override it when set (non-zero)."""
    d_model: int = 0
    """Hidden size."""
    n_layers: int = 0
    """Number of decoder blocks."""
    n_heads: int = 0
    """Attention heads."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention when < n_heads); 0 means n_heads."""
    d_ff: int = 0
    """SwiGLU hidden size."""
    vocab_size: int = 0
    """Vocabulary size; 0 means take it from the workspace's tokenizer."""
    max_seq_len: int = 256
    """Longest context, in tokens."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: Literal["none", "llama3"] = "none"
    """"llama3": Llama 3.1/3.2's RoPE frequency scaling for a context longer than the one trained on
    (its Hugging Face config's rope_type "llama3", with the four rope_* settings below)."""
    rope_factor: float = 8.0
    """llama3: how much longer the context is than `rope_original_max_seq_len`."""
    rope_low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_max_seq_len / this are slowed by `rope_factor`."""
    rope_high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_max_seq_len / this are kept; those between, blended."""
    rope_original_max_seq_len: int = 8192
    """llama3: the context the model was first trained at."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2's attention; Llama has none)."""

    def __post_init__(self) -> None:
        if self.preset != "custom":
            if self.preset not in MODEL_PRESETS:
                raise ValueError(f"model.preset must be one of {[*MODEL_PRESETS, 'custom']}")
            for key, value in MODEL_PRESETS[self.preset].items():
                if getattr(self, key) == 0:
                    setattr(self, key, value)
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.rope_scaling not in ("none", "llama3"):
            raise ValueError(f"model.rope_scaling must be \"none\" or \"llama3\", not {self.rope_scaling!r}")
        if self.rope_scaling == "llama3" and not (
                self.rope_factor > 0 and self.rope_original_max_seq_len > 0
                and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ValueError("model.rope_scaling = \"llama3\" needs rope_factor > 0, rope_original_max_seq_len > 0 "
                             "and 0 < rope_low_freq_factor < rope_high_freq_factor")
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be > 0 (set it, or pick a model.preset)")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / model.n_heads must be even (rotary embeddings)")
        if self.vocab_size < 0:
            raise ValueError("model.vocab_size must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 128
    """Tokens per training sequence (<= model.max_seq_len)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices, the (tied) embedding among them; norms are not decayed."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast (weights and optimizer state stay fp32) where the device has bf16 matmul
    units (CUDA, MPS, a CPU with AVX512-BF16 or AMX); elsewhere fp32, as emulated bf16 is ~8x slower."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    seed: int = 1337
    """Seeds the weights, the data order and dropout-free sampling."""
    log_every: int = 10
    """Log a metrics line every this many steps."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches for the loss logged at checkpoints."""
    threads: int = 0
    """torch threads; 0 leaves torch's default."""
    device: str = "auto"
    """Where this process trains: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or
    "mps". Model, batches, LoRA, DP-SGD and the optimiser state live there; updates cross the
    wire from the CPU. A federated run's silos each resolve it on their own machine."""
    init_from: str = ""
    """Start from this model (run or model directory) instead of fresh weights: fine-tuning."""
    init_sha256: str = ""
    """sha256 of the model init_from names (`fedlm.pretrained.model_digest`): filled in when a run
    starts (`resolve_config`), or set to pin a model. A federated run's silos start only from a
    model with this digest, so the coordinator cannot point them at another file of theirs."""
    mode: Literal["centralised", "federated", "local-only"] = "centralised"
    """centralised: the silos pooled in one run; federated: across silos (see [federation]);
    local-only: each silo trains alone (a baseline)."""

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be > 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("train.lr must be a positive number")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError("train.min_lr must be between 0 and train.lr")
        if self.warmup_steps < 0:
            raise ValueError("train.warmup_steps must be >= 0")
        if self.grad_clip < 0:
            raise ValueError("train.grad_clip must be >= 0 (0 disables clipping)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("train.beta1 and train.beta2 must be in [0, 1)")
        check_device_spelling(self.device)


@dataclass
class FederationConfig:
    engine: Literal["inprocess", "flower"] = "inprocess"
    """inprocess: every silo in this process; flower: Flower's SuperLink + one SuperNode per silo."""
    rounds: int = 10
    """Federated rounds."""
    local_steps: int = 5
    """Optimizer steps each silo takes per round (with train.batch_size, train.seq_len)."""
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "cyclic", "fedsgd"] = "fedavg"
    """Server aggregation: FedAvg (weighted by tokens), FedProx, a server optimiser, cyclic
    (the silos train in turn, each from the weights the previous one left: more sequential
    steps for the same compute, but each update is seen alone and a round takes every silo's
    time), or fedsgd (each silo sends one batch's gradient and the server takes the trainer's
    AdamW step on their mean: pooled training's steps, one round each; needs local_steps = 1)."""
    fraction: float = 1.0
    """Share of the silos sampled each round."""
    min_silos: int = 1
    """A round completes when at least this many sampled silos replied in time. Under secure
    aggregation a round needs at least 3 (with 2, each silo could take its own update off the
    sum and read the other's) and the SecAgg threshold, whatever this says."""
    server_lr: float = 1.0
    """Server learning rate applied to the aggregated update."""
    server_beta1: float = 0.9
    """FedAdam/FedYogi first-moment decay."""
    server_beta2: float = 0.99
    """FedAdam/FedYogi second-moment decay."""
    server_tau: float = 1e-3
    """FedAdam/FedYogi adaptivity (epsilon)."""
    prox_mu: float = 0.01
    """FedProx proximal weight (strategy = "fedprox")."""
    aggregation: Literal["mean", "trimmed_mean", "median"] = "mean"
    """Robust coordinate-wise aggregation instead of the weighted mean."""
    trim_fraction: float = 0.1
    """Share trimmed from each end for aggregation = "trimmed_mean"."""
    max_update_norm: float = 0.0
    """Reject (do not average) an update whose L2 norm exceeds this; 0 disables."""
    secure_aggregation: bool = False
    """Mask updates so the server learns only their sum."""
    round_timeout: float = 600.0
    """Seconds to wait for the silos each round; late silos are dropped from the round."""
    personalise_steps: int = 0
    """After the run, each silo fine-tunes the global model this many steps on its own shards."""
    compression: Literal["none", "fp16", "int8", "topk"] = "none"
    """Codec applied to each update before it is sent (undone on the server)."""
    topk_fraction: float = 0.1
    """Share of coordinates sent with compression = "topk" (the rest is carried as error feedback)."""
    value: Literal["none", "rounds"] = "none"
    """rounds: value each silo's contribution inside the run from its per-round updates (`fedlm value
    RUN --method rounds`). It shows every silo's update to the server and the one-silo coalition
    models to every silo, so it is opt-in and refused with secure_aggregation or privacy.mode = "client"."""

    def __post_init__(self) -> None:
        for key in ("rounds", "local_steps", "min_silos"):
            if getattr(self, key) <= 0:
                raise ValueError(f"federation.{key} must be > 0")
        if not 0 < self.fraction <= 1:
            raise ValueError("federation.fraction must be in (0, 1]")
        if self.strategy == "fedsgd" and self.local_steps != 1:
            raise ValueError("federation.local_steps must be 1 with strategy = \"fedsgd\" (a round is one "
                             "optimizer step on the silos' gradients); raise train.batch_size or "
                             "train.grad_accum for more tokens per round")
        if self.server_lr <= 0 or self.server_tau <= 0 or self.prox_mu < 0:
            raise ValueError("federation.server_lr and server_tau must be > 0, prox_mu >= 0")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("federation.trim_fraction must be in [0, 0.5)")
        if not 0 < self.topk_fraction <= 1:
            raise ValueError("federation.topk_fraction must be in (0, 1]")
        if self.max_update_norm < 0 or self.round_timeout <= 0 or self.personalise_steps < 0:
            raise ValueError(
                "federation.max_update_norm and personalise_steps must be >= 0, round_timeout > 0"
            )


@dataclass
class PrivacyConfig:
    mode: Literal["none", "record", "client"] = "none"
    """record: DP-SGD inside each silo (Opacus); client: clipped updates + Gaussian noise on the aggregate."""
    target_epsilon: float = 8.0
    """ε each silo may spend over the whole run; the noise multiplier is derived from it."""
    delta: float = 1e-5
    """δ of the guarantee; must be < 1/N for N records (record) or silos (client)."""
    clip: float = 1.0
    """Per-sample gradient norm bound (record) or per-silo update norm bound (client)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Privacy accountant for record-level DP (Opacus's RDP or PRV); client-level DP always uses RDP."""
    noise_multiplier: float = 0.0
    """Noise std / clip; 0 derives it from target_epsilon over all steps/rounds. Set, the run is
    refused when the configured steps/rounds would spend more than target_epsilon."""
    sample_rate: float = 0.0
    """Record DP: Poisson sampling rate of training windows per step; 0 means train.batch_size / N."""
    dishonest_silos: int = 0
    """Client-level DP under secure aggregation: how many silos may leave out their noise shares.
    Each share is sized so that the other survivors' shares carry the planned noise even without
    theirs (0: every silo is trusted to add its share)."""
    insecure_reproducible_noise: bool = False
    """Derive the DP noise and sampling from train.seed instead of each party's secret key, so
    runs repeat bit for bit. Anyone holding the config can then remove the noise: for tests
    only; warned whenever on, refused on the deployed (multi-organisation) engine."""

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not 0 <= self.sample_rate <= 1:
            raise ValueError("privacy.noise_multiplier must be >= 0 and privacy.sample_rate in [0, 1]")
        if self.dishonest_silos < 0:
            raise ValueError("privacy.dishonest_silos must be >= 0")
        if self.mode != "none":
            if not self.target_epsilon > 0:
                raise ValueError(f"privacy.target_epsilon must be > 0 when privacy.mode = {self.mode!r}")
            if not 0 < self.delta < 1:
                raise ValueError(f"privacy.delta must be in (0, 1) when privacy.mode = {self.mode!r}")
            if not self.clip > 0:
                raise ValueError(f"privacy.clip must be > 0 when privacy.mode = {self.mode!r}")


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 trains all weights. With rank > 0 only adapters train and cross the wire."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: ["wqkv", "wo", "w13", "w2"])
    """Module names that get adapters."""

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora.rank must be >= 0, lora.alpha > 0, lora.dropout in [0, 1)")
        if self.rank and not self.targets:
            raise ValueError("lora.targets must name at least one module when lora.rank > 0")


@dataclass
class ValueConfig:
    beneficiaries: list[str] = field(default_factory=list)
    """Silos whose validation splits define the consortium's utility (token-weighted); empty: all."""
    eval_tokens: int = 0
    """Validation tokens each silo scores a model on (the same first ones for every model); 0: the whole split."""

    def __post_init__(self) -> None:
        if self.eval_tokens < 0:
            raise ValueError("value.eval_tokens must be >= 0 (0 scores the whole validation split)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    value: ValueConfig = field(default_factory=ValueConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every check across sections (ValueError naming the keys). Runs on construction; the
        entry points run it again, since a Config's fields can be changed afterwards."""
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"train.seq_len ({self.train.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})"
            )
        self._check_federation()
        self._check_privacy()

    def _check_federation(self) -> None:
        """Refuse strategy options that cannot work together."""
        fed, mode = self.federation, self.privacy.mode
        if fed.strategy == "cyclic":  # the weights pass from silo to silo: each update is seen alone
            clash = ("federation.secure_aggregation = true" if fed.secure_aggregation else
                     f"federation.aggregation = {fed.aggregation!r}" if fed.aggregation != "mean" else
                     f"privacy.mode = {mode!r}" if mode != "none" else None)
            if clash is not None:
                raise ValueError(f"federation.strategy = \"cyclic\" sums the silos' updates made in turn and "
                                 f"cannot be combined with {clash}, which works on a round's updates together; "
                                 f"use strategy = \"fedavg\" for it")
        if fed.strategy == "fedsgd" and mode == "record":
            raise ValueError("federation.strategy = \"fedsgd\" sends one gradient per round and cannot run "
                             "privacy.mode = \"record\" (DP-SGD's steps are the silo's own); use privacy.mode = "
                             "\"client\" (clipped gradients, noise on their sum) or strategy = \"fedavg\"")
        if fed.value == "rounds":
            clash = ("federation.secure_aggregation = true: the server would have to see each silo's update, "
                     "which secure aggregation exists to hide" if fed.secure_aggregation else
                     "privacy.mode = \"client\": the coalition models would leave the server without the DP noise"
                     if mode == "client" else
                     "federation.strategy = \"cyclic\": its updates are made in turn, not side by side"
                     if fed.strategy == "cyclic" else
                     f"federation.aggregation = {fed.aggregation!r}: a silo's share of a robust aggregate is "
                     "not defined" if fed.aggregation != "mean" else None)
            if clash is not None:
                raise ValueError(f"federation.value = \"rounds\" cannot run with {clash}; set federation.value = "
                                 "\"none\" and value the finished run with `fedlm value RUN --method exact` (or "
                                 "sampled), which retrains each coalition under the run's own settings")
        if fed.secure_aggregation and fed.aggregation != "mean":
            raise ValueError(f"federation.aggregation = {fed.aggregation!r} needs each silo's update, which "
                             "secure aggregation hides; use aggregation = \"mean\" or turn secure_aggregation off")

    def _check_privacy(self) -> None:
        """Refuse options that would void the DP guarantee asked for (or that it does not account)."""
        mode, fed = self.privacy.mode, self.federation
        if mode == "none":
            return
        where = f"privacy.mode = {mode!r}"
        if mode == "client":
            if self.train.mode != "federated":
                raise ValueError(f"{where} protects silos in a federation: set train.mode = \"federated\" "
                                 "(or use privacy.mode = \"record\")")
            if fed.aggregation != "mean":
                raise ValueError(f"{where} bounds each silo's influence on a sum; federation.aggregation = "
                                 f"{fed.aggregation!r} has another sensitivity: use \"mean\"")
            if 0 < fed.max_update_norm < self.privacy.clip:
                raise ValueError(f"{where}: federation.max_update_norm = {fed.max_update_norm:g} < privacy.clip = "
                                 f"{self.privacy.clip:g} rejects updates depending on their data; set it to 0 "
                                 "or >= privacy.clip")
            if fed.compression != "none":
                raise ValueError(f"{where}: federation.compression = {fed.compression!r} changes what is sent "
                                 "after clipping (norm no longer bounded); use compression = \"none\"")
        if fed.personalise_steps > 0 and self.train.mode == "federated" and mode == "record":
            raise ValueError(f"{where}: federation.personalise_steps trains on the silo's records outside "
                             "DP-SGD's accounting; set it to 0")
        if mode == "record":
            if self.train.mode == "federated" and fed.strategy == "fedprox":
                raise ValueError(f"{where}: federation.strategy = \"fedprox\" adds a term to the loss that "
                                 "DP-SGD's per-sample clipping does not bound; use strategy = \"fedavg\"")
            if self.train.grad_accum != 1:
                raise ValueError(f"{where}: each DP-SGD step is one Poisson batch; set train.grad_accum = 1 "
                                 "(raise train.batch_size or privacy.sample_rate instead)")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one TOML (or --set string) value to the field's type; name the key if wrong."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{key} = {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise UserError(f"{key} must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type for {key}: {tp}")  # a bug in this file


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


RENAMED = {"federation.personalize_steps": "federation.personalise_steps"}
"""Keys renamed to the house spelling (-ise): accepted no more; the error names the new key."""


def _merge(raw: dict[str, dict[str, Any]], table: dict[str, Any], where: str) -> None:
    sections = _section_types()
    for name, body in table.items():
        if name not in sections:
            raise UserError(f"{where}: unknown section [{name}]; known: {', '.join(sections)}")
        if not isinstance(body, dict):
            raise UserError(f"{where}: [{name}] must be a table of keys")
        known = {f.name for f in dataclasses.fields(sections[name])}
        for key, value in body.items():
            if f"{name}.{key}" in RENAMED:
                raise UserError(f"{where}: {name}.{key} is now {RENAMED[f'{name}.{key}']}; rename the key")
            if key not in known:
                raise UserError(
                    f"{where}: unknown key {name}.{key}; known keys of [{name}]: {', '.join(sorted(known))}"
                )
            raw.setdefault(name, {})[key] = value


def _parse_set(item: str) -> tuple[str, str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.lr=3e-4")
    path, value = item.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:  # accept TOML literals (numbers, booleans, lists, quoted strings) ...
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:  # ... and bare strings
        parsed = value
    return section, key, parsed


def build_config(raw: dict[str, dict[str, Any]], where: str = "config") -> Config:
    """Build and validate a Config from {section: {key: value}}."""
    sections = _section_types()
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        hints = typing.get_type_hints(cls)
        kwargs = {
            key: _coerce(f"{name}.{key}", value, hints[key])
            for key, value in raw.get(name, {}).items()
        }
        try:
            built[name] = cls(**kwargs)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    try:
        return Config(**built)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file of overrides (or none) and apply `section.key=value` overrides."""
    raw: dict[str, dict[str, Any]] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read config ({e})") from None
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        _merge(raw, table, where)
    for item in overrides or []:
        section, key, value = _parse_set(item)
        _merge(raw, {section: {key: value}}, f"--set {item}")
    return build_config(raw, where)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(cfg: Config) -> str:
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, section.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def config_diff(a: Config, b: Config) -> list[str]:
    """The keys ("section.key") whose values differ between two configs, in file order."""
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(a)
            for f in dataclasses.fields(getattr(a, section.name))
            if getattr(getattr(a, section.name), f.name) != getattr(getattr(b, section.name), f.name)]


RESUME_MAY_CHANGE = {"train.device"}
"""Keys a resumed run may change: where it computes, not what."""


def check_resume_config(cfg: Config, saved: Path) -> None:
    """UserError naming each key (and both values) where the config given to --resume is not the run's."""
    if not saved.exists():
        return
    old = load_config(saved)

    def value(c: Config, key: str) -> str:
        section, name = key.split(".")
        return _toml_value(getattr(getattr(c, section), name))

    changes = [f"{key} from {value(old, key)} to {value(cfg, key)}" for key in config_diff(old, cfg)
               if key not in RESUME_MAY_CHANGE]
    if changes:
        raise UserError(f"{saved}: the config given to --resume changes {', '.join(changes)}; "
                        f"resume with `fedlm train {saved} --resume`")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; `load_config(path)` gives the same Config back."""
    write_text(path, config_to_toml(cfg))
