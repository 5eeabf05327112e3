"""Batch plans of the probe: packed rows, padded rows, and the check that picks between them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from collapse_core.batching import (
    Batch,
    batch_tensors,
    pack_width,
    packed_batches,
    packing_supported,
    padded_batches,
    plan_batches,
)
from collapse_core.models import load_model, model_parts
from collapse_core.probesets import load_probe_set
from collapse_core.probing import ProbeConfig, run_capture, summarise, tokenize_probe_set
from tiny_models import make_tiny_model

MIXED = [14, 35, 22, 9, 30, 3, 28, 17, 17, 40, 1, 26, 12, 33, 8, 21, 19, 5, 24, 11]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_packed_rows_hold_every_prompt_once_within_width_and_memory_bound(batch_size):
    """Each prompt lands in exactly one row; no row is fuller than the pack width; no forward
    holds more positions than batch_size prompts of max_length; with mixed lengths the plan
    has fewer forwards than the sorted padded one, and fewer positions wherever that one pads."""
    max_length = 48
    batches = packed_batches(MIXED, batch_size, max_length)
    width = pack_width(MIXED, max_length)
    assert width == 48  # the longest prompt is 40, PACK_WIDTH is capped by max_length
    assert sorted(p for b in batches for p in b.prompts) == list(range(len(MIXED)))
    for b in batches:
        assert b.packed
        fills = [sum(MIXED[p] for p in row) for row in b.rows]
        assert max(fills) == b.width <= width
        assert len(b.rows) * b.width <= batch_size * max_length
    positions = sum(len(b.rows) * b.width for b in batches)
    padded = padded_batches(MIXED, batch_size)
    # one prompt per padded forward has no padding: packing then saves forwards only
    assert positions <= sum(len(b.rows) * b.width for b in padded) - (batch_size > 1)
    assert len(batches) < len(padded)
    # best fit: at most one row is at most half full (two such rows would have been merged)
    fills = [sum(MIXED[p] for p in row) for b in batches for row in b.rows]
    assert sum(f <= width // 2 for f in fills) <= 1


def _best_fit_by_scan(lengths: list[int], width: int) -> list[list[int]]:
    """Best-fit decreasing the plain way: scan every row for the fullest that still fits."""
    rows: list[list[int]] = []
    fills: list[int] = []
    for p in sorted(range(len(lengths)), key=lambda p: -lengths[p]):
        fits = [r for r, fill in enumerate(fills) if fill + lengths[p] <= width]
        if fits:
            r = max(fits, key=lambda r: (fills[r], -r))
            rows[r].append(p)
            fills[r] += lengths[p]
        else:
            rows.append([p])
            fills.append(lengths[p])
    return rows


def test_packing_picks_the_rows_a_full_scan_would():
    """The bucketed best fit (heaps of rows per fill) packs exactly as the quadratic scan of
    every row does, ties to the lowest row included, on random lengths (zeros among them)."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        max_length = int(rng.choice([8, 32, 64, 200]))
        lengths = rng.integers(0, max_length + 1, size=int(rng.integers(1, 150))).tolist()
        width = pack_width(lengths, max_length)
        want = sorted(_best_fit_by_scan(lengths, width))
        got = sorted(list(row) for b in packed_batches(lengths, 7, max_length) for row in b.rows)
        assert got == want


