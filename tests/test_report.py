"""The offline HTML report and the table export, on a small real study database."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
from study_db import STUDY_NAME, cached_study_db

from collapse_core import figures, report, views
from collapse_core.errors import CollapseError
from collapse_core.store import Store


@pytest.fixture(scope="module")
def study():
    return cached_study_db()


@pytest.fixture
def store(study, tmp_path):
    path = tmp_path / "copy.duckdb"
    shutil.copy(study["db"], path)
    return Store(path)


def _script_tags(text: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", text, flags=re.IGNORECASE)


def test_study_report_is_self_contained(study, store, tmp_path):
    before = store.table_hashes()
    path = report.export_report(store, study["study_id"], tmp_path / "out")
    assert path.name == f"collapse-report-{study['study_id']}.html"
    text = path.read_text(encoding="utf-8")
    # plotly.js inlined exactly once, every figure drawn from it, no external script at all
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    assert text.count(js[:200]) == 1 and js[-200:] in text
    assert len(text) > len(js)
    assert not any("src=" in tag.lower() for tag in _script_tags(text))
    assert not re.search(r"<script[^>]+src\s*=\s*[\"']?https?:", text, flags=re.IGNORECASE)
    assert not re.search(r"<link[^>]+href\s*=\s*[\"']?https?:", text, flags=re.IGNORECASE)
    assert text.count("Plotly.newPlot") >= 2 + 2 * 2 + 1 + 1  # stage, layers, spectrum, calib
    for ckpt in study["study_checkpoints"]:
        assert ckpt in text
    assert study["standalone"] not in text
    assert "<b>study</b>" not in text and html_escape(STUDY_NAME) in text  # DB text escaped
    for heading in ("Checkpoints", "Headline metrics per stage", "across layers", "Spectra",
                    "Calibration", "Evaluations", "Intervention arms vs baseline"):  # fmt: skip
        assert heading in text
    assert "paired by (order, seed)" in text  # the arm table carries its note on the CIs
    assert store.table_hashes() == before  # exporting never writes to the database


def _embedded(fig) -> str:
    """A figure's trace data exactly as ``fig.to_html`` embeds it."""
    from plotly.io.json import to_json_plotly

    return to_json_plotly(fig.to_dict()["data"]).replace("</", "<\\/")


def test_report_draws_with_the_app_figures(study, store):
    """Report and app match: the report embeds the very traces of the shared figure builders
    (the ones the pages call) for the same view frames."""
    text = report.build_report_html(store, study["study_id"])
    sel = report.selection(store, study["study_id"])
    ids = sorted(sel["checkpoint_id"].unique())
    run_ids = list(views.runs(store, study["study_id"])["run_id"])
    main = views.probe_sets(store, ids)[0]
    layer = views.mid_layer(views.n_layers_of(store, main, ids))
    spec, fits, lines = views.spectrum_panel(store, main, layer, sel)
    aniso = views.stage_curves(store, "anisotropy_cosine", main, run_ids, n_groups=1)
    expected = {
        "spectra": figures.spectra_figure(spec, lines, fits, layer),
        "reliability": figures.reliability_figure(views.calibration_bins(store, sel, "ood")),
        "layer curves": figures.layer_curves_figure(
            views.layer_curves(store, "effective_rank", main, sel),
            views.metric_label("effective_rank"),
        ),
        "stage curves": figures.stage_curves_figure(aniso, views.metric_label("anisotropy_cosine")),
    }
    for name, fig in expected.items():
        assert len(fig.data) >= 2, name  # a real figure, not the empty placeholder
        assert _embedded(fig) in text, f"the report's {name} figure is not the app's"


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


def test_standalone_report(study, store, tmp_path):
    path = report.export_report(store, None, tmp_path)
    text = path.read_text(encoding="utf-8")
    assert path.name == "collapse-report-standalone.html"
    assert study["standalone"] in text
    assert not any(c in text for c in study["study_checkpoints"])
    assert list(report.selection(store, None)["checkpoint_id"]) == [study["standalone"]]


def test_report_scores_carry_their_intervals(study, store, tmp_path):
    """The headline table and the standalone evaluations show a score stored with an
    interval as "v [lo, hi]" (they showed the bare value although an interval was stored)."""
    with store.transaction() as con:  # the small study stores bare values: give them CIs
        con.execute("UPDATE evals SET n = 40, ci_low = value * 0.5, ci_high = value * 0.5 + 0.4 "
                    "WHERE eval = 'ood' AND metric = 'accuracy'")  # fmt: skip
    text = report.export_report(store, study["study_id"], tmp_path / "s").read_text("utf-8")
    head = text.split("Headline metrics per stage", 1)[1].split("<h2>", 1)[0]
    assert re.search(r"<td>\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]</td>", head), head[:2000]
    with store.transaction() as con:
        store.insert_df(con, "evals", pd.DataFrame([{
            "run_id": None, "checkpoint_id": study["standalone"], "stage": None, "eval": "ood",
            "metric": "accuracy", "value": 0.25, "n": 40, "ci_low": 0.142, "ci_high": 0.403,
            "ci_method": "Wilson score interval over items"}]))  # fmt: skip
    text = report.export_report(store, None, tmp_path / "a").read_text("utf-8")
    evals = text.split("<h2>Evaluations</h2>", 1)[1].split("<h2>", 1)[0]
    assert "0.250 [0.142, 0.403]" in evals


