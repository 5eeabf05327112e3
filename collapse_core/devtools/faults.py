"""Fault injection: bad inputs through the CLI and the upload path, and crashes mid-job.

Used by ``python -m collapse_core bench faults`` (prints the counts) and by the test suite
(``tests/test_faults.py`` asserts every case). Each bad input must give a clear one-line error
(exit status 2 on the CLI, a :class:`CollapseError` in the library/app path) and leave the
database unchanged in content (:meth:`Store.table_hashes` before == after), with a real probe
result already stored so that "unchanged" means something.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CollapseError
from ..paths import REPO_ROOT

PICKLE_MARKER = "PICKLE_EXECUTED"


class _Exploit:
    """Unpickling this object creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class BadInput:
    """One bad input: files to create, a CLI command, and how the app would receive it."""

    name: str
    files: dict[str, bytes]  # relative path -> content, created under the case folder
    cli: list[str]  # arguments after `python -m collapse_core`; {dir} = case folder
    upload: list[str] | None = None  # which files the app would receive as uploads
    app: Callable[[Path], Any] | None = None  # non-upload app path (config form, probe file)
    expect: str = ""  # a word the error must contain
    marker: str | None = None  # a file whose existence proves code ran
    extra: dict[str, Any] = field(default_factory=dict)


