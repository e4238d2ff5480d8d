"""What a reader sees, checked in a real browser: the book, a study's summary.html, JupyterLab.

Headless Chromium from Debian (``tools/browser_packages.sh``, run by ``make test``)
driven by Playwright's Python package through the system browser's path (Playwright
downloads no browser here). Every page is opened from disk as a reader opens it:
each image must load (``naturalWidth`` > 0), each internal link and source must name
a file that exists (and an anchor the page has), nothing may be fetched from the
network and no console error may appear. Screenshots go to ``outputs/screenshots/``
for a person to look at. Then JupyterLab (as ``make lab`` starts it, headless, on a
random port with a token) runs notebook 01 on the ``chexlib`` kernel with small
parameters, and its figure must appear in the page.

The summary and the published notebook come from a real run: ``chexlib study`` runs
the summary notebook over hand-made training records (the shape ``chexlib train``
writes), and the book is built with that executed notebook published into a copy
of ``docs/``, so the walkthrough page has real outputs and figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psutil
import pytest
from conftest import require
from test_summary import record

from chexlib.core.runs import write_run_record
from chexlib.report.notebooks import publish_notebooks
from chexlib.study.runner import expand, load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SHOTS = REPO / "outputs" / "screenshots"
CHROMIUM = shutil.which("chromium")
BOOK_TIMEOUT = 300  # s: mkdocs build of the whole book (seconds on an idle machine)


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# --- what the browser opens -------------------------------------------------------------


def _mini_study(out: Path) -> Path:
    """A study folder after two stand-in training runs, then its summary stage run for
    real by ``chexlib study`` (papermill, the chexlib kernel, summary.html)."""
    spec, out = out / "mini.yaml", out / "out"
    stages = [
        {"name": "train", "notebook": "04_distributed_training",
         "grid": {"PIPELINE": ["naive", "optimized"]}, "parameters": {"MODEL": "standin"}},
        {"name": "summary", "notebook": "05_summary", "output_dir": "{study_dir}/summary",
         "html": "summary.html", "parameters": {"STUDY_DIR": "{study_dir}"}},
    ]  # fmt: skip
    spec.write_text(json.dumps({"name": "mini", "stages": stages}))
    for run in expand(load_spec(spec), out):
        if run.stage != "train":
            continue
        pipeline = run.parameters["PIPELINE"]
        rate = 30.0 if pipeline == "optimized" else 10.0
        rec = record(run.run_id, pipeline, 1, rate, synthetic=40.0, model="standin", ci=2.0)
        write_run_record(run.run_dir, rec["params"], rec["metrics"])
        marker = {"stage": run.stage, "notebook": run.notebook, "parameters": run.parameters}
        (run.run_dir / "run.json").write_text(json.dumps({**marker, "status": "complete"}))
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    _run([VENV_BIN / "chexlib", "study", spec, "--outputs", out, "--only", "summary"],
         env=env, timeout=600)  # fmt: skip
    return out / "mini"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return _mini_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def book(study, tmp_path_factory) -> Path:
    """The book built from a copy of docs/ with the study's executed summary published
    into its walkthrough (the other notebooks as the committed docs/ has them)."""
    work = tmp_path_factory.mktemp("book")
    docs = work / "docs"
    shutil.copytree(REPO / "docs", docs)
    written = publish_notebooks(study, docs / "walkthrough", Path("outputs/mini"))
    assert [p.name for p in written] == ["05_summary.ipynb"]
    config = work / "mkdocs.yml"
    config.write_text(
        f"INHERIT: {REPO / 'mkdocs.yml'}\ndocs_dir: {docs}\nsite_dir: {work / 'site'}\n"
        f"hooks:\n  - {REPO / 'tools' / 'mkdocs_hooks.py'}\n"
    )
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    _run([VENV_BIN / "mkdocs", "build", "--strict", "-f", config], env=env, timeout=BOOK_TIMEOUT)
    return work / "site"


@pytest.fixture(scope="module")
def browser():
    require(CHROMIUM, "Debian's chromium is not installed: make browser-packages")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox refuses to start
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class Visit:
    """One page opened in a fresh tab: what it logged and what it asked the network for."""

    def __init__(self, browser, url: str, shot: Path | None = None):
        self.errors: list[str] = []
        self.external: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.context.route(re.compile(r"^(https?|wss?)://"), self._outside)
        self.page.goto(url, wait_until="load")
        self.page.wait_for_load_state("networkidle")
        if shot:
            SHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(shot))

    def _outside(self, route):
        self.external.append(route.request.url)
        route.abort()

    def images(self) -> list[dict]:
        return self.page.eval_on_selector_all(
            "img",
            "els => els.map(e => ({src: e.getAttribute('src').slice(0, 80),"
            " complete: e.complete, width: e.naturalWidth}))",
        )

    def references(self) -> list[str]:
        """Every href and src of the page, resolved by the browser."""
        return self.page.eval_on_selector_all(
            "a[href], img[src], link[href], script[src], iframe[src]",
            "els => els.map(e => e.href || e.src)",
        )

    def ids(self) -> set[str]:
        return set(
            self.page.eval_on_selector_all("[id], a[name]", "els => els.map(e => e.id || e.name)")
        )

    def close(self):
        self.context.close()


_ANCHORS: dict[Path, set[str]] = {}  # page -> its ids, each page opened once per run


def broken_references(visit: Visit, browser) -> list[str]:
    """Links and sources on disk that name no file, or an anchor the target lacks."""
    broken, anchors = [], _ANCHORS
    here = Path(unquote(urlsplit(visit.page.url).path))
    anchors[here] = visit.ids()
    for ref in visit.references():
        url = urlsplit(ref)
        if url.scheme != "file":
            continue  # http(s) links are the reader's to follow; loads are checked apart
        target = Path(unquote(url.path))
        if not target.exists():
            broken.append(f"{ref}: no such file")
        elif url.fragment and target.suffix == ".html":
            if target not in anchors:
                other = Visit(browser, target.as_uri())
                anchors[target] = other.ids()
                other.close()
            # nbconvert writes ids percent-encoded; a browser tries the raw fragment first
            if not {url.fragment, unquote(url.fragment)} & anchors[target]:
                broken.append(f"{ref}: no anchor #{url.fragment}")
    return broken


def check_page(browser, path: Path, shot: Path) -> tuple[list[str], int]:
    """The problems a reader would meet on one page, and how many images it has."""
    visit = Visit(browser, path.as_uri(), shot)
    try:
        images = visit.images()
        problems = [f"image not loaded: {i['src']}" for i in images if not i["width"]]
        problems += broken_references(visit, browser)
        problems += [f"fetched from the network: {u}" for u in visit.external]
        problems += [f"console: {e}" for e in visit.errors]
        return problems, len(images)
    finally:
        visit.close()


# --- the book -------------------------------------------------------------------------


def test_every_page_of_the_book_loads_whole_offline(book, browser):
    pages = sorted(p for p in book.rglob("*.html") if p.name != "404.html")
    names = {p.relative_to(book).as_posix() for p in pages}
    # the contents mkdocs.yml promises: home, results, the walkthrough, the reference
    assert {"index.html", "results.html", "walkthrough/index.html", "data.html",
            "cluster.html", "walkthrough/01_data_prep.html", "walkthrough/05_summary.html",
            "walkthrough/06_explain.html"} <= names, names  # fmt: skip
    problems, images = {}, {}
    for page in pages:
        rel = page.relative_to(book).as_posix()
        found, images[rel] = check_page(browser, page, SHOTS / f"book-{rel.replace('/', '-')}.png")
        if found:
            problems[rel] = found
    assert not problems, json.dumps(problems, indent=1)
    # the published summary shows its figures; the results page shows the README block's
    assert images["walkthrough/05_summary.html"] >= 1, images
    assert images["results.html"] == len(list((REPO / "docs" / "results").glob("*.png"))), images


def test_notebook_pages_link_to_each_other(book, browser):
    """The published notebook's last cell links its neighbours and the contents, and
    the links open their pages (not the .ipynb files)."""
    visit = Visit(browser, (book / "walkthrough" / "05_summary.html").as_uri())
    try:
        hrefs = visit.page.eval_on_selector_all(
            ".jp-Notebook a[href]", "els => els.map(e => e.href)"
        )
    finally:
        visit.close()
    local = [h for h in hrefs if h.startswith("file:")]
    assert any(h.endswith("walkthrough/index.html") for h in local), local
    assert not [h for h in local if ".ipynb" in h], local


# --- a study's summary.html -------------------------------------------------------------


@pytest.fixture(scope="module")
def summary_visit(study, browser):
    page = study / "summary" / "summary.html"
    assert page.is_file(), f"{page}: the summary stage wrote no HTML"
    visit = Visit(browser, page.as_uri(), SHOTS / "summary.png")
    yield visit
    visit.close()


def test_summary_html_shows_its_figures(summary_visit):
    images = summary_visit.images()
    assert len(images) >= 2, images  # the poster's figures from the two training runs
    assert all(i["width"] > 0 for i in images), images
    uncaught = [e for e in summary_visit.errors if e.startswith("uncaught")]
    assert not uncaught, uncaught


def test_summary_html_has_no_broken_link_and_loads_nothing_from_the_network(summary_visit, browser):
    assert not broken_references(summary_visit, browser)
    assert not summary_visit.external, summary_visit.external
    assert not summary_visit.errors, summary_visit.errors


# --- JupyterLab ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(folder: Path, log_file: Path):
    """``jupyter lab`` as ``make lab`` starts it, headless: loopback, a random port, a token.
    Yields (base URL, token); the server and its kernels (its session) are killed after."""
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [VENV_BIN / "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
           "--ServerApp.port_retries=0", "--LabApp.news_url="]  # fmt: skip
    if os.geteuid() == 0:  # CI runs as root, which JupyterLab refuses without this
        cmd.append("--allow-root")
    log = log_file.open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while f"127.0.0.1:{port}/lab" not in log_file.read_text():
            assert server.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "JupyterLab did not start in 120 s"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token
    finally:
        # kernels run in sessions of their own (jupyter_client starts them so): listed
        # first, killed after the server's own shutdown if any is left
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(server.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        log.close()


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a folder of its own: (base URL, token, folder)."""
    folder = tmp_path / "lab"
    folder.mkdir()
    with jupyter_lab(folder, tmp_path / "lab.log") as (base, token):
        yield base, token, folder


