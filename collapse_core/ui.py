"""Small shared Streamlit helpers for the dashboard pages.

- :func:`store` / :func:`db_path`: the cached :class:`Store` of ``$COLLAPSE_DB`` (or the default).
- :func:`readonly`: viewer mode (``COLLAPSE_READONLY=1``) hides upload and run controls.
- Widgets synced with ``st.query_params`` (:func:`select`, :func:`multiselect`, :func:`radio`,
  :func:`toggle`, :func:`select_slider`): a widget starts from its URL parameter when that is a
  valid option and writes its value back, so a copied link reproduces the view; a URL value
  that is no option gets one warning line naming it and what is shown instead.
- :func:`sidebar` / :func:`selection`: the study / run picker. ``app.py`` draws it once per
  script run; a page run on its own (tests, ``streamlit run pages/x.py``) draws it itself.
- :func:`page`: the shared start of a browse page (store, sidebar selection, title, caption).
- :func:`chart`: every plotly figure of the pages, with the toolbar's camera saving SVG and an
  "SVG / PDF" menu rendered on the server (:func:`collapse_core.figures.static_image`).
- :func:`model_input`: the one validated model control (Runs form, Probe page's LoRA base).
- :func:`reap_on_start`: once per server, mark jobs/runs whose owner process died interrupted.
- :func:`error_box` shows a :class:`CollapseError` as one line; :func:`missing` says what is
  missing and how to produce it.

Only ``streamlit``, pandas and the light parts of ``collapse_core`` are imported here (never
torch/transformers/umap), so every browse page opens in well under a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from . import views
from .errors import CollapseError
from .paths import default_db_path, env_flag
from .store import Store

_TRUE = ("1", "true", "yes", "on")
_SIDEBAR_FLAG = "_ui_sidebar_drawn"
_SELECTION = "_ui_selection"


def readonly() -> bool:
    """True in read-only viewer mode (``COLLAPSE_READONLY`` = 1/true/yes, any case): no uploads,
    runs or jobs, and the database is opened read-only. The one place the flag is parsed
    (:func:`collapse_core.paths.env_flag`); an unreadable value stops the page with one line."""
    try:
        return env_flag("COLLAPSE_READONLY")
    except CollapseError as err:
        error_box(err)
        st.stop()


def viewer_settings() -> None:
    """In viewer mode, hide exception details from the browser (``client.showErrorDetails`` =
    "none": no tracebacks, types or messages of unexpected errors; they go to the server log)."""
    if readonly():
        st.set_option("client.showErrorDetails", "none")


def autoprobe_enabled() -> bool:
    """False when ``COLLAPSE_NO_AUTOPROBE=1`` (tests): no first-run probe is submitted."""
    return os.environ.get("COLLAPSE_NO_AUTOPROBE", "").strip().lower() not in _TRUE


def db_path() -> Path:
    """The database file the app shows (``$COLLAPSE_DB`` or ``data/collapse.duckdb``)."""
    return default_db_path()


@st.cache_resource(show_spinner=False)
def _store(path: str, read_only: bool = False) -> Store:
    return Store(path, read_only=read_only)


def store() -> Store:
    """The cached Store for :func:`db_path` (read-only in viewer mode: the file must exist and is
    never written); on failure shows the reason and stops the page."""
    try:
        return _store(str(db_path()), readonly())
    except CollapseError as err:
        error_box(err)
        st.stop()
    except Exception as err:  # a broken or foreign file: say so in one line
        st.error(f"cannot open the database {db_path()}: {type(err).__name__}: {err}"[:400])
        st.stop()


def data_version() -> tuple:
    """Changes whenever the database file (or its WAL) is written: a cache key for views."""
    out = []
    for path in (db_path(), db_path().with_name(db_path().name + ".wal")):
        try:
            stat = path.stat()
            out.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


@st.cache_data(show_spinner=False, max_entries=64)
def _cached_view(name: str, path: str, version: tuple, args: tuple, kwargs: tuple) -> Any:
    return getattr(views, name)(_store(path, readonly()), *args, **dict(kwargs))


def cached(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(store, *args, **kwargs)`` for a :mod:`collapse_core.views` function, memoised until
    the database changes (use for the slower views, e.g. bootstrap correlations)."""
    return _cached_view(fn.__name__, str(db_path()), data_version(), args,
                        tuple(sorted(kwargs.items())))  # fmt: skip


