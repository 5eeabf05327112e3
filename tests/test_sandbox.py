"""Sandboxed execution of generated code and the HumanEval pass@1 path."""

from __future__ import annotations

import pytest

from collapse_core.evals import code_pass_at_1, extract_code
from collapse_core.sandbox import humaneval_program, run_python
from collapse_core.stagedata import load_stage
from tiny_models import make_tiny_model


def humaneval_items():
    items = load_stage("code", "heldout", 50, seed=0, source="sample")
    items = [e for e in items if e.meta.get("entry_point")]
    assert len(items) >= 3
    return items


def test_exit_status_decides_pass_or_fail():
    assert run_python("x = 1 + 1\nassert x == 2\n").passed
    failed = run_python("assert 1 == 2, 'nope'\n")
    assert failed.status == "failed" and "AssertionError: nope" in failed.stderr_tail


def test_infinite_loop_times_out_and_is_killed():
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed


def test_memory_blowup_fails_under_the_address_space_limit():
    result = run_python("x = bytearray(3 * 1024 ** 3)\n", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.stderr_tail


def test_child_sees_an_empty_environment_and_a_throwaway_working_directory(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    probe = (
        "import os, sys\n"
        "assert 'SECRET_TOKEN' not in os.environ, 'env leaked'\n"
        "assert os.getcwd().rsplit('/', 1)[-1].startswith('collapse-sandbox-')\n"
        "assert sys.flags.isolated == 1\n"
        "open('left_behind.txt', 'w').write('x')\n"
        "print(os.getcwd(), file=sys.stderr)\n"
    )
    result = run_python(probe)
    assert result.passed, result.stderr_tail
    import os

    assert not os.path.exists(result.stderr_tail.strip())  # the directory is removed


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    for ex in humaneval_items():
        good = humaneval_program(ex.prompt, ex.response, ex.meta["test"], ex.meta["entry_point"])
        assert run_python(good).passed, ex.meta["task_id"]
        bad = humaneval_program(ex.prompt, "    return None\n", ex.meta["test"],
                                ex.meta["entry_point"])  # fmt: skip
        assert not run_python(bad).passed, ex.meta["task_id"]


def test_a_whole_function_in_a_fenced_block_replaces_the_stub():
    ex = humaneval_items()[0]
    body = ex.response
    response = (
        "Here is the solution:\n```python\n"
        + ex.prompt.split("def ", 1)[0]  # the prompt's imports
        + "def "
        + ex.prompt.split("def ", 1)[1]
        + body
        + "```\nIt works because..."
    )
    code = extract_code(response, ex.meta["entry_point"])
    assert code.startswith(ex.prompt.split("def ", 1)[0]) and "It works" not in code
    program = humaneval_program(ex.prompt, code, ex.meta["test"], ex.meta["entry_point"])
    assert run_python(program).passed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pass_at_1_generates_runs_and_scores_every_problem(arch):
    model, tok = make_tiny_model(arch)
    items = humaneval_items()
    result = code_pass_at_1(model, tok, items + [items[0].__class__("no tests", "x")],
                            max_new_tokens=8, batch_size=2)  # fmt: skip
    assert result["n"] == len(items)  # the item without HumanEval metadata is skipped
    assert [r["task_id"] for r in result["results"]] == [e.meta["task_id"] for e in items]
    # A random tiny model writes gibberish: every program must fail, none may pass by accident.
    assert result["pass_at_1"] == 0.0
    assert all(r["status"] == "failed" for r in result["results"])


def test_extract_code_finds_the_function_wherever_the_model_put_it():
    fenced = "Here:\n```python\ndef f(x):\n    return x\n```\nand ```py\ndef g(): pass\n```"
    assert extract_code(fenced, "g") == "def g(): pass\n"
    assert extract_code(fenced, "f") == "def f(x):\n    return x\n"
    assert extract_code(fenced, "h") == "def f(x):\n    return x\n"  # first block
    assert extract_code("```python\ndef h(): return 1", "h") == "def h(): return 1"  # unclosed
    # SmolLM2 style: code first, then only a closing fence and an explanation.
    closing_only = "def h(x):\n    return 2 * x\n```\n\nThis doubles x."
    assert extract_code(closing_only, "h") == "def h(x):\n    return 2 * x\n"
    assert extract_code("    return 1\n", "h") == "    return 1\n"  # a bare body
