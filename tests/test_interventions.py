"""Each intervention does what it claims on a toy case."""

from __future__ import annotations

import pytest
import torch

from collapse_core.interventions import build_interventions
from collapse_core.interventions.diversity import diversity_penalty, vicreg_terms
from collapse_core.interventions.olora import OLoRA, olora_penalty
from collapse_core.interventions.refresh import refresh_units, shrink_and_perturb, unit_utilities
from collapse_core.interventions.replay import Replay, replay_count
from collapse_core.metrics import effective_rank
from tiny_models import make_tiny_model


def test_olora_zero_for_orthogonal_and_grows_with_overlap():
    basis = torch.linalg.qr(torch.randn(32, 32)).Q
    past = [basis[:, :4].T.contiguous()]  # r=4 rows in a 32-d input space
    orthogonal = basis[:, 4:8].T.contiguous()
    assert olora_penalty(past, orthogonal).item() == pytest.approx(0.0, abs=1e-5)
    values = []
    for mix in (0.0, 0.3, 0.6, 1.0):
        new = (1 - mix) * orthogonal + mix * past[0]
        values.append(olora_penalty(past, new).item())
    assert values == sorted(values) and values[-1] > values[0] + 1.0
    # the gradient pushes the new A away from the past subspace
    new = (0.5 * orthogonal + 0.5 * past[0]).requires_grad_(True)
    opt = torch.optim.SGD([new], lr=0.05)
    before = olora_penalty(past, new).item()
    for _ in range(20):
        opt.zero_grad()
        olora_penalty(past, new).backward()
        opt.step()
    assert olora_penalty(past, new).item() < 0.5 * before


def test_olora_reads_past_adapters_from_disk(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = make_tiny_model("llama", seed=1)
    peft = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(tmp_path / "a1")
    olora = OLoRA({"lam": 1.0})
    olora.bind(None, [str(tmp_path / "a1")])
    olora.before_stage(model, 2, "math")
    assert len(olora.past) == 2  # one q_proj per block
    term = olora.extra_loss(peft, {}, None)  # same A as the past one: large overlap
    assert term is not None and term.item() > 0


def test_diversity_term_raises_effective_rank_of_collapsed_toy():
    """Same training with and without the penalty from a collapsed start."""

    def train(mu: float) -> float:
        torch.manual_seed(0)
        x = torch.randn(256, 16)
        y = x @ torch.randn(16, 1)
        u, v = torch.randn(16, 1), torch.randn(16, 1)
        w = torch.nn.Parameter(u @ v.T / 4 + 0.01 * torch.randn(16, 16))
        readout = torch.nn.Parameter(torch.randn(16, 1) * 0.1)
        opt = torch.optim.Adam([w, readout], lr=1e-2)
        for _ in range(300):
            z = x @ w.T
            loss = ((z @ readout - y) ** 2).mean()
            if mu:
                loss = loss + mu * diversity_penalty(z)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return effective_rank((x @ w.T).detach().numpy())

    without, with_penalty = train(0.0), train(5.0)
    assert with_penalty > without + 2.0, (without, with_penalty)


def test_vicreg_terms_closed_forms():
    torch.manual_seed(0)
    iso = torch.randn(20000, 8)
    var_term, cov_term = vicreg_terms(iso)
    assert var_term.item() == pytest.approx(0.0, abs=0.02)  # std ≈ 1/sqrt(d) = γ
    assert cov_term.item() < 1e-3
    collapsed = torch.randn(2000, 1) @ torch.ones(1, 8)
    var_c, cov_c = vicreg_terms(collapsed)
    assert cov_c.item() > 100 * cov_term.item()


def test_refresh_reinitialises_exactly_the_selected_units():
    model, tok = make_tiny_model("llama", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = tok(["hello there, general kenobi", "a second text to measure"], return_tensors="pt",
              padding=True)  # fmt: skip
    utilities = unit_utilities(model, [dict(enc)])
    assert len(utilities) == 2 and utilities[0].shape == (64,)
    chosen = refresh_units(model, utilities, rate=0.125, seed=0)
    after = model.state_dict()
    for layer, idx in chosen.items():
        assert len(idx) == 8
        # lowest-utility units were chosen
        assert set(idx.tolist()) == set(torch.argsort(utilities[layer])[:8].tolist())
        mlp = f"model.layers.{layer}.mlp."
        keep = torch.ones(64, dtype=torch.bool)
        keep[idx] = False
        for name in ("gate_proj", "up_proj"):
            w0, w1 = before[mlp + name + ".weight"], after[mlp + name + ".weight"]
            assert torch.equal(w0[keep], w1[keep])
            assert not torch.equal(w0[~keep], w1[~keep])
        d0, d1 = before[mlp + "down_proj.weight"], after[mlp + "down_proj.weight"]
        assert torch.equal(d0[:, keep], d1[:, keep])
        assert torch.count_nonzero(d1[:, ~keep]) == 0
    untouched = [k for k in before if ".mlp." not in k]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_shrink_and_perturb():
    model, _ = make_tiny_model("llama", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrink_and_perturb(model, shrink=1.0, noise=0.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shrink_and_perturb(model, shrink=0.5, noise=0.0)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(model.state_dict()[w], 0.5 * before[w])
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"],
                       before["model.embed_tokens.weight"])  # fmt: skip


@pytest.mark.parametrize("batch_size,fraction,expected", [(8, 0.25, 2), (4, 0.5, 2), (10, 0.3, 3)])
def test_replay_mixes_exact_fraction(batch_size, fraction, expected):
    assert replay_count(batch_size, fraction) == expected
    replay = Replay({"fraction": fraction})
    replay.set_pool([f"old{i}" for i in range(50)])
    replay.set_stage(2, "math")
    replay.stage = "math"
    for step in range(5):
        batch = [f"new{i}" for i in range(batch_size)]
        mixed = replay.batch_mixer(step, batch)
        assert len(mixed) == batch_size
        assert sum(m.startswith("old") for m in mixed) == expected
    # deterministic
    assert replay.batch_mixer(3, list("abcdefgh")) == replay.batch_mixer(3, list("abcdefgh"))


def test_build_interventions_composes_and_rejects_unknown():
    composite = build_interventions("replay+olora", {"replay": {"fraction": 0.5}}, None, ["sft"])
    assert [p.name for p in composite.parts] == ["replay", "olora"]
    assert build_interventions("baseline", {}, None, []).hooks(1, "sft") is None
    from collapse_core.errors import CollapseError

    with pytest.raises(CollapseError, match="unknown intervention"):
        build_interventions("dropout", {}, None, [])
