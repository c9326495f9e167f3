"""The `fedlm` command: one subcommand per user task (see DESIGN.md for the contract).

Bad input raises `UserError`; `main` prints its one line and exits 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fedlm.errors import UserError
from fedlm.progress import console, progress_bar, status

app = typer.Typer(
    name="fedlm",
    help="Train one language model across data silos without moving their text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare silo data: clean, agree a tokenizer, shard.", no_args_is_help=True)
app.add_typer(data_app, name="data")
silo_app = typer.Typer(help="Silo identities: a key on each silo, the registry on the coordinator.",
                       no_args_is_help=True)
app.add_typer(silo_app, name="silo")

_out = typer.echo
_MODEL_HELP = 'Run or model directory, a Hugging Face Llama directory, a .gguf file, or "smollm2".'
_DEVICE_HELP = 'auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.'


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """fedlm: federated training, evaluation and serving of Transformer language models."""


# ---------------------------------------------------------------------------------------
# data


@data_app.command("prepare")
def data_prepare(
    sources: Annotated[list[Path], typer.Argument(help="Files or folders of .txt .md .rst .jsonl .csv .parquet")],
    silo: Annotated[str, typer.Option(help="Name of the silo to write.")],
    workspace: Annotated[Path, typer.Option(help="Workspace directory (WS/silos/NAME is written).")],
    text_field: Annotated[str, typer.Option(help="JSONL field holding the text.")] = "text",
    text_column: Annotated[str, typer.Option(help="CSV/Parquet column holding the text.")] = "text",
    near_dup_threshold: Annotated[float, typer.Option(help="MinHash Jaccard threshold for near duplicates.")] = 0.8,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Rebuild an existing silo from these sources alone (its documents and shards go).")] = False,
    min_chars: Annotated[int, typer.Option(help="Filter: drop documents with fewer non-space characters.")] = 8,
    max_symbol_ratio: Annotated[float, typer.Option(
        help="Filter: drop documents whose share of punctuation/symbols (of non-space characters) is above this.")] = 0.5,
    max_repeated_lines_ratio: Annotated[float, typer.Option(
        help="Filter: drop documents (>= 6 lines) whose share of characters in repeated lines is above this.")] = 0.6,
) -> None:
    """Read, normalise, PII-scrub, deduplicate and filter raw files or instruction data
    (messages, prompt/response, Alpaca records) into a silo (+ card.json)."""
    from fedlm.data.prepare import prepare_silo

    _check_silo_name(silo)
    with progress_bar(f"prepare {silo}", unit="bytes") as update:
        card = prepare_silo(
            list(sources), silo=silo, workspace=workspace, text_field=text_field,
            text_column=text_column, near_dup_threshold=near_dup_threshold, on_progress=update,
            replace=replace, min_chars=min_chars, max_symbol_ratio=max_symbol_ratio,
            max_repeated_lines_ratio=max_repeated_lines_ratio,
        )
    for err in card.get("errors", []):
        console.print(f"[yellow]skipped[/] {escape(err['path'])}: {escape(err['reason'])}", highlight=False)
    if card.get("filtered"):
        console.print(f"[yellow]filtered out[/] {_filtered_line(card)}", highlight=False, soft_wrap=True)
    if card.get("conversations_in"):
        _out(f"{silo}: {card['conversations']}/{card['conversations_in']} conversations kept")
    dups = card.get("duplicates_removed", {})
    _out(
        f"{silo}: {card['documents_out']}/{card['documents_in']} documents kept, "
        f"{card['bytes_out']:,} bytes; PII replaced: {sum(card.get('pii', {}).values())}; "
        f"duplicates removed: {sum(dups.values()) if isinstance(dups, dict) else dups}; "
        f"errors: {len(card.get('errors', []))} -> {workspace / 'silos' / silo}"
    )


_FILTER_FLAGS = {"too_short": ("fewer non-space characters than --min-chars", "min_chars"),
                 "symbols": ("symbols above --max-symbol-ratio", "max_symbol_ratio"),
                 "repeated_lines": ("repeated lines above --max-repeated-lines-ratio", "max_repeated_lines_ratio"),
                 "empty_turn": ("a conversation turn empty after cleaning", "")}


def _filtered_line(card: dict[str, Any]) -> str:
    """The filter's removals by reason, each with the flag (and value) that decided it."""
    limits = card.get("filter_thresholds", {})
    parts = []
    for reason, n in card["filtered"].items():
        why, key = _FILTER_FLAGS.get(reason, (reason, ""))
        parts.append(f"{n} {reason} ({why}{f' = {limits[key]}' if key in limits else ''})")
    return f"{sum(card['filtered'].values())} of {card['documents_in']} documents: " + ", ".join(parts)


