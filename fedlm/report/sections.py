"""The report's sections, one function each; a section returns None where the run lacks its data."""

from __future__ import annotations

import itertools
import json
from typing import Any

from fedlm.errors import UserError
from fedlm.report.markup import (
    MB,
    esc,
    fmt,
    fnum,
    new_figure,
    num,
    participated,
    ratio,
    section,
    silo_colour,
    svg,
    table,
)
from fedlm.report.rundata import RunData

CONFIG_KEYS = {
    "model": ["preset", "init_from", "d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len"],
    "train": ["mode", "batch_size", "seq_len", "lr", "precision", "seed", "init_from"],
    "federation": ["engine", "strategy", "rounds", "local_steps", "fraction", "min_silos", "aggregation",
                   "compression", "secure_aggregation", "personalise_steps"],
    "privacy": ["mode", "target_epsilon", "delta", "clip"],
    "lora": ["rank"],
}


def config_section(d: RunData) -> str:
    rows = []
    for sec, keys in CONFIG_KEYS.items():
        got = {k: d.config.get(sec, {}).get(k) for k in keys}
        shown = [f"{esc(k)} = <code>{esc(json.dumps(v))}</code>" for k, v in got.items()
                 if v not in (None, "") and not (sec == "lora" and v == 0)]
        if shown:
            rows.append(f"<th>[{esc(sec)}]</th><td>{' · '.join(shown)}</td>")
    s = d.summary
    done = sum(1 for r in d.rounds if r.get("completed"))
    facts = [f"<b>{len(d.silos)}</b> silos ({esc(', '.join(d.silos))})",
             f"<b>{done}</b> of {esc(s.get('rounds', len(d.rounds)))} rounds completed"]
    if isinstance(s.get("seconds"), (int, float)):
        facts.append(f"{s['seconds']:.1f} s of rounds")
    if isinstance(s.get("loss"), (int, float)):
        facts.append(f"final training loss {s['loss']:.4f}")
    for silo, loss in (s.get("worse_than_start") or {}).items():
        facts.append(f'<span class="warn">silo {esc(silo)}: training loss {loss["first"]:.4f} → '
                     f'{loss["last"]:.4f}, worse than at the start</span>')
    return section("config", "Run and config in brief",
                   f"<p>{' · '.join(facts)}</p>" + table(["section", "settings (RUN/config.toml)"], rows, cls="kv"))


