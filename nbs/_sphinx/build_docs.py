"""Build the docs site offline from the notebooks: execute, process with nbdev, convert, run Sphinx.

    python nbs/_sphinx/build_docs.py --out _site

1. Execute every notebook in `nbs/` (not `_`-prefixed) with execnb, as `nbdev_test` does: cells
   flagged with a `tst_flags` flag from settings.ini (`notest slow cuda`) are not run.
2. Process the executed notebooks with nbdev's `proc_nbs` (show_doc cells for exported symbols,
   `#| hide` and exported cells removed, backticked names linked), in a scratch copy of the project
   config so that nothing in the repo is touched.
3. Convert nbdev's Quarto-flavoured notebooks into plain ones for myst-nb (`to_plain_nb`).
4. `sphinx-build -W --keep-going` with `nbs/_sphinx/conf.py` into `--out`.
"""
from __future__ import annotations
import argparse, configparser, json, multiprocessing, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

def read_settings(repo:Path=REPO) -> dict:
    "The `[DEFAULT]` section of the project's settings.ini"
    cp = configparser.ConfigParser(interpolation=None)
    if not cp.read(repo/'settings.ini'): raise FileNotFoundError(f"expected settings.ini in {repo}")
    return dict(cp['DEFAULT'])

def notebooks(nbs:Path) -> list[Path]:
    "The notebooks that make pages, in sidebar order (file name order; `_`/`.`-prefixed skipped)"
    return sorted(p for p in nbs.glob('*.ipynb') if p.name[0] not in '_.')

def page_name(nb:Path) -> str:
    "The page a notebook becomes, as nbdev names it (`01a_init.ipynb` -> `init`)"
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.stem.lower())

class BuildError(Exception): "A step of the docs build failed; the message says which and what to do"

# ---------------------------------------------------------------- 1. execute

def execute_nb(args):
    "Run `src`'s cells (except those flagged with one of `skip_flags`) in its folder; write to `dst`"
    src, dst, skip_flags, repo, threads = args
    os.environ.setdefault('OMP_NUM_THREADS', str(threads))  # before torch loads: n_workers x threads = the cores
    from execnb.nbio import write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    from fastcore.basics import str2bool
    sys.path.insert(0, str(repo))
    src, dst = Path(src), Path(dst)
    fm = getattr(NBProcessor(src, procs=FrontmatterProc, process=True).nb, 'frontmatter_', {})
    nb = NBProcessor(src, rm_directives=False).nb
    def _skip(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export'+'(' in cell.source: return True
        dirs = cell.directives_ or {}
        if dirs.get('eval:', [''])[0].lower() == 'false': return True
        flags = sorted(set(skip_flags) & dirs.keys())
        if flags: cell.metadata['docs_not_run'] = flags
        return bool(flags)
    start = time.time()
    if not str2bool(fm.get('skip_exec', False)):
        shell = CaptureShell(src)
        with working_directory(src.parent):
            try: shell.run_all(nb, exc_stop=True, preproc=_skip)
            except Exception: return src.name, time.time() - start, shell.prettytb(fname=src)
    for cell in nb.cells: cell.pop('directives_', None)
    write_nb(nb, dst)
    return src.name, time.time() - start, None

def execute_all(nbs:list[Path], dst:Path, skip_flags:list[str], n_workers:int):
    dst.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    jobs = [(str(p), str(dst/p.name), skip_flags, str(REPO), threads) for p in nbs]
    # A fresh process per notebook, as nbdev_test: no state leaks between notebooks
    failed = []
    pool = multiprocessing.get_context('spawn').Pool(n_workers, maxtasksperchild=1)
    try:
        for name, secs, err in pool.imap_unordered(execute_nb, jobs):
            print(f"  {'FAILED' if err else 'executed'} {name} in {secs:.1f}s", flush=True)
            if err: failed.append(name); sys.stderr.write(err + '\n')
    except BaseException: pool.terminate(); raise
    pool.close(); pool.join()
    if failed: raise BuildError(f"{', '.join(sorted(failed))} failed while executing for the docs (tracebacks above): "
                                "fix the notebook, or flag a long cell `#| notest` to leave it out of the docs")

# ---------------------------------------------------------------- 2. nbdev processing

def process_all(executed:Path, work:Path, n_workers:int) -> Path:
    "Run nbdev's `proc_nbs` on `executed` with a copy of settings.ini in `work`: returns work/_proc"
    shutil.copy(REPO/'settings.ini', work/'settings.ini')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)}
    code = (f"from nbdev.serve import proc_nbs; "
            f"proc_nbs({str(executed)!r}, n_workers={n_workers}, force=True)")
    if subprocess.run([sys.executable, '-c', code], cwd=work, env=env).returncode:
        raise BuildError("nbdev's proc_nbs failed (traceback above). It re-runs only the exported cells, the import cells "
                         "and show_doc in a fresh shell, so a cell mixing imports with other code fails there: keep "
                         "imports in their own cells")
    missing = [p.name for p in executed.glob('*.ipynb') if not (work/'_proc'/p.name).exists()]
    if missing: raise BuildError(f"nbdev's proc_nbs wrote no {', '.join(missing)}: it skips paths with a `.`-prefixed "
                                 f"or `_proc`/`_docs`/`_site` folder in them, and {work} may have one: pick another --work")
    return work/'_proc'