def _safetensors_bytes(tensors: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _tiny_folder_files(tiny_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in tiny_dir.iterdir() if p.is_file()}


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bad_inputs(tiny_dir: Path, other_tiny_dir: Path) -> list[BadInput]:
    """The catalogue (≥ 20 cases). ``other_tiny_dir`` is a tiny model of another width."""
    import torch

    from ..runconfig import parse_config

    folder = _tiny_folder_files(tiny_dir)
    weights = folder["model.safetensors"]
    config = json.loads(folder["config.json"])
    header_len = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + header_len])
    name0 = next(k for k in header if k != "__metadata__")
    header[name0]["data_offsets"][1] += 4096  # claims more bytes than the buffer holds
    lying_header = json.dumps(header).encode()
    lying = struct.pack("<Q", len(lying_header)) + lying_header + weights[8 + header_len :]
    bert_config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32}
    remote_config = {**config, "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilLM"}}
    nan_state = {k: v.clone() for k, v in _load_state(tiny_dir).items()}
    first = next(k for k in nan_state if k.endswith("weight") and nan_state[k].dim() == 2)
    nan_state[first][0, 0] = float("nan")
    other = _tiny_folder_files(other_tiny_dir)
    adapter = _adapter_files(other_tiny_dir)
    quick = (REPO_ROOT / "configs" / "quick.toml").read_text()
    base_cfg = {"run": {"name": "bad", "model": str(tiny_dir), "stages": ["sft"],
                        "data_source": "sample"}}  # fmt: skip

    def form(raw: dict) -> Callable[[Path], Any]:
        return lambda _dir: parse_config(raw, where="form")

    def probe_file(name: str) -> Callable[[Path], Any]:
        from ..probesets import load_probe_set

        return lambda d: load_probe_set(str(d / name))

    with_folder = {k: v for k, v in folder.items() if k != "model.safetensors"}
    cases = [
        BadInput("empty file", {"model.gguf": b""}, ["probe", "--model", "{dir}/model.gguf"],
                 ["model.gguf"], expect="empty"),
        BadInput("truncated safetensors", {**with_folder, "model.safetensors": weights[:200]},
                 ["probe", "--model", "{dir}"], list(folder), expect="safetensors"),
        BadInput("safetensors header lies about sizes", {**with_folder, "model.safetensors": lying},
                 ["probe", "--model", "{dir}"], list(folder), expect="safetensors"),
        BadInput("non-causal-LM architecture",
                 {**folder, "config.json": json.dumps(bert_config).encode()},
                 ["probe", "--model", "{dir}"], list(folder), expect="causal"),
        BadInput("config asks for trust_remote_code",
                 {**folder, "config.json": json.dumps(remote_config).encode()},
                 ["probe", "--model", "{dir}"], list(folder), expect="custom code"),
        BadInput("config.json is not JSON", {**folder, "config.json": b"{not json"},
                 ["probe", "--model", "{dir}"], list(folder), expect="JSON"),
        BadInput("pickle that would run code",
                 {**with_folder, "pytorch_model.bin": b""},
                 ["probe", "--model", "{dir}"], [*with_folder, "pytorch_model.bin"],
                 expect="pickle", marker=PICKLE_MARKER),
        BadInput("invalid GGUF (bad magic)", {"model.gguf": b"NOTGGUF" + b"\0" * 64},
                 ["probe", "--model", "{dir}/model.gguf"], ["model.gguf"], expect="GGUF"),
        BadInput("truncated GGUF", {"model.gguf": b"GGUF" + b"\3\0\0\0" + b"\1" * 12},
                 ["probe", "--model", "{dir}/model.gguf"], ["model.gguf"], expect="GGUF"),
        BadInput("zip with ../ paths",
                 {"model.zip": _zip_bytes({"../../evil.json": b"{}", **folder})},
                 ["probe", "--model", "{dir}/model.zip"], ["model.zip"], expect="model.zip"),
        BadInput("zip bomb", {"model.zip": b""},
                 ["probe", "--model", "{dir}/model.zip"], ["model.zip"], expect="model.zip",
                 extra={"zip_bomb": True}),
        BadInput("upload over the size cap", {"big.gguf": b"GGUF" + b"\0" * 4096},
                 ["probe", "--model", "{dir}/big.gguf"], ["big.gguf"], expect="GGUF",
                 extra={"upload_cap": 1024}),
        BadInput("LoRA adapter whose base does not match", adapter,
                 ["probe", "--model", "{dir}", "--base", str(tiny_dir)], list(adapter),
                 expect="adapter", extra={"base": str(tiny_dir)}),
        BadInput("LoRA adapter without a base", adapter, ["probe", "--model", "{dir}"],
                 list(adapter), expect="--base"),
        BadInput("weights containing NaN",
                 {**with_folder, "model.safetensors": _safetensors_bytes(nan_state)},
                 ["probe", "--model", "{dir}"], list(folder), expect="NaN"),
        BadInput("no tokenizer", {k: v for k, v in other.items() if "token" not in k
                                  and k != "chat_template.jinja"},
                 ["probe", "--model", "{dir}"], ["config.json", "model.safetensors"],
                 expect="tokenizer"),
        BadInput("model path does not exist", {}, ["probe", "--model", "{dir}/nothing"],
                 None, app=lambda d: _load(d / "nothing"), expect="not found"),
        BadInput("empty probe set", {"empty.txt": b"\n\n  \n"},
                 ["probe", "--model", str(tiny_dir), "--probe-set", "{dir}/empty.txt"],
                 None, app=probe_file("empty.txt"), expect="no"),
        BadInput("non-UTF-8 probe file", {"latin.txt": "café olé\n".encode("latin-1")},
                 ["probe", "--model", str(tiny_dir), "--probe-set", "{dir}/latin.txt"],
                 None, app=probe_file("latin.txt"), expect="UTF-8"),
        BadInput("probe file with a broken JSON line",
                 {"bad.jsonl": b'{"text": "fine"}\n{"text": broken\n'},
                 ["probe", "--model", str(tiny_dir), "--probe-set", "{dir}/bad.jsonl"],
                 None, app=probe_file("bad.jsonl"), expect="line 2"),
        BadInput("unknown stage in run config",
                 {"c.toml": quick.replace('"sft", "dpo"', '"sft", "pretrain"').encode()},
                 ["run", "{dir}/c.toml"], None,
                 app=form({"run": {**base_cfg["run"], "stages": ["pretrain"]}}),
                 expect="pretrain"),
        BadInput("unknown intervention in run config",
                 {"c.toml": (quick + '\n[interventions]\narms = ["dropout"]\n').encode()},
                 ["run", "{dir}/c.toml"], None,
                 app=form({**base_cfg, "interventions": {"arms": ["dropout"]}}),
                 expect="dropout"),
        BadInput("negative step count",
                 {"c.toml": quick.replace("steps = 3", "steps = -3", 1).encode()},
                 ["run", "{dir}/c.toml"], None, app=form({**base_cfg, "train": {"steps": -3}}),
                 expect="steps"),
        BadInput("absurd step count",
                 {"c.toml": quick.replace("steps = 3", "steps = 999999999", 1).encode()},
                 ["run", "{dir}/c.toml"], None,
                 app=form({**base_cfg, "train": {"steps": 999_999_999}}), expect="steps"),
        BadInput("run config is not TOML", {"c.toml": b"[run\nname = "},
                 ["run", "{dir}/c.toml"], None, app=form({"nothing": 1}), expect="TOML"),
    ]  # fmt: skip
    cases += config_and_viewer_cases(tiny_dir, adapter)
    del torch
    cases += hostile_inputs(tiny_dir)  # issue 13, classes 1-3 (block below)
    return cases


# == issue 13, classes 4-5: run configs, the database and the viewer ==========================
def _quick_with(old: str, new: str, count: int = 1) -> bytes:
    """configs/quick.toml with one text replacement (the CLI sees the file, the form the dict)."""
    text = (REPO_ROOT / "configs" / "quick.toml").read_text()
    assert old in text, old
    return text.replace(old, new, count).encode()


def _quick_raw(edit: Callable[[dict], None]) -> dict:
    import tomllib

    raw = tomllib.loads((REPO_ROOT / "configs" / "quick.toml").read_text())
    edit(raw)
    return raw


