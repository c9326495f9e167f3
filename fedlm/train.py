"""The local training loop: AdamW, warm-up + cosine, accumulation, clipping, bf16, checkpoints.

    summary = train(load_config("run.toml"), Path("runs/a"))            # one silo or several pooled
    summary = train(load_config("runs/a/config.toml"), Path("runs/a"), resume=True)

The run directory holds config.toml, metrics.jsonl, model/ and checkpoint/ (see DESIGN.md).
A run killed at any moment and resumed ends bitwise-equal to an uninterrupted one: the
checkpoint holds the weights, the optimizer state, the step, the global RNG and the data
sampler's generator (the data position), and is replaced atomically.

The pieces (`make_optimizer`, `lr_at`, `train_step`, `SiloBatches`) are reused by federated
local training, which runs the same steps from the global weights each round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedlm.config import Config, TrainConfig, check_resume_config, save_config
from fedlm.data.chatshards import (
    IGNORE,
    ChatIndex,
    chat_spans,
    iter_chat_windows,
    sample_chat_batch,
)
from fedlm.data.shards import iter_eval_windows, open_chat, open_split, sample_batch
from fedlm.data.tokenizer import load_tokenizer, tokenizer_hash
from fedlm.device import autocast, module_device, resolve_device, to_cpu
from fedlm.errors import UserError
from fedlm.fileio import append_jsonl, atomic_dir, recover_dir, truncate_jsonl, write_json
from fedlm.lora import apply_lora, has_lora, plain_model, save_adapters
from fedlm.model import Transformer
from fedlm.modelio import assign_tensors, save_model, stored_state
from fedlm.pretrained import base_reference, load_pretrained, tokenizer_json_hash
from fedlm.privacy.dpsgd import (
    DPSGD,
    PoissonRecords,
    RecordPlan,
    dp_train_steps,
    num_records,
    plan_record_dp,
    privacy_record,
    restart_stream,
    stream_name,
)
from fedlm.privacy.randomness import party_key
from fedlm.resolve import resolve_config, resolve_model, resolve_silos

StepCallback = Callable[[int, int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------
# data: random windows from one silo's shards, or from several silos pooled


@dataclass
class SiloBatches:
    """Samples training batches from one or more silos' train splits; the generator is the position.

    A chat silo's windows start at a conversation and target only the answers' tokens (the
    others are -100, which the loss skips: `sample_chat_batch`); raw-text and chat silos pool."""

    splits: list[np.ndarray]
    weights: torch.Tensor  # (S,) sampling weight per silo: its share of the tokens
    generator: torch.Generator
    chats: list[ChatIndex | None] = dataclasses.field(default_factory=list)  # per silo: its loss mask
    names: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, silo_dirs: Sequence[Path], *, seed: int, tokenizer_sha256: str | None) -> SiloBatches:
        splits = [open_split(d, "train", expect_tokenizer_sha256=tokenizer_sha256) for d in silo_dirs]
        _check_one_template(silo_dirs)
        weights = torch.tensor([float(len(s)) for s in splits], dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        return cls(splits, weights, generator, [open_chat(d, "train") for d in silo_dirs],
                   [Path(d).name for d in silo_dirs])

    @property
    def masks(self) -> list[np.ndarray | None]:
        """Each silo's loss mask (None: every token is trained on), for DP-SGD's records."""
        return [c.mask if c is not None else None for c in self.chats] or [None] * len(self.splits)

    def truncated(self, seq_len: int) -> dict[str, int]:
        """Per chat silo, its conversations longer than a window (their tails are not trained)."""
        return {n: c.truncated(seq_len) for n, c in zip(self.names, self.chats, strict=True)
                if c is not None and c.truncated(seq_len)}

    def _sample(self, s: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        chat = self.chats[s] if self.chats else None
        if chat is not None:
            return sample_chat_batch(self.splits[s], chat, batch_size=batch_size, seq_len=seq_len,
                                     generator=self.generator)
        return sample_batch(self.splits[s], batch_size=batch_size, seq_len=seq_len, generator=self.generator)

    def next(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.splits) == 1:
            return self._sample(0, batch_size, seq_len)
        # pooled: each row comes from a silo drawn in proportion to its tokens
        rows = torch.multinomial(self.weights, batch_size, replacement=True, generator=self.generator)
        xs, ys = [], []
        for s in range(len(self.splits)):
            n = int((rows == s).sum())
            if n:
                x, y = self._sample(s, n, seq_len)
                xs.append(x)
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)


def _check_one_template(silo_dirs: Sequence[Path]) -> None:
    """UserError when the chat silos of one run were formatted with different chat templates, or
    with another template than their workspace's (installed again since they were sharded)."""
    from fedlm.data.chat import template_path, template_sha256
    from fedlm.data.shards import read_meta

    seen: dict[str, str] = {}
    for d in silo_dirs:
        sha = read_meta(d).get("chat", {}).get("template_sha256")
        if sha is None:
            continue
        seen.setdefault(sha, Path(d).name)
        current = template_path(Path(d).parent.parent)
        if current.is_file() and template_sha256(current.read_text(encoding="utf-8")) != sha:
            raise UserError(f"silo {Path(d).name!r} was formatted with another chat template than {current}: "
                            f"re-run `fedlm data shard --workspace {Path(d).parent.parent} --silo {Path(d).name}`")
    if len(seen) > 1:
        (a_sha, a), (b_sha, b) = list(seen.items())[:2]
        raise UserError(f"silos {a!r} and {b!r} were formatted with different chat templates "
                        f"({a_sha[:12]}… vs {b_sha[:12]}…): shard every silo of the run with one workspace "
                        "tokenizer (`fedlm data tokenizer --from-model`, then `fedlm data shard`)")


