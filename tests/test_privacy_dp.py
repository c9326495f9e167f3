"""Differential privacy: accounting against the libraries, per-sample clipping by hand, budgets,
refusals, and DP runs that still produce a model that generates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedlm.config import ModelConfig, PrivacyConfig, load_config
from fedlm.errors import UserError
from fedlm.federation.dp_rounds import RoundPrivacy
from fedlm.federation.secagg import min_survivors
from fedlm.model import Transformer
from fedlm.privacy.accounting import PrivacyLedger, client_epsilon, record_epsilon
from fedlm.privacy.client_dp import clip_update, plan_client_dp
from fedlm.privacy.dpsgd import DPSGD, PoissonRecords, RecordPlan, plan_record_dp


@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(target=st.floats(0.5, 10), q=st.floats(0.002, 0.2), steps=st.integers(1, 400))
def test_record_plan_never_exceeds_target_and_matches_opacus(target: float, q: float, steps: int) -> None:
    """ε of the plan ≤ target, and equals Opacus's RDP accountant fed the logged (z, q, steps)."""
    n = 100_000
    pc = PrivacyConfig(mode="record", target_epsilon=target, delta=1e-6, sample_rate=q)
    plan = plan_record_dp(num_records=n, batch_size=8, steps=steps, privacy=pc)
    assert plan.planned_epsilon <= target
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps)]
    assert acc.get_epsilon(delta=1e-6) == pytest.approx(plan.planned_epsilon, rel=1e-12)


@settings(max_examples=6, deadline=None)
@given(z=st.floats(0.6, 3.0), q=st.floats(0.001, 0.1), steps=st.integers(1, 300))
def test_record_epsilon_agrees_with_dp_accounting(z: float, q: float, steps: int) -> None:
    """An independent library (dp-accounting's RDP, its own orders) gives the same ε within 5%."""
    ours = record_epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=1e-5)
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert ours == pytest.approx(acc.get_epsilon(1e-5), rel=0.05)


def test_client_epsilon_matches_flower_and_pld_bound() -> None:
    """z = 1 over 5 releases: ε = 12.30 at δ = 1e-5 (Flower's RdpAccountant, measured); PLD is tighter."""
    assert client_epsilon([1.0] * 5, delta=1e-5) == pytest.approx(12.30, abs=0.01)
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(1.0), 5)
    assert pld.get_epsilon(1e-5) <= client_epsilon([1.0] * 5, delta=1e-5)


@settings(max_examples=5, deadline=None)
@given(target=st.floats(1, 20), rounds=st.integers(1, 40))
def test_client_plan_never_exceeds_target(target: float, rounds: int) -> None:
    pc = PrivacyConfig(mode="client", target_epsilon=target, delta=1e-3)
    plan = plan_client_dp(num_silos=10, participations={"a": rounds}, per_round=10, distributed=True, privacy=pc,
                          min_survivors=6)
    assert client_epsilon([plan.noise_multiplier] * rounds, delta=1e-3) <= target