def test_batch_tensors_restart_positions_per_prompt_and_map_every_token():
    ids = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    packed = batch_tensors(Batch(((2, 1), (0,)), 6, True), ids, pad_id=0)
    assert set(packed.model_inputs) == {"input_ids", "position_ids"}
    assert packed.model_inputs["input_ids"].tolist() == [
        [30, 31, 32, 33, 20, 21],
        [10, 11, 12, 12, 12, 12],  # the tail repeats the last token, never the pad id
    ]
    assert packed.model_inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert packed.valid.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
    assert packed.prompts == [2, 1, 0]
    assert packed.slot_prompt.tolist() == [[0, 0, 0, 0, 1, 1], [2, 2, 2, -1, -1, -1]]
    assert [packed.flat_index(p, 1) for p in (2, 1, 0)] == [1, 5, 7]
    # drop_first: each prompt's first token is attended to (same inputs) but not measured
    skipped = batch_tensors(Batch(((2, 1), (0,)), 6, True), ids, pad_id=0, skip_first=1)
    assert skipped.valid.tolist() == [
        [False, True, True, True, False, True],
        [False, True, True, False, False, False],
    ]
    assert all(torch.equal(skipped.model_inputs[k], v) for k, v in packed.model_inputs.items())
    padded = batch_tensors(Batch(((2,), (0,)), 4, False), ids, pad_id=0)
    assert set(padded.model_inputs) == {"input_ids", "attention_mask"}
    assert padded.model_inputs["input_ids"].tolist() == [[30, 31, 32, 33], [10, 11, 12, 0]]
    assert padded.model_inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    skipped = batch_tensors(Batch(((2,), (0,)), 4, False), ids, pad_id=0, skip_first=1)
    assert skipped.model_inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert skipped.valid.tolist() == [[False, True, True, True], [False, True, True, False]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_models_honour_packed_rows(arch):
    model, _ = make_tiny_model(arch)
    assert packing_supported(model, model_parts(model).blocks, torch.device("cpu"))


def _ignore_position_ids(model: nn.Module) -> nn.Module:
    """Make ``model`` take ``position_ids`` and drop them (positions 0 … T−1 in every row and a
    full causal mask): packed prompts then see each other, so packing must be refused."""
    forward = model.forward

    def without_positions(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.forward = without_positions
    return model


def test_a_model_that_ignores_packing_falls_back_to_padded_rows_with_the_same_metrics(tmp_path):
    make_tiny_model("llama", path=tmp_path, seed=1)
    honest, ignoring = (load_model(str(tmp_path), device="cpu") for _ in range(2))
    _ignore_position_ids(ignoring.model)
    ids = [[(7 * i + p) % 200 + 3 for i in range(n)] for p, n in enumerate(MIXED)]
    config = ProbeConfig(max_length=48, batch_size=4, n_samples=64)
    blocks = model_parts(ignoring.model).blocks
    assert not packing_supported(ignoring.model, blocks, torch.device("cpu"))
    assert not any(b.packed for b in plan_batches(ignoring.model, blocks, "cpu", MIXED, 4, 48))

    def metrics(loaded) -> tuple[list[Batch], np.ndarray]:
        capture, _ = run_capture(loaded, ids, config)
        long, _ = summarise(capture, config)
        wide = long.pivot(index="layer", columns="metric", values="value")
        return capture.batches, wide.sort_index(axis=1).to_numpy()

    packed_plan, packed = metrics(honest)
    padded_plan, padded = metrics(ignoring)
    assert all(b.packed for b in packed_plan) and not any(b.packed for b in padded_plan)
    np.testing.assert_allclose(packed, padded, rtol=1e-4, atol=1e-6)


def test_equal_lengths_keep_padded_rows():
    """Windows of one length: packing cannot save a position, so the plan stays padded (and
    the check is not even run)."""
    model, _ = make_tiny_model("llama")
    plan = plan_batches(model, model_parts(model).blocks, "cpu", [32] * 10, 4, 32)
    assert [(len(b.rows), b.width, b.packed) for b in plan] == [(4, 32, False)] * 2 + [
        (2, 32, False)
    ]


@pytest.mark.real_model
def test_real_smollm2_packs_the_default_probe_set():
    """SmolLM2 honours packed rows; on the 64-prompt `general` set at 64 tokens the probe runs
    2 forwards of 1,510 positions instead of 4 of 1,632 (sorted padded). The same model made
    to ignore position ids is refused: its second prompt's tokens move by 24–92 % of their
    norms (token norms here span 76–860, so the check compares each token to its own)."""
    loaded = load_model("smollm2", device="cpu")
    config = ProbeConfig()
    ids = tokenize_probe_set(loaded.tokenizer, load_probe_set("general"), config)
    lengths = [len(x) for x in ids]
    blocks = model_parts(loaded.model).blocks
    assert packing_supported(loaded.model, blocks, loaded.device)
    plan = plan_batches(loaded.model, blocks, loaded.device, lengths, config.batch_size, 64)
    assert all(b.packed for b in plan)
    padded = padded_batches(lengths, config.batch_size)
    positions = [sum(len(b.rows) * b.width for b in p) for p in (plan, padded)]
    assert (len(plan), len(padded)) == (2, 4) and positions[0] < positions[1]
    assert sum(lengths) <= positions[0]
    ignoring = load_model("smollm2", device="cpu")
    _ignore_position_ids(ignoring.model)
    assert not packing_supported(ignoring.model, model_parts(ignoring.model).blocks, "cpu")
