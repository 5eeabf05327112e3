"""Collapse Observatory: the Streamlit entry point (``streamlit run app.py``).

Registers the pages with ``st.navigation`` (Overview first; pages whose file is missing are
skipped, see ``collapse_core.ui.PAGE_SECTIONS``), draws the sidebar (database path, study / run
picker) and runs the chosen page. Once per server start it reaps jobs and runs whose owner
process died (``ui.reap_on_start``), so a Ctrl-C'd CLI run does not stay "running". Pages are
thin views over ``collapse_core.views`` / ``collapse_core.figures``; nothing heavy (torch,
transformers, umap) is imported here or in the browse pages.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from collapse_core import ui

st.set_page_config(page_title="Collapse Observatory", page_icon="🔭", layout="wide")
ui.viewer_settings()
page = st.navigation(ui.build_navigation(Path(__file__).resolve().parent))
st.sidebar.markdown("**Collapse Observatory**")
ui.reap_on_start()
ui.sidebar(ui.store())
ui.mark_sidebar_drawn()
page.run()