@data_app.command("tokenizer")
def data_tokenizer(
    workspace: Annotated[Path, typer.Option(help="Workspace whose silos agree on the tokenizer.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 4096,
    epsilon: Annotated[float | None, typer.Option(help="Per-silo ε for the private counts; omit for exact counts.")] = None,
    delta: Annotated[float, typer.Option(help="Per-silo δ for the private counts.")] = 1e-6,
    seed: Annotated[int | None, typer.Option(help="Seed for the privacy noise (tests only).")] = None,
    counts: Annotated[list[Path] | None, typer.Option(
        "--counts", help="Silos on other machines: one `fedlm data counts` file per silo (repeat).")] = None,
    from_model: Annotated[str | None, typer.Option(
        "--from-model", help="Use this model's tokenizer instead (smollm2, a .gguf or a model dir): fine-tuning.")] = None,
) -> None:
    """Agree one byte-level BPE tokenizer from each silo's privatised pre-token counts."""
    from fedlm.data.tokenizer import agree_tokenizer, agree_tokenizer_from_counts

    if from_model:  # no counts leave the silos: the pretrained model's tokenizer is public
        from fedlm.pretrained import write_model_tokenizer

        _out(f"tokenizer of {from_model} -> {write_model_tokenizer(workspace, from_model)}; now `fedlm data shard`")
        from fedlm.data.chat import template_path

        if not template_path(workspace).is_file():
            console.print(f"[yellow]note:[/] {escape(from_model)} has no chat template: silos of instruction "
                          "data cannot be sharded with it (raw-text silos can)", highlight=False, soft_wrap=True)
        return
    if counts:
        if epsilon is not None or seed is not None:
            raise UserError("--epsilon/--seed apply where counts are made (`fedlm data counts`), not with --counts")
        record = agree_tokenizer_from_counts(workspace, list(counts), vocab_size=vocab_size)
        for silo, rec in record["silos"].items():
            _out(_released_line(silo, rec))
        _out(f"tokenizer -> {workspace / 'tokenizer.json'} ({_vocab_note(record)}); send it to every silo")
        return
    with progress_bar("count + train BPE") as update:
        record = agree_tokenizer(workspace, vocab_size=vocab_size, epsilon=epsilon, delta=delta,
                                 seed=seed, on_progress=update)
    if epsilon is None:
        _out("exact counts, no privacy: each silo released its exact pre-token counts")
    for silo, rec in record.get("silos", {}).items():
        if epsilon is not None:
            _out(_released_line(silo, rec))
    _out(f"tokenizer -> {workspace / 'tokenizer.json'} ({_vocab_note(record)})")


def _released_line(silo: str, rec: dict[str, Any]) -> str:
    """One silo's line of WS/tokenizer_privacy.json: its ε, δ and how many pre-tokens it released."""
    return f"{silo}: ε = {rec.get('epsilon')}, δ = {rec.get('delta')}, released {rec['released_pretokens']:,} pre-tokens"


def _vocab_note(record: dict[str, Any]) -> str:
    """The vocabulary the tokenizer got, and the size asked when the released counts gave fewer merges."""
    got, asked = int(record["vocab_size"]), int(record["vocab_size_requested"])
    if got < asked:
        return f"vocab {got:,}; {asked:,} asked, but the released pre-tokens support no more merges"
    return f"vocab {got:,}"


@data_app.command("counts")
def data_counts(
    workspace: Annotated[Path, typer.Option(help="This silo's workspace (WS/silos/NAME/docs.jsonl).")],
    silo: Annotated[str, typer.Option(help="The silo whose counts to release.")],
    out: Annotated[Path, typer.Option(help="JSON file to send to the coordinator.")],
    epsilon: Annotated[float | None, typer.Option(help="ε for the private counts; omit for exact counts.")] = None,
    delta: Annotated[float, typer.Option(help="δ for the private counts.")] = 1e-6,
) -> None:
    """Release this silo's pre-token counts for a tokenizer agreed across machines."""
    from fedlm.data.tokenizer import release_silo_counts
    from fedlm.fileio import write_json

    _check_silo_name(silo)
    released = release_silo_counts(workspace, silo, epsilon=epsilon, delta=delta)
    write_json(out, released)
    rec = released["privacy"]
    privacy = "exact counts, no privacy" if epsilon is None else f"ε = {rec['epsilon']}, δ = {rec['delta']}"
    _out(f"{silo}: {len(released['counts']):,} pre-tokens ({privacy}) -> {out}; send it to the coordinator")


@data_app.command("shard")
def data_shard(
    workspace: Annotated[Path, typer.Option(help="Workspace with tokenizer.json and prepared silos.")],
    silo: Annotated[str | None, typer.Option(help="Shard only this silo (default: all).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents held out for validation.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
) -> None:
    """Tokenize silos into train.bin / val.bin memmaps + meta.json."""
    from fedlm.data.shards import list_silos, shard_silo

    silos = [silo] if silo else list_silos(workspace)
    if not silos:
        raise UserError(f"{workspace}: no prepared silos; run `fedlm data prepare` first")
    for name in silos:
        with progress_bar(f"shard {name}", unit="bytes") as update:
            meta = shard_silo(workspace, name, val_fraction=val_fraction, seed=seed, on_progress=update)
        _out(f"{name}: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val tokens ({meta['dtype']})")
        if "chat" in meta:
            _chat_lines(name, meta["chat"], workspace)


@data_app.command("canaries")
def data_canaries(
    workspace: Annotated[Path, typer.Option(help="Workspace holding the prepared silo.")],
    silo: Annotated[str, typer.Option(help="Silo whose training text gets the canaries.")],
    repeats: Annotated[str, typer.Option(help="Comma-separated repeat counts, one canary each.")] = "1,10",
    seed: Annotated[int, typer.Option(help="Seed of the secrets and their places.")] = 0,
) -> None:
    """Plant random canaries in a silo's documents (before `data shard`) for `fedlm audit`."""
    from fedlm.privacy.audit import plant_canaries

    try:
        counts = [int(r) for r in repeats.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--repeats {repeats!r}: expected comma-separated integers, e.g. 1,10") from None
    if not counts or min(counts) <= 0:
        raise UserError(f"--repeats {repeats!r}: each repeat count must be > 0")
    planted = plant_canaries(workspace / "silos" / silo, repeats=counts, seed=seed)
    _out(f"{silo}: planted {len(planted)} canaries (repeats {', '.join(map(str, counts))}); "
         f"re-run `fedlm data shard --workspace {workspace} --silo {silo}`, then train and `fedlm audit`")


FEW_HELD_OUT = 20
"""Fewer held-out questions than this and exact match moves in steps of over 5%: shard says so."""


def _chat_lines(name: str, chat: dict[str, Any], workspace: Path) -> None:
    """A chat silo's conversations per split, and those skipped (by reason and first lines)."""
    conv = chat["conversations"]
    _out(f"{name}: {conv['train']:,} train / {conv['val']:,} held-out conversations in the model's chat "
         f"template ({chat['answer_tokens']['train']:,} answer tokens trained on; the longest conversation is "
         f"{chat['conversation_tokens']['max']:,} tokens: a smaller train.seq_len cuts it)")
    if conv["val"] < FEW_HELD_OUT:
        console.print(f"[yellow]{name}: only {conv['val']} held-out questions to score answers on[/]; "
                      "a larger `fedlm data shard --val-fraction` holds out more")
    for skip in chat.get("skipped", []):
        lines = ", ".join(map(str, skip["first_lines"]))
        console.print(f"[yellow]skipped[/] {skip['lines']} conversations of "
                      f"{escape(str(workspace / 'silos' / name / 'docs.jsonl'))} (lines {lines}"
                      f"{', ...' if skip['lines'] > len(skip['first_lines']) else ''}): {escape(skip['reason'])}",
                      highlight=False, soft_wrap=True)


def _check_silo_name(silo: str) -> None:
    if not silo or "/" in silo or silo.startswith("."):
        raise UserError(f"--silo {silo!r}: use a plain name (letters, digits, - and _)")


# ---------------------------------------------------------------------------------------
# train / eval / generate / export


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="TOML config (overrides of the defaults) or a run's config.toml.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out (default: the config's folder).")] = False,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<config>-<time>).")] = None,
    superlink: Annotated[str | None, typer.Option(
        help="127.0.0.1:PORT of `fedlm superlink --control-port PORT` (federation.engine = \"flower\"; run on its machine).")] = None,
    root_certificates: Annotated[Path | None, typer.Option(
        help="CA certificate (PEM) that signed the SuperLink's certificate.")] = None,
    insecure: Annotated[bool, typer.Option(help="Talk to --superlink without TLS (tests on loopback).")] = False,
) -> None:
    """Train on one silo, several pooled, or federated across silos, as the config says."""
    from fedlm.config import load_config
    from fedlm.train import train as run_train
    from fedlm.train import train_local_only

    cfg = load_config(config, set_ or [])
    if (superlink or root_certificates or insecure) and (
            cfg.train.mode != "federated" or cfg.federation.engine != "flower"):
        raise UserError("--superlink/--root-certificates/--insecure need train.mode = \"federated\" and "
                        "federation.engine = \"flower\"; add --set federation.engine=flower")
    if (root_certificates or insecure) and not superlink:
        raise UserError("--root-certificates/--insecure need --superlink HOST:PORT (without it fedlm starts "
                        "its own SuperLink on 127.0.0.1)")
    if not superlink:  # the silos train on this machine: a device it lacks is named before anything starts
        from fedlm.device import resolve_device

        resolve_device(cfg.train.device)
    if out is None:
        out = config.parent if resume else Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.train.mode == "federated":
        from fedlm.federation.runner import run_federated

        with progress_bar("federated", unit="rounds") as update:
            summary = run_federated(cfg, out, resume=resume, on_round=lambda r, n, row: update(r, n),
                                    superlink=superlink, root_certificates=root_certificates, insecure=insecure)
        rounds = summary.get("rounds", cfg.federation.rounds)
        _out(f"federated: {summary.get('rounds_completed', rounds)} of {rounds} rounds completed -> {out}")
        _out(f"report: fedlm report {out}")
        if _federated_outcome(summary, out):
            sys.exit(1)
        if cfg.federation.personalise_steps and superlink:  # the silos' data is on their machines, not here
            _out(f"personalise on each silo's machine (federation.personalise_steps = "
                 f"{cfg.federation.personalise_steps}): send it {out / 'config.toml'} and {out / 'model'} (into "
                 f"{out}), then: fedlm personalise {out} --workspace WS --silo NAME")
        elif cfg.federation.personalise_steps:
            _personalise(cfg, out)
        return
    with progress_bar("train", unit="steps") as update:
        def on_step(step: int, total: int, row: dict[str, float]) -> None:
            update(step, total, info=f"loss {row['loss']:.3f}")

        if cfg.train.mode == "local-only":
            summary = train_local_only(cfg, out, resume=resume, on_step=on_step)
        else:
            summary = run_train(cfg, out, resume=resume, on_step=on_step)
    _out(f"trained {summary['steps']} steps, final loss {summary['loss']:.4f}, "
         f"{summary['tokens_per_s']:,.0f} tokens/s -> {out}")
    for silo_name, n in summary.get("truncated_conversations", {}).items():
        console.print(f"[yellow]warning:[/] silo {silo_name!r}: {n} conversations are longer than train.seq_len = "
                      f"{cfg.train.seq_len} tokens and were cut to it (raise train.seq_len to train on them whole)",
                      highlight=False, soft_wrap=True)


def _federated_outcome(summary: dict[str, Any], out: Path) -> bool:
    """Print skipped rounds and silos left worse off; True when a round did not complete."""
    from fedlm.federation.outcome import incomplete, outcome_lines

    for line in outcome_lines(summary):
        console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)
    if not incomplete(summary):
        return False
    console.print(f"[red]error:[/] {summary['rounds'] - summary['rounds_completed']} of {summary['rounds']} "
                  f"rounds did not complete (see {out / 'rounds.jsonl'})", highlight=False, soft_wrap=True)
    return True