def test_dpsgd_step_matches_a_per_example_loop() -> None:
    """DPSGD.step itself (Opacus: tied embedding, RMSNorm via functorch), noise off, plain SGD at
    lr 1: the weights move by exactly −Σ_i clip(∇ loss_i) / B, computed here by a loop."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig(preset="custom", d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                vocab_size=50, max_seq_len=16))
    x, y = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
    ref = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for i in range(4):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1]).flatten(0, 1), y[i]).backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters()}  # type: ignore[union-attr]
        norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
        for n in ref:
            ref[n] += min(1.0, 0.5 / (norm + 1e-6)) * g[n]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.zero_grad()
    plan = RecordPlan(num_records=4, sample_rate=1.0, steps=1, noise_multiplier=0.0, clip=0.5, delta=1e-5,
                      target_epsilon=1.0, accountant="rdp", planned_epsilon=1.0)
    with DPSGD(m, torch.optim.SGD(m.parameters(), lr=1.0), plan=plan, generator=torch.Generator()) as dp:
        dp.step(x, y, lr=1.0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), ref[n] / 4, atol=1e-6, rtol=1e-5)
    assert not any(hasattr(p, "grad_sample") for p in m.parameters())  # hooks removed


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e3), bound=st.floats(0.01, 10), seed=st.integers(0, 1000))
def test_clip_update_bounds_norm_and_keeps_direction(scale: float, bound: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = {"a": torch.randn(7, 3, generator=g) * scale, "b": torch.randn(5, generator=g) * scale}
    c, norm = clip_update(u, max_norm=bound)
    new = math.sqrt(sum(float((t.double() ** 2).sum()) for t in c.values()))
    assert new <= bound
    if norm <= bound:
        torch.testing.assert_close(c["a"], u["a"])
    else:
        torch.testing.assert_close(c["a"] * norm / new, u["a"], rtol=1e-4, atol=1e-6)


def test_poisson_sampling_rate_is_real() -> None:
    """Each window is included with probability q: batch sizes average q·N, windows are disjoint targets."""
    import numpy as np

    tokens = np.arange(1001, dtype=np.uint16)
    rec = PoissonRecords([tokens], seq_len=10, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    assert rec.num_records == 100
    sizes = [len(rec.next()[0]) for _ in range(400)]
    assert abs(np.mean(sizes) - 10) < 0.6 and 0 < np.var(sizes) < 20  # Binomial(100, 0.1): var 9
    x, y = rec.next()
    assert bool((y[:, 0] == x[:, 0] + 1).all()) and bool((x[:, 0] % 10 == 0).all())


def test_budget_refusals_name_the_numbers() -> None:
    pc = PrivacyConfig(mode="record", target_epsilon=1.0, delta=1e-5, noise_multiplier=0.5)
    with pytest.raises(UserError, match=r"1000 DP-SGD steps .* ε = .* > privacy.target_epsilon = 1 .*at most \d+ steps"):
        plan_record_dp(num_records=10_000, batch_size=100, steps=1000, privacy=pc)
    with pytest.raises(UserError, match="delta .* must be < 1/N"):
        plan_record_dp(num_records=1000, batch_size=8, steps=10, privacy=PrivacyConfig(mode="record", delta=0.01))
    with pytest.raises(UserError, match="exceeds the 5 records"):
        plan_record_dp(num_records=5, batch_size=8, steps=10, privacy=PrivacyConfig(mode="record", delta=1e-3))
    with pytest.raises(UserError, match="expected batch of 0"):
        plan_record_dp(num_records=1000, batch_size=8, steps=10,
                       privacy=PrivacyConfig(mode="record", sample_rate=1e-4, delta=1e-5))
    with pytest.raises(UserError, match=r"30 rounds at noise multiplier 0.5 .* at most \d+ rounds"):
        plan_client_dp(num_silos=100, participations={"a": 30}, per_round=10, distributed=False,
                       privacy=PrivacyConfig(mode="client", target_epsilon=3, delta=1e-3, noise_multiplier=0.5))
    with pytest.raises(UserError, match="1/N .* N = 3 silos"):
        plan_client_dp(num_silos=3, participations={"a": 3}, per_round=3, distributed=False,
                       privacy=PrivacyConfig(mode="client", delta=0.5))


@pytest.mark.parametrize("sets, match", [
    (["privacy.mode=record", "privacy.target_epsilon=0"], "target_epsilon must be > 0"),
    (["privacy.mode=record", "privacy.clip=0"], "clip must be > 0"),
    (["privacy.mode=client"], "train.mode"),
    (["privacy.mode=client", "train.mode=federated", "federation.aggregation=median"], "sensitivity"),
    (["privacy.mode=client", "train.mode=federated", "federation.max_update_norm=0.5"], "depending on their data"),
    (["privacy.mode=record", "train.mode=federated", "federation.personalise_steps=5"], "outside"),
    (["privacy.mode=record", "train.grad_accum=2"], "grad_accum"),
])
def test_options_that_break_the_guarantee_are_refused(sets: list[str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        load_config(None, sets)


def _client_dp(tmp_path: Path, *, silos: int, rounds: int, target: float) -> RoundPrivacy:
    """The server's privacy state of a distributed-noise run: every silo in every round."""
    names = [f"s{i}" for i in range(silos)]
    pc = PrivacyConfig(mode="client", target_epsilon=target, delta=1e-5)
    plan = plan_client_dp(num_silos=100, participations=dict.fromkeys(names, rounds), per_round=silos,
                          distributed=True, privacy=pc, min_survivors=min_survivors(silos))
    ledger = PrivacyLedger(mode="client", target_epsilon=target, delta=1e-5, accountant="rdp", clip=1.0)
    server = PrivacyLedger(mode="client", target_epsilon=target, delta=1e-5, accountant="rdp", clip=1.0)
    return RoundPrivacy(ledger, plan, tmp_path / "privacy.json", 0, 1, server_ledger=server)