# ---------------------------------------------------------------- 3. convert to plain notebooks

_re_dir = re.compile(r'^\s*#\|\s*([\w-]+):?\s*(.*?)\s*$')
_re_pandoc_attrs = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*=[^}\n]*\}')  # [text](url){target="_blank" ...}
_re_md_link = re.compile(r'\[([^\]]*)\]\([^)\s]*\)')
_re_link = re.compile(r'(!?)\[([^\]]*)\]\(([^)\s]+)(\s+"[^"]*")?\)')

def src_text(cell) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else (s or '')

def split_directives(src:str) -> tuple[dict, str]:
    "Quarto/nbdev `#| key: value` lines at the top of a code cell, and the code after them"
    lines, dirs = src.splitlines(), {}
    while lines and (m := _re_dir.match(lines[0])):
        dirs[m.group(1)] = m.group(2)
        lines.pop(0)
    return dirs, '\n'.join(lines).strip('\n')

def pandoc_slug(s:str) -> str:
    "Pandoc's auto identifier for a heading (what nbdev's links point at), e.g. `BatchlessNorm.forward` -> `batchlessnorm.forward`"
    s = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', s)  # link text only
    s = re.sub(r'[^\w\s.-]', '', s.replace('`', '').strip().lower())
    s = re.sub(r'\s+', '-', s)
    return re.sub(r'^[^a-z]+', '', s)

def _headings(md:str):
    in_fence = False
    for l in md.splitlines():
        if l.lstrip().startswith(('```', '~~~')): in_fence = not in_fence
        elif not in_fence and (m := re.match(r'^(#{1,6})\s+(.*?)\s*#*\s*$', l)): yield m.group(2)

class LinkFixer:
    """Points markdown links at the built site: nbdev's absolute links into it (`doc_host/doc_baseurl/page.html#a`)
    and relative links to notebooks become myst links to the pages; relative links to other files of the repo
    go to them on GitHub; images next to the notebooks are copied along (`images`)"""
    def __init__(self, settings:dict, anchors:dict[str, set], nbs_dir:Path):
        self.base = settings['doc_host'].rstrip('/') + '/' + settings.get('doc_baseurl', '').strip('/')
        self.blob = f"{settings['git_url'].rstrip('/')}/blob/{settings.get('branch', 'main')}/"
        self.anchors, self.nbs_dir, self.images = anchors, nbs_dir, set()  # anchors: page -> heading slugs

    def _page(self, page:str, anchor:str) -> str:
        return f"{page}.ipynb#{anchor}" if anchor in self.anchors[page] else f"{page}.ipynb"

    def _target(self, url:str, image:bool) -> str:
        path, _, anchor = url.partition('#')
        if path.startswith(self.base + '/') and path.endswith('.html'):  # nbdev's own links
            page = path[len(self.base) + 1:-len('.html')]
            return self._page(page, anchor) if page in self.anchors else url
        if not path or re.match(r'^[a-zA-Z][\w+.-]*:', path) or path.startswith('/'): return url  # external, or in-page
        f = (self.nbs_dir/path).resolve()
        if f.suffix == '.ipynb' and f.parent == self.nbs_dir and page_name(f) in self.anchors: return self._page(page_name(f), anchor)
        if image and f.is_file() and f.is_relative_to(self.nbs_dir): self.images.add(f); return url
        if f.exists() and f.is_relative_to(REPO): return self.blob + f.relative_to(REPO).as_posix() + ('#' + anchor if anchor else '')
        return url  # a broken link: sphinx -W reports it

    def _link(self, m):
        bang, text, url, title = m.groups()
        return f"{bang}[{text}]({self._target(url, bool(bang))}{title or ''})"

    def __call__(self, md:str) -> str:
        out, in_fence = [], False
        for l in md.splitlines():
            if l.lstrip().startswith(('```', '~~~')): in_fence = not in_fence
            elif in_fence: l = _re_md_link.sub(r'\1', l)  # show_doc's signatures: a link is noise in code
            else: l = _re_link.sub(self._link, _re_pandoc_attrs.sub(r'\1', l))
            out.append(l)
        return '\n'.join(out)