def _personalise(cfg: Any, run: Path) -> None:
    from fedlm.train import personalise

    with progress_bar("personalise", unit="steps") as update:
        done = personalise(cfg, run, on_step=lambda s, t, row: update(s, t))
    _out(f"personalised {len(done)} silo{'' if len(done) == 1 else 's'}: {', '.join(str(p) for p in done.values())}")


@app.command("personalise")
def personalise_(
    run: Annotated[Path, typer.Argument(help="A federated run's folder: its config.toml and model/ (on a silo's "
                                             "machine, copied from the coordinator).")],
    workspace: Annotated[Path, typer.Option(help="This machine's workspace (its sharded WS/silos/NAME).")],
    silo: Annotated[str, typer.Option(help="The silo whose data tunes the model.")],
    steps: Annotated[int | None, typer.Option(
        help="Training steps (default: the run's federation.personalise_steps).")] = None,
) -> None:
    """Tune a federated run's model further on one silo's own data alone (RUN/personalised-SILO):
    on a silo's machine after a run across machines, whose silos' data the coordinator never holds."""
    from fedlm.config import load_config

    _check_silo_name(silo)
    for need in (run / "config.toml", run / "model"):
        if not need.exists():
            raise UserError(f"{need}: not found; RUN is a federated run's folder with its config.toml and "
                            "model/ (copy both from the coordinator's run folder)")
    sets = [f"data.workspace={json.dumps(str(workspace))}", f"data.silos={json.dumps([silo])}"]
    if steps is not None:
        sets.append(f"federation.personalise_steps={steps}")
    cfg = load_config(run / "config.toml", sets)
    if cfg.federation.personalise_steps < 1:
        raise UserError(f"{run / 'config.toml'}: federation.personalise_steps = 0; give --steps N")
    if (run / f"personalised-{silo}").exists():  # train's own refusal would name flags this command lacks
        raise UserError(f"{run / f'personalised-{silo}'}: already holds a personalised model of silo {silo!r}; move "
                        "or remove it to personalise again")
    _personalise(cfg, run)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    data: Annotated[Path, typer.Option(help="Silo directory: WS/silos/NAME (sharded).")],
    split: Annotated[str, typer.Option(help="val or train.")] = "val",
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    max_questions: Annotated[int, typer.Option(
        help="Chat silos: answer at most this many held-out questions (0 = all).")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Chat silos: longest greedy answer, in tokens.")] = 64,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
) -> None:
    """Perplexity, bits per byte, next-token accuracy on a silo's validation split; on a chat
    silo also answer bits/byte and exact match of greedy answers to its held-out questions."""
    from fedlm.data.shards import open_chat
    from fedlm.device import resolve_device
    from fedlm.evaluate import answer_metrics, evaluate_silo
    from fedlm.pretrained import load_any

    if split not in ("val", "train"):
        raise UserError(f"--split {split!r}: use val or train")
    net, tok_path = load_any(model, device=resolve_device(device, key="--device"))
    with progress_bar("eval", unit="tokens") as update:
        result: dict[str, Any] = dict(evaluate_silo(net, tok_path, data, split=split, on_progress=update))
    if open_chat(data, split) is not None:  # type: ignore[arg-type]
        answers = answer_metrics(net, data, model_tokenizer=tok_path, split=split, max_questions=max_questions,
                                 max_new_tokens=max_new_tokens)
        result.update(answer_bits_per_byte=answers["answer_bits_per_byte"], exact_match=answers["exact_match"],
                      questions=answers["n"])
    if json_:
        _out(json.dumps(result))
    else:
        _out(f"perplexity {result['perplexity']:.3f}  bits/byte {result['bits_per_byte']:.4f}  "
             f"accuracy {result['token_accuracy']:.4f}  tokens {result['tokens']:,}")
        if "exact_match" in result:
            _out(f"answers: bits/byte {result['answer_bits_per_byte']:.4f}  exact match "
                 f"{result['exact_match']:.3f} over {result['questions']} held-out questions")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
) -> None:
    """Continue PROMPT, streaming tokens as they come."""
    from tokenizers import Tokenizer

    from fedlm.data.tokenizer import end_token_id
    from fedlm.device import resolve_device
    from fedlm.generate import generate as gen
    from fedlm.pretrained import load_any
    from fedlm.serve.text import TextDecoder

    if max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be > 0")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    net, tok_path = load_any(model, device=resolve_device(device, key="--device"))
    if tok_path is None:
        raise UserError(f"{model}: no tokenizer.json beside the model")
    tok = Tokenizer.from_file(str(tok_path))
    ids: list[int] = tok.encode(prompt).ids
    eos = end_token_id(tok)
    sys.stdout.write(prompt)
    text = TextDecoder(tok)  # holds back a token that ends inside a multi-byte character
    for token in gen(net, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, eos_id=eos, seed=seed):
        sys.stdout.write(text.push(token)[0])
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Directory to write.")],
    format: Annotated[str, typer.Option(help="Export format: hf (Hugging Face Llama).")] = "hf",
) -> None:
    """Export a model for other tools (hf: loads as transformers' LlamaForCausalLM)."""
    from fedlm.hf import export_hf
    from fedlm.pretrained import load_any

    if format != "hf":
        raise UserError(f"--format {format!r}: only 'hf' is supported")
    net, tok_path = load_any(model)
    export_hf(net, out, tokenizer_path=tok_path)
    _out(f"exported -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="A small run that finishes in about two minutes.")] = False,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("demo-out"),
    seed: Annotated[int, typer.Option(help="Seed of the weights and data order of every run.")] = 1337,
    assistant: Annotated[bool, typer.Option(
        "--assistant", help="Tune SmolLM2-135M-Instruct with federated LoRA on the bundled silos' "
        "questions and answers instead (default --out assistant-out).")] = False,
) -> None:
    """The whole flow on the bundled corpus: prepare, tokenizer, shard, train, evaluate, generate."""
    if assistant:
        from fedlm.assistant import run_assistant

        run_assistant(Path("assistant-out") if out == Path("demo-out") else out, quick=quick, seed=seed)
        return
    from fedlm.demo import run_demo

    run_demo(out, quick=quick, seed=seed)


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help=_MODEL_HELP)],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key_file: Annotated[Path | None, typer.Option(
        help="File holding the API key; then every endpoint but /health needs it.")] = None,
    quantize: Annotated[str, typer.Option(help="none, or int8 (dynamic, CPU).")] = "none",
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 16,
    max_concurrent: Annotated[int, typer.Option(help="Requests in flight; more get 429.")] = 64,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt, in tokens.")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask.")] = 1024,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: torch's).")] = None,
    body_timeout: Annotated[float, typer.Option(
        help="Seconds a client has to send its request body; then 408.")] = 10.0,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    model_name: Annotated[str | None, typer.Option(
        help="The model name clients ask for (default: the run folder's, the file's stem, or MODEL as given "
             "when it is a name such as smollm2).")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions, chat, streaming)."""
    from fedlm.serve.app import serve_forever

    if quantize not in ("none", "int8"):
        raise UserError(f"--quantize {quantize!r}: use 'none' or 'int8'")
    serve_forever(model, host=host, port=port, api_key_file=api_key_file,
                  quantize="int8" if quantize == "int8" else "none", max_batch=max_batch,
                  max_concurrent=max_concurrent, max_prompt_tokens=max_prompt_tokens,
                  max_tokens=max_tokens, threads=threads, body_timeout=body_timeout, device=device,
                  model_name=model_name)


@app.command()
def node(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the coordinator's SuperLink.")],
    workspace: Annotated[Path, typer.Option(help="This silo's workspace (sharded WS/silos/NAME).")],
    silo: Annotated[str, typer.Option(help="The silo this machine serves.")],
    root_certificates: Annotated[Path, typer.Option(
        help="CA certificate (PEM) that signed the SuperLink's certificate.")],
    key: Annotated[Path, typer.Option(help="This silo's private key (`fedlm silo key`), registered by the coordinator.")],
    port: Annotated[int | None, typer.Option(help="Local port for the SuperNode's ClientApp API (default: free).")] = None,
    peers: Annotated[Path | None, typer.Option(
        help="This silo's copy of the coordinator's silos.json (keys checked out of band): secure aggregation "
             "checks the other silos' round keys against it.")] = None,
) -> None:
    """Serve one silo to a federation: a Flower SuperNode that trains on its shards when asked."""
    from fedlm.federation.deploy import run_node

    _check_silo_name(silo)
    _out(f"silo {silo}: SuperNode for {superlink} (TLS, key {key}); Ctrl-C to stop")
    code = run_node(superlink, workspace, silo, root_certificates=root_certificates, key=key, port=port,
                    peers=peers)
    if code:
        raise typer.Exit(code)


@app.command()
def superlink(
    ssl_ca_certfile: Annotated[Path, typer.Option(help="CA certificate (PEM).")],
    ssl_certfile: Annotated[Path, typer.Option(help="The SuperLink's certificate (PEM), signed by the CA.")],
    ssl_keyfile: Annotated[Path, typer.Option(help="The SuperLink's private key (PEM).")],
    registry: Annotated[Path, typer.Option(help="The silos and their keys (`fedlm silo add`).")] = Path("silos.json"),
    host: Annotated[str, typer.Option(help="Address silos reach (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port silos' SuperNodes connect to (Fleet API only).")] = 9092,
    control_port: Annotated[int, typer.Option(
        help="Flower's own port, on 127.0.0.1 only: `fedlm train` and the ServerApp.")] = 9093,
) -> None:
    """Run the federation's coordinator: a Flower SuperLink behind a Fleet-only TLS proxy, until Ctrl-C."""
    from fedlm.federation.deploy import ServerTls, run_superlink

    tls = ServerTls(ssl_ca_certfile, ssl_certfile, ssl_keyfile)

    def ready(local: str, node_of: dict[str, int]) -> None:
        silos = ", ".join(f"{silo} (node {node})" for silo, node in sorted(node_of.items()))
        _out(f"SuperLink ready: silos connect to {host}:{port} (TLS, Fleet API only; registered: {silos}); "
             f"`fedlm train --superlink {local}` here; Ctrl-C to stop")

    code = run_superlink(host=host, port=port, control_port=control_port, tls=tls, registry=registry,
                         on_ready=ready)
    if code:
        raise typer.Exit(code)


