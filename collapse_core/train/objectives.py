"""Chat formatting, batching and the stage objectives (response-only SFT and DPO).

Formatting (:func:`format_example`): a (prompt, response) pair becomes token ids plus labels with
−100 on every prompt token, so losses and log-probabilities count response tokens only.

- With a chat template: the prompt is the rendered ``[{"role": "user", ...}]`` with
  ``add_generation_prompt=True`` and the response is the rest of the rendered two-turn
  conversation (the assistant text plus the template's end-of-turn tokens). The two parts are
  tokenised separately and concatenated, so the prompt/response boundary is exact.
- Without one: ``"User: {prompt}\\nAssistant:"`` (with the tokenizer's own special tokens, e.g.
  BOS) then ``" {response}"`` followed by the EOS token.
- Truncation to ``max_length`` keeps the response: the prompt is cut from the left down to
  ``max(max_length − len(response), max_length // 2)`` tokens, then the response from the right.

Batches (:func:`collate`) are dicts of tensors ``input_ids``, ``attention_mask`` (1 = real token)
and ``labels`` (−100 on prompt and padding), right-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CollapseError

IGNORE_INDEX = -100
PLAIN_PROMPT = "User: {prompt}\nAssistant:"

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_HEAD_MODEL_TYPES",
    "collate",
    "dpo_loss",
    "format_example",
    "model_response_logprobs",
    "pad_id",
    "prompt_token_ids",
    "response_logprobs",
    "sequence_logprob",
    "sft_loss",
]

Batch = dict[str, torch.Tensor]

#: Architectures whose causal-LM forward is exactly ``logits = lm_head(decoder(x).last_hidden_state)``
#: (checked against their transformers 5 source: no logit soft-capping or scaling), so
#: :func:`model_response_logprobs` may apply the head to the response positions only. Others
#: (Gemma 2/3 soft-capping, Cohere/Granite logit scaling, anything unknown) take the full path.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {
        "gemma", "gpt2", "gpt_neox", "llama", "mistral", "olmo", "olmo2", "phi", "phi3",
        "qwen2", "qwen3", "smollm3", "stablelm", "starcoder2",
    }
)  # fmt: skip


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad token, else EOS, else 0 (padding is masked either way)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_prompt_text(tokenizer: Any, prompt: str) -> str:
    """The rendered user turn followed by the template's generation prompt (assistant header)."""
    user = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)


def _split_text(tokenizer: Any, prompt: str, response: str) -> tuple[str, str] | None:
    """(prompt text, response text) rendered with the chat template, or None if it can't split."""
    convo = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    prompt_text = _chat_prompt_text(tokenizer, prompt)
    full_text = tokenizer.apply_chat_template(convo, tokenize=False)
    if full_text.startswith(prompt_text):
        return prompt_text, full_text[len(prompt_text) :]
    # Templates that rewrite the last turn (e.g. strip reasoning blocks): split at the response.
    cut = full_text.rfind(response) if response else -1
    if cut <= 0:
        return None
    return full_text[:cut], full_text[cut:]