def config_and_viewer_cases(tiny_dir: Path, adapter: dict[str, bytes]) -> list[BadInput]:
    """Class 4: run configs with typos, wrong types, NaN/inf, bad ranges, unknown devices,
    models that only fail at run time (refused before the study is registered). Class 5: the
    database paths the viewer opens (missing, not a database)."""
    from ..pipeline import check_before_writing
    from ..runconfig import parse_config

    def form(edit: Callable[[dict], None], preflight: bool = False) -> Callable[[Path], Any]:
        def call(folder: Path) -> Any:
            config = parse_config(_quick_raw(edit), where="form")
            if preflight:
                check_before_writing(config)
            return config

        return call

    def put(section: str, key: str, value: Any) -> Callable[[dict], None]:
        return lambda raw: raw.setdefault(section, {}).__setitem__(key, value)

    def case(name: str, old: str, new: str, edit: Callable[[dict], None], expect: str,
             preflight: bool = False) -> BadInput:  # fmt: skip
        return BadInput(f"config: {name}", {"c.toml": _quick_with(old, new)},
                        ["run", "{dir}/c.toml"], None, app=form(edit, preflight),
                        expect=expect)  # fmt: skip

    def drop(section: str, key: str, new_key: str, value: Any) -> Callable[[dict], None]:
        def edit(raw: dict) -> None:
            raw[section].pop(key, None)
            raw[section][new_key] = value

        return edit

    interventions = '\n[interventions]\narms = ["baseline", "replay"]\n'
    with_arms = "n_samples = 64\n" + interventions

    def arms(**tables: dict) -> Callable[[dict], None]:
        return lambda raw: raw.__setitem__("interventions", {"arms": ["baseline", "replay"],
                                                               **tables})  # fmt: skip

    cases = [
        case("typo n_sample in [probe]", "n_samples = 64", "n_sample = 64",
             drop("probe", "n_samples", "n_sample", 64), "did you mean n_samples"),
        case("typo fracton in [interventions.replay]", "n_samples = 64",
             with_arms + "[interventions.replay]\nfracton = 0.2\n",
             arms(replay={"fracton": 0.2}), "did you mean fraction"),
        case("typo stpes in [train]", "steps = 3", "stpes = 3",
             drop("train", "steps", "stpes", 3), "did you mean steps"),
        case("unknown section [evals]", "[eval]", "[evals]",
             lambda raw: raw.__setitem__("evals", raw.pop("eval")), "did you mean eval"),
        case("NaN learning rate", "lr = 1e-3", "lr = nan", put("train", "lr", float("nan")),
             "finite"),
        case("infinite learning rate", "lr = 1e-3", "lr = inf",
             put("train", "lr", float("inf")), "finite"),
        case("boolean step count", "steps = 3", "steps = true", put("train", "steps", True),
             "whole number"),
        case("step count as a string", "steps = 3", 'steps = "3"', put("train", "steps", "3"),
             "whole number"),
        case("zero batch size", "batch_size = 4", "batch_size = 0",
             put("train", "batch_size", 0), "batch_size"),
        case("negative probe sample count", "n_samples = 64", "n_samples = -64",
             put("probe", "n_samples", -64), "n_samples"),
        case("string instead of a probe-set list", 'probe_sets = ["general"]',
             'probe_sets = "general"', put("eval", "probe_sets", "general"), "list"),
        case("unknown probe set", 'probe_sets = ["general"]', 'probe_sets = ["genral"]',
             put("eval", "probe_sets", ["genral"]), "did you mean general"),
        case("empty seed list", "seeds = [0]", "seeds = []", put("run", "seeds", []), "empty"),
        case("unknown device", 'device = "cpu"', 'device = "tpu"', put("run", "device", "tpu"),
             "device"),
        case("unknown data source", 'data_source = "sample"', 'data_source = "web"',
             put("run", "data_source", "web"), "data_source"),
        case("unknown held-out domains", "batch_size = 8", 'batch_size = 8\nheldout_domains = "x"',
             put("eval", "heldout_domains", "x"), "heldout_domains"),
        case("replay fraction above 1", "n_samples = 64",
             with_arms + "[interventions.replay]\nfraction = 1.5\n",
             arms(replay={"fraction": 1.5}), "fraction"),
        case("refresh method typo", "n_samples = 64",
             with_arms + '[interventions.refresh]\nmethod = "cpb"\n',
             arms(refresh={"method": "cpb"}), "did you mean cbp"),
        case("diversity layers as a string", "n_samples = 64",
             with_arms + '[interventions.diversity]\nlayers = "all"\n',
             arms(diversity={"layers": "all"}), "list"),
        case("negative O-LoRA weight", "n_samples = 64",
             with_arms + "[interventions.olora]\nlam = -1.0\n",
             arms(olora={"lam": -1.0}), "lam"),
        case("arm listed twice", "n_samples = 64",
             'n_samples = 64\n[interventions]\narms = ["replay", "replay"]\n',
             lambda raw: raw.__setitem__("interventions", {"arms": ["replay", "replay"]}),
             "twice"),
        case("both stages and orders", "seeds = [0]", 'seeds = [0]\norders = [["sft"]]',
             put("run", "orders", [["sft"]]), "both"),
        case("zero max_new_tokens", "max_new_tokens = 8", "max_new_tokens = 0",
             put("eval", "max_new_tokens", 0), "max_new_tokens"),
        case("base model does not exist (refused before registering)", 'model = "tiny-random"',
             f'model = "{tiny_dir.parent / "no-such-model"}"',
             put("run", "model", str(tiny_dir.parent / "no-such-model")), "does not exist",
             preflight=True),
        BadInput("config: base model is a LoRA adapter (refused before registering)",
                 {**adapter, "c.toml": _quick_with("steps = 3", "steps = 3")},
                 ["run", "{dir}/c.toml", "--model", "{dir}"], None,
                 app=lambda d: check_before_writing(parse_config(
                     _quick_raw(put("run", "model", str(d))), where="form")),
                 expect="adapter"),
    ]  # fmt: skip
    return cases + viewer_cases()