# ---------------------------------------------------------------------------------------
# optimisation


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays the weight matrices, the (tied) embedding among them, and not the norms."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), foreach=True)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as named arrays: `exp_avg.NAME` and `exp_avg_sq.NAME` per trained parameter, `step`."""
    out: dict[str, torch.Tensor] = {}
    step = 0.0
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if state:
            out[f"exp_avg.{name}"] = state["exp_avg"].detach().to("cpu", copy=True)  # passed on (cyclic)
            out[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().to("cpu", copy=True)
            step = float(state["step"])
    out["step"] = torch.tensor(step, dtype=torch.float32)
    return out


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, torch.Tensor]) -> None:
    """Restore what `optimizer_state` wrote (KeyError/ValueError when it does not fit the model)."""
    step = state["step"].to(torch.float32).reshape(())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m, v = state[f"exp_avg.{name}"], state[f"exp_avg_sq.{name}"]
        if m.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"optimizer state for {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
        optimizer.state[p] = {"step": step.clone(), "exp_avg": m.to(p.device, p.dtype, copy=True),
                              "exp_avg_sq": v.to(p.device, p.dtype, copy=True)}


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then cosine decay to tc.min_lr at tc.steps (step counts from 0)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """Mean next-token cross-entropy on the model's device (the batch is moved there; bf16 autocast
    on its device type); the model's chunked head never holds the (B*T, V) logits."""
    device = module_device(model)
    with autocast(device, precision):
        return model(x.to(device, non_blocking=True), targets=y.to(device, non_blocking=True))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    grad_accum: int,
    grad_clip: float,
    precision: str,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; returns loss and grad norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = accumulate_grad(model, next_batch, grad_accum=grad_accum, precision=precision, extra_loss=extra_loss)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))  # type: ignore[union-attr]
    optimizer.step()
    return {"loss": total, "grad_norm": norm}


