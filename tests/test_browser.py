"""Real browser: `streamlit run app.py` on a free localhost port, every page loaded in headless
Chromium, a screenshot of each kept under artifacts/screenshots/, and no Streamlit exception box.

Needs Debian's chromium + chromium-driver (installed by .ci/run); skipped where they are absent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "artifacts" / "screenshots"
PAGES = ["overview", "spectra", "compare", "stages", "trajectories", "calibration", "lora", "hypothesis",
         "probe", "runs", "report"]  # fmt: skip

# Issue 16's layout faults, as drawn: a legend or the toolbar over a plot area, the toolbar over
# a title or a colour bar (boxes of plotly's own SVG/HTML elements on the page).
OVERLAPS_JS = """
const box = e => e.getBoundingClientRect();
const hit = (a, b) => a.width > 0 && b.width > 0 && a.height > 0 && b.height > 0 &&
  a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
const out = [];
document.querySelectorAll('.js-plotly-plot').forEach((p, i) => {
  const plots = [...p.querySelectorAll('.draglayer .nsewdrag')].map(box);
  const legend = p.querySelector('.legend'), bar = p.querySelector('.modebar');
  const others = [...p.querySelectorAll('.gtitle, .colorbar')].map(box);
  plots.forEach(a => {
    if (legend && hit(box(legend), a)) out.push(`figure ${i}: legend over the plot`);
    if (bar && hit(box(bar), a)) out.push(`figure ${i}: toolbar over the plot`);
  });
  others.forEach(a => { if (bar && hit(box(bar), a)) out.push(`figure ${i}: toolbar over a title/colour bar`); });
});
return out;
"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian chromium + chromium-driver (installed by .ci/run)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(observatory_db, tmp_path_factory):
    port = _free_port()
    data = tmp_path_factory.mktemp("browser_data")
    env = {**os.environ, "COLLAPSE_DB": str(observatory_db["db"]), "COLLAPSE_DATA": str(data),
           "COLLAPSE_NO_AUTOPROBE": "1"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true",
         "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start within 60 s")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def _wait_rendered(driver, timeout: float = 90.0) -> None:
    """Until the app's sidebar is drawn, no skeleton placeholder is left and the page text has
    stopped changing for 1.5 s."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    last, stable_since = "", time.time()
    while time.time() < deadline:
        time.sleep(0.5)
        skeletons = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]')
        body = driver.find_element(By.TAG_NAME, "body").text
        if skeletons or "Database" not in body:  # the app's sidebar is not drawn yet
            last, stable_since = body, time.time()
            continue
        if body != last:
            last, stable_since = body, time.time()
        elif time.time() - stable_since > 1.5:
            return
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / "_unfinished.png"))
    n = len(driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]'))
    raise AssertionError(f"page did not finish rendering ({n} skeletons; {last[:200]!r})")


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_exception(server, browser, page):
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/" if page == "overview" else f"{server}/{page}")
    _wait_rendered(browser)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / f"{page}.png"))
    errors = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert not errors, f"{page}: {errors[0].text[:500]}"
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in text
    assert len(text) > 50, f"{page} rendered almost nothing"
    overlaps = browser.execute_script(OVERLAPS_JS)
    assert not overlaps, f"{page}: {overlaps}"


def test_figure_downloads_as_pdf_from_the_menu(server, browser, tmp_path):
    """Issue 16: the SVG / PDF menu under a figure downloads a real PDF of it (rendered on the
    server by kaleido when clicked)."""
    from selenium.webdriver.common.by import By

    browser.execute_cdp_cmd("Browser.setDownloadBehavior",
                            {"behavior": "allow", "downloadPath": str(tmp_path)})  # fmt: skip
    browser.get(f"{server}/spectra?layer=2")
    _wait_rendered(browser)
    menu = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stPopover"] button')[0]
    assert "SVG / PDF" in menu.text
    menu.click()
    deadline = time.time() + 10
    while time.time() < deadline:
        pdf = [b for b in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stDownloadButton"] button')
               if b.is_displayed() and b.text.strip() == "PDF"]  # fmt: skip
        if pdf:
            break
        time.sleep(0.3)
    assert pdf, "the menu shows no PDF button"
    pdf[0].click()
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [p for p in tmp_path.iterdir() if p.suffix == ".pdf"]
        if done and done[0].stat().st_size > 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no PDF downloaded: {[p.name for p in tmp_path.iterdir()]}")
    data = done[0].read_bytes()
    assert data.startswith(b"%PDF-") and done[0].name.startswith("Spectrum_layer_2")
