"""The docs site: built offline from the notebooks (nbs/_sphinx/build_docs.py), then opened in headless
Chromium with no network. Screenshots go to artifacts/docs/ for a person to look at."""
import base64, json, re, subprocess, sys, tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NBS = REPO/'nbs'
BUILD = REPO/'nbs'/'_sphinx'/'build_docs.py'
CHROMIUM = Path('/usr/bin/chromium')
ARTIFACTS = REPO/'artifacts'/'docs'
sys.path.insert(0, str(BUILD.parent))
from build_docs import LinkFixer, notebooks, page_name, read_settings  # noqa: E402

def build(out:Path, *args) -> subprocess.CompletedProcess:
    "Build the site as `make docs` does; fail with the build's output"
    import sphinx, myst_nb, furo  # noqa: F401  dev requirements: a missing one fails the tests, never skips them
    r = subprocess.run([sys.executable, str(BUILD), '--out', str(out), *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-5000:]}\n{r.stderr[-10000:]}"
    return r

@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('docs')/'_site'
    build(out)
    return out

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
    reason="headless page checks need /usr/bin/chromium (apt-get install -y chromium)")

def chromium(url:str, *args) -> str:
    "Run headless Chromium on `url` with every host unreachable; returns its stdout"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [str(CHROMIUM), '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
               '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={profile}',
               '--host-resolver-rules=MAP * ~NOTFOUND', '--virtual-time-budget=5000', *args, url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"chromium failed on {url}:\n{r.stderr[-3000:]}"
    return r.stdout

def render(page:Path, shot:str) -> str:
    "The DOM of `page` after its scripts ran; also saves a 1280x1600 screenshot as artifacts/docs/`shot`"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS/shot
    png.unlink(missing_ok=True)
    dom = chromium(page.as_uri(), f'--screenshot={png}', '--window-size=1280,1600', '--dump-dom')
    assert png.stat().st_size > 10_000, f"screenshot {png} looks empty"
    return dom

def assert_math_typeset(dom:str):
    "The bundled MathJax replaced every formula's TeX with its rendering, without errors"
    assert '<mjx-container' in dom, "math was not typeset by the bundled MathJax"
    assert not re.search(r'class="math notranslate nohighlight">\s*\\[(\[]', dom), "a formula was left as raw TeX"
    assert '<mjx-merror' not in dom, "MathJax could not parse a formula"

def plot_imgs(html:str) -> list[str]:
    "Sources of the <img> tags myst-nb writes for PNG cell outputs"
    return re.findall(r'<img[^>]*src="(_images/[^"]+\.png)"', html)

def test_every_notebook_is_a_page_in_order(site):
    pages = [page_name(p) for p in notebooks(NBS)]
    for pg in pages: assert (site/f'{pg}.html').exists(), f"no page for {pg}"
    sidebar = re.search(r'<div class="sidebar-tree">(.*?)</div>', (site/'index.html').read_text(), re.S).group(1)
    linked = re.findall(r'href="(\w+)\.html"', sidebar)
    assert linked == [p for p in pages if p != 'index'], f"sidebar order {linked} is not the notebooks' order {pages}"
    assert (site/'_static'/'mathjax'/'tex-chtml.js').exists(), "MathJax is not bundled: math would need the network"

def test_api_page_has_show_doc_and_links(site):
    html = (site/'norm.html').read_text()
    assert re.search(r'<h\d>BatchlessNorm2d<a class="headerlink"', html), "no show_doc heading for BatchlessNorm2d"
    assert 'id="batchlessnorm2d"' in html  # the anchor nbdev's links (and other nbdev projects) use
    assert 'class="sourcelink' in html
    for pg in site.glob('*.html'):  # nbdev's absolute links into this site became relative ones
        assert not re.search(r'<a [^>]*href="https://batchless-nb\.github\.io', pg.read_text()), pg.name

@needs_chromium
def test_api_page_in_browser(site):
    dom = render(site/'norm.html', 'norm.png')
    assert re.search(r'<h\d>BatchlessNorm2d', dom), "the BatchlessNorm2d API entry is not on the rendered page"
    assert_math_typeset(dom)

@needs_chromium
def test_home_page_in_browser(site):
    assert_math_typeset(render(site/'index.html', 'index.png'))

def _plot_page(site:Path) -> Path|None:
    "The first 9x tutorial's page, else the first page with a plot"
    tuts = [p for p in notebooks(NBS) if p.name.startswith('9')]
    if tuts: return site/f'{page_name(tuts[0])}.html'
    return next((site/f'{page_name(p)}.html' for p in notebooks(NBS)
                 if plot_imgs((site/f'{page_name(p)}.html').read_text())), None)

@needs_chromium
def test_plot_page_in_browser(site):
    page = _plot_page(site)
    if page is None: pytest.skip("no notebook draws a plot yet (the 9x tutorials will): nothing to check")
    dom = render(page, f'{page.stem}.png')
    imgs = plot_imgs(dom)
    assert imgs, f"{page.name} shows no plot image"
    for src in imgs: assert (site/src).stat().st_size > 1000, f"{src} is empty"
    if 'class="math' in dom: assert_math_typeset(dom)
    # the plots sit below the first screen: a long screenshot too, for a person to look at them
    chromium(page.as_uri(), f'--screenshot={ARTIFACTS/(page.stem + "-long.png")}', '--window-size=1280,8000')

SAMPLE = [
    ('code', '#| default_exp sample'),
    ('markdown', '# Sample page\n> A made-up notebook to check the docs pipeline'),
    ('code', '#| hide\nSECRET = "hidden-cell-marker"'),
    ('code', '#| export\nimport matplotlib.pyplot as plt'),
    ('code', '#| export\ndef scale(x:float, # The value\n          k:float=2.0, # The factor\n         ) -> float:\n'
             '    "Multiply `x` by `k`"\n    return x * k'),
    ('markdown', 'It computes $y = kx$:\n\n$$\\sum_i k x_i$$'),
    ('code', 'fig, ax = plt.subplots(figsize=(3, 2)); ax.plot([0, 1], [scale(0), scale(1)]);'),
    ('code', '#| notest\nraise RuntimeError("a notest cell was run")'),
    ('code', 'print("ran:", scale(21))'),
    ('markdown', 'See [the scale entry](01_sample.ipynb#scale) and ![a dot](figs/dot.png)'),
]
DOT_PNG = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==')

def test_pipeline_on_a_sample_notebook(tmp_path):
    "Plots, show_doc, hidden and notest cells, on a notebook made here (the real ones may have no plot yet)"
    nbs = tmp_path/'nbs'; nbs.mkdir()
    cells = [{'cell_type': k, 'id': f'c{i}', 'metadata': {}, 'source': s,
              **({'outputs': [], 'execution_count': None} if k == 'code' else {})} for i, (k, s) in enumerate(SAMPLE)]
    (nbs/'figs').mkdir(); (nbs/'figs'/'dot.png').write_bytes(DOT_PNG)
    (nbs/'01_sample.ipynb').write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    out = tmp_path/'site'
    build(out, '--nbs', str(nbs))
    html = (out/'sample.html').read_text()
    assert re.search(r'<h\d>Sample page<', html) and 'made-up notebook' in html
    assert re.search(r'<h\d>scale<a class="headerlink"', html), "no show_doc entry for the exported function"
    assert 'The factor' in html
    assert 'hidden-cell-marker' not in html
    assert 'a notest cell was run' in html, "the notest cell's source should show"
    assert 'Not run for these docs' in html
    assert 'ran: 42' in html
    imgs = plot_imgs(html)
    assert len(imgs) == 2 and (out/imgs[0]).stat().st_size > 1000, imgs  # the plot, then the copied figs/dot.png
    assert (out/imgs[1]).read_bytes() == DOT_PNG
    assert 'href="#scale"' in html, "a link to a notebook's heading should point at the page's section"
    assert html.count('class="math') >= 2
    assert (out/'index.html').exists(), "a site with no index notebook still needs a home page"

def test_links_point_into_the_site():
    "nbdev's absolute links, notebook and repo-file links, as the converter rewrites them (no build)"
    st = read_settings()
    base, blob = st['doc_host'] + st['doc_baseurl'], f"{st['git_url']}/blob/{st['branch']}"
    fix = LinkFixer(st, {'norm': {'batchlessnorm2d'}, 'index': set()}, NBS.resolve())
    cases = [
        (f'[`BatchlessNorm2d`]({base}/norm.html#batchlessnorm2d)', '[`BatchlessNorm2d`](norm.ipynb#batchlessnorm2d)'),
        (f'[`x`]({base}/norm.html#batchlessnorm.forward)', '[`x`](norm.ipynb)'),  # no such heading: the page
        (f'[a]({base}/elsewhere.html)', f'[a]({base}/elsewhere.html)'),  # not a page of the site: unchanged
        ('[b](01_norm.ipynb#batchlessnorm2d)', '[b](norm.ipynb#batchlessnorm2d)'),
        ('[the tests](../tests/test_docs.py)', f'[the tests]({blob}/tests/test_docs.py)'),
        ('[src](https://x.org/a.py#L3){target="_blank" style="float:right"}', '[src](https://x.org/a.py#L3)'),
        (f'```python\ndef f(x, # As in [`g`]({base}/norm.html#g)\n```', '```python\ndef f(x, # As in `g`\n```'),
    ]
    for md, want in cases: assert fix(md) == want, md
