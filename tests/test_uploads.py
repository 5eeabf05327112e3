"""The untrusted upload path: every bad input is a one-line CollapseError and leaves nothing
behind, nothing is written outside the data directory, and a good upload loads."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from collapse_core import uploads
from collapse_core.errors import CollapseError
from collapse_core.uploads import prepare_upload, sanitize_filename, save_upload
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_upload_src") / "tiny-llama"
    make_tiny_model("llama", path=path, seed=0)
    return path


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A fresh data dir at tmp/sandbox/data; tmp/sandbox must hold nothing else afterwards."""
    root = tmp_path / "sandbox" / "data"
    root.mkdir(parents=True)
    monkeypatch.setenv("COLLAPSE_DATA", str(root))
    monkeypatch.delenv("COLLAPSE_MAX_UPLOAD_MB", raising=False)
    monkeypatch.delenv("COLLAPSE_MAX_EXTRACT_MB", raising=False)
    yield root
    outside = [p for p in (tmp_path / "sandbox").rglob("*") if not p.is_relative_to(root)]
    assert outside == [], f"written outside the data dir: {outside}"
    assert not list(tmp_path.glob("evil*")) and not list(Path.cwd().glob("evil*"))


def _uploaded_files(data: Path) -> list[Path]:
    return [p for p in (data / "uploads").rglob("*") if p.is_file()]