@silo_app.command("key")
def silo_key(
    key: Annotated[Path, typer.Argument(help="Where to write the private key (KEY.pub beside it).")],
) -> None:
    """On a silo: make its SuperNode key; send KEY.pub to the coordinator, keep KEY on this machine."""
    from fedlm.federation.trust import make_silo_key

    pub = make_silo_key(key)
    _out(f"private key {key} (keep it here, used by `fedlm node --key`); send {pub} to the coordinator")


@silo_app.command("add")
def silo_add(
    name: Annotated[str, typer.Argument(help="The silo's name, as in the run config's data.silos.")],
    public_key: Annotated[Path, typer.Argument(help="The silo's public key (KEY.pub from `fedlm silo key`).")],
    registry: Annotated[Path, typer.Option(help="The coordinator's registry of silos.")] = Path("silos.json"),
) -> None:
    """On the coordinator: bind a silo's name to its key (takes effect when `fedlm superlink` starts)."""
    from fedlm.federation.trust import add_silo

    add_silo(registry, name, public_key)
    _out(f"silo {name} registered in {registry}; (re)start `fedlm superlink` for it to take effect")


@silo_app.command("remove")
def silo_remove(
    name: Annotated[str, typer.Argument(help="The silo to remove.")],
    registry: Annotated[Path, typer.Option(help="The coordinator's registry of silos.")] = Path("silos.json"),
) -> None:
    """On the coordinator: forget a silo's key (its node is refused once `fedlm superlink` restarts)."""
    from fedlm.federation.trust import remove_silo

    remove_silo(registry, name)
    _out(f"silo {name} removed from {registry}; restart `fedlm superlink` for it to take effect")