# -- messages ------------------------------------------------------------------------------
def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace to one line and cap its length."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Emphasis, code, links/images, HTML, headings, tables, LaTeX, Streamlit :icon:/:red[..] directives
_MARKDOWN_SIGNIFICANT = re.compile(r"([\\`*_\[\]<>#|~$:])")
_LIST_START = re.compile(r"^(\s*)([-+]|\d+\.)(\s)")


def md_escape(text: Any) -> str:
    """``text`` (a name from the database, a path, an error quoting user input) made inert for
    ``st.markdown`` / captions / labels: newlines become spaces and every character Markdown,
    HTML or Streamlit's directives act on is backslash-escaped (CommonMark allows escaping any
    ASCII punctuation), so ``**x**``, ``[x](url)``, ``<b>`` and ``:red[x]`` show as typed."""
    flat = _MARKDOWN_SIGNIFICANT.sub(r"\\\1", " ".join(str(text).split()))
    return _LIST_START.sub(lambda m: f"{m[1]}{m[2][:-1]}\\{m[2][-1]}{m[3]}", flat)


def error_box(err: BaseException | str) -> None:
    """Show a user-facing error as a single line (no traceback, no Markdown from its text)."""
    st.error(md_escape(one_line(str(err))), icon="⚠️")


@contextmanager
def errors() -> Iterator[None]:
    """``with ui.errors(): ...`` shows a CollapseError raised inside as one line."""
    try:
        yield
    except CollapseError as err:
        error_box(err)


def missing(what: str, how: str | None = None) -> None:
    """Say plainly what is missing and how to produce it."""
    st.info(what + (f"  \n{how}" if how else ""), icon="ℹ️")


HOW_PIPELINE = (
    "Start one on the **Runs & jobs** page or run "
    "`python -m collapse_core run configs/demo.toml` (or `configs/quick.toml` for a fast one)."
)
HOW_PROBE = (
    "Probe a model on the **Probe a model** page or run "
    "`python -m collapse_core probe --model smollm2 --probe-set general`."
)


# -- query-param synced widgets ------------------------------------------------------------
def _key(param: str) -> str:
    return f"qp:{param}"


def _match(value: str | None, options: Sequence[Any]) -> Any:
    if value is None:
        return None
    for option in options:
        if str(option) == value:
            return option
    return None


def _keep(param: str) -> str:
    return f"keep:{param}"


def _wrote(param: str) -> str:
    return f"wrote:{param}"


def _from_link(param: str, raw: str | list[str] | None) -> bool:
    """Whether the URL's value of ``param`` came from a link, not from this session's own
    :func:`_write` (a value the page wrote goes stale when its options change, e.g. the
    checkpoint picker after the sidebar's run changed; that is no bad link)."""
    return bool(raw) and raw != st.session_state.get(_wrote(param))


def _init_single(param: str, options: Sequence[Any], default: Any, persist: bool) -> str | None:
    """Seed the widget's state: current value, else the URL, else (``persist``) the value kept
    from another page, else ``default``, else the first option. Returns the URL's value when it
    was none of the options (the caller says so: a link must not be misread silently)."""
    key = _key(param)
    if key in st.session_state and st.session_state[key] in options:
        # Re-assigning keeps the value when the widget gets a new id (another page).
        st.session_state[key] = st.session_state[key]
        return None
    raw = st.query_params.get(param)
    value = _match(raw, options)
    bad = raw if value is None and _from_link(param, raw) else None
    if value is None and persist and st.session_state.get(_keep(param)) in options:
        value = st.session_state[_keep(param)]
    if value is None:
        value = default if default in options else (options[0] if options else None)
    st.session_state[key] = value
    return bad


def _say_bad_link(box: Any, param: str, bad: str | Sequence[str] | None, shown: str) -> None:
    """One warning line for a link parameter that named no choice of this page."""
    if bad is None or (not isinstance(bad, str) and not bad):
        return
    given = bad if isinstance(bad, str) else ", ".join(bad)
    box.warning(f"The link's `{param}={given[:80]}` is not a choice on this page; showing "
                f"{shown} instead.", icon="⚠️")  # fmt: skip


