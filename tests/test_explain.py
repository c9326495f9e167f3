"""`fedlm explain` against references: surprisal against `fedlm eval`'s sums, attention against
transformers' eager attention, integrated gradients against captum on the Hugging Face export, the
logit lens against the model's output, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlm.config import ModelConfig
from fedlm.data.tokenizer import load_tokenizer, token_byte_lengths
from fedlm.errors import UserError
from fedlm.evaluate import evaluate_tokens
from fedlm.explain import (
    IG_STEPS,
    attributions,
    explain,
    html_fragment,
    html_page,
    target_log2_prob,
)
from fedlm.hf import export_hf
from fedlm.model import Transformer
from fedlm.modelio import save_model
from fedlm.pretrained import load_model

FEDLM = [sys.executable, "-m", "fedlm.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _sharp_model(vocab: int, *, seed: int) -> Transformer:
    """A small untrained model with grouped-query heads, its weights scaled up so that attention and
    predictions are far from uniform (a uniform model would make every comparison trivially pass)."""
    cfg = ModelConfig(preset="custom", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      vocab_size=vocab, max_seq_len=64, tie_embeddings=False)
    model = Transformer(cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def dirs(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fedlm model directory and its Hugging Face export, with the workspace's tokenizer."""
    root = tmp_path_factory.mktemp("explain")
    tok = workspace / "tokenizer.json"
    model = _sharp_model(load_tokenizer(tok).get_vocab_size(), seed=3)
    save_model(model, root / "run" / "model", tokenizer_path=tok)
    export_hf(model, root / "hf", tokenizer_path=tok)
    return {"run": root / "run", "hf": root / "hf", "tok": tok, "root": root}


@pytest.fixture(scope="module")
def text(workspace: Path) -> str:
    """The opening of a real document of the legal silo, short enough for the 64-token context."""
    doc = json.loads((workspace / "silos" / "legal" / "docs.jsonl").read_text().splitlines()[0])["text"]
    return " ".join(doc.split())[:120]


@pytest.fixture(scope="module")
def result(dirs: dict[str, Path], text: str) -> dict[str, Any]:
    return explain(dirs["run"], text)


def _hf(dirs: dict[str, Path]) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(dirs["hf"], attn_implementation="eager").eval()


