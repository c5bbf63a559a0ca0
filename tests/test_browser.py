"""The explorer in a real browser: JupyterLab on localhost, a notebook that explores a saved run, headless Chromium.

Needs /usr/bin/chromium (Debian: `apt-get install -y chromium`) and the `playwright` Python package (its
bundled browsers are not used: `playwright install` is never needed). Skipped without either. Writes a
screenshot to artifacts/browser_explorer.png.
"""
import json, os, secrets, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

CHROMIUM = Path('/usr/bin/chromium')
ARTIFACTS = Path(__file__).resolve().parent.parent/'artifacts'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-dev-shm-usage']

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason=f'no Chromium at {CHROMIUM}: apt-get install -y chromium'),
              pytest.mark.slow]

NOTEBOOK_CELLS = [
    "from batchless_nb.explore import explore",
    "ex = explore('run')\nex",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _notebook(cells:list[str]) -> dict:
    return {'cells': [{'cell_type': 'code', 'execution_count': None, 'id': f'c{i}', 'metadata': {}, 'outputs': [],
                       'source': src} for i, src in enumerate(cells)],
            'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}


def _saved_run(out:Path):
    "A small run directory: the digits CNN with BlN, one epoch, statistics tracked"
    from batchless_nb.core import set_seed
    from batchless_nb.data import get_data, dataloaders
    from batchless_nb.models import get_model
    from batchless_nb.callbacks import batchless_learner, InitBatchless
    from batchless_nb.track import TrackStats
    from batchless_nb.runs import save_run
    set_seed(0)
    learn = batchless_learner(get_model('digits_cnn', 'bln-log'), dataloaders(get_data('digits'), batch_size=64, seed=0),
                              progress=False, device='cpu', cbs=[InitBatchless(n_samples=300), TrackStats(every=3, n_samples=64)])
    learn.fit(1)
    save_run(learn, out)


def _wait_for_server(url:str, proc:subprocess.Popen, timeout:float=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f'JupyterLab exited with code {proc.returncode}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.5)
    raise TimeoutError(f'JupyterLab did not answer at {url} within {timeout}s')


@pytest.fixture
def lab(tmp_path):
    "JupyterLab serving a root with the explorer notebook and a saved run; shut down afterwards"
    root = tmp_path/'root'
    root.mkdir()
    _saved_run(root/'run')
    (root/'explore.ipynb').write_text(json.dumps(_notebook(NOTEBOOK_CELLS)))
    settings = tmp_path/'settings'  # JupyterLab user settings: no news question, start the notebook's kernel unasked
    for name, value in {'apputils-extension/notification': {'fetchNews': 'false'},
                        'notebook-extension/tracker': {'autoStartDefaultKernel': True}}.items():
        f = settings/'@jupyterlab'/f'{name}.jupyterlab-settings'
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = os.environ | {'JUPYTER_CONFIG_DIR': str(tmp_path/'config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'),
                        'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'workspaces'), 'IPYTHONDIR': str(tmp_path/'ipython'),
                        'JUPYTER_DATA_DIR': str(tmp_path/'data')}  # nothing read from or written to the user's Jupyter dirs
    cmd = [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', f'--IdentityProvider.token={token}', '--ServerApp.ip=127.0.0.1',
           f'--port={port}', '--ServerApp.port_retries=0', f'--ServerApp.root_dir={root}', '--LabApp.news_url=None',
           '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', f'--LabApp.user_settings_dir={settings}',
           '--LabApp.expose_app_in_browser=True']  # window.jupyterapp, to run JupyterLab commands
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')  # CI containers run as root
    log = open(tmp_path/'jupyter.log', 'w')
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        _wait_for_server(f'{base}/api/status?token={token}', proc)
        yield base, token
    finally:
        try:
            req = urllib.request.Request(f'{base}/api/shutdown?token={token}', method='POST')
            urllib.request.urlopen(req, timeout=5)
            proc.wait(timeout=20)
        except Exception:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
                try: proc.wait(timeout=10)
                except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
        log.close()


def test_explorer_renders_in_jupyterlab(lab):
    sync_api = pytest.importorskip('playwright.sync_api', reason='pip install playwright (no `playwright install` needed)')
    base, token = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={'width': 1500, 'height': 1050})
            page.set_default_timeout(60_000)
            try: _run_and_check(page, base, token)
            except Exception:
                page.screenshot(path=str(ARTIFACTS/'browser_explorer_failure.png'))
                raise
            page.screenshot(path=str(ARTIFACTS/'browser_explorer.png'))
        finally:
            browser.close()


_KERNEL_READY = '''() => {
    const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
    return kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
}'''


def _run_and_check(page, base:str, token:str):
    "Open the notebook, run all cells, check the widgets and the figure rendered, change the layer, see a new figure"
    page.goto(f'{base}/lab/tree/explore.ipynb?token={token}')
    page.wait_for_selector('.jp-Notebook .jp-Cell')
    page.wait_for_function(_KERNEL_READY)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")  # what Run > Run All Cells does
    # widgets rendered live by the widget manager in the page, from the running kernel
    dropdown = page.wait_for_selector('.jupyter-widgets.widget-dropdown select')
    page.wait_for_selector('.jupyter-widgets.widget-slider')
    page.wait_for_selector('.widget-toggle-buttons button:has-text("bln-log")')  # the method toggle
    img = page.wait_for_selector('.jupyter-widgets.widget-image img, img.jupyter-widgets')
    page.wait_for_function("el => el.naturalWidth > 500", arg=img)
    before = img.get_attribute('src')
    assert [o.inner_text() for o in dropdown.query_selector_all('option')] == ['norm1', 'norm2', 'norm3']
    dropdown.select_option('norm3')  # the kernel redraws and sends a new image
    page.wait_for_function("([el, old]) => el.getAttribute('src') !== old", arg=[img, before])
    assert 'norm3' in page.inner_text('.jp-Notebook')
    assert len(page.query_selector_all('.jp-Notebook .jp-OutputArea-output img')) == 1  # the widget, not its static PNG too
    img.scroll_into_view_if_needed()
