"""Probe sets: built-ins load, hashes are stable and content-sensitive, bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collapse_core.errors import CollapseError
from collapse_core.probesets import (
    MAX_ITEMS,
    ProbeSet,
    list_probe_sets,
    load_probe_set,
    probe_hash,
)

BUILTIN = ("general", "math", "code", "refusal")


def test_list_probe_sets_names_builtins_and_mixed():
    names = list_probe_sets()
    assert set(BUILTIN) <= set(names)
    assert "mixed" in names


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_sets_have_64_valid_items(name):
    ps = load_probe_set(name)
    assert isinstance(ps, ProbeSet)
    assert ps.name == name and ps.version == "1"
    assert len(ps.texts) == len(ps.ids) == len(ps.domains) == 64
    assert len(set(ps.ids)) == 64 and len(set(ps.texts)) == 64
    assert set(ps.domains) == {name}
    for text in ps.texts:
        assert text == text.strip() and 40 <= len(text) <= 400
    assert len(ps.content_hash) == 16
    int(ps.content_hash, 16)


def test_builtin_files_follow_the_schema():
    root = Path(__file__).resolve().parent.parent / "data" / "probesets"
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    for name in BUILTIN:
        assert manifest[name]["version"] and manifest[name]["description"]
        for line in (root / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            assert set(json.loads(line)) == {"id", "text", "domain"}


def test_refusal_set_mixes_prompts_and_refusals():
    ps = load_probe_set("refusal")
    prompts = [i for i in ps.ids if i.startswith("refusal-prompt-")]
    replies = [i for i in ps.ids if i.startswith("refusal-reply-")]
    assert len(prompts) == len(replies) == 32


def test_mixed_is_the_union_in_order():
    mixed = load_probe_set("mixed")
    parts = [load_probe_set(n) for n in BUILTIN]
    assert mixed.texts == sum((p.texts for p in parts), ())
    assert mixed.ids == sum((p.ids for p in parts), ())
    assert set(mixed.domains) == set(BUILTIN)
    assert len(mixed.texts) == 256


def test_hash_is_stable_and_matches_the_documented_formula():
    a, b = load_probe_set("general"), load_probe_set("general")
    assert a.content_hash == b.content_hash
    assert a.content_hash == probe_hash(a.version, a.texts)
    assert len({load_probe_set(n).content_hash for n in BUILTIN}) == 4


def test_hash_changes_with_text_and_version():
    base = probe_hash("1", ["hello world", "second text"])
    assert probe_hash("1", ["hello world", "second text"]) == base
    assert probe_hash("1", ["hello world!", "second text"]) != base
    assert probe_hash("2", ["hello world", "second text"]) != base
    assert probe_hash("1", ["second text", "hello world"]) != base
    # No ambiguity from joining: moving a boundary changes the hash.
    assert probe_hash("1", ["ab", "c"]) != probe_hash("1", ["a", "bc"])


def test_max_items_truncates_and_rehashes():
    full = load_probe_set("math")
    part = load_probe_set("math", max_items=10)
    assert part.texts == full.texts[:10] and part.ids == full.ids[:10]
    assert part.content_hash != full.content_hash
    with pytest.raises(CollapseError, match="max_items"):
        load_probe_set("math", max_items=0)


def test_user_txt_file(tmp_path):
    path = tmp_path / "my_probes.txt"
    path.write_text("first line\n\n   \nsecond line  \n", encoding="utf-8")
    ps = load_probe_set(str(path))
    assert ps.name == "my_probes"
    assert ps.texts == ("first line", "second line")
    assert ps.ids == ("1", "4")
    assert ps.version == "user"
    path.write_text("first line\n\nsecond line changed\n", encoding="utf-8")
    assert load_probe_set(str(path)).content_hash != ps.content_hash


@pytest.mark.parametrize("name", ["general.txt", "math.jsonl", "mixed.TXT"])
def test_user_file_named_like_a_builtin_set_is_refused(tmp_path, name):
    # Its numbers would be stored under the built-in set's name and shown as the built-in's.
    path = tmp_path / name
    path.write_text('{"text": "x"}\n' if name.endswith("jsonl") else "x\n", encoding="utf-8")
    with pytest.raises(CollapseError, match=r"name of a built-in set; rename the file \(e.g. my_"):
        load_probe_set(str(path))


def test_user_txt_with_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello there\n".encode())
    assert load_probe_set(str(path)).texts == ("hello there",)


def test_user_jsonl_file(tmp_path):
    path = tmp_path / "custom.jsonl"
    rows = [
        {"text": "alpha text", "id": "a", "domain": "d1"},
        {"text": "beta text"},
        {"text": "   "},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ps = load_probe_set(str(path))
    assert ps.name == "custom"
    assert ps.texts == ("alpha text", "beta text")
    assert ps.ids == ("a", "2")
    assert ps.domains == ("d1", "user")


def test_missing_file(tmp_path):
    with pytest.raises(CollapseError, match="not found"):
        load_probe_set(str(tmp_path / "nope.txt"))


def test_unknown_name_lists_builtins():
    with pytest.raises(CollapseError, match="unknown probe set 'nonsense'.*general"):
        load_probe_set("nonsense")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "probes.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CollapseError, match=r"use \.txt or \.jsonl"):
        load_probe_set(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(CollapseError, match="has no non-empty texts"):
        load_probe_set(str(path))
    jpath = tmp_path / "empty.jsonl"
    jpath.write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(CollapseError, match="has no non-empty texts"):
        load_probe_set(str(jpath))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CollapseError) as err:
        load_probe_set(str(path))
    assert str(err.value) == "probe file latin.txt is not valid UTF-8 text; save it as UTF-8"


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(CollapseError, match="line 3 is not valid JSON"):
        load_probe_set(str(path))


def test_json_line_without_text(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(CollapseError, match='line 2 needs a "text" string'):
        load_probe_set(str(path))
    path.write_text('["just", "a", "list"]\n', encoding="utf-8")
    with pytest.raises(CollapseError, match='line 1 needs a "text" string'):
        load_probe_set(str(path))


def test_duplicate_ids(tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_text('{"id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n', encoding="utf-8")
    with pytest.raises(CollapseError, match="repeats the id 'x'"):
        load_probe_set(str(path))


def test_file_over_20_mb(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(20 * 1024 * 1024 + 1)  # sparse: cheap to create
    with pytest.raises(CollapseError, match="limit is 20 MB"):
        load_probe_set(str(path))


def test_too_many_items(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("x\n" * (MAX_ITEMS + 1), encoding="utf-8")
    with pytest.raises(CollapseError, match="limit is 100,000"):
        load_probe_set(str(path))


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(CollapseError) as err:
        load_probe_set(str(path))
    assert "\n" not in str(err.value)


def test_cli_probe_checks_the_probe_sets_before_loading_any_model(tmp_path, capsys):
    from collapse_core.cli import main

    # The model does not exist either: the error names the set, so the sets were checked first.
    argv = ["probe", str(tmp_path / "no-such-model"), "--probe-set", "general", "--probe-set",
            "genral", "--db", str(tmp_path / "db.duckdb")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown probe set 'genral'" in err
    assert not (tmp_path / "db.duckdb").exists()