def test_surprisal_sums_to_what_fedlm_eval_computes(dirs: dict[str, Path], result: dict[str, Any]) -> None:
    """Σ surprisal = the summed NLL `evaluate_tokens` (fedlm eval's scorer) gives the same tokens, in bits,
    within 1e-4 bits; bits/byte and the token count agree too; each top-5 list is sorted and valid."""
    model, _ = load_model(dirs["run"])
    ids = np.asarray(result["token_ids"], dtype=np.int64)
    ref = evaluate_tokens(model, ids, token_byte_lengths(load_tokenizer(dirs["tok"])),
                          seq_len=model.cfg.max_seq_len)
    ref_bits = math.log(ref["perplexity"]) * ref["tokens"] / math.log(2)
    assert ref["tokens"] == len(result["surprisal_bits"]) == len(ids) - 1
    assert abs(sum(result["surprisal_bits"]) - ref_bits) < 1e-4
    assert result["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)
    assert result["bytes"] == len(result["text"].encode())  # every byte of TEXT is predicted once
    for alts in result["alternatives"]:
        probs = [a["prob"] for a in alts]
        assert len(alts) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_attention_equals_hf_eager_output_attentions(dirs: dict[str, Path], result: dict[str, Any]) -> None:
    """Every layer's and head's probabilities equal transformers' eager attention on the export within
    1e-5 (grouped-query heads included); they are causal and each row sums to 1."""
    hf = _hf(dirs)
    with torch.no_grad():
        out = hf(torch.tensor([result["token_ids"]]), output_attentions=True)
    ref = torch.stack(out.attentions)[:, 0].double().numpy()  # (L, H, T, T)
    got = np.asarray(result["attention"])
    assert got.shape == ref.shape == (2, 4, len(result["tokens"]), len(result["tokens"]))
    assert np.abs(got - ref).max() < 1e-5
    assert np.allclose(got.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(got, k=1) == 0.0)
    assert got[..., 1:, :].max(-1).min() > 0.0 and got.max() > 0.5  # not a uniform model


def test_attributions_equal_captum_on_the_hf_export(dirs: dict[str, Path], result: dict[str, Any]) -> None:
    """Integrated gradients equal captum's LayerIntegratedGradients (midpoint rule) on the export's
    embeddings within 1e-4 per token, for the default target and a --target; completeness is within 1%
    at the default step count."""
    from captum.attr import LayerIntegratedGradients

    hf = _hf(dirs)
    idx = torch.tensor([result["token_ids"]])
    tok = load_tokenizer(dirs["tok"])
    other = explain(dirs["run"], result["text"], target=" the")
    assert other["attributions"]["target_id"] == tok.encode(" the").ids[0]
    for r in (result, other):
        a = r["attributions"]
        lig = LayerIntegratedGradients(lambda x, t=a["target_id"]: target_log2_prob(hf(x).logits, t),
                                       hf.model.embed_tokens)
        base = torch.tensor([result["token_ids"][:1] + [tok.encode(" ").ids[0]] * (idx.shape[1] - 1)])
        assert a["baseline_id"] == base[0, 1]
        ref = lig.attribute(idx, baselines=base, n_steps=IG_STEPS, method="riemann_middle")[0].sum(-1)
        assert np.abs(np.asarray(a["scores"]) - ref.detach().numpy()).max() < 1e-4
        assert (a["steps"], a["method"]) == (IG_STEPS, "riemann_middle")  # the default step count sufficed
        assert a["completeness_error"] < 0.01
        gap = a["f_x"] - a["f_baseline"]
        assert abs(sum(a["scores"]) - gap) <= 0.01 * abs(gap)
    with torch.no_grad():
        assert result["attributions"]["target_id"] == int(hf(idx).logits[0, -1].argmax())


def test_refined_attributions_are_the_trapezoid_rule_on_the_hf_export(dirs: dict[str, Path],
                                                                      result: dict[str, Any]) -> None:
    """Refining (4 midpoints, then 5 ends, then 8 midpoints) gives the trapezoid rule on 17 points:
    captum's riemann_trapezoid on the export, whose weights sum to 16/17, times 17/16, within 1e-4;
    and the completeness error shrinks as the rule refines."""
    from captum.attr import LayerIntegratedGradients

    model, _ = load_model(dirs["run"])
    ids, a0 = result["token_ids"], result["attributions"]
    coarse = attributions(model, ids, a0["target_id"], blank_id=a0["baseline_id"], steps=4, max_steps=4)
    fine = attributions(model, ids, a0["target_id"], blank_id=a0["baseline_id"], steps=4, max_steps=17,
                        tolerance=0.0)
    assert (coarse["steps"], coarse["method"], fine["steps"], fine["method"]) == (4, "riemann_middle", 17, "trapezoid")
    hf = _hf(dirs)
    lig = LayerIntegratedGradients(lambda x: target_log2_prob(hf(x).logits, a0["target_id"]), hf.model.embed_tokens)
    base = torch.tensor([ids[:1] + [a0["baseline_id"]] * (len(ids) - 1)])
    ref = lig.attribute(torch.tensor([ids]), baselines=base, n_steps=17, method="riemann_trapezoid")[0].sum(-1) * 17 / 16
    assert np.abs(np.asarray(fine["scores"]) - ref.detach().numpy()).max() < 1e-4
    assert fine["completeness_error"] < coarse["completeness_error"]


def test_logit_lens_last_layer_is_the_model_output(dirs: dict[str, Path], result: dict[str, Any]) -> None:
    """One entry per layer; the last layer's top tokens and probabilities are the model's own output's."""
    model, _ = load_model(dirs["run"])
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([result["token_ids"]]))[0], -1)
    lens = result["logit_lens"]
    assert [e["layer"] for e in lens] == [1, 2]
    assert lens[-1]["ids"] == p.argmax(-1).tolist()
    assert np.allclose(lens[-1]["probs"], p.max(-1).values.numpy(), atol=1e-6)
    assert lens[0]["ids"] != lens[-1]["ids"]  # an earlier layer reads differently


def test_the_hf_export_explains_like_the_model_dir(dirs: dict[str, Path], result: dict[str, Any]) -> None:
    """`fedlm explain` on the export gives the model directory's numbers (to float error)."""
    r = explain(dirs["hf"], result["text"])
    assert np.abs(np.subtract(r["surprisal_bits"], result["surprisal_bits"])).max() < 1e-4
    assert np.abs(np.subtract(r["attention"], result["attention"])).max() < 1e-5
    assert r["tokens"] == result["tokens"] and r["attributions"]["target"] == result["attributions"]["target"]


