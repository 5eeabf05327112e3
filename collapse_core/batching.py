"""How a probe lays its prompts out in forward batches: padded rows or packed rows.

A padded batch holds one prompt per row, right-padded to its longest prompt, and the forward
pays for every padded position. Sorting prompts by length (:func:`length_sorted_order`) cuts
the padding; packing removes it: several prompts share one row, each with its own position ids
0 … n−1, and the attention is block-diagonal, so no prompt sees another. transformers builds
that mask itself from the position ids when no attention mask is passed (its "packed sequence"
format, ``masking_utils.find_packed_sequence_indices``), the same path padding-free training
uses. Packing also needs fewer forwards for the same tokens, and on a CPU each forward streams
every weight once (≈ 0.11 s for SmolLM2 on one core, whatever the batch).

On the default 64-prompt probe set at 64 tokens (1,439 tokens): 2,032 padded positions in
prompt order, 1,632 sorted in 4 forwards, 1,510 packed in 2 forwards.

Packing is exact only if the model honours the packed format, so :func:`packing_supported`
checks it on the model itself (states of a packed row against the same prompts padded, through
the first blocks) and the probe falls back to sorted padded rows where it does not hold.
"""

from __future__ import annotations

import bisect
import heapq
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .models import forward_accepts

#: Packed rows are at least this many tokens wide (or the longest prompt, if longer), capped
#: by the probe's ``max_length``: wide enough to pair typical prompts, narrow enough that the
#: masked attention over a row (∝ width²) stays a few percent of the forward.
PACK_WIDTH = 128

#: What one forward costs beyond its token positions, in positions: each forward streams every
#: weight once (SmolLM2, one CPU core: 0.11 s per forward, 3.2 ms per position).
FORWARD_COST_POSITIONS = 32

#: Blocks the packing check runs through: the mask and positions are built once per forward,
#: and models that alternate local and global attention do so with a short period.
_CHECK_BLOCKS = 4


@dataclass(frozen=True)
class Batch:
    """One forward: ``rows[r]`` lists the prompts laid end to end in row r, in order; the
    tensors are ``len(rows)`` × ``width``. Padded batches hold one prompt per row."""

    rows: tuple[tuple[int, ...], ...]
    width: int
    packed: bool

    @property
    def prompts(self) -> list[int]:
        """Every prompt of the batch, row by row."""
        return [p for row in self.rows for p in row]


def length_sorted_order(lengths: list[int]) -> list[int]:
    """Prompt indices longest first (ties in prompt order): the order prompts are batched in.

    Batching prompts of similar length cuts padding, and longest first puts the widest batch,
    and so the forward's peak memory, at the start, where running out of memory fails fast.
    Causal attention never lets a padded position reach a real one, so the measured states do
    not depend on the batching beyond float rounding.
    """
    return sorted(range(len(lengths)), key=lambda p: -lengths[p])


def padded_batches(lengths: list[int], batch_size: int) -> list[Batch]:
    """``batch_size`` prompts per forward in :func:`length_sorted_order`, one per row, each
    batch as wide as its longest prompt."""
    order = length_sorted_order(lengths)
    batches = []
    for start in range(0, len(order), batch_size):
        prompts = order[start : start + batch_size]
        rows = tuple((p,) for p in prompts)
        batches.append(Batch(rows, max(lengths[p] for p in prompts), packed=False))
    return batches


def pack_width(lengths: list[int], max_length: int) -> int:
    """Row width of a packed probe: the longest prompt, or :data:`PACK_WIDTH` capped at
    ``max_length`` if that is wider."""
    return max(max(lengths), min(PACK_WIDTH, max_length))


