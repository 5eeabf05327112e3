"""The LoRA training loop, objectives and adapter utilities on tiny random models (seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from collapse_core.errors import CollapseError
from collapse_core.evals import preference_margins
from collapse_core.stagedata import Example
from collapse_core.train import (
    TrainConfig,
    TrainHooks,
    collate,
    dpo_loss,
    format_example,
    sequence_logprob,
    sft_loss,
    train_stage,
)
from collapse_core.train.loop import lr_at, resolve_target_modules
from collapse_core.train.lora import (
    delta_weight,
    load_adapter_deltas,
    lora_deltas,
    merge_and_unload,
    module_weight,
    save_adapter,
)
from collapse_core.train.objectives import (
    IGNORE_INDEX,
    model_response_logprobs,
    response_logprobs,
)
from tiny_models import make_tiny_model

QUIET = {"progress": lambda *_: None}


def sft_examples(n: int = 4) -> list[Example]:
    return [Example(prompt=f"what is {i}+{i}?", response=f"It is {2 * i}.") for i in range(n)]


def dpo_examples(n: int = 4) -> list[Example]:
    return [
        Example(
            prompt=f"what is {i}+{i}?", chosen=f"{2 * i} exactly", rejected=f"{2 * i + 1} maybe"
        )
        for i in range(n)
    ]


# -- formatting --------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False])
def test_labels_mask_exactly_the_prompt(chat):
    _, tok = make_tiny_model("llama", chat_template=chat)
    prompt, response = "What is 2+2?", "It is 4."
    feat = format_example(tok, prompt, response)
    if chat:
        user = [{"role": "user", "content": prompt}]
        prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        full_text = tok.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        assert tok.decode(feat["input_ids"]) == full_text
    else:
        prompt_ids = tok(f"User: {prompt}\nAssistant:")["input_ids"]
        assert feat["input_ids"][-1] == tok.eos_token_id
    n = len(prompt_ids)
    assert feat["input_ids"][:n] == prompt_ids
    assert feat["labels"][:n] == [IGNORE_INDEX] * n
    assert feat["labels"][n:] == feat["input_ids"][n:]
    assert IGNORE_INDEX not in feat["labels"][n:]
    assert tok.decode(feat["input_ids"][n:]).startswith(("It is 4.", " It is 4."))


def test_truncation_keeps_the_response_and_close_turn():
    _, tok = make_tiny_model("llama")
    feat = format_example(tok, "x" * 200, "short answer", max_length=64)
    assert len(feat["input_ids"]) == 64
    assert tok.decode([t for t in feat["labels"] if t != IGNORE_INDEX]).startswith("short answer")
    long = format_example(tok, "q", "y" * 300, max_length=64)
    assert len(long["input_ids"]) == 64 and sum(t != IGNORE_INDEX for t in long["labels"]) >= 32
    open_turn = format_example(tok, "q", "Sure, here is", close_turn=False)
    assert tok.decode(open_turn["input_ids"]).endswith("assistant\nSure, here is")


def test_collate_pads_right_and_masks_padding():
    _, tok = make_tiny_model("llama")
    feats = [format_example(tok, "a", "b"), format_example(tok, "longer prompt", "longer answer")]
    batch = collate(feats, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(feats[0]["input_ids"])
    assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()


# -- objectives ----------------------------------------------------------------------------------
def test_dpo_loss_matches_hand_computed_values_and_gradient_signs():
    # Pair 1: β[(−10 − −11) − (−12 − −11)] = 0.1 · 2 = 0.2 → −log σ(0.2) = log(1 + e^−0.2).
    # Pair 2: policy = reference → −log σ(0) = log 2.
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -7.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -7.0])
    per_pair = dpo_loss(pc, pr, rc, rr, beta=0.1, reduction="none")
    assert per_pair[0].item() == pytest.approx(0.598138869, abs=1e-7)  # ln(1.818730753)
    assert per_pair[1].item() == pytest.approx(math.log(2.0), abs=1e-7)
    loss = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx((0.598138869 + 0.693147181) / 2, abs=1e-7)
    loss.backward()
    # ∂/∂π_c = −β σ(−z) / B: raising the chosen log-prob lowers the loss; the rejected one opposite.
    assert pc.grad[0].item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.2))) / 2, abs=1e-7)
    assert pc.grad[1].item() == pytest.approx(-0.1 * 0.5 / 2, abs=1e-7)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert torch.allclose(pr.grad, -pc.grad)


def test_sft_loss_and_sequence_logprob_count_response_tokens_only():
    model, tok = make_tiny_model("llama")
    batch = collate([format_example(tok, "hi", "yo"), format_example(tok, "hey", "x y z")], 3)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    manual_sums, n_tokens = [], 0
    for i in range(2):
        total = 0.0
        for t in range(1, batch["labels"].shape[1]):
            label = batch["labels"][i, t].item()
            if label != IGNORE_INDEX:
                total += logp[i, t - 1, label].item()
                n_tokens += 1
        manual_sums.append(total)
    seq = sequence_logprob(model, batch)
    assert torch.allclose(seq, torch.tensor(manual_sums), atol=1e-4)
    assert sft_loss(logits, batch["labels"]).item() == pytest.approx(
        -sum(manual_sums) / n_tokens, abs=1e-5
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_on_response_positions_matches_full_logits_values_and_gradients(arch):
    from peft import get_peft_model

    from collapse_core.train.loop import make_lora_config

    model, tok = make_tiny_model(arch)
    cfg = TrainConfig()
    feats = [
        format_example(tok, "a long prompt here " * 3, "yo"),
        format_example(tok, "hi", "x y z"),
    ]
    batch = collate(feats, 3)
    peft_model = get_peft_model(model, make_lora_config(model, cfg))
    lora_b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.normal_()  # a non-zero adapter, so its gradient path is exercised
    peft_model.eval()  # GPT-2 has dropout; gradients flow in eval mode too

    full_out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    full_logp, full_count = response_logprobs(full_out.logits, batch["labels"])
    full_logp.sum().backward()
    full_grad = lora_b.grad.clone()
    lora_b.grad = None

    fast_logp, fast_count, out = model_response_logprobs(peft_model, batch, True)
    assert not hasattr(out, "logits")  # the (B, T, V) logits were never built
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    fast_logp.sum().backward()
    assert torch.equal(fast_count, full_count)
    assert torch.allclose(fast_logp, full_logp, atol=1e-5)
    assert torch.allclose(lora_b.grad, full_grad, atol=1e-5)
    assert float(full_grad.abs().sum()) > 0


def test_unknown_architectures_take_the_full_logits_path():
    model, tok = make_tiny_model("llama")
    batch = collate([format_example(tok, "hi", "yo"), format_example(tok, "hey", "x y z")], 3)
    expected, _, _ = model_response_logprobs(model, batch)
    model.config.model_type = "softcapped_llama"  # not in PLAIN_HEAD_MODEL_TYPES
    logp, _, out = model_response_logprobs(model, batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.allclose(logp, expected, atol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


# -- the loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_reduces_loss_on_a_repeated_dataset(arch):
    model, tok = make_tiny_model(arch)
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-2, min_lr_ratio=1.0, lora_r=4)
    result = train_stage(model, tok, sft_examples(), "sft", cfg, **QUIET)
    assert len(result.losses) == 30 and result.tokens > 0 and result.seconds > 0
    assert np.mean(result.losses[-5:]) < result.losses[0] - 0.15
    assert result.target_modules == (("c_attn",) if arch == "gpt2" else ("q_proj", "v_proj"))


def test_same_seed_twice_gives_identical_losses_and_rng_is_untouched():
    runs = []
    for _ in range(2):
        model, tok = make_tiny_model("llama")
        torch.manual_seed(123)
        cfg = TrainConfig(steps=6, batch_size=3, lr=1e-2, seed=7, lora_dropout=0.1)
        runs.append(train_stage(model, tok, sft_examples(5), "sft", cfg, **QUIET).losses)
        after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(1))  # fork_rng: caller's RNG stream unchanged
    assert runs[0] == runs[1]
    model, tok = make_tiny_model("llama")
    other = train_stage(model, tok, sft_examples(5), "sft", TrainConfig(steps=6, batch_size=3,
                        lr=1e-2, seed=8, lora_dropout=0.1), **QUIET).losses  # fmt: skip
    assert other != runs[0]


def test_dpo_training_increases_the_chosen_vs_rejected_margin():
    model, tok = make_tiny_model("llama")
    pairs = dpo_examples()
    before = preference_margins(model, tok, pairs)
    cfg = TrainConfig(steps=15, batch_size=4, lr=2e-2, dpo_beta=0.5, min_lr_ratio=1.0)
    result = train_stage(model, tok, pairs, "dpo", cfg, **QUIET)
    assert result.losses[0] == pytest.approx(math.log(2.0), abs=1e-5)  # fresh LoRA: π = ref
    assert result.losses[-1] < result.losses[0]
    after = preference_margins(result.peft_model, tok, pairs)
    assert after.mean() > before.mean() + 0.5


def test_dpo_batch_mixes_in_plain_examples_and_rejects_missing_pairs():
    model, tok = make_tiny_model("llama")
    with pytest.raises(CollapseError, match="chosen and rejected"):
        train_stage(model, tok, sft_examples(), "dpo", TrainConfig(steps=1), **QUIET)
    mixed = dpo_examples(2) + sft_examples(2)
    result = train_stage(model, tok, mixed, "dpo", TrainConfig(steps=3, batch_size=4), **QUIET)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)


def test_hooks_are_called_with_hidden_states_and_should_stop_ends_early():
    model, tok = make_tiny_model("llama")
    calls = {"mixer": [], "extra": [], "after": []}

    def mixer(step, batch):
        calls["mixer"].append(step)
        return [*batch[:-1], Example(prompt="replayed", response="old data")]

    def extra(model, batch, outputs):
        calls["extra"].append(len(outputs.hidden_states))
        assert outputs.hidden_states[-1].shape[0] == batch["input_ids"].shape[0]
        return 0.01 * outputs.hidden_states[-1].pow(2).mean()

    hooks = TrainHooks(
        batch_mixer=mixer,
        extra_loss=extra,
        after_step=lambda m, s: calls["after"].append(s),
        needs_hidden_states=True,
    )
    stop_after = iter([False, False, False, True])
    result = train_stage(
        model, tok, sft_examples(), "sft", TrainConfig(steps=10, batch_size=2), hooks=hooks,
        should_stop=lambda: next(stop_after), **QUIET,
    )  # fmt: skip
    assert result.stopped and len(result.losses) == 3
    assert calls["mixer"] == [0, 1, 2] and calls["after"] == [1, 2, 3]
    assert calls["extra"] == [3, 3, 3]  # embeddings + 2 layers
    assert len(result.extra_losses) == 3


def test_failed_training_leaves_the_model_untouched():
    model, tok = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(model, step):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        train_stage(model, tok, sft_examples(), "sft", TrainConfig(steps=3),
                    hooks=TrainHooks(after_step=boom), **QUIET)  # fmt: skip
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_target_module_resolution():
    llama, _ = make_tiny_model("llama")
    gpt2, _ = make_tiny_model("gpt2")
    assert resolve_target_modules(llama) == ("q_proj", "v_proj")
    assert resolve_target_modules(llama, ["q_proj", "k_proj", "o_proj"]) == (
        "q_proj", "k_proj", "o_proj",
    )  # fmt: skip
    assert resolve_target_modules(gpt2) == ("c_attn",)
    with pytest.raises(CollapseError, match="not found"):
        resolve_target_modules(llama, ["nope"])
    with pytest.raises(CollapseError, match="merge_and_unload"):
        model, tok = make_tiny_model("llama")
        result = train_stage(model, tok, sft_examples(), "sft", TrainConfig(steps=1), **QUIET)
        train_stage(result.peft_model, tok, sft_examples(), "sft", TrainConfig(steps=1), **QUIET)


# -- adapters ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_deltas_and_saved_adapter_agree(arch, tmp_path):
    model, tok = make_tiny_model(arch)
    base = {n: module_weight(model, n) for n, _ in model.named_modules() if n.endswith(
        ("q_proj", "v_proj", "c_attn"))}  # fmt: skip
    cfg = TrainConfig(steps=5, batch_size=4, lr=2e-2, lora_r=4)
    result = train_stage(model, tok, sft_examples(), "sft", cfg, **QUIET)
    peft_model = result.peft_model.eval()
    batch = collate([format_example(tok, "what is 1+1?", "2")], tok.pad_token_id)
    with torch.no_grad():
        logits_peft = peft_model(input_ids=batch["input_ids"]).logits
    deltas = lora_deltas(peft_model)
    assert set(deltas) == set(base)
    for a, b, scaling in deltas.values():
        assert a.shape[0] == 4 and b.shape[1] == 4 and scaling == pytest.approx(16 / 4)
        assert torch.linalg.matrix_rank(delta_weight(a, b, scaling)) <= 4
    save_adapter(peft_model, tmp_path / "adapter")
    loaded = load_adapter_deltas(tmp_path / "adapter")
    assert set(loaded) == set(deltas)
    for name, (a, b, s) in deltas.items():
        la, lb, ls = loaded[name]
        assert torch.equal(a, la) and torch.equal(b, lb) and s == ls
    merged = merge_and_unload(peft_model)
    with torch.no_grad():
        logits_merged = merged(input_ids=batch["input_ids"]).logits
    assert torch.allclose(logits_peft, logits_merged, atol=1e-5)
    for name, (a, b, s) in deltas.items():  # W_merged = W0 + scaling·BA in (out × in) layout
        expected = base[name] + delta_weight(a, b, s).double().numpy()
        assert np.allclose(module_weight(merged, name), expected, atol=1e-6)
    # The merged model is a plain model again: the next stage can wrap it in a fresh LoRA.
    again = train_stage(merged, tok, sft_examples(), "sft", TrainConfig(steps=1), **QUIET)
    assert len(again.losses) == 1


# -- LoRA update geometry ---------------------------------------------------------------------
def test_lora_update_metrics_on_known_subspaces():
    from collapse_core import metrics as M

    assert hasattr(M, "update_spectrum_metrics")
    from collapse_core.train.lora_metrics import lora_update_metrics

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    first = 2.0 * q[:, :2] @ v[:, :2].T  # rank 2, equal singular values
    same_space = 3.0 * q[:, :2] @ v[:, 2:4].T  # same column space, other inputs
    orthogonal = q[:, 4:6] @ v[:, :2].T
    w0 = rng.normal(size=(12, 8))
    stage_deltas = {"1:sft": {"m": first}, "2:math": {"m": same_space}, "3:code": {"m": orthogonal}}
    rows = lora_update_metrics(stage_deltas, {"m": w0})
    get = {(r["stage"], r["metric"], r["other_stage"]): r["value"] for r in rows}
    assert get[("1:sft", "effective_rank", None)] == pytest.approx(2.0, abs=1e-5)
    assert get[("1:sft", "stable_rank", None)] == pytest.approx(2.0)
    assert get[("1:sft", "update_rank", None)] == 2
    assert get[("2:math", "subspace_overlap", "1:sft")] == pytest.approx(1.0)
    assert get[("2:math", "principal_angle_mean", "1:sft")] == pytest.approx(0.0, abs=1e-6)
    assert get[("3:code", "subspace_overlap", "1:sft")] == pytest.approx(0.0, abs=1e-12)
    assert get[("3:code", "principal_angle_min", "2:math")] == pytest.approx(np.pi / 2)
    assert get[("1:sft", "frobenius_norm", None)] == pytest.approx(np.linalg.norm(first))
    assert ("1:sft", "subspace_overlap", None) not in get
    assert any(r["metric"].startswith("intruder_dimensions") for r in rows)
    assert any(r["metric"].startswith("intruder_dimensions_cumulative") for r in rows)
    assert get[("2:math", "relative_update_norm", None)] == pytest.approx(
        np.linalg.norm(same_space) / np.linalg.norm(w0 + first)
    )
    # Base weights taken after stage 1 (a resumed run) reconstruct the same starting weights.
    resumed = lora_update_metrics(stage_deltas, {"m": w0 + first}, base_after=1)
    assert [r["value"] for r in resumed] == pytest.approx([r["value"] for r in rows])


def test_lora_update_metrics_on_trained_adapters():
    from collapse_core.train.lora_metrics import lora_update_metrics

    model, tok = make_tiny_model("llama")
    base = {n: module_weight(model, n) for n, _ in model.named_modules() if n.endswith("q_proj")}
    stage_deltas = {}
    for i, stage in enumerate(["1:sft", "2:math"]):
        cfg = TrainConfig(steps=3, batch_size=4, lr=2e-2, lora_r=4, seed=i)
        result = train_stage(model, tok, sft_examples(), "sft", cfg, **QUIET)
        stage_deltas[stage] = {
            m: delta_weight(a, b, s).numpy()
            for m, (a, b, s) in lora_deltas(result.peft_model).items()
        }
        model = merge_and_unload(result.peft_model)
    rows = lora_update_metrics(stage_deltas, base)
    ranks = [r["value"] for r in rows if r["metric"] == "update_rank"]
    assert len(ranks) == 8 and all(1 <= r <= 4 for r in ranks)  # 2 stages × 2 layers × q/v
    overlaps = [r for r in rows if r["metric"] == "subspace_overlap"]
    assert len(overlaps) == 4 and all(r["other_stage"] == "1:sft" for r in overlaps)
    assert all(0.0 <= r["value"] <= 1.0 + 1e-9 for r in overlaps)
    assert {r["module"] for r in rows if r["metric"] == "intruder_dimensions"} == set(base)


# -- full fine-tuning ---------------------------------------------------------------------------
def _full(**changes) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 3, "lr": 1e-3, "seed": 5, "method": "full",
                          **changes})  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_ft_changes_every_weight_reproducibly(arch):
    runs = []
    for _ in range(2):
        model, tok = make_tiny_model(arch)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = train_stage(model, tok, sft_examples(5), "sft", _full(), **QUIET)
        assert result.method == "full" and result.peft_model is model  # trained in place
        after = dict(model.named_parameters())
        assert before.keys() == after.keys()
        unchanged = [n for n in before if torch.equal(before[n], after[n])]
        assert unchanged == [], unchanged  # every trainable weight moved
        assert all(p.requires_grad for p in model.parameters())
        if arch == "gpt2":  # tied input embedding / LM head: still one tensor after training
            assert model.lm_head.weight is model.transformer.wte.weight
        # ΔW = W_after − W_before of the target modules, in the (out × in) orientation
        targets = {n for n, _ in model.named_modules() if n.endswith(result.target_modules)}
        assert set(result.deltas) == targets and targets
        for name, delta in result.deltas.items():
            w = before[f"{name}.weight"].double().numpy()
            w = w.T if arch == "gpt2" else w  # Conv1D stores (in × out)
            np.testing.assert_allclose(delta, module_weight(model, name) - w, atol=1e-7)
        runs.append((result.losses, {n: p.detach().clone() for n, p in after.items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    model, tok = make_tiny_model(arch)
    lora = train_stage(model, tok, sft_examples(5), "sft", _full(method="lora"), **QUIET)
    if arch == "llama":  # no dropout: the same first batch on the same starting weights
        assert lora.losses[0] == runs[0][0][0]
    assert lora.losses[1:] != runs[0][0][1:]


def test_full_ft_dpo_uses_a_frozen_copy_of_the_starting_weights():
    from collapse_core.train.loop import SETUPS, TrainHooks, _run_steps

    model, tok = make_tiny_model("llama")
    pairs = dpo_examples()
    feats = [format_example(tok, e.prompt, e.chosen, 64) for e in pairs]
    batch = collate(feats, tok.pad_token_id)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _full(steps=6, lr=5e-3, dpo_beta=0.5, min_lr_ratio=1.0)
    trainee = SETUPS["full"](model, cfg, torch.device("cpu"))
    ref_before = trainee.reference(batch)
    with torch.no_grad():
        policy_before = model_response_logprobs(model, batch)[0]
    assert torch.equal(ref_before, policy_before)  # reference = the starting weights
    done = _run_steps(trainee, tok, pairs, "dpo", cfg, TrainHooks(), lambda *_: None, None)
    with torch.no_grad():
        policy_after = model_response_logprobs(model, batch)[0]
    assert torch.equal(trainee.reference(batch), ref_before)  # frozen: unchanged by training
    assert not torch.allclose(policy_after, policy_before)
    assert done.losses[0] == pytest.approx(math.log(2.0), abs=1e-5)  # π = ref at step 1
    assert done.losses[-1] < done.losses[0] - 0.05  # a live reference would stay at log 2
    assert not any(torch.equal(start[n], p) for n, p in model.named_parameters())

    model, tok = make_tiny_model("llama")  # the same through train_stage
    before = preference_margins(model, tok, pairs)
    result = train_stage(model, tok, pairs, "dpo", cfg, **QUIET)
    assert result.losses == done.losses
    assert preference_margins(model, tok, pairs).mean() > before.mean() + 0.5


def test_failed_full_ft_restores_the_starting_weights():
    model, tok = make_tiny_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(model, step):
        if step == 2:
            raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        train_stage(model, tok, sft_examples(), "sft", _full(),
                    hooks=TrainHooks(after_step=boom), **QUIET)  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.transformer.wte.weight.requires_grad  # flags as the caller left them
    assert model.lm_head.weight is model.transformer.wte.weight


def test_unknown_method_in_a_train_config_is_one_line():
    model, tok = make_tiny_model("llama")
    with pytest.raises(CollapseError, match="unknown training method 'qlora'; valid: lora, full"):
        train_stage(model, tok, sft_examples(), "sft", _full(method="qlora"), **QUIET)


def test_update_metrics_of_full_and_lora_deltas_share_one_shape():
    from collapse_core.train.lora_metrics import lora_update_metrics

    rows = {}
    for method in ("lora", "full"):
        model, tok = make_tiny_model("llama")
        base = {n: module_weight(model, n) for n, _ in model.named_modules()
                if n.endswith(("q_proj", "v_proj"))}  # fmt: skip
        stage_deltas = {}
        for i, stage in enumerate(["1:sft", "2:math"]):
            cfg = _full(method=method, lr=2e-2 if method == "lora" else 1e-3, lora_r=4, seed=i)
            result = train_stage(model, tok, sft_examples(), "sft", cfg, **QUIET)
            stage_deltas[stage] = result.deltas
            model = merge_and_unload(result.peft_model) if method == "lora" else model
        rows[method] = lora_update_metrics(stage_deltas, base, max_rank=4)
    keys = {m: sorted((r["stage"], r["module"], r["metric"], str(r["other_stage"]))
                      for r in rows[m]) for m in rows}  # fmt: skip
    assert keys["lora"] == keys["full"]  # same table, same shape
    rank = {m: [r for r in rows[m] if r["metric"] == "update_rank"] for m in rows}
    assert all(r["value"] <= 4 for r in rank["lora"])
    # A full-FT ΔW is of full numerical rank (q_proj 32 × 32, v_proj 16 × 32 here).
    assert all(r["value"] == (32 if "q_proj" in r["module"] else 16) for r in rank["full"])
    overlap = [r["value"] for r in rows["full"] if r["metric"] == "subspace_overlap"]
    assert all(0.0 <= v < 1.0 for v in overlap)  # top-4 subspaces, not the whole space


def test_bench_train_times_both_trainers_in_alternating_rounds(tmp_path, capsys):
    import argparse
    import re

    from collapse_core.devtools.bench_train import bench_train

    make_tiny_model("llama", path=tmp_path / "tiny")
    args = argparse.Namespace(
        model=str(tmp_path / "tiny"), device="cpu", steps=2, batch_size=2, tokens=32, repeats=2
    )
    assert bench_train(args) == 0
    out = capsys.readouterr().out
    rounds = re.findall(r"round (\d) (ours|hf)\s+([0-9.]+) tokens/s", out)
    assert [(r, name) for r, name, _ in rounds] == [
        ("1", "ours"), ("1", "hf"), ("2", "hf"), ("2", "ours")
    ]  # fmt: skip
    assert all(float(tps) > 0 for _, _, tps in rounds)
    ratio = float(re.search(r"ours / HF Trainer tokens/s: ([0-9.]+)x", out).group(1))
    assert 0 < ratio < 100
    assert "same NLL to 1e-4: True" in out  # both head paths score the OOD items identically
