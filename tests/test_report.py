"""`fedlm report`: the demo's page in a real browser (headless Chromium), and bad input.

The browser is Debian's `chromium` (the Makefile's setup installs it), driven by playwright
through its executable: playwright never downloads a browser here.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedlm.corpus import SILOS

ROOT = Path(__file__).resolve().parents[1]
FEDLM = [sys.executable, "-m", "fedlm.cli"]


def fedlm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDLM, *args], cwd=cwd, env={**os.environ, "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=300)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed and could not be (`make setup` runs `apt-get install chromium`; "
                    "without root or apt, install Debian/Ubuntu's chromium package by hand)")
    return path


def render(page_path: Path) -> dict[str, Any]:
    """Open the page in headless Chromium with JavaScript off; what a reader and a checker see."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {"console": [], "requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_context(java_script_enabled=False, viewport={"width": 1200, "height": 900}).new_page()
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["console"].append(("pageerror", str(e))))
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            # the explain panel keeps all but one attention map a click away (display: none)
            seen["figures"] = page.eval_on_selector_all("figure", """els => els.map(e => [e.id || e.className,
                getComputedStyle(e).display, e.getBoundingClientRect().width, e.getBoundingClientRect().height])""")
            seen["cells"] = page.eval_on_selector_all(
                "[data-silo]", "els => els.map(e => [e.dataset.silo, e.dataset.key, e.dataset.value, e.innerText])")
            seen["sections"] = page.eval_on_selector_all("section", "els => els.map(e => e.id)")
            seen["png"] = page.screenshot(full_page=True)
        finally:
            browser.close()
    return seen


def not_blank(png: bytes) -> bool:
    """Far from one flat colour: over 2% of the pixels are not the background's."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    hist = img.histogram()
    return img.height > 2000 and 1 - max(hist) / sum(hist) > 0.02


def measured(out: Path) -> dict[tuple[str, str], float]:
    """The per-silo numbers the page must show, from summary.json and rounds.jsonl themselves."""
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "runs" / "federated" / "rounds.jsonl").read_text().splitlines()]
    want: dict[tuple[str, str], float] = {}
    for name, model in summary["models"].items():
        for silo in SILOS:
            if name in ("federated", "centralised") or name.endswith(f":{silo}"):
                want[(silo, f"bpb:{name}")] = model["bits_per_byte"][silo]
    for silo in SILOS:
        mine = [r for r in rows if r["completed"] and silo in r["silos"] and silo not in r["dropped"]]
        want[(silo, "rounds")] = len(mine)
        want[(silo, "loss_first")] = mine[0]["silos"][silo]["loss"]
        want[(silo, "loss_last")] = mine[-1]["silos"][silo]["loss"]
        want[(silo, "mb_up")] = sum(r["silos"].get(silo, {}).get("bytes_up", 0.0) for r in rows) / 1e6
        want[(silo, "mb_down")] = sum(r["silos"].get(silo, {}).get("bytes_down", 0.0) for r in rows) / 1e6
    return want


@pytest.mark.slow
def test_demo_report_in_headless_chromium(quick_demo: tuple[Path, subprocess.CompletedProcess[str]],
                                          tmp_path: Path) -> None:
    """The quick demo's report.html in a real browser: no console error, no request leaves the file,
    every figure is drawn, the per-silo numbers are summary.json's and rounds.jsonl's, and it is not blank."""
    out, demo = quick_demo
    assert demo.returncode == 0, demo.stderr[-3000:]
    page_path = out / "report.html"
    assert f"report: {page_path}" in " ".join((demo.stdout + demo.stderr).split()), demo.stderr[-2000:]
    seen = render(page_path)
    assert seen["console"] == []
    assert seen["requests"] == [page_path.resolve().as_uri()]
    assert {"config", "loss", "bpb", "comm", "time", "drops", "plan", "samples", "explain"} <= set(seen["sections"])
    shown_figures = [f for f in seen["figures"] if f[1] != "none"]
    assert sum(1 for f in shown_figures if f[0].startswith("fig-")) >= 4, seen["figures"]
    assert any(f[0].startswith("m-") for f in shown_figures), "no attention map shown in the explain panel"
    assert all(f[0].startswith("m-") for f in seen["figures"] if f[1] == "none"), seen["figures"]
    assert all(w > 100 and h > 50 for _, _, w, h in shown_figures), shown_figures
    shown = {(silo, key): (float(value), text) for silo, key, value, text in seen["cells"]}
    want = measured(out)
    assert set(want) <= set(shown), sorted(set(want) - set(shown))
    for (silo, key), expected in want.items():
        value, text = shown[(silo, key)]
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-12), (silo, key)
        digits = 0 if key == "rounds" else 2 if key.startswith("mb_") else 4
        assert text == f"{expected:.{digits}f}", (silo, key, text)
    assert not_blank(seen["png"])
    assert page_path.stat().st_size < 3_000_000

    # the README's command on the same output: a page of its own, where --out says
    readme = (ROOT / "README.md").read_text()
    assert "fedlm report demo-out --out demo-report.html" in readme
    (tmp_path / "demo-out").symlink_to(out)
    r = fedlm("report", "demo-out", "--out", "demo-report.html", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "demo-report.html").stat().st_size > 10_000


def _assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), r.stderr
    assert "Traceback" not in r.stderr


def test_report_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    """A folder that is no run, a run with no rounds yet, and a corrupt rounds.jsonl line (named)."""
    _assert_one_line_error(fedlm("report", str(tmp_path / "nothing")), "nothing", "not a directory")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[train]\nmode = \"federated\"\n")
    _assert_one_line_error(fedlm("report", str(run)), "rounds.jsonl", "no rounds")
    (run / "rounds.jsonl").write_text("")
    _assert_one_line_error(fedlm("report", str(run)), "rounds.jsonl", "no rounds")
    good = {"round": 1, "seconds": 1.0, "completed": True, "silos": {"a": {"loss": 1.0}}, "dropped": {}, "loss": 1.0}
    (run / "rounds.jsonl").write_text(json.dumps(good) + "\n" + '{"round": 2, "seconds": 1.0, "compl\n')
    _assert_one_line_error(fedlm("report", str(run)), "rounds.jsonl line 2", "not a JSON object")
    (run / "rounds.jsonl").write_text(json.dumps(good) + "\n[1, 2]\n")
    _assert_one_line_error(fedlm("report", str(run)), "rounds.jsonl line 2", "not a round row")
    assert not (run / "report.html").exists()


def cells(page: str) -> dict[tuple[str, str], float]:
    """{(silo, key): value} of the page's per-silo cells."""
    found = re.findall(r'data-silo="([^"]+)" data-key="([^"]+)" data-value="([^"]+)"', page)
    return {(silo, key): float(value) for silo, key, value in found}