def _small_notebook_01(folder: Path) -> Path:
    """Notebook 01 with papermill's parameters cell injected: a small generated set."""
    import nbformat
    from papermill.iorw import load_notebook_node  # gives every cell the tags papermill reads
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(REPO / "notebooks" / "01_data_prep.ipynb"))
    params = {"DATA_DIR": str(folder / "data"), "OUTPUT_DIR": str(folder / "run"),
              "GENERATE": True, "N_IMAGES": 40, "IMAGE_SIZE": 64, "WORKERS": 1}  # fmt: skip
    nb = parameterize_notebook(nb, params)
    target = folder / "01_data_prep.ipynb"
    nbformat.write(nb, target)
    return target


def test_jupyterlab_runs_notebook_01_on_the_chexlib_kernel(lab, browser):
    base, token, folder = lab
    notebook = _small_notebook_01(folder)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{base}/lab/tree/{notebook.name}?token={token}", wait_until="load")
        # the notebook opened on the chexlib kernel, idle
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        kernel = page.locator(".jp-Toolbar-kernelName").first
        try:  # "No Kernel" while it starts, then the kernel spec's display name
            page.locator(".jp-Toolbar-kernelName", has_text="chexlib").wait_for(timeout=120_000)
        except Exception:
            page.screenshot(path=str(SHOTS / "jupyterlab-01-no-kernel.png"))
            raise AssertionError(f"kernel: {kernel.inner_text()!r}, not chexlib") from None
        page.wait_for_selector(
            ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000
        )
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        # until the last cell ran (its prompt gets a number) or a cell failed, which stops
        # the run there (JupyterLab shows an error as stderr text with its traceback)
        last = page.locator(".jp-Notebook .jp-CodeCell").last.locator(".jp-InputPrompt")
        stderr = "[data-mime-type='application/vnd.jupyter.stderr']"
        failed = page.locator(stderr, has_text="Traceback (most recent call last)")
        deadline = time.monotonic() + 300
        while not (failed.count() or re.search(r"\[\d+\]", last.inner_text())):
            assert time.monotonic() < deadline, "notebook 01 did not finish in 300 s"
            time.sleep(1)
        assert failed.count() == 0, failed.first.inner_text()[-2000:]
        figures = page.locator(".jp-OutputArea-output img")
        figures.first.scroll_into_view_if_needed()
        widths = figures.evaluate_all("els => els.map(e => e.naturalWidth)")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "jupyterlab-01.png"))
        assert widths and all(w > 0 for w in widths), widths
        assert (folder / "run" / "prevalence.png").is_file()  # the figure the notebook saved
        assert not errors, errors
    finally:
        context.close()