def _releases(n: int) -> str:
    return f"{n:,} release{'' if n == 1 else 's'}"


@silo_app.command("spent")
def silo_spent(
    workspace: Annotated[Path, typer.Option(help="This silo's workspace (WS/silos/NAME).")],
    silo: Annotated[str, typer.Option(help="The silo whose records to read.")],
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """On a silo: what runs have taken from its data, by its own records: DP spent (each ledger and all
    together), models scored for coordinators, secure sums."""
    from fedlm.federation.silo_privacy import spent

    path = workspace / "silos" / silo
    if not path.is_dir():
        raise UserError(f"{path}: no such silo; give the workspace and silo `fedlm node` serves")
    got = spent(path)
    if json_:
        _out(json.dumps(got))
        return
    _out(got["policy"])
    for key, row in got["ledgers"].items():
        name = "its lifetime ledger (the DP policy of its privacy.toml)" if key == "lifetime" else f"run config {key}"
        eps = ("ε unknown (kept by an older fedlm)" if row["epsilon"] is None else
               f"{row['mode']}-level ε = {row['epsilon']:.3f} (δ = {row['delta']:g}; target {row['target_epsilon']:g})")
        _out(f"{name}: {_releases(row['releases'])}, {eps}")
    for mode, row in got["total"].items():
        _out(f"all runs on its data together: {mode}-level ε = {row['epsilon']:.3f} at δ = {row['delta']:g} "
             f"({_releases(row['releases'])}: each round's update, each local-only baseline of a valuation)")
    if not got["ledgers"]:
        _out("no DP release of its data recorded")
    cap = got["max_scored_models"]
    _out(f"models scored for coordinators: {got['scored']:,}" + (f" of at most {cap:,}" if cap is not None else
                                                                 " (no cap: max_scored_models in its privacy.toml)"))
    _out(f"secure sums its updates were unmasked in: {got['secure_sums']:,}")


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="TOML config of the run to plan.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value (repeatable).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    memory_limit: Annotated[str | None, typer.Option(help="Peak memory per silo, e.g. 2GiB; propose changes that fit.")] = None,
    time_limit: Annotated[str | None, typer.Option(help="Seconds per round, e.g. 30s; propose changes that fit.")] = None,
    device_flops: Annotated[str | None, typer.Option(help="FLOP/s per silo (e.g. 50T) instead of calibrating here.")] = None,
) -> None:
    """Parameters, FLOPs, memory, time and bytes per silo per round, before the run starts."""
    from fedlm.config import load_config
    from fedlm.plan import fit_limits, parse_bytes, parse_flops, parse_seconds, plan_run, render

    cfg = load_config(config, set_ or [])
    flops = parse_flops(device_flops) if device_flops else None
    if memory_limit or time_limit:
        result, changes = fit_limits(cfg, memory_limit=parse_bytes(memory_limit) if memory_limit else None,
                                     time_limit=parse_seconds(time_limit) if time_limit else None, device_flops=flops)
    else:
        result, changes = plan_run(cfg, device_flops=flops), []
    if json_:
        _out(json.dumps(result.to_json()))
        return
    console.print(render(result))
    for note in result.notes:
        console.print(note, highlight=False)
    if memory_limit or time_limit:
        console.print("fits with:" if changes else "fits as it is", highlight=False)
        for line in changes:
            console.print(f"  --set {line}", highlight=False)