def _save_all(folder: Path) -> list[Path]:
    return [save_upload(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]


def _zip_bytes(members: dict[str, bytes], prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(prefix + name, content)
    return buf.getvalue()


def _folder_members(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _fails(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(CollapseError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


# -- saving --------------------------------------------------------------------------------
def test_sanitize_filename():
    assert sanitize_filename("../../etc/passwd") == "passwd"
    assert sanitize_filename("C:\\Users\\x\\model.gguf") == "model.gguf"
    assert sanitize_filename("my model (1).gguf") == "my_model__1_.gguf"
    assert sanitize_filename("...hidden") == "hidden"
    assert sanitize_filename("") == "upload"
    assert sanitize_filename("..") == "upload"
    long = sanitize_filename("a" * 500 + ".safetensors")
    assert len(long) <= uploads.MAX_NAME_LEN and long.endswith(".safetensors")


def test_save_upload_streams_under_uploads_dir(data):
    path = save_upload("../../evil name.gguf", io.BytesIO(b"GGUF" + b"\0" * 100))
    assert path.name == "evil_name.gguf"
    assert path.is_relative_to(data / "uploads") and path.stat().st_size == 104


def test_empty_file(data):
    _fails("empty", save_upload, "model.gguf", b"")
    assert _uploaded_files(data) == []


def test_upload_over_cap_deletes_partial_file(data, monkeypatch):
    message = _fails("limit", save_upload, "big.gguf", io.BytesIO(b"x" * 3_000_000), 1_000_000)
    assert "COLLAPSE_MAX_UPLOAD_MB" in message
    assert _uploaded_files(data) == [] and list((data / "uploads").iterdir()) == []
    monkeypatch.setenv("COLLAPSE_MAX_UPLOAD_MB", "1")
    message = _fails("1 MB", save_upload, "big.gguf", b"x" * (2 * 1024 * 1024))
    assert _uploaded_files(data) == []


# -- single files --------------------------------------------------------------------------
def test_non_gguf_single_files(data):
    fake = save_upload("model.gguf", os.urandom(4096))
    _fails("not a GGUF", prepare_upload, [fake])
    notes = save_upload("notes.txt", b"hello")
    _fails("not a model file we accept", prepare_upload, [notes])
    weights = save_upload("model.safetensors", b"\0" * 64)
    _fails("needs its config.json", prepare_upload, [weights])
    pickle = save_upload("pytorch_model.bin", b"\x80\x04junk")
    _fails("pickled weights are not accepted", prepare_upload, [pickle])
    tar = save_upload("model.tar.gz", b"\x1f\x8b junk")
    _fails(r"upload a \.gguf", prepare_upload, [tar])


def test_gguf_header_accepted_without_loading(data):
    header = b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + b"\0" * 1000
    path = save_upload("tiny.gguf", header)
    assert prepare_upload([path]) == path
    truncated = save_upload("cut.gguf", b"GGUF" + struct.pack("<IQQ", 3, 10**9, 3))
    _fails("truncated or corrupt", prepare_upload, [truncated])


# -- loose files: safetensors + config -----------------------------------------------------
def test_loose_files_make_a_loadable_folder(data, tiny_dir):
    from collapse_core.models import load_model

    folder = prepare_upload(_save_all(tiny_dir))
    assert folder.is_relative_to(data / "uploads") and (folder / "config.json").is_file()
    # the per-file upload folders were emptied and removed
    assert {p.parent for p in _uploaded_files(data)} == {folder}
    loaded = load_model(folder, device="cpu", verbose=False)
    assert loaded.n_layers == 2 and loaded.d_model == 32


def test_truncated_safetensors(data, tiny_dir):
    members = _folder_members(tiny_dir)
    members["model.safetensors"] = members["model.safetensors"][:-500]
    paths = [save_upload(name, content) for name, content in members.items()]
    _fails("truncated or corrupt|lies about sizes", prepare_upload, paths)
    assert list((data / "uploads").iterdir()) == []  # consumed inputs and their folders gone


def test_safetensors_whose_header_lies(data, tiny_dir):
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "F32", "shape": [260, 32],
                                       "data_offsets": [0, 260 * 32 * 4]}}
    ).encode()  # fmt: skip
    liar = struct.pack("<Q", len(header)) + header + b"\0" * 1000  # far fewer bytes than claimed
    members = _folder_members(tiny_dir)
    members["model.safetensors"] = liar
    paths = [save_upload(name, content) for name, content in members.items()]
    _fails("lies about sizes", prepare_upload, paths)
    huge = struct.pack("<Q", 10**12) + b"{}"
    members["model.safetensors"] = huge
    paths = [save_upload(name, content) for name, content in members.items()]
    _fails("truncated or corrupt", prepare_upload, paths)


def test_custom_code_config_refused(data, tiny_dir):
    members = _folder_members(tiny_dir)
    config = json.loads(members["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    members["config.json"] = json.dumps(config).encode()
    _fails("custom code", prepare_upload, [save_upload(n, c) for n, c in members.items()])


def test_loose_files_without_tokenizer_or_config(data, tiny_dir):
    members = _folder_members(tiny_dir)
    no_tok = {n: c for n, c in members.items() if n in ("config.json", "model.safetensors")}
    _fails("tokenizer", prepare_upload, [save_upload(n, c) for n, c in no_tok.items()])
    no_cfg = {n: c for n, c in members.items() if n != "config.json"}
    _fails("no config.json", prepare_upload, [save_upload(n, c) for n, c in no_cfg.items()])


# -- zips ----------------------------------------------------------------------------------
def test_good_zip_of_tiny_hf_folder_loads(data, tiny_dir):
    from collapse_core.models import load_model

    members = _folder_members(tiny_dir)
    members["README.md"] = b"# model card"
    members["modeling_evil.py"] = b"import os; os.system('echo pwned')"
    blob = _zip_bytes(members, prefix="tiny-llama/")
    with zipfile.ZipFile(io.BytesIO(blob), "a") as zf:
        zf.writestr("__MACOSX/tiny-llama/._config.json", b"junk")
    zipped = save_upload("tiny-llama.zip", blob)
    folder = prepare_upload([zipped])
    assert folder.is_relative_to(data / "uploads") and (folder / "config.json").is_file()
    assert not (folder / "modeling_evil.py").exists() and not (folder / "README.md").exists()
    assert not zipped.exists()  # the uploaded zip is removed once extracted
    loaded = load_model(folder, device="cpu", verbose=False)
    assert loaded.n_layers == 2 and loaded.architecture == "llama"


def test_zip_with_dotdot_path(data, tiny_dir):
    members = _folder_members(tiny_dir)
    members["../../evil.json"] = b"{}"
    zipped = save_upload("slip.zip", _zip_bytes(members))
    _fails("escapes its folder", prepare_upload, [zipped])
    assert [p.name for p in _uploaded_files(data)] == ["slip.zip"]  # nothing extracted


def test_zip_with_absolute_path_and_symlink(data):
    zipped = save_upload("abs.zip", _zip_bytes({"/tmp/evil.json": b"{}"}))
    _fails("absolute path", prepare_upload, [zipped])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("model/config.json")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    _fails("symbolic link", prepare_upload, [save_upload("link.zip", buf.getvalue())])


def test_zip_bomb_declared_size(data):
    bomb = _zip_bytes({"model/model.safetensors": b"\0" * (20 * 1024 * 1024)})
    assert len(bomb) < 100_000
    zipped = save_upload("bomb.zip", bomb)
    _fails("over the limit", prepare_upload, [zipped], max_expanded=5 * 1024 * 1024)
    assert [p.name for p in _uploaded_files(data)] == ["bomb.zip"]


def test_zip_bomb_lying_sizes(data):
    """Declared sizes patched to look small: the bytes actually written are counted too."""
    payload = b"\0" * (8 * 1024 * 1024)
    blob = bytearray(_zip_bytes({"model/model.safetensors": payload}))
    real = struct.pack("<I", len(payload))
    fake = struct.pack("<I", 1000)
    assert blob.count(real) == 2  # local header + central directory
    blob = bytearray(bytes(blob).replace(real, fake))
    zipped = save_upload("liar.zip", bytes(blob))
    _fails("zip bomb|corrupt", prepare_upload, [zipped], max_expanded=4096)
    assert [p.name for p in _uploaded_files(data)] == ["liar.zip"]


def test_zip_bytes_written_are_counted(data, monkeypatch):
    """Even if a member stream yields more than its declared size, extraction stops."""
    zipped = save_upload("small.zip", _zip_bytes({"model/config.json": b"{}" * 10}))
    monkeypatch.setattr(
        uploads.zipfile.ZipFile, "open", lambda self, info: io.BytesIO(b"\0" * (4 << 20))
    )
    _fails("zip bomb", prepare_upload, [zipped])
    assert [p.name for p in _uploaded_files(data)] == ["small.zip"]


def test_zip_member_count_cap(data):
    members = {f"model/f{i}.txt": b"x" for i in range(50)}
    zipped = save_upload("many.zip", _zip_bytes(members))
    _fails("members; the limit is 20", prepare_upload, [zipped], max_members=20)


def test_not_a_zip(data):
    _fails("not a valid zip", prepare_upload, [save_upload("model.zip", b"PK\x03\x04broken")])


def test_pickle_in_zip_rejected_without_opt_in(data, tiny_dir):
    import torch

    from collapse_core.models import load_model

    model, _ = make_tiny_model("llama", seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    members = {n: c for n, c in _folder_members(tiny_dir).items() if n != "model.safetensors"}
    members["pytorch_model.bin"] = buf.getvalue()
    blob = _zip_bytes(members, prefix="m/")
    message = _fails("pickled weights", prepare_upload, [save_upload("pickle.zip", blob)])
    assert "safetensors" in message
    assert [p.name for p in _uploaded_files(data)] == ["pickle.zip"]
    # with the explicit opt-in the .bin is kept and loads with weights_only=True
    folder = prepare_upload([save_upload("pickle.zip", blob)], allow_pickle=True)
    assert (folder / "pytorch_model.bin").is_file()
    loaded = load_model(folder, device="cpu", allow_pickle=True, verbose=False)
    assert loaded.n_layers == 2


def test_lora_adapter_zip(data, tiny_dir):
    from peft import LoraConfig, get_peft_model

    from collapse_core.models import load_model

    model, _ = make_tiny_model("llama", seed=0)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    adapter_src = data.parent.parent / "adapter_src"
    peft_model.save_pretrained(adapter_src)
    zipped = save_upload("adapter.zip", _zip_bytes(_folder_members(adapter_src), "adapter/"))
    folder = prepare_upload([zipped])
    assert (folder / "adapter_config.json").is_file()
    assert uploads.check_model_path(folder) == "lora"
    loaded = load_model(folder, base=tiny_dir, device="cpu", verbose=False)
    assert loaded.kind == "lora"
    import shutil

    shutil.rmtree(adapter_src)


def test_check_model_path_local(data, tiny_dir, tmp_path):
    assert uploads.check_model_path("smollm2") == "builtin"
    assert uploads.check_model_path(tiny_dir) == "hf"
    _fails("does not exist", uploads.check_model_path, tmp_path / "nope")


def test_discard_never_touches_files_outside_uploads(data, tiny_dir):
    uploads.discard([tiny_dir / "config.json", data])
    assert (tiny_dir / "config.json").is_file() and data.is_dir()
    path = save_upload("x.gguf", b"GGUF")
    uploads.discard([path])
    assert not path.exists() and not path.parent.exists()


# -- the trial load: an upload's first load runs in a child with time and memory limits -------
def test_first_load_of_an_upload_runs_in_a_limited_child_once(data, tiny_dir, monkeypatch):
    from collapse_core import validation
    from collapse_core.models import load_model

    folder = prepare_upload(_save_all(tiny_dir))
    calls = []
    real = validation.trial_load
    monkeypatch.setattr("collapse_core.models.trial_load",
                        lambda *a, **k: calls.append(a) or real(*a, **k))  # fmt: skip
    load_model(folder, device="cpu", verbose=False)
    assert len(calls) == 1 and (folder / validation.TRIAL_MARKER).is_file()
    real(folder)  # remembered: returns at once, no child (the marker matches the files)
    # a local folder (not an upload) is the user's own and loads directly
    assert not validation.needs_trial(tiny_dir)


def test_trial_load_enforces_its_wall_clock_and_memory_limits(data, tiny_dir):
    from collapse_core.validation import trial_load

    folder = prepare_upload(_save_all(tiny_dir))
    _fails("longer than", trial_load, folder, timeout_s=0.5)
    _fails("more than 300 MB", trial_load, folder, memory_mb=300)
    assert not (folder / ".collapse_trial.json").exists()
