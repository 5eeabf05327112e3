"""Tiny random causal LMs and a byte-level tokenizer, built in code (no network, ~0.1 s).

Usage::

    from collapse_core.tiny_models import make_tiny_model

    model, tok = make_tiny_model("llama")                 # in memory
    model, tok = make_tiny_model("gpt2", path=tmp_path)   # also saved with save_pretrained

The tokenizer is a byte-level BPE with no merges (every UTF-8 byte is one token, so any text
round-trips and there is no unknown token) plus four special tokens. ``chat_template=True`` (the
default) attaches a ChatML template like SmolLM2's, so ``apply_chat_template`` works; with
``chat_template=False`` code paths for plain-text formatting can be tested. The model's
``vocab_size`` equals ``len(tokenizer)``; pad/bos/eos ids are set in its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "make_tiny_model", "make_tiny_tokenizer"]


def make_tiny_tokenizer(chat_template: bool = True) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE (256 byte tokens + 4 specials, 260 total).

    eos = ``<|im_end|>`` (end of a chat turn), bos = ``<|endoftext|>``, pad = ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def make_tiny_model(
    arch: str = "llama",
    path: Path | str | None = None,
    seed: int = 0,
    chat_template: bool = True,
) -> tuple[torch.nn.Module, Any]:
    """Build a tiny random ``arch`` ("llama" or "gpt2") causal LM and its tokenizer.

    Llama: hidden 32, 2 layers, MLP 64, 4 heads, 2 KV heads. GPT-2: n_embd 32, 2 layers, 4 heads.
    Weights are drawn from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the
    caller's RNG state is untouched), fp32, eval mode. With ``path`` both are saved there with
    ``save_pretrained`` (safetensors), so ``AutoModelForCausalLM.from_pretrained(path)`` works.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer(chat_template=chat_template)
    ids = {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "llama":
            config = LlamaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=512,
                tie_word_embeddings=False,
                **ids,
            )
            model = LlamaForCausalLM(config)
        elif arch == "gpt2":
            config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
            model = GPT2LMHeadModel(config)
        else:
            raise ValueError(f"unknown tiny arch {arch!r}; use 'llama' or 'gpt2'")
    model.eval()
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return model, tok