def _follow(param: str, value: Any, valid: Callable[[Any], bool]) -> None:
    """Make the widget of ``param`` adopt ``value`` whenever ``value`` changes (the sidebar's
    run changing under a page's own run picker), but not on the first render: a link's
    parameter or the widget's default decides that one. A change to a value that is no
    option here is remembered but not adopted, so changing back to a valid one is a change."""
    if value is None:
        return
    mark, seen = f"follow:{param}", tuple(value) if isinstance(value, list) else value
    if mark in st.session_state and st.session_state[mark] != seen and valid(value):
        st.session_state[_key(param)] = list(value) if isinstance(value, list) else value
    st.session_state[mark] = seen


def _write(param: str, value: Any) -> None:
    if value is None:
        if param in st.query_params:
            del st.query_params[param]
        st.session_state[_wrote(param)] = None
    elif isinstance(value, list | tuple):
        st.query_params[param] = [str(v) for v in value]
        st.session_state[_wrote(param)] = [str(v) for v in value]
    else:
        st.query_params[param] = str(value)
        st.session_state[_wrote(param)] = str(value)


def select(
    label: str,
    options: Sequence[Any],
    param: str,
    default: Any = None,
    format_func: Callable[[Any], str] = str,
    container: Any = None,
    persist: bool = False,
    follow: Any = None,
    **kw: Any,
) -> Any:
    """A selectbox whose value lives in ``st.query_params[param]``; None without options.

    ``persist`` keeps the choice across pages (the study / run picker); ``follow`` (e.g. the
    sidebar's run) is adopted whenever it changes, so one picker drives the pages."""
    options = list(options)
    if not options:
        return None
    _follow(param, follow, lambda v: v in options)
    bad = _init_single(param, options, default, persist)
    box = container if container is not None else st
    value = box.selectbox(label, options, key=_key(param), format_func=format_func, **kw)
    _say_bad_link(box, param, bad, format_func(value))
    if persist:
        st.session_state[_keep(param)] = value
    _write(param, value)
    return value


def radio(
    label: str,
    options: Sequence[Any],
    param: str,
    default: Any = None,
    format_func: Callable[[Any], str] = str,
    container: Any = None,
    horizontal: bool = True,
    **kw: Any,
) -> Any:
    """A radio group synced with ``st.query_params[param]``."""
    options = list(options)
    if not options:
        return None
    bad = _init_single(param, options, default, False)
    box = container if container is not None else st
    value = box.radio(label, options, key=_key(param), format_func=format_func,
                      horizontal=horizontal, **kw)  # fmt: skip
    _say_bad_link(box, param, bad, format_func(value))
    _write(param, value)
    return value


def select_slider(
    label: str, options: Sequence[Any], param: str, default: Any = None, container: Any = None,
    **kw: Any,
) -> Any:  # fmt: skip
    """A select_slider (e.g. over layers) synced with ``st.query_params[param]``."""
    options = list(options)
    if not options:
        return None
    if len(options) == 1:
        _write(param, options[0])
        return options[0]
    bad = _init_single(param, options, default, False)
    box = container if container is not None else st
    value = box.select_slider(label, options, key=_key(param), **kw)
    _say_bad_link(box, param, bad, str(value))
    _write(param, value)
    return value


def multiselect(
    label: str,
    options: Sequence[Any],
    param: str,
    default: Sequence[Any] | None = None,
    format_func: Callable[[Any], str] = str,
    container: Any = None,
    follow: Sequence[Any] | None = None,
    **kw: Any,
) -> list[Any]:
    """A multiselect synced with the repeated URL parameter ``param`` (``?p=a&p=b``);
    ``follow`` as in :func:`select` (a list, adopted when it changes)."""
    options = list(options)
    key = _key(param)
    if follow is not None:
        _follow(param, list(follow), lambda v: all(x in options for x in v))
    current = st.session_state.get(key)
    bad: list[str] = []
    if current is not None and all(v in options for v in current):
        st.session_state[key] = list(current)
    else:
        raw = st.query_params.get_all(param)
        from_url = [m for v in raw if (m := _match(v, options)) is not None]
        bad = [v for v in raw if _match(v, options) is None] if _from_link(param, raw) else []
        if from_url:
            st.session_state[key] = from_url
        else:
            st.session_state[key] = [v for v in (default or []) if v in options]
    box = container if container is not None else st
    value = box.multiselect(label, options, key=key, format_func=format_func, **kw)
    _say_bad_link(box, param, bad, ", ".join(format_func(v) for v in value) or "none")
    _write(param, list(value))
    return list(value)


