"""Export a study (or the standalone checkpoints) as a self-contained offline HTML report and as
plain tables, for collaborators who have neither Python nor the app.

- :func:`export_report` writes one ``.html`` file: plotly.js is inlined once in ``<head>``, every
  figure follows as a ``<div>`` with a small inline script, and all tables are plain HTML. It opens
  in any browser with no network and no external script.
- :func:`export_tables` writes each relevant table, filtered to the study, as CSV or Parquet.
- :func:`write_report` is what ``python -m collapse_core report`` runs (``cli.py`` parses it).

Scope: a study is its runs, their committed stages and those stages' checkpoints. ``study_id=None``
means "all standalone checkpoints": probed models that belong to no pipeline run (uploads,
``probe --model ...``). Selections, labels and "newest probe per checkpoint" come from
:mod:`collapse_core.views`, so the report shows what the dashboard shows.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from . import figures, views
from .catalog import evals_rows, pivot_evals
from .errors import CollapseError
from .paths import data_dir
from .store import Store

STANDALONE = "standalone"
TABLE_FORMATS = ("csv", "parquet")
LAYER_METRICS = ("effective_rank", "anisotropy_cosine")


# -- scope ---------------------------------------------------------------------------------
def _check_study(store: Store, study_id: str | None) -> str:
    """The study's display name; CollapseError naming the known ids if it does not exist."""
    if not study_id:
        return "all standalone checkpoints"
    known = views.studies(store)
    match = known[known["study_id"] == study_id]
    if match.empty:
        ids = known["study_id"].tolist()
        hint = f"known: {', '.join(ids[:8])}" if ids else "no studies are stored yet"
        raise CollapseError(f"unknown study {study_id!r}; {hint} (omit --study for standalone)")
    return str(match["name"].iloc[0])


def selection(store: Store, study_id: str | None) -> pd.DataFrame:
    """The report's checkpoints as a :func:`collapse_core.views.checkpoint_choices` frame:
    the study's stage rows, or (``None``) the standalone checkpoints."""
    if study_id:
        return views.checkpoint_choices(store, study_id=study_id, include_standalone=False)
    return views.checkpoint_choices(store, run_ids=[], include_standalone=True)