def _viewer_env(value: str, check: Callable[[], Any]) -> Callable[[Path], Any]:
    """Run ``check`` with ``COLLAPSE_READONLY=value`` (restored afterwards)."""

    def call(_folder: Path) -> Any:
        old = os.environ.get("COLLAPSE_READONLY")
        os.environ["COLLAPSE_READONLY"] = value
        try:
            return check()
        finally:
            if old is None:
                os.environ.pop("COLLAPSE_READONLY", None)
            else:
                os.environ["COLLAPSE_READONLY"] = old

    return call


def _open_viewer(name: str) -> Callable[[Path], Any]:
    """The viewer's Store on ``<case folder>/name``; creating the file would be a failure."""

    def call(folder: Path) -> Any:
        from ..store import Store

        path = folder / name
        existed = path.exists()
        try:
            return Store(path, read_only=True)
        finally:
            if path.exists() != existed:
                raise RuntimeError(f"the viewer created {path}")  # counted as not clean

    return call


def _through_viewer(action: Callable[[Any], Any]) -> Callable[[Path], Any]:
    """``action`` on a read-only Store of a fresh database in the case folder."""

    def call(folder: Path) -> Any:
        from ..store import Store

        Store(folder / "viewer.duckdb")  # the owner's database
        return action(Store(folder / "viewer.duckdb", read_only=True))

    return call


def viewer_cases() -> list[BadInput]:
    """Class 5: what the read-only viewer and the worker read from the database: mistyped or
    broken database files, writes through the viewer, a garbage COLLAPSE_READONLY, corrupt job
    rows. App path only (``cli=[]``): the command line has no viewer."""
    from ..jobs import queue, worker
    from ..paths import env_flag

    def job_row(spec_json: str | None) -> Callable[[Path], Any]:
        return lambda _d: queue.decode_spec(spec_json, strict=True)

    def case(name: str, app: Callable[[Path], Any], expect: str,
             files: dict[str, bytes] | None = None) -> BadInput:  # fmt: skip
        return BadInput(f"viewer: {name}", files or {}, [], None, app=app, expect=expect,
                        extra={"app_expect": True})  # fmt: skip

    return [
        case("mistyped database path", _open_viewer("colapse.duckdb"), "not found"),
        case("database file is another engine's", _open_viewer("bad.duckdb"), "cannot open",
             {"bad.duckdb": b"SQLite format 3\0" + b"x" * 4096}),
        case("database file is empty", _open_viewer("empty.duckdb"), "read-only",
             {"empty.duckdb": b""}),
        case("a job submitted through the viewer", _through_viewer(
            lambda store: queue.submit(store, "probe", {"model": "smollm2"})), "read-only"),
        case("a worker started by the viewer", _through_viewer(worker.ensure_worker),
             "read-only"),
        case("a cancel sent by the viewer", _through_viewer(
            lambda store: queue.request_cancel(store, "any")), "read-only"),
        case("COLLAPSE_READONLY=ture", _viewer_env("ture", lambda: env_flag("COLLAPSE_READONLY")),
             "not understood"),
        case("COLLAPSE_READONLY=2", _viewer_env("2", lambda: env_flag("COLLAPSE_READONLY")),
             "not understood"),
        case("job row with broken JSON", job_row("{not json"), "corrupt"),
        case("job row whose spec is a list", job_row("[1, 2]"), "corrupt"),
        case("job row with a NULL spec", job_row(None), "corrupt"),
        case("job row nested 100000 deep", job_row("[" * 100_000 + "]" * 100_000), "corrupt"),
    ]  # fmt: skip


# == end of issue 13, classes 4-5 ================================================================


def _load_state(tiny_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "model.safetensors"))