def packed_batches(lengths: list[int], batch_size: int, max_length: int) -> list[Batch]:
    """Prompts packed into rows of :func:`pack_width` tokens by best-fit decreasing (each
    prompt, longest first, goes into the fullest row it fits in; Johnson 1973), then the rows,
    fullest first, into forwards of batch_size · max_length / width rows, so a forward never
    holds more token positions than ``batch_size`` prompts of ``max_length`` tokens padded
    would. Each batch is as wide as its fullest row."""
    width = pack_width(lengths, max_length)
    fills: list[int] = []
    rows: list[list[int]] = []
    # Rows by fill (a heap of row indices per fill, the fills sorted): the best fit is the
    # largest fill ≤ width − n, lowest row first, in O(log) per prompt instead of a scan of
    # every row (quadratic: minutes at the 100,000-prompt limit).
    rows_at: dict[int, list[int]] = {}
    open_fills: list[int] = []
    for p in length_sorted_order(lengths):
        i = bisect.bisect_right(open_fills, width - lengths[p]) - 1
        if i >= 0:
            fill = open_fills[i]
            r = heapq.heappop(rows_at[fill])
            if not rows_at[fill]:
                del rows_at[fill], open_fills[i]
            rows[r].append(p)
            fills[r] = fill + lengths[p]
        else:
            r = len(rows)
            rows.append([p])
            fills.append(lengths[p])
        if fills[r] not in rows_at:
            rows_at[fills[r]] = []
            bisect.insort(open_fills, fills[r])
        heapq.heappush(rows_at[fills[r]], r)
    order = sorted(range(len(rows)), key=lambda r: (-fills[r], r))
    per_batch = max(1, batch_size * max_length // width)
    batches = []
    for start in range(0, len(order), per_batch):
        chosen = order[start : start + per_batch]
        batches.append(
            Batch(tuple(tuple(rows[r]) for r in chosen), max(fills[r] for r in chosen), True)
        )
    return batches


@dataclass
class BatchTensors:
    """A :class:`Batch` as model inputs and the capture's view of it.

    ``valid`` (rows × width, bool): the tokens to measure (not padding, nor the first
    ``skip_first`` of each prompt); ``slot_prompt`` (rows × width): for each position, the index
    into ``prompts`` of the prompt it belongs to (−1: padding); ``offsets[p]``: the flat index
    (row · width + column) of prompt p's first token."""

    model_inputs: dict[str, torch.Tensor]
    valid: torch.Tensor
    slot_prompt: torch.Tensor
    prompts: list[int]
    offsets: dict[int, int]

    def flat_index(self, prompt: int, position: int) -> int:
        """Flat index (row · width + column) of token ``position`` of ``prompt``."""
        return self.offsets[prompt] + position

    def inputs_on(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """``model_inputs`` moved to ``device``."""
        return {name: tensor.to(device) for name, tensor in self.model_inputs.items()}


def batch_tensors(
    batch: Batch, ids: list[list[int]], pad_id: int, skip_first: int = 0
) -> BatchTensors:
    """Token ids, and the attention mask (padded) or per-prompt position ids (packed), of
    ``batch``; ``ids[p]`` are prompt p's token ids. The first ``skip_first`` tokens of each
    prompt are attended to but not measured (the probe's ``drop_first``)."""
    n_rows, width = len(batch.rows), batch.width
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    valid = torch.zeros((n_rows, width), dtype=torch.bool)
    slot_prompt = torch.full((n_rows, width), -1, dtype=torch.long)
    positions = torch.zeros((n_rows, width), dtype=torch.long)
    prompts, offsets = batch.prompts, {}
    slot_of = {p: i for i, p in enumerate(prompts)}
    for r, row in enumerate(batch.rows):
        column = 0
        for p in row:
            n = len(ids[p])
            input_ids[r, column : column + n] = torch.tensor(ids[p], dtype=torch.long)
            attention[r, column : column + n] = 1
            valid[r, column + skip_first : column + n] = True
            slot_prompt[r, column : column + n] = slot_of[p]
            positions[r, column : column + n] = torch.arange(n)
            offsets[p] = r * width + column
            column += n
        # Padding after the last prompt continues its positions, so transformers reads it as
        # part of that prompt's segment: causal attention keeps it out of every real token.
        # In a packed row it repeats the last token, not the pad id, because transformers
        # warns about pad ids in inputs without an attention mask.
        if column < width and column:
            positions[r, column:] = torch.arange(width - column) + positions[r, column - 1] + 1
            if batch.packed:
                input_ids[r, column:] = input_ids[r, column - 1]
    if batch.packed:
        model_inputs = {"input_ids": input_ids, "position_ids": positions}
    else:
        model_inputs = {"input_ids": input_ids, "attention_mask": attention}
    return BatchTensors(model_inputs, valid, slot_prompt, prompts, offsets)


class _StopAfterBlock(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


_SUPPORT: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _states_after(model: nn.Module, block: nn.Module, inputs: dict) -> torch.Tensor:
    """The output of ``block`` for ``inputs``; the forward stops there."""

    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise _StopAfterBlock(output[0] if isinstance(output, tuple) else output)

    handle = block.register_forward_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _StopAfterBlock as done:
        return done.hidden
    finally:
        handle.remove()
    raise RuntimeError("the forward never reached the checked block")


def packing_supported(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> bool:
    """Whether ``model`` gives a packed row the same states as the same prompts padded.

    Two prompts (5 and 4 tokens) run packed in one row and padded in two rows, through the
    first :data:`_CHECK_BLOCKS` blocks. The second prompt is the test: with a block-diagonal
    mask and its own positions it sees only itself, as when padded; a model that ignores the
    packed format lets it attend to the first prompt, or gives it positions 5 … 8, and its states
    move by O(1) relative. Every token's states within 1e-3 of their norm (2e-2 for 16-bit
    weights) passes.
    Cached per model object (the answer depends on the code, not on the weights)."""
    if model in _SUPPORT:
        return _SUPPORT[model]
    supported = False
    if forward_accepts(model, "position_ids") and len(blocks):
        vocab = getattr(model.config, "vocab_size", None) or 2
        ids = [[(7 * i + 3) % vocab for i in range(5)], [(11 * i + 5) % vocab for i in range(4)]]
        block = blocks[min(len(blocks), _CHECK_BLOCKS) - 1]
        packed = batch_tensors(Batch(((0, 1),), 9, True), ids, 0)
        padded = batch_tensors(Batch(((0,), (1,)), 5, False), ids, 0)
        try:
            got = _states_after(model, block, packed.inputs_on(device))
            want = _states_after(model, block, padded.inputs_on(device))
            got = torch.cat([got[0, :5], got[0, 5:9]]).float()
            want = torch.cat([want[0, :5], want[1, :4]]).float()
            # per token, relative to its own norm: a massive activation elsewhere must not
            # hide a leak into the ordinary rows
            error = torch.linalg.vector_norm(got - want, dim=1) / torch.linalg.vector_norm(
                want, dim=1
            ).clamp_min(1e-12)
            tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 2e-2
            supported = bool(torch.isfinite(got).all() and error.max() <= tol)
        except Exception:  # noqa: BLE001 - any failure of the packed format means "do not pack"
            supported = False
    _SUPPORT[model] = supported
    return supported


def plan_batches(
    model: nn.Module,
    blocks: nn.ModuleList,
    device: torch.device | str,
    lengths: list[int],
    batch_size: int,
    max_length: int,
) -> list[Batch]:
    """The probe's forwards: :func:`packed_batches` where they cost less (:func:`batch_cost`)
    and :func:`packing_supported`; else :func:`padded_batches`."""
    padded = padded_batches(lengths, batch_size)
    packed = packed_batches(lengths, batch_size, max_length)
    if batch_cost(packed) >= batch_cost(padded):
        return padded  # nothing to gain (e.g. every prompt as long as a row: windows)
    return packed if packing_supported(model, blocks, device) else padded


def batch_cost(batches: list[Batch]) -> int:
    """Σ over forwards of (rows × width + :data:`FORWARD_COST_POSITIONS`): the positions the
    forwards compute, plus each forward's fixed cost in positions."""
    return sum(len(b.rows) * b.width + FORWARD_COST_POSITIONS for b in batches)