def _in(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    if not values:
        return "false", []
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


def _table_queries(store: Store, study_id: str | None) -> dict[str, tuple[str, list[Any]]]:
    """Per exported table: a SELECT filtered to the scope, and its parameters."""
    ids = sorted(selection(store, study_id)["checkpoint_id"].unique())
    ck, ck_p = _in("checkpoint_id", ids)
    probes = f"probe_key IN (SELECT probe_key FROM probes WHERE {ck})"
    out: dict[str, tuple[str, list[Any]]] = {}
    if study_id:
        runs, runs_p = _in("run_id", list(views.runs(store, study_id)["run_id"]))
        out["studies"] = ("SELECT * FROM studies WHERE study_id = ?", [study_id])
        out["runs"] = (f"SELECT * FROM runs WHERE {runs} ORDER BY run_id", runs_p)
        out["stages"] = (f"SELECT * FROM stages WHERE {runs} ORDER BY run_id, stage_index", runs_p)
        out["evals"] = (f"SELECT * FROM evals WHERE {runs}", runs_p)
        out["lora_metrics"] = (f"SELECT * FROM lora_metrics WHERE {runs}", runs_p)
        out["correlations"] = ("SELECT * FROM correlations WHERE study_id = ?", [study_id])
        out["hypothesis_tests"] = ("SELECT * FROM hypothesis_tests WHERE study_id = ?", [study_id])
    else:
        out["evals"] = (f"SELECT * FROM evals WHERE {ck}", ck_p)
    out["checkpoints"] = (f"SELECT * FROM checkpoints WHERE {ck} ORDER BY created_at", ck_p)
    out["probes"] = (f"SELECT * FROM probes WHERE {ck} ORDER BY created_at", ck_p)
    out["layer_metrics"] = (
        f"SELECT * FROM layer_metrics WHERE {ck} ORDER BY checkpoint_id, probe_set, metric, layer",
        ck_p,
    )
    out["spectra"] = (
        f"SELECT * FROM spectra WHERE {ck} ORDER BY checkpoint_id, probe_set, layer, idx",
        ck_p,
    )
    out["calibration_bins"] = (f"SELECT * FROM calibration_bins WHERE {ck}", ck_p)
    out["generations"] = (f"SELECT * FROM generations WHERE {ck}", ck_p)
    out["token_samples"] = (f"SELECT * FROM token_samples WHERE {probes}", ck_p)
    out["layer_metric_ci"] = (f"SELECT * FROM layer_metric_ci WHERE {probes}", ck_p)
    out["embeddings"] = (f"SELECT * FROM embeddings WHERE {probes}", ck_p)
    return out


# -- tables --------------------------------------------------------------------------------
def report_tables(store: Store, study_id: str | None) -> dict[str, pd.DataFrame]:
    """Every relevant table filtered to the study (or the standalone checkpoints)."""
    _check_study(store, study_id)
    return {name: store.query(sql, params) for name, (sql, params) in
            _table_queries(store, study_id).items()}  # fmt: skip


def _table_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    if fmt == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return buf.getvalue()
    raise CollapseError(f"table format {fmt!r} is not supported; use csv or parquet")


def export_tables(
    store: Store, study_id: str | None, out_dir: str | Path, fmt: str = "csv"
) -> list[Path]:
    """Write each relevant table (filtered to the study) as ``<out_dir>/<table>.<fmt>``.

    ``fmt`` is ``"csv"`` or ``"parquet"``. ``token_vectors`` (binary float16 blobs) is left out;
    everything else a notebook user would query is included, empty tables as header-only files.
    Returns the written paths.
    """
    _table_bytes(pd.DataFrame(), fmt)  # reject a bad format before touching the disk
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in report_tables(store, study_id).items():
        path = out / f"{name}.{fmt}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(_table_bytes(df, fmt))
        os.replace(tmp, path)
        written.append(path)
    return written


def tables_zip(store: Store, study_id: str | None, fmt: str = "csv") -> bytes:
    """The tables of :func:`export_tables` as the bytes of one zip (for a download button)."""
    _table_bytes(pd.DataFrame(), fmt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, df in report_tables(store, study_id).items():
            zf.writestr(f"{name}.{fmt}", _table_bytes(df, fmt))
    return buf.getvalue()


# -- HTML ----------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid
#ddd; padding-bottom: .2rem; } .meta { color: #666; font-size: .9rem; }
table.data { border-collapse: collapse; font-size: .82rem; margin: .6rem 0; display: block;
             overflow-x: auto; max-width: 100%; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 7px; text-align: right;
             white-space: nowrap; }
table.data th { background: #f4f4f4; } table.data td:first-child, table.data th:first-child {
             text-align: left; }
.note { background: #f7f7fb; border-left: 3px solid #8888cc; padding: .5rem .8rem; }
.fig { margin: 1rem 0; }
"""

_ABOUT = (
    "Hidden states are measured per layer (layer 0 = token embeddings) on fixed probe texts. "
    "<b>Effective rank</b> is exp(entropy) of the normalised singular values (lower = more "
    "collapsed); <b>anisotropy</b> is the mean pairwise cosine of token vectors (higher = all "
    "vectors point one way); the <b>spectrum</b> shows covariance eigenvalues, a steeper decay "
    "meaning fewer directions carry the variance. Calibration: a reliability curve below the "
    "diagonal means over-confidence. Directions are measured, not assumed."
)


def _table_html(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    if df.empty:
        return '<p class="meta">(none)</p>'
    return df.to_html(
        index=False, escape=True, border=0, classes="data", na_rep="–",
        float_format=lambda v: floatfmt.format(v),
    )  # fmt: skip


def _fig_html(fig) -> str:
    return (
        '<div class="fig">'
        + fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
        + "</div>"
    )


def _section(title: str, *parts: str) -> str:
    return f"<h2>{html.escape(title)}</h2>" + "".join(parts)


def _standalone_evals(store: Store, ids: list[str], sel: pd.DataFrame) -> pd.DataFrame:
    """Evals of standalone checkpoints, one row per checkpoint, each score as ``v [lo, hi]``
    (:func:`views.with_intervals`; the bare value where none is stored)."""
    ev = evals_rows(store, "checkpoint_id", ids)
    if ev.empty:
        return ev
    scores = sorted(ev["col"].unique())
    wide = pivot_evals(ev, ["checkpoint_id"], intervals=True)
    wide = views.with_intervals(wide, scores)[["checkpoint_id", *scores]]
    return sel[["label", "checkpoint_id"]].merge(wide, on="checkpoint_id")


def _fig_block(title: str, fig: Any) -> str:
    """A figure under its own small heading (the shared figures carry no title of their own)."""
    return f"<h3>{html.escape(title)}</h3>" + _fig_html(fig)


def _headline_section(store: Store, study_id: str | None, probe_set: str, ids: list[str]) -> str:
    """Per-stage headline table; for a study also effective rank (middle layer) and anisotropy
    (layers averaged) across stages, drawn as on the Stages page."""
    if not study_id:
        head = views.standalone_table(store, probe_set)
        show = ["label", "architecture", "n_layers", "probe_sets", "erank_mid", "erank_last",
                "anisotropy", "checkpoint_id"]  # fmt: skip
        figs: list[str] = []
    else:
        head = views.headline_display(views.headline_table(store, probe_set, study_id=study_id))
        show = ["run_label", "stage_label", "erank_mid", "erank_last", "anisotropy",
                "plasticity", "ood_accuracy", "ood_ece", "behaviour", "checkpoint_id"]  # fmt: skip
        run_ids = list(views.runs(store, study_id)["run_id"])
        mid = views.mid_layer(views.n_layers_of(store, probe_set, ids))
        erank = views.stage_curves(store, "effective_rank", probe_set, run_ids, layers=[mid])
        aniso = views.stage_curves(store, "anisotropy_cosine", probe_set, run_ids, n_groups=1)
        figs = [
            _fig_block(f"effective rank (layer {mid}) across stages",
                       figures.stage_curves_figure(erank, views.metric_label("effective_rank"))),
            _fig_block("anisotropy (mean over layers) across stages",
                       figures.stage_curves_figure(aniso, views.metric_label("anisotropy_cosine"))),
        ]  # fmt: skip
    return _section(
        f"Headline metrics per stage · probe set {probe_set}",
        '<p class="meta">erank = effective rank at the middle / last layer; anisotropy = '
        "mean pairwise cosine averaged over layers; plasticity = fresh-LoRA loss-curve AUC "
        "relative to the run's start (higher = learns slower).</p>",
        _table_html(head[show]), *figs,
    )  # fmt: skip


def _layer_sections(store: Store, sel: pd.DataFrame, probe_sets: list[str], ids: list[str]) -> str:
    """Layer curves per probe set (as on the Overview) and the middle-layer spectra with their
    α-ReQ fits (as on the Spectra page)."""
    figs = []
    for probe_set in probe_sets:
        for metric in LAYER_METRICS:
            curves = views.layer_curves(store, metric, probe_set, sel)
            name = views.metric_label(metric)
            figs.append(_fig_html(figures.layer_curves_figure(
                curves, name, f"{name} across layers · probe set {probe_set}")))  # fmt: skip
    main = probe_sets[0]
    layer = views.mid_layer(views.n_layers_of(store, main, ids))
    spec, fits, lines = views.spectrum_panel(store, main, layer, sel)
    return _section("Effective rank and anisotropy across layers", *figs) + _section(
        "Spectra", _fig_block(f"covariance eigenvalue spectrum · probe set {main}",
                              figures.spectra_figure(spec, lines, fits, layer)),
    )  # fmt: skip


def _calibration_section(store: Store, sel: pd.DataFrame, run_ids: list[str]) -> str:
    """Per eval with stored bins: the summary table (study) and the reliability diagram."""
    parts = []
    for eval_name in views.calibration_evals(store):
        bins = views.calibration_bins(store, sel, eval_name)
        if bins.empty:
            continue
        if run_ids:
            summary = views.calibration_summary(store, run_ids, eval_name)
            shown = views.with_intervals(summary, views.CALIBRATION_METRICS)
            parts.append(_table_html(shown[["run_label", "stage_label", "n",
                                            *views.CALIBRATION_METRICS, "checkpoint_id"]]))  # fmt: skip
        parts.append(_fig_block(f"reliability diagram · {eval_name}",
                                figures.reliability_figure(bins)))  # fmt: skip
    return _section("Calibration", *parts) if parts else ""


def _checkpoints_section(store: Store, sel: pd.DataFrame, ids: list[str], is_study: bool) -> str:
    """One row per selected checkpoint (per run and stage in a study) with its shape and the
    probe sets stored for it."""
    sql, params = _in("checkpoint_id", ids)
    meta = store.query(
        "SELECT checkpoint_id, name, architecture, n_layers, d_model, n_params FROM checkpoints "
        f"WHERE {sql}", params,
    )  # fmt: skip
    sets = views.latest_probes(store, ids).groupby("checkpoint_id")["probe_set"]
    table = sel.merge(meta, on="checkpoint_id", how="left")
    table["probe_sets"] = table["checkpoint_id"].map(sets.agg(lambda s: ", ".join(sorted(s))))
    cols = ["label", "checkpoint_id", "name", "architecture", "n_layers", "d_model", "n_params",
            "probe_sets"]  # fmt: skip
    note = '<p class="meta">One row per run and stage (stage index:stage).</p>' if is_study else ""
    return _section(f"Checkpoints ({len(ids)} distinct)", note,
                    _table_html(table[cols], "{:,.0f}"))  # fmt: skip


def _outcome_sections(
    store: Store, study_id: str | None, sel: pd.DataFrame, ids: list[str], run_ids: list[str]
) -> str:
    """The evaluations table and, for a study with stored results, the hypothesis tests."""
    if not study_id:
        return _section("Evaluations", _table_html(_standalone_evals(store, ids, sel)))
    out = _section(
        "Evaluations",
        '<p class="meta">Each score with its 95 % interval over the items it was measured on '
        "(Wilson for rates, item bootstrap otherwise; none for plasticity, one training run).</p>",
        _table_html(views.evals_table(store, run_ids)),
    )
    probe_sets = views.probe_sets(store, ids)
    if probe_sets:
        deltas = views.arm_deltas(store, study_id, probe_sets[0])
        if not deltas.empty:  # the table `analyze` prints and the Hypothesis page shows
            out += _section(
                f"Intervention arms vs baseline ({probe_sets[0]})",
                f'<p class="meta">{html.escape(views.ARM_NOTE)} '
                f"{html.escape(views.ARM_READING)}</p>",
                _table_html(deltas),
            )
        # The one estimator of collapse_core.hypothesis (stored by `analyze`, else computed).
        tests, _ = views.hypothesis_tests(store, study_id, probe_sets[0])
        if not tests.empty:
            out += _section(
                "Hypothesis tests (within-stage Spearman ρ, cluster-bootstrap CI over independent "
                "runs, within-stage permutation p, BH q, fixed-effects β; pooled ρ for comparison)",
                _table_html(tests, "{:.3f}"))  # fmt: skip
    return out


def build_report_html(store: Store, study_id: str | None) -> str:
    """The complete report as one HTML string (see :func:`export_report`). Figures come from
    :mod:`collapse_core.figures` on the frames of :mod:`collapse_core.views`, as in the app."""
    from plotly.offline import get_plotlyjs

    title = _check_study(store, study_id)
    sel = selection(store, study_id)
    ids = sorted(sel["checkpoint_id"].unique())
    run_ids = list(views.runs(store, study_id)["run_id"]) if study_id else []
    sections = [_checkpoints_section(store, sel, ids, bool(study_id))]
    probe_sets = views.probe_sets(store, ids)  # general first
    if not probe_sets:
        sections.append(_section("Collapse metrics", '<p class="note">No probe results are '
                                 "stored for these checkpoints yet.</p>"))  # fmt: skip
    else:
        sections.append(_headline_section(store, study_id, probe_sets[0], ids))
        sections.append(_layer_sections(store, sel, probe_sets, ids))
    sections.append(_calibration_section(store, sel, run_ids))
    sections.append(_outcome_sections(store, study_id, sel, ids, run_ids))

    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    scope = f"study <code>{html.escape(study_id)}</code>" if study_id else "standalone checkpoints"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Collapse Observatory report · {html.escape(title)}</title>"
        f"<style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f"<h1>Collapse Observatory · {html.escape(title)}</h1>"
        f'<p class="meta">{scope} · database {html.escape(store.path.name)} · generated {now} · '
        "self-contained: opens offline, no external scripts</p>"
        f'<p class="note">{_ABOUT}</p>' + "".join(sections) + "</body></html>\n"
    )


def export_report(store: Store, study_id: str | None, out_dir: str | Path) -> Path:
    """Write the offline HTML report of a study (``None``: standalone checkpoints) into
    ``out_dir`` and return its path: ``collapse-report-<study id | standalone>.html``.

    Contents: checkpoints table, per-stage headline metrics, effective rank and anisotropy
    across layers per checkpoint, eigenvalue spectra, calibration (if stored), evaluations and
    hypothesis tests. plotly.js is embedded once; the file needs no network.
    """
    text = build_report_html(store, study_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in (study_id or STANDALONE))
    path = out / f"collapse-report-{slug}.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def default_reports_dir() -> Path:
    """``<data>/reports`` (gitignored)."""
    return data_dir() / "reports"


# -- CLI -----------------------------------------------------------------------------------
def write_report(
    store: Store, study: str | None, out: str | Path | None = None, tables: str = "csv"
) -> int:
    """What ``python -m collapse_core report`` does (the CLI parses and resolves the study):
    :func:`export_report` into ``out`` (default ``data/reports``), then with ``tables`` = csv or
    parquet :func:`export_tables` beside it; prints both paths. ``out`` must be a folder."""
    folder = Path(out or default_reports_dir())
    if folder.exists() and not folder.is_dir():
        raise CollapseError(f"--out {folder} is a file; give a folder for the report")
    path = export_report(store, study, folder)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline in any browser)")
    if tables and tables != "none":
        table_folder = folder / f"tables-{study or STANDALONE}"
        files = export_tables(store, study, table_folder, tables)
        print(f"tables: {len(files)} {tables} files in {table_folder}")
    return 0