def test_empty_database_report(tmp_path):
    store = Store(tmp_path / "empty.duckdb")
    text = report.export_report(store, None, tmp_path).read_text(encoding="utf-8")
    assert "No probe results are stored" in text


def test_unknown_study(store, tmp_path):
    with pytest.raises(CollapseError, match="unknown study 'nope'; known: study-test0001"):
        report.export_report(store, "nope", tmp_path)
    assert not list(tmp_path.glob("*.html"))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_tables_filtered_to_study(study, store, tmp_path, fmt):
    files = report.export_tables(store, study["study_id"], tmp_path, fmt)
    names = {p.stem for p in files}
    assert {"checkpoints", "layer_metrics", "spectra", "evals", "runs", "stages",
            "generations"} <= names  # fmt: skip
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    lm = read(tmp_path / f"layer_metrics.{fmt}")
    assert set(lm["checkpoint_id"]) == set(study["study_checkpoints"])
    assert set(read(tmp_path / f"runs.{fmt}")["run_id"]) == {"run-a", "run-b"}
    ckpts = read(tmp_path / f"checkpoints.{fmt}")
    assert study["standalone"] not in set(ckpts["checkpoint_id"])


def test_tables_zip_and_bad_format(study, store):
    import io
    import zipfile

    blob = report.tables_zip(store, None, "csv")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        ckpts = pd.read_csv(zf.open("checkpoints.csv"))
    assert list(ckpts["checkpoint_id"]) == [study["standalone"]]
    with pytest.raises(CollapseError, match="csv or parquet"):
        report.export_tables(store, None, "/nonexistent", "xlsx")


def test_selection_of_study(study, store):
    sel = report.selection(store, study["study_id"])
    assert len(sel) == 4  # two runs x (shared base + one stage)
    assert set(sel["checkpoint_id"]) == set(study["study_checkpoints"])


def test_cli_report(study, store, tmp_path, capsys):
    from collapse_core.cli import main

    # By name as well as by id (the name holds markup: it is looked up, never interpolated).
    argv = ["report", "--study", STUDY_NAME, "--db", str(store.path), "--out", str(tmp_path),
            "--tables", "parquet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "parquet files" in out
    assert (tmp_path / f"collapse-report-{study['study_id']}.html").is_file()
    assert (tmp_path / f"tables-{study['study_id']}" / "evals.parquet").is_file()


def test_cli_report_and_analyze_never_create_or_write_a_database(study, store, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    from collapse_core.cli import main

    typo = tmp_path / "no_such_dir" / "colapse.duckdb"
    for argv in (["report", "--db", str(typo), "--out", str(tmp_path)],
                 ["analyze", "latest", "--db", str(typo)]):  # fmt: skip
        assert main(argv) == 2
        assert "not found; check --db" in capsys.readouterr().err
    assert not typo.parent.exists()
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert main(["report", "--db", str(store.path), "--out", str(afile)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    # Viewer mode: reading commands open the file read-only, writing ones are refused.
    before = store.table_hashes()
    monkeypatch.setenv("COLLAPSE_READONLY", "1")
    assert main(["analyze", "latest", "--db", str(store.path)]) == 2
    assert "COLLAPSE_READONLY is set and `analyze` writes" in capsys.readouterr().err
    assert main(["probe", "--db", str(store.path)]) == 2
    assert main(["report", "--study", "latest", "--db", str(store.path), "--out",
                 str(tmp_path / "ro"), "--tables", "none"]) == 0  # fmt: skip
    monkeypatch.setenv("COLLAPSE_READONLY", "maybe")
    assert main(["report", "--db", str(store.path), "--out", str(tmp_path / "ro")]) == 2
    assert "COLLAPSE_READONLY='maybe' is not understood" in capsys.readouterr().err
    monkeypatch.delenv("COLLAPSE_READONLY")
    assert store.table_hashes() == before


@pytest.mark.parametrize("flag, value", [("--n-boot", "0"), ("--n-boot", "-5"), ("--n-perm", "0"),
                                         ("--ci-boot", "-3"), ("--ci-boot", "5")])  # fmt: skip
def test_cli_analyze_refuses_replicate_counts_that_cannot_give_a_result(flag, value, store, capsys):
    from collapse_core.cli import main

    before = store.table_hashes()
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "latest", "--db", str(store.path), flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err and "must be" in err
    assert store.table_hashes() == before


def test_latest_study_skips_one_without_stages(study, store):
    from collapse_core.analysis import resolve_study

    # What a `track` that failed on its first checkpoint leaves: a newer study with no stage.
    store.execute(
        "INSERT INTO studies VALUES ('study-empty', 'broken', '{}', now() + INTERVAL 1 DAY)"
    )
    assert resolve_study(store, "latest") == study["study_id"]
    assert resolve_study(store, "broken") == "study-empty"
    with pytest.raises(
        CollapseError, match="no study 'nope' in the database; known studies: broken"
    ):
        resolve_study(store, "nope")