def accumulate_grad(
    model: torch.nn.Module,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    grad_accum: int,
    precision: str,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> float:
    """Fresh gradients of the mean loss over `grad_accum` micro-batches in `.grad`; returns that loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(grad_accum):
        x, y = next_batch()
        loss = lm_loss(model, x, y, precision) / grad_accum
        if extra_loss is not None:
            loss = loss + extra_loss() / grad_accum
        loss.backward()
        total += float(loss.detach())
    if not math.isfinite(total):
        raise FloatingPointError(f"loss is {total}; lower train.lr or use train.precision = 'fp32'")
    return total


@torch.no_grad()
def val_loss(model: torch.nn.Module, splits: Sequence[np.ndarray], *, batches: int, batch_size: int,
             seq_len: int, precision: str, seed: int = 0,
             chats: Sequence[ChatIndex | None] | None = None) -> float:
    """Mean over the splits of each one's loss; a chat split (`chats[i]`, from `open_chat`) is scored
    as it is trained, on its answers' tokens only. A split whose windows number at most `batches` ×
    `batch_size` is scored whole, each target once (exact, and cheaper than the sample); a larger
    one on a fixed (seeded) sample of that many windows."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    means = []
    for i, tokens in enumerate(splits):
        chat = chats[i] if chats else None
        if (len(tokens) <= seq_len and chat is None) or len(tokens) < 2:
            continue
        spans = chat_spans(chat, seq_len) if chat is not None else None
        whole = len(spans) if spans is not None else -(-(len(tokens) - 1) // seq_len)
        if whole <= batches * batch_size:
            windows = (iter_chat_windows(tokens, chat, seq_len=seq_len, batch_size=batch_size, spans=spans)
                       if chat is not None else iter_eval_windows(tokens, seq_len=seq_len, batch_size=batch_size))
            exact = _exact_loss(model, windows, precision)
            means += [] if exact is None else [exact]
            continue
        losses = []
        for _ in range(batches):
            if chat is not None:
                x, y = sample_chat_batch(tokens, chat, batch_size=batch_size, seq_len=seq_len, generator=gen)
            else:
                x, y = sample_batch(tokens, batch_size=batch_size, seq_len=seq_len, generator=gen)
            losses.append(float(lm_loss(model, x, y, precision)))
        means.append(float(np.mean(losses)))
    model.train(was_training)
    return float(np.mean(means)) if means else float("nan")


def _exact_loss(model: torch.nn.Module, windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
                precision: str) -> float | None:
    """The mean loss over every target of `windows` (None without one)."""
    total, count = 0.0, 0
    for x, y in windows:
        k = int((y != IGNORE).sum())
        if k:
            total += float(lm_loss(model, x, y, precision)) * k
            count += k
    return total / count if count else None


def load_global(model: torch.nn.Module, global_state: dict[str, torch.Tensor]) -> set[str]:
    """Load the round's global weights into `model` (train mode); returns the frozen names, not loaded.

    A frozen LoRA base is the model's own and is not reloaded: in one process the silos share it,
    and writing it would bump its autograd version under another silo's backward pass."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in global_state.items() if k not in frozen}, strict=not frozen)
    if unexpected or set(missing) - frozen:
        raise KeyError(f"global state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.train()
    return frozen


def local_update(
    model: torch.nn.Module,
    global_state: dict[str, torch.Tensor],
    data: SiloBatches,
    tc: TrainConfig,
    *,
    first_step: int,
    steps: int,
    prox_mu: float = 0.0,
    dp_plan: RecordPlan | None = None,
    carry: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train `steps` steps from the global weights; return the update (local − global) and metrics.

    Stateless between calls (a fresh AdamW each time), so a silo can run in a fresh process
    each round; with `carry` (cyclic weight transfer) the AdamW state starts from it when it is
    not empty and is written back to it, so successive calls are one optimizer's run. The learning rate follows tc's schedule at `first_step + i`; the caller seeds
    `data.generator` (e.g. from seed, silo and round) so the run is reproducible. With
    `prox_mu` > 0 the FedProx term (mu/2)·||w − w_global||² is added to the loss. With
    `dp_plan`, the steps are record-level DP-SGD (`fedlm.privacy.dpsgd`) on Poisson-sampled
    windows of the silo's split; num_tokens is then the expected count (it must not leak N).
    """
    global_state = _on(model, global_state)  # the update is taken on the model's device
    frozen = load_global(model, global_state)
    optimizer = make_optimizer(model, tc)
    if carry:
        load_optimizer_state(model, optimizer, carry)
    if dp_plan is not None:  # record-level DP: Opacus per-sample clipping + noise, Poisson sampling
        t0 = time.perf_counter()
        records = PoissonRecords(data.splits, seq_len=tc.seq_len, sample_rate=dp_plan.sample_rate,
                                 generator=data.generator, masks=data.masks)
        dp_losses = dp_train_steps(model, optimizer, records, plan=dp_plan, precision=tc.precision,
                                   lrs=[lr_at(first_step + i, tc) for i in range(steps)])
        local = model.state_dict()
        return to_cpu({name: local[name] - global_state[name] for name in global_state}), {
            "loss": float(np.nanmean(dp_losses)) if not all(map(math.isnan, dp_losses)) else float("nan"),
            "num_tokens": float(steps * dp_plan.expected_batch_size * tc.seq_len),
            "train_seconds": time.perf_counter() - t0,
            "dp_noise_multiplier": dp_plan.noise_multiplier, "dp_sample_rate": dp_plan.sample_rate,
            "dp_steps": float(steps),
        }
    anchors = [global_state[name].detach() for name, _ in model.named_parameters()]

    def proximal() -> torch.Tensor:
        params = list(model.parameters())
        return 0.5 * prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))  # type: ignore[return-value]

    t0 = time.perf_counter()
    losses = []
    for i in range(steps):
        row = train_step(
            model, optimizer, lambda: data.next(tc.batch_size, tc.seq_len),
            lr=lr_at(first_step + i, tc), grad_accum=tc.grad_accum, grad_clip=tc.grad_clip,
            precision=tc.precision, extra_loss=proximal if prox_mu > 0 else None,
        )
        losses.append(row["loss"])
    if carry is not None:
        carry.clear()
        carry.update(optimizer_state(model, optimizer))
    local = model.state_dict()
    update = to_cpu({name: local[name] - global_state[name] for name in global_state if name not in frozen})
    num_tokens = steps * tc.grad_accum * tc.batch_size * tc.seq_len
    return update, {
        "loss": float(np.mean(losses)),
        "num_tokens": float(num_tokens),
        "train_seconds": time.perf_counter() - t0,
    }


