"""Probe a model: upload files or point at a local path, pick probe sets, queue a probe job.

The page only checks the files (headers, configs; no model is loaded here) and submits a
"probe" job; a background worker does the loading and probing. Bad input is one st.error line.
"""

from __future__ import annotations

import os

import streamlit as st

from collapse_core import series, ui, uploads
from collapse_core.errors import CollapseError
from collapse_core.jobs import queue, worker
from collapse_core.naming import clean_name
from collapse_core.probe_settings import PROBE_DEFAULTS, PROBE_HELP, PROBE_LIMITS

FALLBACK_SETS = ["general", "math", "code", "refusal"]


def _probe_sets() -> list[str]:
    try:
        from collapse_core.probesets import list_probe_sets

        return list(list_probe_sets()) or FALLBACK_SETS
    except Exception:  # the list is a convenience; never break the page over it
        return FALLBACK_SETS


def _setting_input(column, label: str, name: str, key: str) -> int:
    """A number input for one probe setting, with the limits, default and help every entry
    point shares (:mod:`collapse_core.probe_settings`)."""
    limit = PROBE_LIMITS[name]
    return column.number_input(label, int(limit.lo), int(limit.hi), PROBE_DEFAULTS[name],
                               key=key, help=PROBE_HELP[name])  # fmt: skip


st.title("Probe a model")
if ui.readonly():
    st.info(
        "This is a read-only view: probing new models is switched off. Browse the stored "
        "results on the other pages, or run the app without COLLAPSE_READONLY to probe."
    )
    st.stop()

store = ui.store()
limit_mb = min(
    uploads.max_upload_bytes() / uploads.MiB, float(st.get_option("server.maxUploadSize"))
)
st.caption(
    "Accepted: a single **.gguf**; a **.zip** of a Hugging Face model folder (config.json, "
    "*.safetensors, tokenizer files) or of a PEFT **LoRA adapter** folder; or those loose files "
    f"together. Pickled weights (.bin/.pt) and custom model code are refused. Largest upload: "
    f"{limit_mb:,.0f} MB (give a local path for bigger models)."
)

source = st.radio(
    "Model source", ["Upload files", "Local path", "Bundled SmolLM2"], horizontal=True,
    key="probe_source",
)  # fmt: skip
files = []
local_path = ""
if source == "Upload files":
    files = st.file_uploader(
        "Model files", accept_multiple_files=True, key="probe_files",
        help=".gguf, .zip of a model/adapter folder, or config.json + *.safetensors + tokenizer",
    ) or []  # fmt: skip
elif source == "Local path":
    local_path = st.text_input(
        "Path on the server", key="probe_path",
        placeholder="/path/to/hf_model_folder, model.gguf, adapter_folder or model.zip",
    )  # fmt: skip

checkpoint_name = st.text_input(
    "Checkpoint name (optional)", key="probe_name", max_chars=80,
    help="How the checkpoint is listed on every page; empty: named after the file or folder "
    "(a zip after the zip). Rename later on the Overview page.",
)  # fmt: skip

# A typed local adapter folder needs its base: a bad one is an error as typed; otherwise (no
# path yet, an upload, a full model) the base may go unused, so a bad one is only a warning.
typed_adapter = source == "Local path" and bool(local_path.strip()) and os.path.isfile(
    os.path.join(os.path.expanduser(local_path.strip()), "adapter_config.json"))  # fmt: skip
base_model, base_problem = ui.model_input(
    "Base model (used only when the model is a LoRA adapter)", "probe_base",
    check=source != "Bundled SmolLM2",
    needed_if=None if typed_adapter else "the model is a LoRA adapter",
)  # fmt: skip

names = _probe_sets()
chosen_sets = st.multiselect(
    "Probe sets", names, default=[n for n in ("general",) if n in names] or names[:1],
    key="probe_sets",
)  # fmt: skip
custom_set = st.file_uploader(
    "Optional: your own probe set (.txt one text per line, or .jsonl with a \"text\" field)",
    type=["txt", "jsonl"], key="probe_custom_set",
)  # fmt: skip

with st.expander("Probe settings"):
    c1, c2, c3, c4 = st.columns(4)
    max_prompts = c1.number_input(
        "Max prompts (0 = all)", 0, int(PROBE_LIMITS["max_prompts"].hi), 0,
        key="probe_max_prompts", help=PROBE_HELP["max_prompts"],
    )  # fmt: skip
    max_length = _setting_input(c2, "Tokens per prompt", "max_length", "probe_max_length")
    batch_size = _setting_input(c3, "Batch size", "batch_size", "probe_batch")
    n_samples = _setting_input(c4, "Token sample per layer", "n_samples", "probe_samples")
    lens_samples = _setting_input(
        c1, "Logit-lens tokens (0 = off)", "lens_samples", "probe_lens_samples"
    )
    device = st.selectbox("Device", ["auto", "cpu", "cuda"], key="probe_device")


def _model_spec() -> tuple[str, str | None, str]:
    """Save/prepare/check the chosen model; returns (model spec, base spec, description)."""
    if source == "Bundled SmolLM2":
        return "smollm2", None, "bundled SmolLM2-135M-Instruct"
    if source == "Upload files":
        if not files:
            raise CollapseError("choose the model file(s) to upload first")
        # the same selection clicked twice is saved and checked once per session
        prepared = st.session_state.setdefault("prepared_uploads", {})
        key = tuple(sorted(str(getattr(f, "file_id", None) or f.name) for f in files))
        path = prepared.get(key)
        if path is None or not os.path.exists(path):
            saved = []
            try:
                for f in files:
                    saved.append(uploads.save_upload(f.name, f))
                path = str(uploads.prepare_upload(saved))
            except BaseException:
                uploads.discard(saved)
                raise
            prepared[key] = path
    else:
        if not local_path.strip():
            raise CollapseError("type the path of a model folder, .gguf, adapter folder or .zip")
        # absolute: the worker runs from the repository root, not from this server's cwd
        path = os.path.abspath(os.path.expanduser(local_path.strip()))
        if path.lower().endswith(".zip"):
            path = uploads.prepare_upload([path])
    kind = uploads.check_model_path(path)
    base = None
    if kind == "lora":
        if base_problem:
            raise CollapseError(base_problem)
        base = base_model
    return str(path), base, uploads.describe_prepared(path) if kind != "builtin" else str(path)