def loss_section(d: RunData) -> str | None:
    done = [r for r in d.rounds if r.get("completed") and isinstance(r.get("loss"), (int, float))]
    if not done:
        return None
    fig, ax = new_figure()
    for silo in d.silos:
        pts = [(r["round"], r["silos"][silo]["loss"]) for r in d.rounds
               if participated(r, silo) and isinstance(r["silos"][silo].get("loss"), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), lw=1, alpha=0.8, color=silo_colour(d.silos, silo), label=silo)
    ax.plot([r["round"] for r in done], [r["loss"] for r in done], color="black", lw=2, label="global (token-weighted)")
    ax.set(xlabel="round", ylabel="training loss (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    rows = []
    for silo in d.silos:
        mine = [r for r in d.rounds if participated(r, silo) and isinstance(r["silos"][silo].get("loss"), (int, float))]
        first, last = (mine[0]["silos"][silo]["loss"], mine[-1]["silos"][silo]["loss"]) if mine else (None, None)
        rows.append(f"<th>{esc(silo)}</th>{num(len(mine), 'd', silo=silo, key='rounds')}"
                    f"{num(first, silo=silo, key='loss_first')}{num(last, silo=silo, key='loss_last')}")
    body = (svg(fig, "loss", "Training loss per round: each silo's on its own batches from the round's global "
                "weights, and their token-weighted mean.")
            + table(["silo", "rounds taken part", "loss, first round", "loss, last round"], rows))
    return section("loss", "Loss per round", body)


def bpb_section(d: RunData) -> str | None:
    if d.demo is None:
        return None
    models = {name: m.get("bits_per_byte", {}) for name, m in d.demo.get("models", {}).items()}
    columns = [("federated", lambda s: "federated"), ("personalised", lambda s: f"personalised:{s}"),
               ("local-only", lambda s: f"local:{s}"), ("centralised", lambda s: "centralised")]
    columns = [(label, pick) for label, pick in columns if any(pick(s) in models for s in d.silos)]
    fig, ax = new_figure(7.0, 3.4)
    width = 0.8 / len(columns)
    for i, (label, pick) in enumerate(columns):
        xs = [j + i * width for j in range(len(d.silos))]
        ax.bar(xs, [models.get(pick(s), {}).get(s, float("nan")) for s in d.silos], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(d.silos))], d.silos, fontsize=8)
    ax.set(ylabel="bits per byte (lower is better)")
    ax.legend(fontsize=7, ncol=len(columns))
    rows = []
    for s in d.silos:
        cells = "".join(num(models.get(pick(s), {}).get(s), silo=s, key=f"bpb:{pick(s)}") for _, pick in columns)
        rows.append(f"<th>{esc(s)}</th>{cells}")
    means = [[models.get(pick(s), {}).get(s, float("nan")) for s in d.silos] for _, pick in columns]
    rows.append("<th>mean</th>" + "".join(num(sum(m) / len(m)) for m in means))
    body = svg(fig, "bpb", "Bits per byte on each silo's validation split: the federated model, the federated "
                           "model personalised on the silo, the silo's local-only model (same per-silo budget) and the pooled "
                           "(centralised) model.") + table(["silo", *(c for c, _ in columns)], rows)
    found = d.demo.get("findings", {})
    if "federated_vs_centralised" in found:
        body += (f"<p>federated / centralised = {found['federated_vs_centralised']:.3f}; federated / local-only "
                 f"mean = {found.get('federated_vs_local_only_mean', float('nan')):.3f}</p>")
    return section("bpb", "Bits per byte per silo against the baselines", body)


def comm_section(d: RunData) -> str | None:
    def total(row: dict[str, Any], key: str) -> float:
        return sum(float(v.get(key, 0.0)) for v in row["silos"].values())

    xs = [r["round"] for r in d.rounds]
    up = [total(r, "bytes_up") / MB for r in d.rounds]
    down = [total(r, "bytes_down") / MB for r in d.rounds]
    if not any(up) and not any(down):
        return None
    cumulative = list(itertools.accumulate(a + b for a, b in zip(up, down, strict=True)))
    fig, ax = new_figure()
    ax.step(xs, up, where="mid", label="up (silos → server)")
    ax.step(xs, down, where="mid", label="down (server → silos)")
    ax.set(xlabel="round", ylabel="MB per round", ylim=(0, max(max(up), max(down)) * 1.15))
    ax2 = ax.twinx()
    ax2.plot(xs, cumulative, color="black", lw=1.5, label="cumulative")
    ax2.set(ylabel="cumulative MB")
    ax.legend(handles=ax.get_lines() + ax2.get_lines(), fontsize=7, loc="center right")
    rows = []
    for s in d.silos:
        su = sum(float(r["silos"].get(s, {}).get("bytes_up", 0.0)) for r in d.rounds)
        sd = sum(float(r["silos"].get(s, {}).get("bytes_down", 0.0)) for r in d.rounds)
        rows.append(f"<th>{esc(s)}</th>{num(sd / MB, '.2f', silo=s, key='mb_down')}"
                    f"{num(su / MB, '.2f', silo=s, key='mb_up')}")
    rows.append(f"<th>all</th>{num(sum(down), '.2f')}{num(sum(up), '.2f')}")
    meter = (f'<p class="meter">communication: <b>{cumulative[-1]:,.1f} MB</b> in {len(xs)} rounds '
             f"({cumulative[-1] / len(xs):,.2f} MB per round)</p>")
    body = meter + svg(fig, "comm", "Bytes on the wire per round (all silos) and the cumulative total.") + \
        table(["silo", "MB down", "MB up"], rows)
    return section("comm", "Communication", body)


