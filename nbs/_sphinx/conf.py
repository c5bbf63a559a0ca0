"Sphinx configuration for the docs site; `build_docs.py` feeds it plain notebooks made from nbs/."
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_docs import read_settings

_s = read_settings()
project = _s['title']
author = _s['author']
copyright = _s['copyright']
release = version = _s['version']
html_title = f"{_s['title']} {_s['version']}"
html_short_title = _s['title']
html_baseurl = _s['doc_host'].rstrip('/') + '/' + _s.get('doc_baseurl', '').strip('/') + '/'

extensions = ['myst_nb', 'sphinx-mathjax-offline']  # MathJax 3 copied into _static: math typesets with no network
root_doc = 'index'
exclude_patterns = ['_build', '**.ipynb_checkpoints']

# myst: $...$ and $$...$$ math, \begin{align} blocks, {.class} attributes on links and blocks
myst_enable_extensions = ['dollarmath', 'amsmath', 'attrs_inline', 'attrs_block']
myst_dmath_double_inline = True
# Headings get the ids nbdev's (Quarto/pandoc) links use, e.g. `#batchlessnorm.forward`
myst_heading_anchors = 4
myst_heading_slug_func = 'build_docs.pandoc_slug'

# myst-nb: the notebooks are executed by build_docs.py, never again here
nb_execution_mode = 'off'
nb_render_markdown_format = 'myst'
nb_ipywidgets_js = {}  # the widget manager comes from a CDN: outputs fall back to text
nb_merge_streams = True

html_theme = 'furo'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_theme_options = {
    'top_of_page_buttons': [],  # pages are generated from nbs/*.ipynb: an "edit" link would point nowhere
    'footer_icons': [{'name': 'GitHub', 'url': _s['git_url'], 'class': '',
        'html': '<svg stroke="currentColor" fill="currentColor" stroke-width="0" viewBox="0 0 16 16"><path fill-rule="evenodd" '
                'd="M8 0C3.58 0 0 3.58 0 8c0 3.54 2.29 6.53 5.47 7.59.4.07.55-.17.55-.38 0-.19-.01-.82-.01-1.49-2.01.37-2.53-.49'
                '-2.69-.94-.09-.23-.48-.94-.82-1.13-.28-.15-.68-.52-.01-.53.63-.01 1.08.58 1.23.82.72 1.21 1.87.87 2.33.66.07-.52.28'
                '-.87.51-1.07-1.78-.2-3.64-.89-3.64-3.95 0-.87.31-1.59.82-2.15-.08-.2-.36-1.02.08-2.12 0 0 .67-.21 2.2.82.64-.18 1.32'
                '-.27 2-.27.68 0 1.36.09 2 .27 1.53-1.04 2.2-.82 2.2-.82.44 1.1.16 1.92.08 2.12.51.56.82 1.27.82 2.15 0 3.07-1.87 3.75'
                '-3.65 3.95.29.25.54.73.54 1.48 0 1.07-.01 1.93-.01 2.2 0 .21.15.46.55.38A8.013 8.013 0 0016 8c0-4.42-3.58-8-8-8z">'
                '</path></svg>'}],
}
html_copy_source = False
html_show_sourcelink = False
pygments_style = 'friendly'
pygments_dark_style = 'monokai'