@app.command()
def audit(
    model: Annotated[Path, typer.Argument(help="Run directory or model directory.")],
    workspace: Annotated[Path, typer.Option(help="Workspace the model was trained on (WS/silos/NAME sharded).")],
    silo: Annotated[list[str] | None, typer.Option(help="Silo to audit (repeatable; default: every silo).")] = None,
    reference: Annotated[Path | None, typer.Option(help="A model not trained on the silo, for the calibrated attack.")] = None,
    candidates: Annotated[int, typer.Option(help="Random candidate secrets per canary.")] = 5000,
    seq_len: Annotated[int, typer.Option(help="Window length of the membership samples, in tokens.")] = 64,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Privacy audit: exposure of planted canaries and membership inference (AUC, TPR at 1% FPR); a run keeps it in RUN/audit.json."""
    from fedlm.data.shards import list_silos
    from fedlm.pretrained import load_model
    from fedlm.privacy.audit import audit as run_audit

    if candidates < 10 or seq_len < 2:
        raise UserError("--candidates must be >= 10 and --seq-len >= 2")
    net, _ = load_model(model)
    ref = load_model(reference)[0] if reference is not None else None
    silos = list(silo or []) or list_silos(workspace)
    if not silos:
        raise UserError(f"{workspace}: no silos to audit")
    report = run_audit(net, workspace, silos=silos, reference=ref, candidates=candidates, seq_len=seq_len)
    if (model / "rounds.jsonl").is_file():  # a federated run: `fedlm report` shows the audit beside its ε
        from fedlm.fileio import write_json

        write_json(model / "audit.json", report)
    if json_:
        _out(json.dumps(report))
        return
    for name, entry in report["silos"].items():
        for c in entry.get("canaries", []):
            _out(f"{name}: canary x{c['repeats']}  exposure {c['exposure']:.2f} bits "
                 f"(rank {c['rank']} of {c['candidates'] + 1}; max {c['max_exposure']:.1f})")
        m = entry["membership"]
        line = f"{name}: membership ({m['members']} vs {m['nonmembers']} windows)  loss AUC {m['loss']['auc']:.3f}  " \
               f"TPR@1%FPR {m['loss']['tpr_at_1pct_fpr']:.3f}"
        if "calibrated" in m:
            line += f"  calibrated AUC {m['calibrated']['auc']:.3f}  TPR@1%FPR {m['calibrated']['tpr_at_1pct_fpr']:.3f}"
        _out(line)


@app.command("explain")
def explain_(
    model: Annotated[Path, typer.Argument(help="Run directory, model directory or its HF export.")],
    text: Annotated[str, typer.Argument(help="The text to explain (within the model's context).")],
    target: Annotated[str | None, typer.Option(
        help="The next token to attribute (one token, e.g. ' the'; default: the model's top prediction).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write one self-contained HTML page here.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object (every key).")] = False,
    layer: Annotated[int, typer.Option(help="The attention map the page shows first: layer (1-based; 0 = last).")] = 0,
    head: Annotated[int, typer.Option(help="... and head (1-based).")] = 1,
) -> None:
    """Surprisal per token, attention, attributions, logit lens and (federated runs) provenance of TEXT."""
    from fedlm.explain import explain, html_page
    from fedlm.fileio import write_text

    result = explain(model, text, target)
    n_layers, n_heads = len(result["attention"]), len(result["attention"][0])
    if not (0 <= layer <= n_layers and 1 <= head <= n_heads):
        raise UserError(f"--layer {layer} --head {head}: the model has layers 1-{n_layers} (0 = the last) "
                        f"and heads 1-{n_heads}")
    if html is not None:
        write_text(html, html_page(result, layer=layer - 1, head=head - 1))
    if json_:
        _out(json.dumps(result))
        return
    _explain_summary(result)
    if html is not None:
        _out(f"html -> {html}")


def _explain_summary(r: dict[str, Any]) -> None:
    """The terminal view of `fedlm explain`: the totals and what stands out (all of it: --json)."""
    _out(f"{len(r['surprisal_bits'])} tokens, {r['total_bits']:.2f} bits, {r['bits_per_byte']:.4f} bits/byte")
    worst = sorted(range(len(r["surprisal_bits"])), key=lambda i: -r["surprisal_bits"][i])[:5]
    for i in sorted(worst):
        alts = ", ".join(f"{a['token']!r} {a['prob']:.0%}" for a in r["alternatives"][i][:3])
        _out(f"  {r['tokens'][i + 1]!r}: {r['surprisal_bits'][i]:.2f} bits (expected {alts})")
    a = r["attributions"]
    top = sorted(range(len(a["scores"])), key=lambda i: -abs(a["scores"][i]))[:5]
    _out(f"next token {a['target']!r}: log2 p = {a['f_x']:.3f}; most attributed: "
         + ", ".join(f"{r['tokens'][i]!r} {a['scores'][i]:+.2f}" for i in top)
         + f" (completeness error {a['completeness_error']:.2%})")
    _out("logit lens at the last token: " + " -> ".join(
        f"{e['tokens'][-1]!r} {e['probs'][-1]:.0%}" for e in r["logit_lens"]))
    if r.get("provenance"):
        _out(f"provenance ({r['provenance_models']} models, bits/byte): " + ", ".join(
            f"{s} {v:.3f}" for s, v in sorted(r["provenance"].items(), key=lambda kv: kv[1])))


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Federated run directory, or a demo's output directory.")],
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: RUN/report.html).")] = None,
) -> None:
    """The run on one self-contained HTML page: loss, bytes, time, drops, ε, plan, value, samples, explain."""
    from fedlm.report import write_report

    _out(f"report -> {write_report(run, out)} (open it in a browser: no server, no network)")


@app.command()
def value(
    run: Annotated[Path, typer.Argument(help="A finished federated run directory.")],
    method: Annotated[str | None, typer.Option(
        help="exact | sampled | rounds (default: rounds when the run valued itself, else exact).")] = None,
    budget: Annotated[float | None, typer.Option(help="Split this amount among the silos, in cents (by --pay-by).")] = None,
    rounds: Annotated[int, typer.Option(help="Retrain coalitions for this many rounds (reduced budget; 0: the run's).")] = 0,
    local_steps: Annotated[int, typer.Option(
        "--steps", "--local-steps", help="Retrain coalitions with this many local steps a round (0: the run's).")] = 0,
    permutations: Annotated[int, typer.Option(help="sampled: at most this many random orders of the silos.")] = 2000,
    tolerance: Annotated[float, typer.Option(
        help="sampled: stop once every silo's stderr is <= this × the grand utility's gain (0: all --permutations).")
    ] = 0.01,
    truncation: Annotated[float, typer.Option(
        help="sampled: cut an order short once within this × the grand utility's gain of it.")] = 0.0,
    seeds: Annotated[int, typer.Option(
        help="exact, sampled: retrain the coalitions under this many training seeds; values are their mean ± stderr.")] = 1,
    pay_by: Annotated[str, typer.Option(
        help="shapley | others: share the budget by Shapley value, or by the other silos' scores alone: each "
             "beneficiary splits an equal part among the silos whose data helped it (no silo's reports move its own pay).")
    ] = "shapley",
    json_: Annotated[bool, typer.Option("--json", help="Print value.json instead of the table.")] = False,
    superlink: Annotated[str | None, typer.Option(
        help="127.0.0.1:PORT of `fedlm superlink --control-port PORT`: retrain and score on the silos' SuperNodes "
             "(a run trained across machines; run it on the coordinator).")] = None,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of --superlink's TLS.")] = None,
    insecure: Annotated[bool, typer.Option(help="Talk to --superlink without TLS (tests on loopback).")] = False,
) -> None:
    """What each silo contributed (Shapley), gained, and is paid -> RUN/value.json."""
    from fedlm.value.run import parts_table, summary_lines, value_run, value_table

    if (root_certificates or insecure) and not superlink:
        raise UserError("--root-certificates/--insecure need --superlink HOST:PORT (without it the silos' data "
                        "must be on this machine)")
    options = {"method": method, "budget": budget, "rounds": rounds, "local_steps": local_steps,
               "permutations": permutations, "tolerance": tolerance, "truncation": truncation, "seeds": seeds,
               "pay_by": pay_by}
    with status("value") as say:
        if superlink:
            from fedlm.value.deployed import value_on_flower
            body = value_on_flower(run, options, superlink=superlink, root_certificates=root_certificates,
                                   insecure=insecure, progress=say)
        else:
            body = value_run(run, **options, progress=say)  # type: ignore[arg-type]
    if json_:
        _out(json.dumps(body))
        return
    console.print(value_table(body))
    if (parts := parts_table(body)) is not None:
        console.print(parts)
    for line in summary_lines(body):
        console.print(escape(line), highlight=False, soft_wrap=True)
    _out(f"-> {run / 'value.json'}")


def _interrupt(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C behind an exit, through the exceptions raised while handling it."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except UserError as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except SystemExit as e:  # Typer turns Ctrl-C into exit 130 silently: say so, and what the work kept
        stop = _interrupt(e)
        if stop is not None:
            console.print(f"[red]interrupted[/]{escape(f': {stop}') if str(stop) else ''}", highlight=False,
                          soft_wrap=True)
        raise
    except Exception as e:  # a bug, not bad input: say so, keep the traceback for --debug
        if debug:
            raise
        console.print(f"[red]internal error:[/] {type(e).__name__}: {escape(str(e))} (run with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