def toggle(label: str, param: str, default: bool = False, container: Any = None,
           **kw: Any) -> bool:  # fmt: skip
    """A toggle synced with ``st.query_params[param]`` (``1``/``0``)."""
    key = _key(param)
    raw: str | None = None
    if key in st.session_state:
        st.session_state[key] = bool(st.session_state[key])
    else:
        raw = st.query_params.get(param)
        if raw in ("1", "true", "True", "0", "false", "False"):
            st.session_state[key] = raw in ("1", "true", "True")
        else:  # absent, or a value that is no switch position (said below)
            st.session_state[key] = default
    box = container if container is not None else st
    value = bool(box.toggle(label, key=key, **kw))
    _say_bad_link(box, param, raw if raw not in (None, "1", "true", "True", "0", "false",
                                                 "False") else None, "on" if value else "off")  # fmt: skip
    st.query_params[param] = "1" if value else "0"
    return value


# -- navigation ----------------------------------------------------------------------------
#: (file, title, icon, url path) per section; Overview is the default page. The operations
#: pages belong to another part of the app; any file that does not exist is skipped.
PAGE_SECTIONS: dict[str, list[tuple[str, str, str, str]]] = {
    "Browse": [
        ("pages/overview.py", "Overview", ":material/dashboard:", "overview"),
        ("pages/spectra.py", "Spectra", ":material/ssid_chart:", "spectra"),
        ("pages/compare.py", "Compare checkpoints", ":material/compare_arrows:", "compare"),
        ("pages/stages.py", "Anisotropy & rank across stages", ":material/timeline:", "stages"),
        ("pages/trajectories.py", "Token trajectories", ":material/scatter_plot:", "trajectories"),
        ("pages/calibration.py", "Calibration", ":material/tune:", "calibration"),
        ("pages/lora.py", "Weight updates (LoRA / full)", ":material/stacked_line_chart:", "lora"),
        ("pages/hypothesis.py", "Hypothesis", ":material/science:", "hypothesis"),
    ],
    "Operate": [
        ("pages/probe_model.py", "Probe a model", ":material/upload:", "probe"),
        ("pages/runs.py", "Runs & jobs", ":material/play_circle:", "runs"),
        ("pages/report.py", "Export a report", ":material/download:", "report"),
    ],
}


def existing_pages(root: Path) -> dict[str, list[tuple[str, str, str, str]]]:
    """:data:`PAGE_SECTIONS` restricted to page files that exist under ``root``."""
    out = {}
    for section, pages in PAGE_SECTIONS.items():
        found = [p for p in pages if (root / p[0]).is_file()]
        if found:
            out[section] = found
    return out


def build_navigation(root: Path) -> dict[str, list[Any]]:
    """``st.Page`` objects for ``st.navigation``, by section; the first page is the default."""
    nav: dict[str, list[Any]] = {}
    first = True
    for section, pages in existing_pages(root).items():
        nav[section] = []
        for path, title, icon, url in pages:
            nav[section].append(st.Page(path, title=title, icon=icon, url_path=url, default=first))
            first = False
    return nav


# -- the study / run picker ----------------------------------------------------------------
@dataclass
class Selection:
    """What the sidebar picker chose: a study, a run of it, and the frames behind them."""

    study_id: str | None = None
    run_id: str | None = None
    studies: pd.DataFrame = field(default_factory=pd.DataFrame)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def run_ids(self) -> list[str]:
        """All run ids of the chosen study."""
        return [] if self.runs.empty else list(self.runs["run_id"])

    def run_label(self, run_id: str | None) -> str:
        """Short label of a run of the study (its id when unknown)."""
        if run_id is None or self.runs.empty:
            return str(run_id)
        hit = self.runs[self.runs["run_id"] == run_id]
        return str(hit["label"].iloc[0]) if len(hit) else str(run_id)