def test_ledger_stops_a_silo_before_it_overruns(tmp_path: Path) -> None:
    """A silo is stopped before the round that would pass its target, and a round that loses a
    silo is charged what it really released, never more than the target (attack 3: this test
    used to assert the overshoot). privacy.json states ε against a peer and against the server."""
    dp = _client_dp(tmp_path, silos=4, rounds=2, target=4.0)
    names = ["s0", "s1", "s2", "s3"]
    admitted, _ = dp.admit(names)
    dp.spend(admitted, {})
    admitted, _ = dp.admit(names)
    dp.spend(admitted[:3], {})  # one of four drops in the last admitted round: 3 >= m_min = 3 survive
    admitted, stopped = dp.admit(names)
    assert admitted == ["s3"] and all("privacy budget" in stopped[s] for s in names[:3])  # s3 spent 1 round
    rec = json.loads((tmp_path / "privacy.json").read_text())
    assert max(v["epsilon"] for v in rec["silos"].values()) <= 4.0
    assert rec["epsilon_is_against"].startswith("a peer")
    for s in names:  # the server sees one more share than a peer: less ε against it
        assert rec["against_server"][s]["epsilon"] < rec["silos"][s]["epsilon"]
    with pytest.raises(ValueError, match="fewer than the 3"):
        dp.spend(["s0", "s1"], {})  # a round of 2 is never applied under secure aggregation


@settings(max_examples=12, deadline=None)
@given(silos=st.integers(3, 6), rounds=st.integers(1, 5), target=st.floats(1.0, 8.0),
       drops=st.lists(st.integers(0, 3), min_size=8, max_size=8))
def test_epsilon_never_passes_the_target_whatever_drops(silos: int, rounds: int, target: float,
                                                        drops: list[int]) -> None:
    """Attack 3 as a property: whichever silos drop in whichever round (the last admitted one
    included), ε against a peer and against the server stays within the target; a round whose
    survivors fall below what the shares are sized for is refused, never charged."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dp = _client_dp(Path(tmp), silos=silos, rounds=rounds, target=target)
        names = [f"s{i}" for i in range(silos)]
        for r in range(rounds + 2):  # more rounds than planned: admission must stop them
            admitted, _ = dp.admit(names)
            survivors = admitted[: max(0, len(admitted) - drops[r % len(drops)])]
            if admitted and len(survivors) >= dp.min_contributors():
                dp.spend(survivors, {})
        assert dp.server_ledger is not None
        for led in (dp.ledger, dp.server_ledger):
            assert max(led.spent().values(), default=0.0) <= target * (1 + 1e-9)


def test_a_peer_faces_the_planned_noise_at_the_fewest_survivors() -> None:
    """Attack 4: a peer knows its own share; the shares are sized so that the other m_min − 1
    survivors' shares alone carry N(0, (z·C)²)."""
    pc = PrivacyConfig(mode="client", target_epsilon=4.0, delta=1e-5, clip=0.7)
    plan = plan_client_dp(num_silos=10, participations={"a": 5}, per_round=5, distributed=True, privacy=pc,
                          min_survivors=min_survivors(5))
    assert plan.min_survivors == 3
    assert plan.against_peer(3) == pytest.approx(plan.noise_multiplier)
    assert plan.against_server(3) == pytest.approx(plan.noise_multiplier * math.sqrt(3 / 2))
    assert plan.against_peer(5) > plan.noise_multiplier
    assert client_epsilon([plan.against_peer(3)] * 5, delta=1e-5) <= 4.0


def _cfg(ws: Path, *sets: str):  # type: ignore[no-untyped-def]
    return load_config(None, [f'data.workspace="{ws}"', "model.max_seq_len=64", "train.seq_len=64",
                              "train.batch_size=8", "train.threads=1", "train.warmup_steps=2",
                              "train.eval_batches=2", "privacy.delta=1e-4", *sets])


@pytest.mark.slow
def test_record_dp_run_reports_true_epsilon_and_generates(workspace: Path, tmp_path: Path) -> None:
    from fedlm.generate import generate
    from fedlm.pretrained import load_model
    from fedlm.train import train

    cfg = _cfg(workspace, "data.silos=legal", "train.steps=6", "train.checkpoint_every=3",
               "privacy.mode=record", "privacy.target_epsilon=3")
    train(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "privacy.json").read_text())
    acc = RDPAccountant()
    acc.history = [(rec["noise_multiplier"], rec["sample_rate"], rec["steps"])]
    assert rec["epsilon"] == pytest.approx(acc.get_epsilon(rec["delta"]), rel=1e-12) and rec["epsilon"] <= 3
    assert rec["steps"] == 6 and rec["sampling"] == "poisson"
    model, _ = load_model(tmp_path / "run")
    fresh = Transformer(model.cfg)
    assert list(model.state_dict()) == list(fresh.state_dict())
    assert len(list(generate(model, [1, 2, 3], max_new_tokens=5, temperature=0))) <= 5