def _md_cell(src:str) -> dict: return {'cell_type': 'markdown', 'metadata': {}, 'source': src}

def _asis_markdown(cell) -> str:
    "The markdown that a `#| output: asis` cell (a show_doc) puts into the page"
    out = []
    for o in cell.get('outputs', []):
        md = o.get('data', {}).get('text/markdown')
        if md is not None: out.append(''.join(md) if isinstance(md, list) else md)
    md = '\n\n'.join(out)
    # show_doc opens with a `---` rule: a thematic break there reads as a Sphinx transition error
    md = re.sub(r'^\s*---\s*\n', '', md)
    # the source link goes right of the heading (custom.css), as on nbdev's Quarto sites: put it in the heading's section
    return re.sub(r'^\[source\]\(([^)\s]+)\)(?:\{[^}\n]*\})?\s*\n(#{1,6}\s.*)$', r'\2\n\n[source](\1){.sourcelink}',
                  md, count=1, flags=re.M)

_NOT_RUN = '{{.docs-not-run}}\nNot run for these docs: the cell is flagged `{}` (long-running).'
_WIDGET = 'application/vnd.jupyter.widget-view+json'  # needs a live kernel (or a widget manager from a CDN)
_WIDGET_NOTE = '*An interactive widget: open the notebook in Jupyter to use it.*'

def summary(nb:dict) -> str|None:
    "The whole `> summary` under a notebook's `# Title` (nbdev's front matter keeps only its first line)"
    for c in nb['cells']:
        if c['cell_type'] != 'markdown' or not re.search(r'^#\s+\S', src_text(c), flags=re.M): continue
        lines = src_text(c).split('\n')
        i = next(i for i, l in enumerate(lines) if re.match(r'#\s+\S', l)) + 1
        while i < len(lines) and not lines[i].strip(): i += 1
        quote = []
        while i < len(lines) and lines[i].startswith('>'): quote.append(lines[i][1:].strip()); i += 1
        return ' '.join(quote) or None