def sidebar(store: Store) -> Selection:
    """Draw the sidebar: database, read-only badge, study and run pickers."""
    sb = st.sidebar
    sb.caption(f"Database: `{db_path()}`")
    if readonly():
        sb.caption("🔒 Read-only viewer: upload and run controls are hidden.")
    sel = Selection()
    try:
        sel.studies = views.studies(store)
    except CollapseError as err:
        sb.error(one_line(str(err)))
        return sel
    if sel.studies.empty:
        sb.caption("No pipeline studies yet.")
    else:
        names = dict(zip(sel.studies["study_id"], sel.studies["name"].astype(str), strict=True))
        # name · model · date · arms: two studies both called "quick" are told apart at a glance
        labels_s = dict(zip(sel.studies["study_id"], sel.studies["label"], strict=True))
        sel.study_id = select(
            "Study", list(names), "study", container=sb, persist=True,
            format_func=lambda s: labels_s.get(s, s),
        )  # fmt: skip
        sel.runs = views.runs(store, sel.study_id)
        if not sel.runs.empty:
            labels = dict(zip(sel.runs["run_id"], sel.runs["label"], strict=True))
            sel.run_id = select("Run", list(labels), "run", container=sb, persist=True,
                                format_func=lambda r: labels.get(r, r))  # fmt: skip
    st.session_state[_SELECTION] = sel
    return sel


def pick_checkpoints(
    store: Store, sel: Selection, min_picked: int = 1, n_default: int = 7
) -> tuple[pd.DataFrame, str, dict[str, str]]:
    """The checkpoint multiselect (default: the sidebar run's stages) and probe-set picker
    shared by pages; stops the page with a hint when fewer than ``min_picked`` are usable.
    Returns (picked choices, probe set, key → label)."""
    choices = views.checkpoint_choices(store, study_id=sel.study_id)
    if len(choices) < max(min_picked, 1):
        missing("No probed checkpoints yet." if choices.empty else
                f"This needs at least {min_picked} probed checkpoints.", HOW_PROBE)  # fmt: skip
        st.stop()
    labels = dict(zip(choices["key"], choices["label"], strict=True))
    in_run = choices[choices["run_id"] == sel.run_id]["key"].tolist() if sel.run_id else []
    default = in_run if len(in_run) >= min_picked else choices["key"].tolist()[:n_default]
    c1, c2 = st.columns([3, 1])
    with c1:
        keys = multiselect("Checkpoints", list(labels), "ckpt", default=default,
                           format_func=lambda k: labels.get(k, k))  # fmt: skip
    picked = choices[choices["key"].isin(keys)]
    sets = views.probe_sets(store, list(picked["checkpoint_id"])) if not picked.empty else []
    with c2:
        probe_set = select("Probe set", sets, "probe_set", default="general")
    if len(picked) < min_picked or probe_set is None:
        missing(f"Pick at least {'one checkpoint' if min_picked == 1 else min_picked} "
                f"{'checkpoints ' if min_picked > 1 else ''}with probe results.")  # fmt: skip
        st.stop()
    return picked, probe_set, labels


def page(title: str, caption: str | None = None) -> tuple[Store, Selection]:
    """The start every browse page shares: the cached store, the sidebar selection, the
    page's title and its one-paragraph caption. Returns (store, selection)."""
    st_ = store()
    sel = selection(st_)
    st.title(title)
    if caption:
        st.caption(caption)
    return st_, sel


def mark_sidebar_drawn() -> None:
    """Called by app.py after :func:`sidebar`, so the page reuses that selection."""
    st.session_state[_SIDEBAR_FLAG] = True


def selection(store: Store) -> Selection:
    """The picker's selection for this script run (drawing the sidebar if app.py did not)."""
    if st.session_state.pop(_SIDEBAR_FLAG, False) and _SELECTION in st.session_state:
        return st.session_state[_SELECTION]
    if _leave_legacy_pages_mode():
        st.rerun()  # now through app.py and st.navigation, same URL and query parameters
    # Run without app.py (``streamlit run pages/x.py``, tests): same page layout as the app.
    st.set_page_config(page_title="Collapse Observatory", page_icon="🔭", layout="wide")
    viewer_settings()
    return sidebar(store)