def _on(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` on the model's device (the global weights arrive on the CPU, from the wire)."""
    device = module_device(model)
    return {name: t.to(device, non_blocking=True) for name, t in state.items()}


def silo_gradient(
    model: torch.nn.Module, global_state: dict[str, torch.Tensor], data: SiloBatches, tc: TrainConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """fedsgd's local work: −(the mean-loss gradient) at the global weights over one batch of
    tc.grad_accum × tc.batch_size windows, and metrics. No optimizer and no clipping here: the
    server clips the silos' mean and steps AdamW on it (`ServerAdamW`)."""
    global_state = _on(model, global_state)
    frozen = load_global(model, global_state)
    t0 = time.perf_counter()
    total = accumulate_grad(model, lambda: data.next(tc.batch_size, tc.seq_len), grad_accum=tc.grad_accum,
                            precision=tc.precision)
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    update = to_cpu({n: -grads[n] if n in grads else torch.zeros_like(global_state[n])
                     for n in global_state if n not in frozen})
    model.zero_grad(set_to_none=True)
    return update, {
        "loss": total,
        "num_tokens": float(tc.grad_accum * tc.batch_size * tc.seq_len),
        "train_seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors (no pickle), JSON for the rest


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: all (`stored_state`), or only the trained ones when some are
    frozen (a LoRA base: `build_model` makes it again, from train.init_from or the seed)."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    state = stored_state(model)  # type: ignore[arg-type]
    return {n: t for n, t in state.items() if n not in frozen} if frozen else state


def save_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, generator: torch.Generator) -> None:
    """Write model, optimizer, RNG and data position; replaces the old checkpoint atomically."""
    opt_state = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            opt_tensors[f"{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    with atomic_dir(ckpt_dir) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint_state(model).items()},
                  str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(
            {"torch_rng": torch.get_rng_state(), "data_rng": generator.get_state()},
            str(tmp / "rng.safetensors"),
        )
        write_json(tmp / "state.json", {"step": step, "param_groups": opt_state["param_groups"]})


def load_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns state.json (with "step")."""
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
        weights = load_file(str(ckpt_dir / "model.safetensors"))
        opt_tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
        rng = load_file(str(ckpt_dir / "rng.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt_dir}: checkpoint is missing or corrupt ({e}); start without --resume") from None
    assign_tensors(checkpoint_state(model), weights, where=f"{ckpt_dir}/model.safetensors")
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng["torch_rng"])
    generator.set_state(rng["data_rng"])
    return state


def save_run_model(model: Transformer, cfg: Config, model_dir: Path, *, tokenizer_path: Path) -> None:
    """RUN/model: a LoRA run over train.init_from keeps its adapters and names the base (MBs, not
    the base's weights again: `fedlm.lora.save_adapters`); any other run its (merged) weights."""
    if has_lora(model) and cfg.train.init_from:
        save_adapters(model, model_dir, base=base_reference(cfg.train.init_from), tokenizer_path=tokenizer_path)
    else:
        save_model(plain_model(model), model_dir, tokenizer_path=tokenizer_path)


# ---------------------------------------------------------------------------------------
# the run


def build_model(cfg: Config, *, device: torch.device | str = "cpu") -> Transformer:
    """The model a run starts from: fresh (seeded from cfg.train.seed, shaped by `resolve_model`) or
    `train.init_from`'s weights, with LoRA adapters when lora.rank > 0, on `device` (weights drawn
    on the CPU, so every device starts from the same ones). Changes nothing in `cfg`.

    With init_from, the model's own shape is the one `resolve_model` reads from its header, and
    its tokenizer must be the workspace's.
    """
    device = torch.device(device)
    if cfg.train.init_from:
        model = _pretrained(cfg, device)
    else:
        model = Transformer(resolve_model(cfg), seed=cfg.train.seed).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.lora.rank > 0:  # only the adapters train (and, federated, cross the wire)
        apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                   targets=cfg.lora.targets, seed=cfg.train.seed + 1)  # A: the same on every silo and the server
    return model


def _pretrained(cfg: Config, device: torch.device) -> Transformer:
    """A copy of the model train.init_from names (a run/model/HF dir, a .gguf or "smollm2") on `device`,
    checked against the workspace's tokenizer. A LoRA base is frozen, so its copies share memory."""
    model, tok = load_pretrained(cfg.train.init_from, share_frozen=cfg.lora.rank > 0, device=device)
    ws_tok = Path(cfg.data.workspace) / "tokenizer.json"
    if tok is not None and ws_tok.exists() and tokenizer_json_hash(tok) != tokenizer_hash(ws_tok):
        raise UserError(
            f"train.init_from = {cfg.train.init_from!r} uses another tokenizer than {ws_tok}; "
            f"shard the workspace with the model's tokenizer (`fedlm data tokenizer --workspace "
            f"{cfg.data.workspace} --from-model {cfg.train.init_from}`, then `fedlm data shard`)"
        )
    # a model may have more rows than its tokenizer has tokens (Qwen2.5 pads its embedding to a multiple of 128)
    if ws_tok.exists() and model.cfg.vocab_size < (vocab := load_tokenizer(ws_tok).get_vocab_size()):
        raise UserError(f"the model has {model.cfg.vocab_size} tokens, fewer than the workspace tokenizer's {vocab}")
    return model.train()