def to_plain_nb(nb:dict, fix:LinkFixer, tail:str='', description:str|None=None) -> dict:
    "A plain notebook for myst-nb from one that nbdev processed for Quarto (`tail`: markdown to end it with)"
    cells, fm = [], {}
    for cell in nb['cells']:
        if 'source' not in cell: continue  # removed by nbdev (#| hide, exported cells)
        src, kind = src_text(cell), cell['cell_type']
        if kind == 'raw':
            m = None if fm else re.match(r'^\s*---\s*\n(.*?)\n---\s*$', src, flags=re.S)
            if m: fm = yaml.safe_load(m.group(1)) or {}  # nbdev's front matter: title, description, output-file
            else: cells.append({**cell, 'source': src})
            continue
        if kind == 'markdown':
            if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
            cells.append({'cell_type': 'markdown', 'metadata': cell.get('metadata', {}), 'source': fix(src)})
            continue
        dirs, code = split_directives(src)
        if dirs.get('include') == 'false': continue
        if dirs.get('output') == 'asis':
            md = _asis_markdown(cell)
            if dirs.get('echo') != 'false' and code: cells.append(_code_cell(cell, code, [], outputs=False))
            if md.strip(): cells.append(_md_cell(fix(md)))
            continue
        if not code and not cell.get('outputs'): continue
        tags = []
        if dirs.get('echo') == 'false': tags.append('remove-input')
        if dirs.get('output') == 'false': tags.append('remove-output')
        if dirs.get('code-fold') in ('true', 'show'): tags.append('hide-input')
        cells.append(_code_cell(cell, code, tags, fix=fix))
        if not_run := cell.get('metadata', {}).get('docs_not_run'):
            cells.append(_md_cell(_NOT_RUN.format('`, `'.join(not_run))))
    head, desc = f"# {fm.get('title', 'Untitled')}", fm.get('description')
    if desc and description and description.startswith(str(desc)): desc = description
    if desc: head += '\n\n{.description}\n' + fix(str(desc))
    cells = [_md_cell(head)] + cells + ([_md_cell(tail)] if tail else [])
    nest_headings(cells)
    seen = set()
    for i, c in enumerate(cells):  # nbformat 4.5 wants unique cell ids; nbdev's new cells have none
        if not c.get('id') or c['id'] in seen: c['id'] = f'docs-{i}'
        seen.add(c['id'])
    meta = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
            'language_info': {'name': 'python'}}
    return {'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}

def nest_headings(cells:list):
    "Close gaps in heading levels (show_doc's `###` right under the `#` title becomes `##`), keeping the nesting"
    stack = []  # (level in the notebook, level on the page)
    def _fix(m):
        lvl = len(m.group(1))
        while stack and stack[-1][0] >= lvl: stack.pop()
        new = stack[-1][1] + 1 if stack else 1
        stack.append((lvl, new))
        return '#' * new + m.group(2)
    for c in cells:
        if c['cell_type'] != 'markdown': continue
        out, in_fence = [], False
        for l in c['source'].splitlines():
            if l.lstrip().startswith(('```', '~~~')): in_fence = not in_fence
            elif not in_fence: l = re.sub(r'^(#{1,6})(\s+\S.*)$', _fix, l)
            out.append(l)
        c['source'] = '\n'.join(out)

def _code_cell(cell, code:str, tags:list, outputs=True, fix=None) -> dict:
    outs = []
    for o in (cell.get('outputs', []) if outputs else []):
        o = dict(o)
        if 'data' in o:
            if _WIDGET in o['data']: o['data'] = {'text/markdown': _WIDGET_NOTE}  # its repr would read as noise
            if 'text/markdown' in o['data'] and fix:
                md = o['data']['text/markdown']
                o['data']['text/markdown'] = fix(''.join(md) if isinstance(md, list) else md)
            if not o['data']: continue
        outs.append(o)
    meta = {k: v for k, v in cell.get('metadata', {}).items() if k not in ('docs_not_run', 'language')}
    if tags: meta['tags'] = sorted(set(meta.get('tags', []) + tags))
    return {'cell_type': 'code', 'execution_count': None, 'metadata': meta, 'outputs': outs, 'source': code}

def convert_all(procd:Path, srcs:list[Path], dst:Path, settings:dict, nbs_dir:Path) -> list[str]:
    "Write plain notebooks for Sphinx into `dst` (one per page, named like nbdev's pages); return the page names"
    dst.mkdir(parents=True, exist_ok=True)
    nbs = {page_name(p): json.loads((procd/p.name).read_text(encoding='utf-8')) for p in srcs}
    srcs = {page_name(p): p for p in srcs}
    anchors = {}  # page -> slugs of its headings, as nbdev/pandoc make them
    for page, nb in nbs.items():
        mds = [src_text(c) for c in nb['cells'] if c['cell_type'] == 'markdown' and 'source' in c]
        mds += [_asis_markdown(c) for c in nb['cells'] if c['cell_type'] == 'code' and 'source' in c
                and split_directives(src_text(c))[0].get('output') == 'asis']
        anchors[page] = {pandoc_slug(h) for md in mds for h in _headings(md)}
    fix = LinkFixer(settings, anchors, nbs_dir)
    for page, nb in nbs.items():
        tail = _toctree([p for p in nbs if p != 'index'], srcs) if page == 'index' else ''
        plain = to_plain_nb(nb, fix, tail, summary(json.loads(srcs[page].read_text(encoding='utf-8'))))
        (dst/f'{page}.ipynb').write_text(json.dumps(plain, indent=1), encoding='utf-8')
    for f in fix.images:
        (dst/f.relative_to(nbs_dir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst/f.relative_to(nbs_dir))
    if 'index' not in nbs:  # a site needs a root page
        (dst/'index.md').write_text(f"# {settings['title']}\n\n{settings.get('description', '')}\n\n"
                                    + _toctree(list(nbs), srcs), encoding='utf-8')
    return list(nbs)

def _toctree(pages:list[str], srcs:dict[str, Path]) -> str:
    "Hidden toctrees (the sidebar): the API notebooks, then the 9x tutorials"
    tut = {page for page, p in srcs.items() if p.name.startswith('9')}
    out = []
    for caption, ps in (('API', [p for p in pages if p not in tut]), ('Tutorials', [p for p in pages if p in tut])):
        if ps: out.append('```{toctree}\n:hidden:\n:caption: ' + caption + '\n\n' + '\n'.join(ps) + '\n```')
    return '\n\n'.join(out)

# ---------------------------------------------------------------- 4. sphinx

def sphinx_build(src:Path, out:Path, doctrees:Path, srcs:list[Path]):
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-W', '--keep-going', '-q',
           '-c', str(HERE), '-d', str(doctrees), str(src), str(out)]
    if subprocess.run(cmd, cwd=REPO).returncode:
        pages = ', '.join(f"{page_name(p)}.ipynb is {p.name}" for p in srcs)
        raise BuildError(f"sphinx-build failed (warnings are errors): see above; its pages are named as on the site ({pages})")

def _clear_out(out:Path):
    "Empty `out` if it is a previous build (never a folder with anything else in it)"
    if not out.exists(): return
    if any(out.iterdir()) and not (out/'.buildinfo').exists():
        raise FileExistsError(f"--out {out} is not empty and is not a previous docs build: pick a new folder")
    shutil.rmtree(out)

def build(out:Path, nbs_dir:Path|None=None, work:Path|None=None, n_workers:int=2) -> Path:
    "Build the site from the notebooks in `nbs_dir` (settings.ini's `nbs_path`) into `out`"
    t0 = time.time()
    settings = read_settings()
    nbs_dir = Path(nbs_dir or REPO/settings.get('nbs_path', 'nbs')).resolve()
    srcs = notebooks(nbs_dir)
    if not srcs: raise FileNotFoundError(f"expected notebooks (*.ipynb) in {nbs_dir}, found none")
    out = Path(out).resolve()
    _clear_out(out)
    tmp = Path(work) if work else Path(tempfile.mkdtemp(prefix='docs-'))
    for d in ('exec', '_proc', 'src', 'doctrees', 'site'): shutil.rmtree(tmp/d, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        print(f"Executing {len(srcs)} notebooks from {nbs_dir} (skipping cells flagged {settings.get('tst_flags', '')})")
        execute_all(srcs, tmp/'exec', settings.get('tst_flags', '').split(), n_workers)
        t1 = time.time()
        print("Processing with nbdev (show_doc, hidden cells, links)")
        procd = process_all(tmp/'exec', tmp, n_workers)
        t2 = time.time()
        pages = convert_all(procd, srcs, tmp/'src', settings, nbs_dir)
        print(f"Building {len(pages)} pages with Sphinx into {out}")
        # myst-nb writes images beside the output folder, so build inside `tmp` and move the site into place
        sphinx_build(tmp/'src', tmp/'site'/'html', tmp/'doctrees', srcs)
        shutil.move(tmp/'site'/'html', out)
        t3 = time.time()
    finally:
        if not work: shutil.rmtree(tmp, ignore_errors=True)
    print(f"Built {out/'index.html'} in {t3-t0:.0f}s (execute {t1-t0:.0f}s, nbdev {t2-t1:.0f}s, sphinx {t3-t2:.0f}s)")
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(REPO/'_site'), help="folder for the HTML site (default: _site)")
    p.add_argument('--nbs', default=None, help="notebooks folder (default: settings.ini's nbs_path)")
    p.add_argument('--work', default=None, help="keep the intermediate notebooks in this folder (for debugging)")
    p.add_argument('--n-workers', type=int, default=min(2, os.cpu_count() or 1), help="parallel processes")
    a = p.parse_args(argv)
    try: build(Path(a.out), a.nbs and Path(a.nbs), a.work and Path(a.work), a.n_workers)
    except (BuildError, FileNotFoundError, FileExistsError) as e: sys.exit(f"docs build failed: {e}")

if __name__ == '__main__': main()