@pytest.mark.slow
def test_report_shows_drops_rejections_and_epsilon_of_a_real_run(tmp_path: Path) -> None:
    """A real federated run with client-level DP where silo b's updates are non-finite every round and
    rejected: the page names each rejection, and its per-silo counts and ε are rounds.jsonl's and
    privacy.json's."""
    from fedlm.config import build_config
    from fedlm.federation.runner import run_federated
    from fedlm.report import write_report
    from tests.test_federation import make_ws, wrap

    ws = make_ws(tmp_path / "ws")
    cfg = build_config({
        "data": {"workspace": str(ws)},
        "model": {"preset": "custom", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64, "max_seq_len": 32},
        "train": {"batch_size": 4, "seq_len": 16, "mode": "federated", "warmup_steps": 1, "seed": 7},
        "federation": {"rounds": 3, "local_steps": 1, "min_silos": 2, "round_timeout": 120.0},
        "privacy": {"mode": "client", "target_epsilon": 20.0, "clip": 1.0},
    })
    run = tmp_path / "run"
    run_federated(cfg, run, client_app=wrap({"b": "nan"}))
    # RUN/value.json as issue 17 defines it (`fedlm value` writes it; here its numbers are made up)
    value = {"method": "exact", "utility": "bits/byte gained, token-weighted", "baseline_utility": 0.0,
             "grand_utility": 0.25, "coalitions_trained": 7, "seconds": 1.0,
             "silos": {s: {"shapley": x, "stderr": 0.0, "leave_one_out": x / 2, "gain": x / 3, "share": x / 0.25,
                           "payout": 1000 * x / 0.25, "flag": None} for s, x in (("a", 0.15), ("c", 0.1))},
             "matrix": {"a": {"a": 0.2, "c": 0.1}, "c": {"a": 0.05, "c": 0.15}}}
    value["silos"]["b"] = {"shapley": 0.0, "stderr": 0.0, "leave_one_out": 0.0, "gain": None, "share": 0.0,
                           "payout": 0.0, "flag": "free_rider"}
    value["notes"] = ["no gain for silo b: silo 'b': its local-only baseline would take its own ε to 9.1 > 9 <x>"]
    (run / "value.json").write_text(json.dumps(value))
    page = write_report(run).read_text()
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    privacy = json.loads((run / "privacy.json").read_text())
    shown = cells(page)
    for row in rows:  # every drop named with its round and reason (b's non-finite updates are rejected)
        for silo, why in row["dropped"].items():
            assert f'<td class="num">{row["round"]}</td><td>{silo}</td><td>{html.escape(why)}</td>' in page
    assert "rejected: non-finite" in page
    for silo in ("a", "b", "c"):
        assert shown[(silo, "dropped")] == sum(silo in r["dropped"] for r in rows)
        assert shown[(silo, "mb_up")] == pytest.approx(sum(r["silos"][silo]["bytes_up"] for r in rows) / 1e6)
    for silo, entry in privacy["silos"].items():
        assert shown[(silo, "epsilon")] == entry["epsilon"]
    assert shown[("b", "dropped")] == 3 and ("b", "loss_last") not in shown and 'id="fig-drops"' in page
    for silo, body in value["silos"].items():
        for key in ("shapley", "leave_one_out", "gain", "share", "payout"):
            assert shown.get((silo, f"value:{key}")) == body[key], (silo, key)  # None: a dash, no number
    assert "free_rider" in page.split('<section id="value">')[1]
    assert f"<li>{html.escape(value['notes'][0])}</li>" in page.split('<section id="value">')[1]  # what values rest on
    for sid in ("config", "loss", "comm", "time", "drops", "privacy", "plan", "value", "samples", "explain"):
        assert f'<section id="{sid}">' in page, sid
    assert 'id="bpb"' not in page  # no baselines outside a demo's output
    assert "<script" not in page.split('id="explain"')[0]
    assert not re.findall(r'(?:src|href)="(?!#|data:)[^"]*"', page)  # no link out of the page, only to its own parts
