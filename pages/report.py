"""Export: an offline HTML report and the raw tables of a study, for collaborators.

The report is built in memory (nothing is written, so this works in read-only mode too) and
offered as a download; it opens in any browser without network or Python.
"""

from __future__ import annotations

import streamlit as st

from collapse_core import report, ui, views
from collapse_core.errors import CollapseError

store = ui.store()
st.title("Export a report")
st.caption(
    "One self-contained HTML file (interactive plots, tables; works offline) plus the study's "
    "tables as CSV or Parquet for your own analysis."
)

picked = ui.selection(store).study_id  # the study picked in the sidebar is the default
studies = views.studies(store)
labels = {None: f"All standalone checkpoints ({len(views.standalone_checkpoints(store))})"}
for row in studies.itertuples(index=False):
    labels[row.study_id] = f"{row.label} · {row.n_runs} runs · {row.study_id}"
options = list(labels)
scope = st.selectbox("Study", options, format_func=labels.get, key="report_scope",
                     index=options.index(picked) if picked in options else 0)  # fmt: skip
slug = scope or report.STANDALONE

c1, c2 = st.columns(2)
with c1:
    if st.button("Build HTML report", type="primary", key="build_report"):
        try:
            with st.spinner("Building the report ..."):
                text = report.build_report_html(store, scope)
            st.session_state["report_html"] = (scope, text.encode("utf-8"))
        except CollapseError as err:
            st.error(str(err))
    built = st.session_state.get("report_html")
    if built and built[0] == scope:
        st.download_button(
            f"Download report ({len(built[1]) / 1e6:.1f} MB)", built[1],
            file_name=f"collapse-report-{slug}.html", mime="text/html", key="download_report",
        )  # fmt: skip
with c2:
    fmt = st.radio("Table format", list(report.TABLE_FORMATS), horizontal=True, key="report_fmt")
    if st.button("Build tables (zip)", key="build_tables"):
        try:
            with st.spinner("Exporting tables ..."):
                blob = report.tables_zip(store, scope, fmt)
            st.session_state["report_tables"] = (scope, fmt, blob)
        except CollapseError as err:
            st.error(str(err))
    tables = st.session_state.get("report_tables")
    if tables and tables[:2] == (scope, fmt):
        st.download_button(
            f"Download tables ({len(tables[2]) / 1e6:.1f} MB zip)", tables[2],
            file_name=f"collapse-tables-{slug}-{fmt}.zip", mime="application/zip",
            key="download_tables",
        )  # fmt: skip