@pytest.mark.slow
def test_record_dp_with_lora_trains_only_adapters(workspace: Path, tmp_path: Path) -> None:
    """DP-SGD over LoRA adapters: the true ε is reported, the adapters move, the base stays as it was."""
    from safetensors.torch import load_file

    from fedlm.modelio import stored_state
    from fedlm.pretrained import load_model
    from fedlm.train import build_model, train

    cfg = _cfg(workspace, "data.silos=legal", "train.steps=4", "train.checkpoint_every=2",
               "privacy.mode=record", "privacy.target_epsilon=3", "lora.rank=4")
    train(cfg, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "privacy.json").read_text())
    acc = RDPAccountant()
    acc.history = [(rec["noise_multiplier"], rec["sample_rate"], rec["steps"])]
    assert rec["epsilon"] == pytest.approx(acc.get_epsilon(rec["delta"]), rel=1e-12) and rec["epsilon"] <= 3
    resolved = load_config(tmp_path / "run" / "config.toml")
    start = stored_state(build_model(resolved))  # the run's seeded start
    ckpt = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert ckpt and all("lora_" in n for n in ckpt)  # a LoRA checkpoint holds what trains: the adapters
    moved = [n for n in ckpt if not torch.equal(ckpt[n], start[n])]
    tuned = stored_state(load_model(tmp_path / "run")[0])  # base + merged adapters
    plain = [n for n in tuned if "lora_" not in n and n in start and not any(
        n.startswith(a.split(".lora_")[0]) for a in ckpt)]
    assert plain and all(torch.equal(tuned[n], start[n]) for n in plain)  # the base stays as it was
    assert any("lora_B" in n for n in moved)  # B starts at 0: the noisy steps moved it


@pytest.mark.slow
def test_federated_record_dp_with_lora_sends_only_adapters(workspace: Path, tmp_path: Path) -> None:
    """Federated DP-SGD over LoRA adapters: rounds complete, each silo's ε is logged, and only
    adapter arrays cross the wire (bytes up = the adapters' fp32 size)."""
    from fedlm.federation.runner import run_federated
    from fedlm.lora import num_trainable
    from fedlm.train import build_model

    cfg = _cfg(workspace, "train.mode=federated", "federation.rounds=2", "federation.local_steps=2",
               "privacy.mode=record", "privacy.target_epsilon=3", "lora.rank=4")
    run_federated(cfg, tmp_path / "fed")
    rows = [json.loads(line) for line in (tmp_path / "fed" / "rounds.jsonl").read_text().splitlines()]
    assert all(row["completed"] for row in rows) and len(rows) == 2
    assert 0 < max(rows[-1]["epsilon"].values()) <= 3
    adapters = num_trainable(build_model(load_config(tmp_path / "fed" / "config.toml")))
    for silo in rows[-1]["silos"].values():
        assert 4 * adapters <= silo["bytes_up"] < 4 * adapters + 64 * 1024  # the arrays plus message framing


@pytest.mark.slow
def test_client_dp_federated_logs_epsilon_per_silo(workspace: Path, tmp_path: Path) -> None:
    from fedlm.federation.runner import run_federated

    cfg = _cfg(workspace, "train.mode=federated", "federation.rounds=2", "federation.local_steps=1",
               "train.batch_size=2", "privacy.mode=client", "privacy.target_epsilon=6", "privacy.delta=0.01")
    run_federated(cfg, tmp_path / "fed")
    rows = [json.loads(line) for line in (tmp_path / "fed" / "rounds.jsonl").read_text().splitlines()]
    rec = json.loads((tmp_path / "fed" / "privacy.json").read_text())
    z = rec["noise_multiplier"]
    for i, row in enumerate(rows, start=1):
        assert set(row["epsilon"]) == {"legal", "technical", "drama"}
        for eps in row["epsilon"].values():
            acc = RdpAccountant()
            acc.compose(dp_accounting.GaussianDpEvent(z), i)
            assert eps == pytest.approx(acc.get_epsilon(0.01), rel=1e-9)
    assert max(rows[-1]["epsilon"].values()) <= 6


def test_federated_budget_that_cannot_fit_is_refused_before_round_1(workspace: Path, tmp_path: Path) -> None:
    from fedlm.federation.runner import run_federated

    cfg = _cfg(workspace, "train.mode=federated", "federation.rounds=50", "federation.local_steps=1",
               "privacy.mode=client", "privacy.target_epsilon=1", "privacy.noise_multiplier=0.5",
               "privacy.delta=0.01")
    with pytest.raises(UserError, match="50 rounds at noise multiplier 0.5"):
        run_federated(cfg, tmp_path / "fed")
    assert not (tmp_path / "fed" / "rounds.jsonl").exists()
    cfg = _cfg(workspace, "train.mode=federated", "federation.rounds=2", "federation.local_steps=1",
               "privacy.mode=record", "train.batch_size=100000")
    with pytest.raises(UserError, match="silo .* exceeds the .* records"):
        run_federated(cfg, tmp_path / "fed2")