def test_provenance_is_bits_per_byte_under_each_personalised_model(dirs: dict[str, Path], text: str) -> None:
    """A federated run with personalised models: provenance holds each silo model's bits/byte of TEXT,
    equal to `evaluate_tokens` under that model; without them it is absent."""
    run = dirs["root"] / "fed"
    tok = dirs["tok"]
    vocab = load_tokenizer(tok).get_vocab_size()
    save_model(_sharp_model(vocab, seed=10), run / "model", tokenizer_path=tok)
    assert "provenance" not in explain(run, text)  # not a federated run (no rounds.jsonl)
    (run / "rounds.jsonl").write_text("{}\n")
    assert "provenance" not in explain(run, text)  # federated, but nothing personalised
    for i, silo in enumerate(("legal", "drama")):
        save_model(_sharp_model(vocab, seed=20 + i), run / f"personalised-{silo}" / "model", tokenizer_path=tok)
    r = explain(run, text)
    assert r["provenance_models"] == "personalised" and set(r["provenance"]) == {"legal", "drama"}
    lengths = token_byte_lengths(load_tokenizer(tok))
    for silo, bpb in r["provenance"].items():
        model, _ = load_model(run / f"personalised-{silo}")
        ref = evaluate_tokens(model, np.asarray(r["token_ids"]), lengths, seq_len=64)
        assert bpb == pytest.approx(ref["bits_per_byte"], rel=1e-6)


def test_provenance_falls_back_to_a_demo_outputs_local_only_models(dirs: dict[str, Path], text: str) -> None:
    """A demo output's federated run without personalised models reads the local-only runs beside it."""
    demo = dirs["root"] / "demo-out"
    tok = dirs["tok"]
    vocab = load_tokenizer(tok).get_vocab_size()
    save_model(_sharp_model(vocab, seed=30), demo / "runs" / "federated" / "model", tokenizer_path=tok)
    (demo / "runs" / "federated" / "rounds.jsonl").write_text("{}\n")
    for i, silo in enumerate(("legal", "technical", "drama")):
        save_model(_sharp_model(vocab, seed=40 + i), demo / "runs" / f"local-{silo}" / "model", tokenizer_path=tok)
    assert "provenance" not in explain(demo / "runs" / "federated", text)  # not a demo output yet
    (demo / "summary.json").write_text("{}")
    r = explain(demo / "runs" / "federated", text)
    assert r["provenance_models"] == "local-only" and set(r["provenance"]) == {"legal", "technical", "drama"}
    assert len(set(r["provenance"].values())) == 3