def format_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int | None = None,
    close_turn: bool = True,
) -> dict[str, list[int]]:
    """Token ids and labels of one prompt → response pair; labels are −100 on the prompt.

    Returns ``{"input_ids": [...], "labels": [...]}`` of equal length. Uses the tokenizer's chat
    template (user → assistant turn) when it has one, else the plain ``User:/Assistant:`` format;
    see the module docstring for the exact rules and the truncation policy. ``close_turn=False``
    leaves the turn open (no end-of-turn/EOS tokens after the response): use it to score a
    response *prefix* such as "Sure, here is".
    """
    split = _split_text(tokenizer, prompt, response) if _has_chat_template(tokenizer) else None
    if split is not None:
        prompt_ids = tokenizer(split[0], add_special_tokens=False)["input_ids"]
        tail = split[1] if close_turn else response
        response_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(PLAIN_PROMPT.format(prompt=prompt))["input_ids"]
        response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
        eos = getattr(tokenizer, "eos_token_id", None)
        if close_turn and isinstance(eos, int):
            response_ids = [*response_ids, eos]
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        if max_length < 2:
            raise CollapseError(f"max_length must be at least 2 tokens, got {max_length}")
        keep = min(len(prompt_ids), max(max_length - len(response_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` ready for the model to answer: the generation prompt.

    Chat template: the rendered user turn with ``add_generation_prompt=True`` (the prompt part of
    :func:`format_example`); otherwise ``"User: {prompt}\nAssistant:"`` with special tokens.
    """
    if _has_chat_template(tokenizer):
        text = _chat_prompt_text(tokenizer, prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(PLAIN_PROMPT.format(prompt=prompt))["input_ids"])


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> Batch:
    """Right-pad formatted examples into ``input_ids``, ``attention_mask`` and ``labels``."""
    if not features:
        raise CollapseError("cannot build a batch from zero examples")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        length = len(f["input_ids"])
        input_ids[i, :length] = torch.tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :length] = 1
        labels[i, :length] = torch.tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence Σ log p(y_t | y_<t) over response tokens, and their counts (both shape (B,)).

    Causal shift: logits at position t predict the label at t + 1; labels of −100 are skipped.
    Computed in fp32 via ``cross_entropy(reduction="none")`` (no full log-softmax copy).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return -(token_nll * mask).sum(dim=1), mask.sum(dim=1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Response-only cross-entropy: mean over all response tokens of the batch of −log p(y_t).

    Token-weighted (long responses weigh more), as in standard causal-LM fine-tuning. A batch
    without any response token gives 0 (with a graph, so ``backward`` still works).
    """
    logp, count = response_logprobs(logits, labels)
    return -logp.sum() / count.sum().clamp(min=1)


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder trunk, lm_head) of a plain causal LM (PEFT-wrapped or not), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is base or not isinstance(head, nn.Linear):
        return None
    return decoder, head


def model_response_logprobs(
    model: nn.Module, batch: Batch, output_hidden_states: bool = False
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Per-sequence Σ log p(y_t | y_<t) over response tokens, their counts, and the forward output.

    Same values as ``response_logprobs(model(**batch).logits, labels)``, but for the
    architectures in :data:`PLAIN_HEAD_MODEL_TYPES` the LM head and the softmax run only on the
    positions that predict a response token: the (B, T, V) logit tensor, which for a 49k-word
    vocabulary costs about a fifth of a small model's FLOPs and most of its activation memory,
    is never built for prompt and padding positions (the idea behind fused linear cross-entropy
    kernels such as Liger's, here with plain PyTorch ops). The output is the decoder's
    (``last_hidden_state``, ``hidden_states`` when asked) on that path and the full
    ``CausalLMOutput`` otherwise. The KV cache is off (``use_cache=False``): nothing is generated.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    parts = _decoder_and_head(model)
    if parts is None:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
        logp, count = response_logprobs(out.logits, labels)
        return logp, count, out
    decoder, head = parts
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    hidden = out.last_hidden_state[:, :-1][mask]
    token_nll = F.cross_entropy(head(hidden).float(), shift_labels[mask], reduction="none")
    logp = token_nll.new_zeros(labels.shape[0]).index_add(0, rows, -token_nll)
    return logp, mask.sum(dim=1), out


def sequence_logprob(model: nn.Module, batch: Batch, average: bool = False) -> torch.Tensor:
    """log π(response | prompt) per sequence: Σ_t log p(y_t | x, y_<t) over response tokens.

    ``average=True`` divides by the number of response tokens (per-token mean). The batch must
    already be on the model's device. See :func:`model_response_logprobs`.
    """
    logp, count, _ = model_response_logprobs(model, batch)
    return logp / count.clamp(min=1) if average else logp


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """DPO loss −log σ(β[(π_c − ref_c) − (π_r − ref_r)]) (Rafailov et al. 2023, eq. 7).

    Inputs are summed response log-probabilities per pair (shape (B,)). ``reduction`` is
    ``"mean"`` (default) or ``"none"``. Uses ``−logsigmoid`` for numerical stability.
    """
    logits = beta * (
        (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    )
    losses = -F.logsigmoid(logits)
    if reduction == "none":
        return losses
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