def _adapter_files(model_dir: Path) -> dict[str, bytes]:
    """A LoRA adapter trained on ``model_dir`` (a different width than the probe's base)."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory() as tmp:
        peft.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _load(path: Path) -> Any:
    from ..models import load_model

    return load_model(str(path), device="cpu", verbose=False)


def materialise(case: BadInput, root: Path) -> Path:
    """Write a case's files under ``root/<case>`` and return that folder."""
    folder = root / case.name.replace(" ", "_").replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in case.files.items():
        (folder / rel).write_bytes(data)
    if case.marker and "pytorch_model.bin" in case.files:
        with open(folder / "pytorch_model.bin", "wb") as fh:
            pickle.dump({"weight": _Exploit(folder / case.marker)}, fh)
    if case.extra.get("immutable"):
        make_immutable(folder / case.extra["immutable"])
    if case.extra.get("zip_bomb"):
        with zipfile.ZipFile(folder / "model.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            # 8 × 100 MB of zeros compresses to ~0.8 MB; callers lower COLLAPSE_MAX_EXTRACT_MB
            # below 800 so the cap trips without writing gigabytes.
            chunk = b"\0" * (100 * 1024 * 1024)
            for i in range(8):
                zf.writestr(f"shard{i}.safetensors", chunk)
    return folder


def _one_line_error(text: str) -> str | None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if "Traceback" in text or len(errors) != 1:
        return None
    return errors[0]


def run_cli_case(case: BadInput, folder: Path, db: Path) -> tuple[bool, str]:
    """Run the case's CLI command; ok = exit 2 with exactly one ``error:`` line, no traceback."""
    if not case.cli:  # issue 13 class 5: viewer-only cases have no command line
        return True, "n/a (the viewer has no command line)"
    args = [a.replace("{dir}", str(folder)) for a in case.cli]
    target = folder / case.extra["db"] if "db" in case.extra else db
    before = _case_db_state(case, folder)
    out = subprocess.run(
        [sys.executable, "-m", "collapse_core", *args, "--db", str(target)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env={**os.environ, "COLLAPSE_DATA": str(db.parent / "data"),
             "COLLAPSE_MAX_EXTRACT_MB": "256", **case.extra.get("env", {})},
        preexec_fn=_fsize_limit(case.extra["fsize"]) if "fsize" in case.extra else None,  # noqa: PLW1509
    )  # fmt: skip
    line = _one_line_error(out.stderr)
    ok = out.returncode == 2 and line is not None and case.expect.lower() in line.lower()
    if ok and _case_db_state(case, folder) != before:
        return False, f"changed its database: {line}"
    return ok, line or out.stderr[-500:]


def run_app_case(case: BadInput, folder: Path, store: Any) -> tuple[bool, str]:
    """The app's path: save as uploads → prepare → load → probe; or the form/probe-file call."""

    if case.upload is None and case.app is None:
        return True, "n/a (a command-line argument; the app has its own widgets)"
    before = _case_db_state(case, folder)
    try:
        with _case_env(case):
            return _app_outcome(case, folder, store, before)
    finally:
        release(case, folder)


def _app_outcome(case: BadInput, folder: Path, store: Any, before: Any) -> tuple[bool, str]:
    from ..probing import ProbeConfig, probe
    from ..uploads import prepare_upload, save_upload

    try:
        if case.upload is not None:
            saved = []
            for rel in case.upload:
                data = (folder / rel).read_bytes() if (folder / rel).exists() else b""
                saved.append(save_upload(rel, data, max_bytes=case.extra.get("upload_cap")))
            prepared = prepare_upload(saved)
            from ..models import load_model

            loaded = load_model(str(prepared), case.extra.get("base"), device="cpu",
                                verbose=False)  # fmt: skip
            probe(loaded, "general", ProbeConfig(max_length=16, n_samples=16), store=store)
        else:
            case.app(folder)
    except CollapseError as err:
        message = str(err)
        ok = "\n" not in message and bool(message)
        if case.extra.get("app_expect") and case.expect.lower() not in message.lower():
            ok = False
        if ok and _case_db_state(case, folder) != before:
            return False, f"changed its database: {message}"
        return ok, message
    except Exception as err:  # noqa: BLE001 - anything else is exactly the failure we count
        return False, f"{type(err).__name__}: {err}"
    return False, "accepted a bad input"


def seed_store(store: Any, tiny_dir: Path) -> None:
    """Put one real probe result in the store so 'unchanged' is a meaningful check."""
    from ..probing import ProbeConfig, probe

    probe(str(tiny_dir), "math", ProbeConfig(max_length=24, n_samples=32), store=store,
          device="cpu")  # fmt: skip


def crash_probe_job(workdir: Path, tiny_dir: Path) -> dict[str, Any]:
    """kill -9 a worker mid-probe; recovered = DB opens, job interrupted, nothing half-written."""
    from ..jobs import queue, worker
    from ..store import Store

    store = Store(workdir / "crash_probe.duckdb")
    texts = workdir / "many.txt"
    texts.write_text("\n".join(f"prompt number {i} about topic {i % 17}" for i in range(4000)))
    job_id = queue.submit(store, "probe", {"model": str(tiny_dir), "probe_sets": [str(texts)],
                                          "config": {"batch_size": 1}, "device": "cpu"})  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "collapse_core", "worker", "--db", str(store.path)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        job = queue.get_job(store, job_id)
        if job and job["status"] == "running" and (job["progress"] or 0) > 0.01:
            break
        time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    worker.reap_interrupted(store)
    job = queue.get_job(store, job_id)
    orphans = store.query("SELECT count(*) AS n FROM probes")["n"][0]
    return {"recovered": job["status"] == "interrupted" and orphans == 0,
            "status": job["status"], "probes_stored": int(orphans)}  # fmt: skip


def crash_pipeline_run(workdir: Path, tiny_dir: Path) -> dict[str, Any]:
    """kill -9 a pipeline run mid-stage, then rerun: recovered = resumes and completes."""
    from ..store import Store

    db = workdir / "crash_run.duckdb"
    env = {**os.environ, "COLLAPSE_DATA": str(workdir / "data")}
    cmd = [sys.executable, "-m", "collapse_core", "run", str(REPO_ROOT / "configs/quick.toml"),
           "--db", str(db), "--model", str(tiny_dir)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            if db.exists() and len(Store(db, lock_timeout=2).query("SELECT 1 FROM stages")) >= 2:
                break
        except CollapseError:
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(db)
    before = len(store.query("SELECT 1 FROM stages"))
    rerun = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    after = store.query("SELECT stage_index FROM stages ORDER BY 1")["stage_index"].tolist()
    return {"recovered": rerun.returncode == 0 and after == list(range(7)),
            "stages_at_kill": before, "stages_after_resume": len(after)}  # fmt: skip


def bench_faults(args: Any) -> int:
    """Print: bad inputs tried / rejected cleanly / DB unchanged; crashes injected / recovered."""
    import tempfile

    from ..store import Store
    from ..tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["COLLAPSE_DATA"] = str(root / "data")
        os.environ["COLLAPSE_MAX_EXTRACT_MB"] = "256"
        tiny, other = root / "tiny", root / "tiny_wide"
        make_tiny_model("llama", path=tiny, seed=0)
        _make_wide(other)
        store = Store(root / "faults.duckdb")
        seed_store(store, tiny)
        cases = bad_inputs(tiny, other)
        tried = clean_cli = clean_app = unchanged = 0
        for case in cases:
            folder = materialise(case, root / "cases")
            before = store.table_hashes()
            ok_cli, msg_cli = run_cli_case(case, folder, store.path)
            ok_app, msg_app = run_app_case(case, folder, store)
            same = store.table_hashes() == before
            ran = case.marker is not None and (folder / case.marker).exists()
            tried += 1
            clean_cli += ok_cli and not ran
            clean_app += ok_app and not ran
            unchanged += same
            flag = "ok " if ok_cli and ok_app and same and not ran else "BAD"
            print(f"{flag} {case.name:<40} cli: {msg_cli[:70]}")
            print(f"    {'':<40} app: {msg_app[:70]}")
        crashes = [("kill -9 probe job", crash_probe_job(root, tiny)),
                   ("kill -9 pipeline run", crash_pipeline_run(root, tiny))]  # fmt: skip
        for name, result in crashes:
            print(f"{'ok ' if result['recovered'] else 'BAD'} {name}: {result}")
        print(f"\nbad inputs tried {tried} / rejected cleanly via CLI {clean_cli} / via upload "
              f"path {clean_app} / DB unchanged {unchanged}")  # fmt: skip
        print(f"crashes injected {len(crashes)} / recovered "
              f"{sum(r['recovered'] for _, r in crashes)}")  # fmt: skip
    return 0


def _make_wide(path: Path) -> None:
    """A tiny llama of hidden size 48 (so an adapter trained on it fits no 32-wide base)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..tiny_models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


# ===== issue 13, classes 1-3 (sandbox refusal; hostile sizes, adapters, templates; JSON types
# and depth; CLI numbers; broken, read-only and full databases) =================================


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def _with_header(weights: bytes, edit: Callable[[dict], Any]) -> bytes:
    """The safetensors file with its JSON header rewritten by ``edit`` (data left as is)."""
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + n])
    replaced = edit(header)
    raw = replaced if isinstance(replaced, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n :]


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def hostile_inputs(tiny_dir: Path) -> list[BadInput]:
    """Inputs that passed the old checks but hung, exhausted or crashed the loader, the CLI or
    the store (issue 13, classes 1-3). Every one must end in one ``error:`` line / CollapseError,
    leave the database unchanged and leave nothing running."""
    folder = _tiny_folder_files(tiny_dir)
    config = json.loads(folder["config.json"])
    weights = folder["model.safetensors"]
    adapter = _adapter_files(tiny_dir)
    adapter_config = json.loads(adapter["adapter_config.json"])
    tiny = str(tiny_dir)
    model_files = list(folder)
    probe_cli = ["probe", "--model", "{dir}"]
    adapter_cli = ["probe", "--model", "{dir}", "--base", tiny]
    adapter_upload = [k for k in adapter if k.endswith((".json", ".safetensors"))]

    def model(name: str, expect: str, **changes: Any) -> BadInput:
        body = json.dumps({**config, **changes}).encode()
        return BadInput(name, {**folder, "config.json": body}, probe_cli, model_files,
                        expect=expect)  # fmt: skip

    def raw_file(name: str, expect: str, file: str, data: bytes) -> BadInput:
        return BadInput(name, {**folder, file: data}, probe_cli, model_files, expect=expect)

    def lora(name: str, expect: str, **changes: Any) -> BadInput:
        body = json.dumps({**adapter_config, **changes}).encode()
        return BadInput(name, {**adapter, "adapter_config.json": body}, adapter_cli,
                        adapter_upload, expect=expect, extra={"base": tiny})  # fmt: skip

    def template(name: str, expect: str, text: str) -> BadInput:
        tok_config = json.loads(folder["tokenizer_config.json"])
        body = json.dumps({**tok_config, "chat_template": text}).encode()
        files = {k: v for k, v in folder.items() if k != "chat_template.jinja"}
        return BadInput(name, {**files, "tokenizer_config.json": body}, probe_cli, list(files),
                        expect=expect)  # fmt: skip

    def probes(name: str, expect: str, body: bytes) -> BadInput:
        from ..probesets import load_probe_set

        return BadInput(name, {"p.jsonl": body},
                        ["probe", "--model", tiny, "--probe-set", "{dir}/p.jsonl"], None,
                        app=lambda d: load_probe_set(str(d / "p.jsonl")), expect=expect)  # fmt: skip

    def cli_number(name: str, flag: str, value: str) -> BadInput:
        return BadInput(name, {}, ["probe", "--model", tiny, flag, value], None,
                        expect=flag.lstrip("-"))  # fmt: skip

    def broken_db(name: str, data: bytes, expect: str, **extra: Any) -> BadInput:
        from ..store import Store

        return BadInput(name, {"x.duckdb": data}, ["analyze", "latest"], None,
                        app=lambda d: Store(d / "x.duckdb", lock_timeout=2), expect=expect,
                        extra={"db": "x.duckdb", **extra})  # fmt: skip

    def no_sandbox(_dir: Path) -> Any:
        from .. import sandbox

        sandbox.isolation_status.cache_clear()
        try:
            return sandbox.require_isolation()
        finally:
            sandbox.isolation_status.cache_clear()

    quick = str(REPO_ROOT / "configs" / "quick.toml")
    loops = "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}"
    db_bytes = _seeded_db_bytes()
    cases = [
        # class 1: the code sandbox
        BadInput("generation evals without a sandbox", {}, ["run", quick, "--model", tiny],
                 None, app=no_sandbox, expect="bubblewrap",
                 extra={"env": {"COLLAPSE_BWRAP": "", "COLLAPSE_ALLOW_UNISOLATED": ""}}),
        # class 2: sizes against headers, adapters, chat templates
        model("config claims 10 000 layers", "num_hidden_layers", num_hidden_layers=10_000),
        model("config claims 300 layers, weights hold 2", "lack", num_hidden_layers=300),
        model("config vocabulary larger than the embedding", "shape", vocab_size=999_999),
        model("config hidden size larger than the weights", "shape", hidden_size=4096),
        model("config MLP width larger than the weights", "shape", intermediate_size=65536),
        model("config hidden size is a string", "hidden_size", hidden_size="32"),
        model("config layer count negative", "num_hidden_layers", num_hidden_layers=-2),
        model("config context of 10^12 positions", "max_position_embeddings",
              max_position_embeddings=10**12),
        model("config model_type is a list", "model_type", model_type=["llama"]),
        raw_file("config.json nested 100 000 deep", "nests", "config.json", _deep(100_000)),
        raw_file("config.json over the size cap", "limit", "config.json",
                 json.dumps({**config, "pad": "x" * (9 << 20)}).encode()),
        raw_file("safetensors offsets as strings", "malformed", "model.safetensors",
                 _with_header(weights, lambda h: _first_tensor(h).update(
                     data_offsets=[str(v) for v in _first_tensor(h)["data_offsets"]]))),
        raw_file("safetensors negative shape", "malformed", "model.safetensors",
                 _with_header(weights, lambda h: _first_tensor(h).update(shape=[-1, 32]))),
        raw_file("safetensors header nested deep", "nests", "model.safetensors",
                 _with_header(weights, lambda h: _deep(50_000))),
        lora("adapter rank 100 000", "r", r=100_000),
        lora("adapter target_modules a regex", "regular expression",
             target_modules="(.*a+)+$"),
        lora("adapter rank_pattern with a regex key", "rank_pattern",
             rank_pattern={"(a|aa)+$": 4}),
        lora("adapter asks for layer replication", "layer_replication",
             layer_replication=[[0, 2]] * 50),
        lora("adapter data-driven initialisation", "init_lora_weights",
             init_lora_weights="pissa"),
        lora("adapter lora_alpha is a string", "lora_alpha", lora_alpha="big"),
        BadInput("adapter_config.json nested deep",
                 {**adapter, "adapter_config.json": b'{"a": ' + _deep(100_000) + b"}"},
                 adapter_cli, adapter_upload, expect="nests", extra={"base": tiny}),
        template("chat template with nested 10^5 loops", "loops", loops),
        template("chat template repeating a string 10^9 times", "huge", "{{ 'a' * 10**9 }}"),
        template("chat template over the size cap", "limit", "{# " + "x" * 70_000 + " #}"),
        # class 3: JSON types and depth in probe sets, CLI numbers, databases
        probes("probe file line nested 100 000 deep", "nests",
               b'{"text": "fine"}\n' + _deep(100_000) + b"\n"),
        probes("probe file id is an object", "id",
               b'{"text": "fine", "id": {"a": [1, 2]}}\n'),
        cli_number("CLI batch size zero", "--batch-size", "0"),
        cli_number("CLI negative max length", "--max-length", "-3"),
        cli_number("CLI sample count not a number", "--n-samples", "many"),
        cli_number("CLI negative seed", "--seed", "-1"),
        broken_db("database file truncated", db_bytes[: len(db_bytes) // 3], "corrupt"),
        broken_db("database file is garbage", os.urandom(40_000), "corrupt"),
        broken_db("database file empty", b"", "corrupt"),
        broken_db("database file read-only", db_bytes, "read-only", immutable="x.duckdb"),
        BadInput("disk full while storing a probe", {"x.duckdb": db_bytes},
                 ["probe", "--model", tiny, "--probe-set", "math"], None,
                 app=lambda d: _probe_with_fsize(d / "x.duckdb", tiny_dir, 16384),
                 expect="nothing was saved", extra={"db": "x.duckdb", "fsize": 16384}),
    ]  # fmt: skip
    for case in cases:
        case.extra["app_expect"] = True  # the app's message must name the problem too
    return cases


def _seeded_db_bytes() -> bytes:
    """A small valid database file with one row, as bytes."""
    import tempfile

    from ..store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "seed.duckdb")
        store.execute("INSERT INTO meta VALUES ('fault_seed', 'yes')")
        return store.path.read_bytes()


def _fsize_limit(limit: int) -> Callable[[], None]:  # pragma: no cover - runs in the child
    """preexec: files may not grow past ``limit`` bytes; EFBIG instead of the SIGXFSZ kill."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def _probe_with_fsize(db: Path, tiny_dir: Path, limit: int) -> Any:
    """The app's probe → store path with this process's files capped at ``limit`` bytes."""
    import resource

    from ..probing import ProbeConfig, probe
    from ..store import Store

    store = Store(db, lock_timeout=2)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
        return probe(str(tiny_dir), "math", ProbeConfig(max_length=24, n_samples=32),
                     store=store, device="cpu")  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _case_db_state(case: BadInput, folder: Path) -> Any:
    """Bytes-level identity of a case's own database file (None when it has none)."""
    if "db" not in case.extra:
        return None
    path = folder / case.extra["db"]
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


class _case_env:  # noqa: N801 - used as a context manager
    """Set a case's environment variables for the in-process app path, then restore them."""

    def __init__(self, case: BadInput) -> None:
        self.env = case.extra.get("env", {})
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.env.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: Any) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def children_alive() -> list[int]:
    """Pids of this process's live (non-zombie) children: a case must leave none behind."""
    mine, found = os.getpid(), []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == mine and fields[0] != "Z":
            found.append(int(pid))
    return found


def make_immutable(path: Path) -> None:
    """Make a file unwritable even for root (``chattr +i``); chmod 0444 for other users."""
    path.chmod(0o444)
    if os.geteuid() == 0:  # root ignores modes; needs e2fsprogs' chattr and ext2/3/4, xfs, btrfs
        try:
            subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise RuntimeError(f"cannot make {path} immutable for the read-only case") from err


def release(case: BadInput, folder: Path) -> None:
    """Undo :func:`make_immutable` so the case folder can be removed."""
    name = case.extra.get("immutable")
    if name and (folder / name).exists():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder / name)], capture_output=True)
        (folder / name).chmod(0o644)