def time_section(d: RunData) -> str | None:
    done = [r for r in d.rounds if r.get("completed") and isinstance(r.get("overhead_seconds"), (int, float))]
    if not done:
        return None
    xs = [r["round"] for r in done]
    overhead = [float(r["overhead_seconds"]) for r in done]
    compute = [float(r["seconds"]) - o for r, o in zip(done, overhead, strict=True)]
    fig, ax = new_figure()
    ax.stackplot(xs, compute, overhead, labels=["compute (slowest silo's training)", "overhead (all else)"],
                 alpha=0.85, step="mid")
    ax.set(xlabel="round", ylabel="seconds")
    ax.legend(fontsize=7, loc="upper right")
    c, o = sum(compute), sum(overhead)
    text = (f"<p>{len(done)} completed rounds: {c + o:.1f} s, of which compute {c:.1f} s and overhead {o:.1f} s "
            f"({100 * o / max(c + o, 1e-12):.1f}%); {(c + o) / len(done):.2f} s per round.</p>")
    return section("time", "Round time: compute and overhead",
                   text + svg(fig, "time", "Wall time of each completed round, split into the slowest silo's "
                                           "local training and the rest (messages, aggregation, checkpoint)."))


def drops_section(d: RunData) -> str | None:
    events = [(r["round"], s, str(why)) for r in d.rounds for s, why in sorted((r.get("dropped") or {}).items())]
    skipped = [r["round"] for r in d.rounds if not r.get("completed")]
    if not events and not skipped:
        return section("drops", "Dropped silos and rejected updates",
                       f"<p>None: every sampled silo's update counted in all {len(d.rounds)} rounds.</p>")
    fig, ax = new_figure(7.0, 2.8)
    for silo in d.silos:
        mine = [rnd for rnd, s, _ in events if s == silo]
        if mine:
            ax.scatter(mine, [silo] * len(mine), s=14, color=silo_colour(d.silos, silo))
    for rnd in skipped:
        ax.axvline(rnd, color="red", alpha=0.4, lw=1)
    ax.set(xlabel="round (red line: round skipped)", xlim=(0.5, max(r["round"] for r in d.rounds) + 0.5))
    shown = events[:100]
    rows = [f"{num(rnd, 'd')}<td>{esc(s)}</td><td>{esc(why)}</td>" for rnd, s, why in shown]
    more = f"<p>… and {len(events) - len(shown)} more in rounds.jsonl.</p>" if len(events) > len(shown) else ""
    counts = "".join(f"{num(sum(1 for _, s, _ in events if s == silo), 'd', silo=silo, key='dropped')}"
                     for silo in d.silos)
    body = (f"<p>{len(events)} dropped or rejected updates; {len(skipped)} rounds skipped"
            f"{' (' + ', '.join(map(str, skipped[:20])) + ')' if skipped else ''}.</p>"
            + svg(fig, "drops", "Each dot: a sampled silo whose update did not count in that round.")
            + table(d.silos, [counts]) + table(["round", "silo", "why"], rows) + more)
    return section("drops", "Dropped silos and rejected updates", body)