def _leave_legacy_pages_mode() -> bool:
    """Switch a freshly started server out of Streamlit's legacy ``pages/`` directory mode.

    Until ``app.py`` has called ``st.navigation`` once, Streamlit (1.67) serves a deep link such
    as ``/spectra?layer=3`` by running ``pages/spectra.py`` alone, with a file-name page list and
    no app sidebar. Clearing the (private) flag makes the next run go through ``app.py``. Returns
    True when the flag was set; False otherwise or when the internals are not there."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - other Streamlit versions
        return False
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        return True
    return False


# -- jobs ----------------------------------------------------------------------------------
def job_progress(job: dict[str, Any], label: str = "") -> None:
    """A progress bar with message and ETA for one job row (dict from the jobs table)."""
    progress = job.get("progress")
    fraction = 0.0 if progress is None or pd.isna(progress) else float(progress)
    eta = job.get("eta_seconds")
    status = str(job.get("status", ""))
    text = md_escape(f"{label}{status}: {one_line(job.get('message') or '', 120)}")
    if status == "running" and eta is not None and not pd.isna(eta):
        text += f" · about {views.pretty_seconds(eta)} left"
    if status == "queued":
        text += " · waiting for a worker"
    st.progress(max(0.0, min(1.0, fraction)), text=text)


# -- figures -------------------------------------------------------------------------------
#: plotly.js config of every chart: no plotly logo, and the toolbar's camera saves an SVG
#: (drawn by the browser itself: no server round trip).
#: Only the buttons people use are kept, so the upright toolbar stays one column wide even
#: on a short figure (the stage timeline) and fits its margin.
PLOTLY_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "toImageButtonOptions": {"format": "svg"},
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "zoomIn2d", "zoomOut2d", "autoScale2d"],
}


def file_stem(text: str, fallback: str = "figure") -> str:
    """``text`` as a safe file name stem (letters, digits, ``-_.``; at most 60 characters)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")[:60]
    return stem or fallback


def _figure_name(fig: Any, key: str) -> str:
    title = getattr(getattr(fig.layout, "title", None), "text", None)
    return file_stem(title or key)


def chart(fig: Any, key: str, name: str | None = None) -> None:
    """Show a plotly figure the one way every page does: :data:`PLOTLY_CONFIG` (the camera
    saves ``<name>.svg``) plus an "SVG / PDF" menu whose files are rendered on the server only
    when clicked (:func:`collapse_core.figures.static_image`: kaleido, time-limited). ``name``
    (default: the figure's title, else ``key``) names the files."""
    from . import figures

    stem = file_stem(name) if name else _figure_name(fig, key)
    config = {**PLOTLY_CONFIG, "toImageButtonOptions": {"format": "svg", "filename": stem}}
    st.plotly_chart(fig, key=key, config=config)
    with st.popover("SVG / PDF", icon=":material/download:", type="tertiary", key=f"{key}:menu",
                    help="Download this figure as a vector file"):  # fmt: skip
        for fmt, (mime, _) in figures.EXPORT_FORMATS.items():
            st.download_button(
                fmt.upper(), data=lambda fmt=fmt: figures.static_image(fig, fmt),
                file_name=f"{stem}.{fmt}", mime=mime, key=f"{key}:{fmt}", on_click="ignore",
            )  # fmt: skip


# -- the one model control -------------------------------------------------------------------
MODEL_HELP = (
    "`smollm2` (the bundled SmolLM2-135M-Instruct), `tiny-random` (a tiny random model for a "
    "smoke run), or the path of a model folder or .gguf file on this machine"
)


def model_input(label: str, key: str, default: str = "smollm2", help: str = MODEL_HELP,
                check: bool = True, needed_if: str | None = None) -> tuple[str, str | None]:  # fmt: skip
    """One text field for a full (non-adapter) model, checked as typed
    (:func:`collapse_core.uploads.full_model_problem`, headers only): returns (spec, the
    one-line problem or None) and shows the problem under the field. ``check=False`` skips
    the check (the field does not apply to the current choice); with ``needed_if`` (e.g. "the
    model is a LoRA adapter") the problem is a warning caption, since the field may not be
    used at all, and the submit refuses it only when it is."""
    from .uploads import full_model_problem

    spec = st.text_input(label, default, key=key, help=help).strip()
    problem = full_model_problem(spec) if check else None
    if problem and needed_if:
        st.caption(f":orange[{problem}] (matters only if {needed_if})")
    elif problem:
        error_box(problem)
    return spec, problem


# -- start-up ------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _reaped(path: str, read_only: bool) -> int:
    from .jobs.worker import reap_interrupted

    return reap_interrupted(_store(path, read_only))


def reap_on_start() -> None:
    """Once per server start and database (``st.cache_resource``): jobs and runs left
    ``running`` by a process that is gone (a CLI run stopped with Ctrl-C or kill -9, a killed
    worker) become ``interrupted`` (:func:`collapse_core.jobs.worker.reap_interrupted`). A
    read-only viewer only reads."""
    try:
        _reaped(str(db_path()), readonly())
    except CollapseError as err:  # a busy file: the Runs page reaps again when opened
        error_box(err)