class _Page(HTMLParser):
    """Collects what would fetch: script tags and every src/href that is not a data: URI or #anchor."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts = 0
        self.fetches: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        self.images += tag == "img"
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                self.fetches.append(value)


def test_heat_maps_are_the_attention_probabilities(result: dict[str, Any]) -> None:
    """Each map's pixels are √p of that layer's and head's attention on 0-255, row = the reading token."""
    import base64
    import io
    import re

    from PIL import Image

    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html_fragment(result))
    att = np.asarray(result["attention"])
    assert len(uris) == att.shape[0] * att.shape[1]
    for i, uri in enumerate(uris):
        image = Image.open(io.BytesIO(base64.b64decode(uri)))
        assert image.mode == "P" and image.size == att.shape[2:]
        expected = np.rint(np.sqrt(att[i // att.shape[1], i % att.shape[1]]) * 255)
        assert np.array_equal(np.asarray(image), expected)


def test_html_is_one_self_contained_page(result: dict[str, Any]) -> None:
    """The fragment has no script and fetches nothing; one heat map per layer and head, the chosen one
    checked; every token of the text is on the page."""
    page = _Page()
    page.feed(html_page(result, layer=1, head=2))
    assert page.scripts == 0 and page.fetches == [] and page.images == 2 * 4
    fragment = html_fragment(result, layer=1, head=2)
    assert fragment.startswith("<section") and fragment.endswith("</section>")
    uid = fragment.split('id="', 1)[1].split('"', 1)[0]
    assert f'id="{uid}-1-2" checked' in fragment
    assert "Surprisal" in fragment and "Attributions" in fragment and "Logit lens" in fragment


def test_bad_input_is_a_user_error(dirs: dict[str, Path]) -> None:
    """Empty text, a text past the context and a multi-token target each raise one clear UserError."""
    with pytest.raises(UserError, match="TEXT is empty"):
        explain(dirs["run"], "  ")
    with pytest.raises(UserError, match="context of 64 tokens"):
        explain(dirs["run"], "the court " * 200)
    with pytest.raises(UserError, match="not one"):
        explain(dirs["run"], "The court", target=" notwithstanding the")


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`fedlm ARGS` through the CLI's own entry point (its error handling), in this process."""
    from fedlm.cli import main

    old = sys.argv
    sys.argv = ["fedlm", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_bad_input_is_one_line_exit_2(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Empty TEXT, a text past the context, a --target of two tokens and a --head the model lacks: each
    one line on stderr naming what is wrong, exit 2."""
    for args, needle in (([""], "TEXT is empty"), (["word " * 200], "context of 64 tokens"),
                         (["The court", "--target", "notwithstanding the"], "not one"),
                         (["The court", "--head", "9"], "heads 1-4")):
        code, _, err = _main(capsys, "explain", str(dirs["run"]), *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)
    code, out, _ = _main(capsys, "explain", str(dirs["run"]), "The court held that", "--layer", "2", "--head", "4")
    assert code == 0 and "bits/byte" in out and "completeness error" in out and "logit lens" in out, out


@pytest.mark.slow
def test_cli_json_and_html_as_a_user_runs_them(dirs: dict[str, Path], text: str, tmp_path: Path) -> None:
    """`fedlm explain` in its own process, on the HF export: --json holds the documented keys and --html
    writes the page."""
    page = tmp_path / "x.html"
    r = subprocess.run([*FEDLM, "explain", str(dirs["hf"]), text, "--json", "--html", str(page)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert {"tokens", "surprisal_bits", "alternatives", "bits_per_byte", "attention", "attributions",
            "logit_lens"} <= set(out)
    assert {"target", "scores", "completeness_error", "f_x", "f_baseline", "steps"} <= set(out["attributions"])
    assert page.read_text().startswith("<!doctype html>")


class _Steep(torch.nn.Module):
    """f that turns over 0.5% of the path from baseline to text: log2 p(token 0) drops by ~8.7 bits where the
    mean embedding's projection crosses 37% of the way (a sharper turn than 513 even points resolve)."""

    def __init__(self, ids: list[int], blank: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_emb = torch.nn.Embedding(8, 4)
        self.w = torch.randn(4)
        with torch.no_grad():
            s_x, s_b = (float(self.tok_emb(torch.tensor([x])).mean(1)[0] @ self.w)
                        for x in (ids, ids[:1] + [blank] * (len(ids) - 1)))
        self.mid, self.scale = s_b + 0.37 * (s_x - s_b), 400.0 / abs(s_x - s_b)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        z = torch.tanh(self.scale * (self.tok_emb(x).mean(1) @ self.w - self.mid))
        return torch.stack([6 * z, torch.zeros_like(z)], -1)[:, None, :]  # (B, 1, 2) logits


def test_attributions_cut_the_path_where_f_turns_too_sharply_for_an_even_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """On f that jumps over 0.5% of the path, the even rules up to 513 points miss f(x) - f(baseline) by more
    than 1%; the result then comes from the segmented rule: complete to 1% from 8 midpoints a piece (256
    gradient points), and within 1% of the gap of the same pieces refined to 65 points each (complete to 0.2%)."""
    import fedlm.explain as explain_mod

    ids, blank = [0, 3, 5, 6, 2, 7], 1
    net = _Steep(ids, blank)
    cut = attributions(net, ids, 0, blank_id=blank)
    finest = attributions(net, ids, 0, blank_id=blank, tolerance=0.0)
    monkeypatch.setattr(explain_mod, "IG_SEGMENTS", 10**6)  # more segments than points: no cutting
    even = attributions(net, ids, 0, blank_id=blank)
    assert even["method"] == "trapezoid" and even["steps"] == 513 and even["completeness_error"] > 0.01, even
    assert cut["method"] == "segmented" and cut["steps"] == 256 and cut["completeness_error"] < 0.01, cut
    assert finest["method"] == "segmented" and finest["steps"] == 32 * 65 and finest["completeness_error"] < 0.002
    gap = abs(cut["f_x"] - cut["f_baseline"])
    assert gap > 8 and np.abs(np.subtract(cut["scores"], finest["scores"])).max() < 0.01 * gap
    page = explain_mod._attributions_html({"attributions": {**cut, "target": "x"}, "tokens": [str(i) for i in ids]})
    assert "256 points along the path, segmented rule" in page  # the HTML page names the rule