def privacy_section(d: RunData) -> str | None:
    eps_rows = [r for r in d.rounds if isinstance(r.get("epsilon"), dict)]
    if not eps_rows and d.privacy is None and d.audit is None:
        return None
    body = ""
    if eps_rows:
        fig, ax = new_figure()
        for silo in d.silos:
            pts = [(r["round"], r["epsilon"][silo]) for r in eps_rows if isinstance(r["epsilon"].get(silo), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=silo_colour(d.silos, silo), label=silo, lw=1.2)
        target = (d.privacy or {}).get("target_epsilon")
        if isinstance(target, (int, float)):
            ax.axhline(target, color="red", ls="--", lw=1, label="target ε")
        ax.set(xlabel="round", ylabel="ε spent (cumulative)")
        ax.legend(fontsize=7, ncol=2)
        body += svg(fig, "epsilon", "ε each silo has spent after each round (the ledger's figure, as logged).")
    if d.privacy is not None:
        p = d.privacy
        body += (f"<p>mode {esc(p.get('mode'))}, target ε {esc(p.get('target_epsilon'))}, δ {esc(p.get('delta'))}, "
                 f"clip {esc(p.get('clip'))}, accountant {esc(p.get('accountant'))} "
                 f"({esc(p.get('accountant_library'))})</p>")
        rows = [f"<th>{esc(s)}</th>{num(b.get('epsilon'), silo=s, key='epsilon')}{num(b.get('steps'), 'd')}"
                f"<td>{esc(b.get('stopped') or '')}</td>" for s, b in sorted((p.get("silos") or {}).items())]
        body += table(["silo", "ε spent", "steps", "stopped"], rows)
    if d.audit is not None:
        body += audit_table(d.audit)
    return section("privacy", "Privacy: ε per silo and audit", body)


def audit_table(audit: dict[str, Any]) -> str:
    """Canary exposure and membership-inference AUC per silo, from `fedlm audit`'s report."""
    rows = []
    for silo, entry in sorted((audit.get("silos") or {}).items()):
        canaries = entry.get("canaries") or []
        exposure = "; ".join(f"x{c.get('repeats')}: {float(c.get('exposure', float('nan'))):.2f}" for c in canaries)
        m = entry.get("membership") or {}
        rows.append(f"<th>{esc(silo)}</th><td>{esc(exposure or '—')}</td>"
                    f"{num((m.get('loss') or {}).get('auc'), '.3f', silo=silo, key='mia_auc')}"
                    f"{num((m.get('calibrated') or {}).get('auc'), '.3f')}")
    return "<h3>Audit</h3>" + table(["silo", "canary exposure (bits, by repeats)", "membership AUC (loss)",
                                     "membership AUC (calibrated)"], rows)


def plan_of(d: RunData) -> tuple[dict[str, Any] | None, str]:
    """The run's plan (RUN/plan.json, made before it ran) or the plan of its config without timing."""
    if d.plan is not None:
        return d.plan, "RUN/plan.json (made before the run)"
    from fedlm.config import load_config
    from fedlm.plan import plan_run

    try:
        return plan_run(load_config(d.run_dir / "config.toml", []), calibrate=False).to_json(), \
            "`fedlm plan` of RUN/config.toml, without a timing calibration"
    except (UserError, ValueError, OSError):  # the workspace moved, or a config of another version
        return None, ""


def plan_section(d: RunData) -> str | None:
    plan, source = plan_of(d)
    if plan is None:
        return None
    done = [r for r in d.rounds if r.get("completed")]
    rows = []

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    for s in d.silos:
        mine = [r["silos"][s] for r in d.rounds if s in r["silos"] and r["silos"][s].get("bytes_up")]
        for key, label in (("bytes_up", "bytes up per round"), ("bytes_down", "bytes down per round")):
            predicted = (plan.get(f"{key}_per_round") or {}).get(s)
            measured = mean([float(m.get(key, 0.0)) for m in mine])
            rows.append(f"<th>{esc(s)}: {label}</th>{num(predicted, ',.0f')}"
                        f"{num(measured, ',.0f', silo=s, key=f'{key}_mean')}{ratio(measured, predicted)}")
    tokens = mean([sum(float(v.get("num_tokens", 0.0)) for k, v in r["silos"].items() if participated(r, k))
                   for r in done])
    rows.append(f"<th>tokens per round</th>{num(plan.get('tokens_per_round'), ',.0f')}{num(tokens, ',.0f')}"
                f"{ratio(tokens, plan.get('tokens_per_round'))}")
    seconds = mean([float(r["seconds"]) for r in done])
    rows.append(f"<th>seconds per round</th>{num(plan.get('seconds_per_round'), '.3f')}{num(seconds, '.3f')}"
                f"{ratio(seconds, plan.get('seconds_per_round'))}")
    peak = plan.get("peak_memory_bytes") or {}
    note = (f"<p>Predicted by {esc(source)}; measured: the mean over the rounds each silo took part in. "
            f"Predicted peak memory per silo: {max(peak.values()) / 2**20:,.0f} MiB "
            f"({esc(plan.get('time_source', ''))}).</p>" if peak else "")
    return section("plan", "Plan: predicted against measured",
                   note + table(["quantity", "predicted", "measured", "measured / predicted"], rows))


OTHERS_PAY = "the other silos' scores (each beneficiary splits an equal part among the silos that helped it)"
VALUE_KEYS = ("shapley", "stderr", "leave_one_out", "value_to_others", "gain", "share", "payout")


def value_columns(silos: dict[str, dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(label, key, sub-key) per column of value.json's per-silo numbers; a dict (gain per model) spreads out."""
    cols: list[tuple[str, str, str | None]] = []
    for key in VALUE_KEYS:
        subs = sorted({k for b in silos.values() if isinstance(b.get(key), dict) for k in b[key]})
        cols += [(f"{key} ({sub})", key, sub) for sub in subs] or [(key, key, None)]
    return cols


def value_cell(body: dict[str, Any], key: str, sub: str | None) -> Any:
    x = body.get(key)
    return x.get(sub) if sub is not None and isinstance(x, dict) else x


def value_section(d: RunData) -> str | None:
    v = d.value
    if v is None or not isinstance(v.get("silos"), dict):
        return None
    per, silos = v["silos"], sorted(v["silos"])
    cols = value_columns(per)
    gain = next(((k, sub) for _, k, sub in cols if k == "gain"), ("gain", None))
    fig, ax = new_figure(7.0, 3.0)
    xs = range(len(silos))
    ax.bar([x - 0.2 for x in xs], [fnum(per[s].get("shapley")) for s in silos], 0.4, label="contribution (Shapley)",
           yerr=[fnum(per[s].get("stderr"), 0.0) for s in silos])
    ax.bar([x + 0.2 for x in xs], [fnum(value_cell(per[s], *gain)) for s in silos], 0.4,
           label=f"gain from joining{f' ({gain[1]})' if gain[1] else ''}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(xs), silos, fontsize=8)
    ax.set(ylabel="bits/byte")
    ax.legend(fontsize=7)
    rows = [f"<th>{esc(s)}</th>" + "".join(num(value_cell(per[s], k, sub), silo=s, key=f"value:{k}"
                                                + (f":{sub}" if sub else "")) for _, k, sub in cols)
            + f"<td>{esc(flag_text(per[s]))}</td>" for s in silos]
    head = (f"<p>method <b>{esc(v.get('method'))}</b>; utility: {esc(v.get('utility', 'bits/byte gained'))}; "
            f"baseline {fmt(v.get('baseline_utility'))}, all silos {fmt(v.get('grand_utility'))}; "
            f"{esc(v.get('coalitions_trained', '—'))} coalitions trained; shares by "
            f"{OTHERS_PAY if v.get('pay_by') == 'others' else 'Shapley value'}.</p>")
    return section("value", "Contributions, gains and payouts",
                   head + svg(fig, "value", "Each silo's contribution to the consortium (with its standard "
                                            "error) and what it gained by joining (drops in bits/byte).")
                   + table(["silo", *(c for c, _, _ in cols), "flag"], rows) + value_notes(v.get("notes"))
                   + matrix_table(v.get("matrix")))


def value_notes(notes: Any) -> str:
    """value.json's notes: what the values rest on and what they cost (a reduced budget, one seed, the
    privacy spent, a silo that refused its baseline), under the table they qualify."""
    if not isinstance(notes, list) or not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"


def flag_text(body: dict[str, Any]) -> str:
    flag = body.get("flag")
    if isinstance(flag, dict):
        return " ".join(str(x) for x in (flag.get("flag"), flag.get("why")) if x)
    return " ".join(str(x) for x in (flag, body.get("why")) if x)


def matrix_table(matrix: Any) -> str:
    """Each contributor's Shapley value for each beneficiary alone (value.json's matrix)."""
    if not isinstance(matrix, dict) or not matrix:
        return ""
    beneficiaries = sorted({j for row in matrix.values() if isinstance(row, dict) for j in row})
    rows = [f"<th>{esc(i)}</th>" + "".join(num((matrix[i] or {}).get(j)) for j in beneficiaries)
            for i in sorted(matrix)]
    return ("<h3>Contributor × beneficiary</h3>"
            + table(["contributor ↓ · beneficiary →", *beneficiaries], rows))