def _probe_set_specs() -> list[str]:
    sets = list(chosen_sets)
    if custom_set is not None:
        from collapse_core.probesets import load_probe_set

        saved = uploads.save_upload(custom_set.name, custom_set, max_bytes=20 * uploads.MiB)
        try:
            load_probe_set(str(saved))
        except BaseException:
            uploads.discard([saved])
            raise
        sets.append(str(saved))
    if not sets:
        raise CollapseError("choose at least one probe set")
    return sets


def _check_device() -> None:
    """ "cuda" on a machine without a GPU is refused at submit, not later by the worker (the
    worker runs on this machine). torch is imported only on a click, never to draw the page."""
    from collapse_core.devices import resolve_device

    resolve_device(device)


if st.button("Probe", type="primary", key="probe_submit"):
    try:
        with st.spinner("Checking the files (no model is loaded here) ..."):
            _check_device()
            model, base, what = _model_spec()
            sets = _probe_set_specs()
        spec = {
            "model": model, "base": base, "probe_sets": sets, "device": device,
            "name": clean_name(checkpoint_name) if checkpoint_name.strip() else None,
            "config": {
                "max_length": int(max_length), "batch_size": int(batch_size),
                "n_samples": int(n_samples), "max_prompts": int(max_prompts) or None,
                "lens_samples": int(lens_samples),
            },
        }  # fmt: skip
        job_id = queue.submit(store, "probe", spec)
        worker.ensure_worker(store)
        st.success(
            f"Queued probe job {job_id}: {what} on {', '.join(os.path.basename(s) for s in sets)}."
            " Follow its progress on the Runs & jobs page; results appear on the other pages."
        )
    except CollapseError as err:
        st.error(str(err))
    except OSError as err:  # unreadable path, full disk: still one line, never a traceback
        st.error(f"could not read or write {err.filename or 'the files'}: {err.strerror or err}")

# -- a checkpoint series: one "track" job ----------------------------------------------------
st.divider()
st.subheader("Track a checkpoint series")
st.caption(
    "Your own run as a study: several checkpoints (one .zip or .gguf each, named e.g. "
    "checkpoint-100.zip), or a server folder of checkpoint-<step> folders under an allowed root "
    f"({series.ROOTS_ENV}). They become one run whose stages are the checkpoints, in step order, "
    "probed with the probe sets and settings above."
)
series_source = st.radio("Series source", ["Upload checkpoints", "Server folder"],
                         horizontal=True, key="series_source")  # fmt: skip
series_files = []
series_folder = ""
if series_source == "Upload checkpoints":
    series_files = st.file_uploader("Checkpoints (one file each)", accept_multiple_files=True,
                                    type=["zip", "gguf"], key="series_files") or []  # fmt: skip
else:
    series_folder = st.text_input("Folder on the server", key="series_folder",
                                  placeholder="/runs/my-sft (holding checkpoint-<step> folders)")  # fmt: skip
series_name = st.text_input("Series name", key="series_name", placeholder="my-sft-run")
series_eval = st.checkbox("Also run the evaluations and weight-update metrics (slower)",
                          key="series_eval")  # fmt: skip


def _series_spec() -> dict:
    """Check the series (headers only; nothing is loaded here) and build the track job spec."""
    if not series_name.strip():
        raise CollapseError("give the series a name (it names the study)")
    spec: dict = {"name": series_name.strip()}
    if series_source == "Upload checkpoints":
        if len(series_files) < 2:
            raise CollapseError("a series needs at least two checkpoint files")
        uploaded = []
        for f in series_files:
            saved = uploads.save_upload(f.name, f)
            uploaded.append((f.name, str(uploads.prepare_upload([saved]))))
        entries = series.upload_entries(uploaded)
        spec["entries"] = [{"label": e.label, "path": e.path, "step": e.step} for e in entries]
        kinds = {uploads.check_model_path(e.path) for e in entries}
    else:
        folder = series.check_allowed_folder(series_folder.strip())
        entries = series.discover([folder])
        spec["paths"] = [str(folder)]
        kinds = {uploads.check_model_path(e.path) for e in entries}
    if "lora" in kinds:
        if base_problem:
            raise CollapseError(base_problem)
        spec["base"] = base_model
    return {**spec, "eval": bool(series_eval), "n": len(entries)}


if st.button("Track series", key="series_submit"):
    try:
        with st.spinner("Checking the checkpoints (no model is loaded here) ..."):
            _check_device()
            track_spec = _series_spec()
            sets = _probe_set_specs()
        n = track_spec.pop("n")
        track_spec.update({"probe_sets": sets, "device": device, "config": {
            "max_length": int(max_length), "batch_size": int(batch_size),
            "n_samples": int(n_samples), "max_prompts": int(max_prompts) or None,
            "lens_samples": int(lens_samples),
        }})  # fmt: skip
        job_id = queue.submit(store, "track", track_spec)
        worker.ensure_worker(store)
        st.success(f"Queued track job {job_id}: {n} checkpoints as study {track_spec['name']!r}.")
    except CollapseError as err:
        st.error(str(err))
    except OSError as err:
        st.error(f"could not read or write {err.filename or 'the files'}: {err.strerror or err}")