def train(cfg: Config, out_dir: Path, *, resume: bool = False, on_step: StepCallback | None = None,
          noise_stream: str | None = None) -> dict[str, Any]:
    """Train one model on the config's silos (pooled); returns a summary. Ctrl-C checkpoints first.
    `noise_stream`: a DP-SGD run's stream name under the data holder's key (default: a fresh random one);
    the same name trains the same model, so a request repeated is the same release."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)  # a device this machine lacks is named before anything runs
    workspace = Path(cfg.data.workspace)
    tok_path = workspace / "tokenizer.json"
    load_tokenizer(tok_path)  # a missing or broken tokenizer is named before anything else
    tok_sha = tokenizer_hash(tok_path)
    cfg = resolve_config(cfg)  # what config.toml records: the model's vocabulary, init_from's shape
    silo_dirs = [workspace / "silos" / s for s in resolve_silos(workspace, cfg.data.silos)]
    model = build_model(cfg, device=device)
    model.train()
    optimizer = make_optimizer(model, tc)  # its state is made on the parameters' device
    data = SiloBatches.open(silo_dirs, seed=tc.seed, tokenizer_sha256=tok_sha)
    val_splits = [open_split(d, "val", expect_tokenizer_sha256=tok_sha) for d in silo_dirs]
    val_chats = [open_chat(d, "val") for d in silo_dirs]
    dp_plan = None
    if cfg.privacy.mode == "record":  # DP-SGD over Poisson-sampled windows of the (pooled) silos
        dp_plan = plan_record_dp(
            num_records=sum(num_records(len(s), tc.seq_len) for s in data.splits), batch_size=tc.batch_size,
            steps=tc.steps, privacy=cfg.privacy, where="+".join(d.name for d in silo_dirs))

    ckpt_dir = out_dir / "checkpoint"
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    if resume:
        if not recover_dir(ckpt_dir):  # a swap cut by a kill: the previous checkpoint
            raise UserError(f"{out_dir}: no checkpoint to resume from; run without --resume")
        check_resume_config(cfg, out_dir / "config.toml")
        restored = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, generator=data.generator)
        start = int(restored["step"])
        truncate_jsonl(metrics_path, key="step", upto=start)
        if start >= tc.steps and (out_dir / "summary.json").exists() and (out_dir / "model").exists():
            return dict(json.loads((out_dir / "summary.json").read_text()))  # already complete
    else:
        if recover_dir(ckpt_dir):
            raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    save_config(cfg, out_dir / "config.toml")

    stream = ""  # a DP-SGD run's public stream name (its key stays in the workspace)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, step=step, generator=data.generator)
        if dp_plan is not None:
            write_json(out_dir / "privacy.json", privacy_record(dp_plan, steps_done=step,
                                                               silos=[d.name for d in silo_dirs],
                                                               seq_len=tc.seq_len, stream=stream))

    dp = records = None
    if dp_plan is not None:  # secret sampling and noise: the data holder's key, one stream per step
        noise_key = party_key(insecure=cfg.privacy.insecure_reproducible_noise, seed=tc.seed, who="train",
                              owner_dir=workspace)
        stream = noise_stream or stream_name(out_dir, resume=resume)
        records = PoissonRecords(data.splits, seq_len=tc.seq_len, sample_rate=dp_plan.sample_rate,
                                 generator=torch.Generator(), masks=data.masks)
        dp = DPSGD(model, optimizer, plan=dp_plan, generator=records.generator)

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    step = start
    t0 = time.perf_counter()
    last = {"loss": float("nan"), "grad_norm": float("nan")}
    with _interrupt_flag() as interrupted:
        while step < tc.steps:
            t_step = time.perf_counter()
            if dp is not None and records is not None:
                restart_stream(records.generator, noise_key, stream, step)
                last = {"loss": dp.step(*records.next(), lr=lr_at(step, tc), precision=tc.precision),
                        "grad_norm": float("nan")}  # the clean gradient's norm is not released
            else:
                last = train_step(
                    model, optimizer, lambda: data.next(tc.batch_size, tc.seq_len),
                    lr=lr_at(step, tc), grad_accum=tc.grad_accum, grad_clip=tc.grad_clip,
                    precision=tc.precision,
                )
            step += 1
            row = {**last, "step": step, "lr": lr_at(step - 1, tc),
                   "tokens_per_s": tokens_per_step / (time.perf_counter() - t_step)}
            if step % tc.log_every == 0 or step == tc.steps:
                append_jsonl(metrics_path, row)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                row["val_loss"] = val_loss(model, val_splits, batches=tc.eval_batches,
                                           batch_size=tc.batch_size, seq_len=tc.seq_len,
                                           precision=tc.precision, chats=val_chats)
                append_jsonl(metrics_path, {"step": step, "val_loss": row["val_loss"]})
                checkpoint(step)
            if on_step is not None:
                on_step(step, tc.steps, row)
            if interrupted():
                checkpoint(step)
                raise UserError(
                    f"interrupted at step {step}/{tc.steps}; checkpoint saved — resume with "
                    f"`fedlm train {out_dir / 'config.toml'} --resume`"
                )
    elapsed = time.perf_counter() - t0
    if dp is not None:
        dp.close()  # the plain model again: same names, generates
    save_run_model(model, cfg, out_dir / "model", tokenizer_path=tok_path)
    summary = {
        "steps": step,
        "loss": last["loss"],
        "seconds": elapsed,
        "tokens": (step - start) * tokens_per_step,
        "tokens_per_s": (step - start) * tokens_per_step / max(elapsed, 1e-9),
        "silos": [d.name for d in silo_dirs],
    }
    if truncated := data.truncated(tc.seq_len):  # never silently: the CLI prints it
        summary["truncated_conversations"] = truncated
    write_json(out_dir / "summary.json", summary)
    return summary


@contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """Turn Ctrl-C into a flag checked between steps, so a checkpoint never holds half a step."""
    hit = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield hit.is_set
        return
    previous = signal.signal(signal.SIGINT, lambda *_: hit.set())
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def train_local_only(cfg: Config, out_dir: Path, *, resume: bool = False,
                     on_step: StepCallback | None = None) -> dict[str, Any]:
    """The local-only baseline: each silo trains alone, with the config's steps, in out_dir/local-SILO."""
    workspace = Path(cfg.data.workspace)
    silo_dirs = [workspace / "silos" / s for s in resolve_silos(workspace, cfg.data.silos)]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.toml")
    runs = {}
    for d in silo_dirs:
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, silos=[d.name]))
        run = out_dir / f"local-{d.name}"
        runs[d.name] = train(one, run, resume=resume and (run / "checkpoint").exists(), on_step=on_step)
    summary = {"mode": "local-only", "runs": {silo: str(out_dir / f"local-{silo}") for silo in runs},
               "steps": cfg.train.steps, "loss": float(np.mean([r["loss"] for r in runs.values()])),
               "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in runs.values()]))}
    write_json(out_dir / "summary.json", summary)
    return summary


def personalise(cfg: Config, run_dir: Path, *, on_step: StepCallback | None = None) -> dict[str, Path]:
    """Each silo fine-tunes the run's model for federation.personalise_steps steps on its own shards.

    Writes run_dir/personalised-SILO (a run directory each); returns them by silo. In a
    deployment this step runs at each silo; here every silo of the workspace runs in turn.
    """
    steps = cfg.federation.personalise_steps
    # a fresh AdamW's first steps move every weight by about lr whatever its gradient; warming up
    # over a third of the steps spares the trained model that jolt
    warmup = max(1, steps // 3)
    out: dict[str, Path] = {}
    workspace = Path(cfg.data.workspace)
    for d in (workspace / "silos" / s for s in resolve_silos(workspace, cfg.data.silos)):
        tc = dataclasses.replace(cfg.train, steps=steps, warmup_steps=warmup, checkpoint_every=steps,
                                 log_every=min(cfg.train.log_every, steps), mode="centralised",
                                 init_from=str(run_dir / "model"), init_sha256="")  # pinned afresh
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, silos=[d.name]), train=tc)
        out[d.name] = run_dir / f"personalised-{d.name}"
        train(one, out[d.name], on_step=on_step)
    return out
