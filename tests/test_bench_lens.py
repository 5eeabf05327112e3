"""``bench lens``: the two-phase logit-lens study (estimator, proxy, bootstrap, table)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from collapse_core.devtools import bench_lens as B
from collapse_core.lens import lens_sample_index, nested_design, predicted_variance_ratio
from collapse_core.models import load_model
from collapse_core.probing import ProbeConfig, run_capture, tokenize_probe_set


def test_difference_estimate_is_exact_when_the_proxy_is_off_by_a_constant():
    """With x = y − c at every token, ȳ_m + x̄_n − x̄_m is the mean of y over the n proxy
    tokens, for the plain estimate and for every bootstrap replicate."""
    rng = np.random.default_rng(0)
    y = rng.normal(5.0, 2.0, size=96)
    x = y - 3.25
    exact_rows, proxy_rows = B.design_rows(len(y), 12, 48)
    got = B.difference_estimate(y[exact_rows], x[exact_rows], x[proxy_rows])
    assert got == pytest.approx(y[proxy_rows].mean(), abs=1e-12)
    counts = B.prompt_bootstrap_counts(np.arange(len(y)) // 4, n_boot=50, seed=1)
    replicates = B.difference_estimate(
        y[exact_rows], x[exact_rows], x[proxy_rows], counts[:, exact_rows], counts[:, proxy_rows]
    )
    expected = (counts[:, proxy_rows] @ y[proxy_rows]) / counts[:, proxy_rows].sum(1)
    finite = np.isfinite(replicates)
    assert finite.mean() > 0.5
    np.testing.assert_allclose(replicates[finite], expected[finite], atol=1e-12)
    # a proxy unrelated to y does not give the mean of y
    noise = rng.normal(size=96)
    assert B.difference_estimate(
        y[exact_rows], noise[exact_rows], noise[proxy_rows]
    ) != pytest.approx(y[proxy_rows].mean(), abs=1e-3)


def test_design_rows_nest_the_exact_tokens_in_the_proxy_tokens():
    exact_rows, proxy_rows = B.design_rows(512, 16, 192)
    assert len(proxy_rows) == 192 and len(exact_rows) == 16
    assert set(exact_rows) <= set(proxy_rows)
    assert proxy_rows.min() == 0 and proxy_rows.max() == 511  # spread over the whole subsample


def test_prompt_bootstrap_counts_resample_whole_prompts():
    prompt_of_row = [3, 3, 3, 7, 7, 9]
    counts = B.prompt_bootstrap_counts(prompt_of_row, n_boot=200, seed=0)
    assert counts.shape == (200, 6)
    assert np.all(counts[:, 0] == counts[:, 1]) and np.all(counts[:, 3] == counts[:, 4])
    # each replicate draws 3 prompts: row-weighted, the draws of the three prompts sum to 3
    np.testing.assert_array_equal(counts[:, 0] + counts[:, 3] + counts[:, 5], 3)
    assert counts[:, 0].std() > 0  # it resamples
    # the very draws the probe's CIs use (uncertainty.prompt_draws), in prompt order 3, 7, 9
    from collapse_core.uncertainty import prompt_draws

    draws = np.asarray(list(prompt_draws(3, 200, 0)))
    np.testing.assert_array_equal(counts[:, [0, 3, 5]], draws)


def test_prefix_vocab_entropy_is_the_entropy_of_the_head_cut_to_its_first_ids():
    """On a tiny model: k = V gives the probe's own exact lens entropy; k < V the entropy of
    softmax over the first k logits of norm → head, computed independently here."""
    loaded = load_model("tiny-random", device="cpu")
    config = ProbeConfig(max_length=16, batch_size=4, n_samples=40, max_prompts=8,
                         logit_lens=False)  # fmt: skip
    ids = tokenize_probe_set(loaded.tokenizer, _probe_set(), config)
    capture, _ = run_capture(loaded, ids, config)
    hidden = capture.state.samples[1]
    vocab = capture.parts.lm_head.weight.shape[0]
    full = B.prefix_vocab_entropy(capture, hidden, vocab)
    own, _ = capture._head_entropy(hidden, False)
    np.testing.assert_allclose(full.numpy(), own.numpy(), rtol=1e-6)
    with torch.no_grad():
        logits = capture.parts.lm_head(capture.parts.final_norm(hidden)).double()[:, :37]
    p = torch.softmax(logits, dim=1)
    expected = -(p * torch.log(p)).sum(1)
    got = B.prefix_vocab_entropy(capture, hidden, 37)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5)
    assert not np.allclose(got.numpy(), full.numpy(), rtol=1e-3)
    # the row's own id joins the prefix when it lies past it, and changes nothing inside it
    own_ids = torch.tensor([5, 36, 37, 200] * (hidden.shape[0] // 4 + 1))[: hidden.shape[0]]
    with_own = B.prefix_vocab_entropy(capture, hidden, 37, own_ids)
    inside = own_ids < 37
    np.testing.assert_allclose(with_own[inside].numpy(), got[inside].numpy(), rtol=1e-6)
    with torch.no_grad():
        all_logits = capture.parts.lm_head(capture.parts.final_norm(hidden)).double()
    for row in torch.nonzero(~inside).flatten().tolist():
        z = torch.cat([all_logits[row, :37], all_logits[row, own_ids[row]].reshape(1)])
        q = torch.softmax(z, 0)
        assert float(with_own[row]) == pytest.approx(float(-(q * q.log()).sum()), rel=1e-5)


def test_bench_lens_prints_every_design_and_scores_the_exact_lens_against_itself(capsys):
    args = argparse.Namespace(model="tiny-random", prompts=32, tokens=32, batch_size=8,
                              repeats=2, threads=0, device="cpu")  # fmt: skip
    assert B.bench_lens(args) == 0
    out = capsys.readouterr().out
    assert "2 subsample(s)" in out
    lines = {line[:32].strip(): line for line in out.splitlines()}
    probe_row = lines["exact 64"].split()
    assert probe_row[2:5] == ["1.00x", "0.00", "1.00x"]  # cost, saved, SE ratio vs itself
    fewer = lines["exact 16"].split()
    assert float(fewer[2].rstrip("x")) == pytest.approx(0.25)
    assert float(fewer[4].rstrip("x")) > 1.3  # a quarter of the tokens: wider CIs
    designs = [label for label in lines if label.startswith("k=")]
    assert len(designs) == len(B.PROXIES) * (len(B.DESIGNS) + len(B.ADAPTIVE))
    # The tiny random model's ids carry no frequency order, so no prefix proxy tracks its
    # lens: an adaptive design tops up every layer and is the exact lens, SE ratio 1 exactly.
    adaptive = [lines[label].replace(" (probe)", "").split() for label in designs if ".." in label]
    assert len(adaptive) == len(B.PROXIES) * len(B.ADAPTIVE)
    assert sum("(probe)" in label for label in designs) == 1  # the probe's own design
    for row in adaptive:
        assert row[5:7] == ["1.00x", "1.00x"] and row[-1] == "2/2"  # SE median, worst


def test_bench_lens_refuses_a_subsample_too_small_for_the_lens():
    from collapse_core.errors import CollapseError

    args = argparse.Namespace(model="tiny-random", prompts=4, tokens=8, batch_size=4,
                              repeats=1, threads=0, device="cpu")  # fmt: skip
    with pytest.raises(CollapseError, match="subsample holds .* tokens"):
        B.bench_lens(args)


def _probe_set():
    from collapse_core.probesets import load_probe_set

    return load_probe_set("general")


def test_adaptive_rows_take_the_exact_tokens_from_the_lens_and_nest_them_in_the_proxy():
    design = nested_design(512, 64, 24, 128)
    exact_rows, lens_rows, proxy_rows = design.exact, design.lens, design.proxy
    np.testing.assert_array_equal(lens_rows, lens_sample_index(512, 64))  # the probe's lens
    assert len(exact_rows) == 24 and set(exact_rows) <= set(lens_rows)
    assert set(exact_rows) <= set(proxy_rows) and len(proxy_rows) >= 128


def test_predicted_variance_ratio_tops_up_only_where_the_proxy_is_weak():
    """A proxy off by a constant predicts Var = s_y²/n (ratio L/n); an unrelated proxy with
    m ≪ L predicts more than the exact lens (ratio > 1, so the layer is topped up)."""
    rng = np.random.default_rng(3)
    y = rng.normal(4.0, 1.5, size=(24, 2))
    x = np.column_stack([y[:, 0] - 2.0, rng.normal(size=24)])
    ratio = predicted_variance_ratio(y, x, 128, 64)
    assert ratio[0] == pytest.approx(64 / 128)
    assert ratio[1] > 1
    flat = np.full((24, 1), 3.0)  # no spread at all: nothing to gain, nothing to top up
    assert predicted_variance_ratio(flat, flat, 128, 64)[0] == 0.0
