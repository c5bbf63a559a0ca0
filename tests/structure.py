"""The package's structure, read from its files: the module import graph, line counts, the largest function and
the largest exported notebook cell. `python tests/structure.py [ROOT]` prints them; tests/test_structure.py checks them."""
import ast, json, sys
from pathlib import Path

PKG = 'batchless_nb'

def modules(root:Path) -> dict[str, Path]:
    "Module name -> file, for the package's own modules (generated `_modidx` left out)"
    return {p.stem: p for p in sorted((root/PKG).glob('*.py')) if not p.stem.startswith('_')}

def imports(path:Path, names:set[str]) -> dict[str, bool]:
    "The package modules `path` imports -> whether at module level (False: only inside a function)"
    tree, found = ast.parse(path.read_text()), {}
    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                mod = child.module or ''
                if child.level: target = mod.split('.')[0] if mod else None
                elif mod.startswith(PKG + '.'): target = mod.split('.')[1]
                else: target = None
                targets = [target] if target else [a.name for a in child.names] if (child.level or mod == PKG) else []
                for t in targets:
                    if t in names: found[t] = found.get(t, False) or top
            elif isinstance(child, ast.Import):
                for a in child.names:
                    parts = a.name.split('.')
                    if parts[0] == PKG and len(parts) > 1 and parts[1] in names: found[parts[1]] = found.get(parts[1], False) or top
            visit(child, inner)
    visit(tree, True)
    return found

def graph(root:Path) -> dict[str, dict[str, bool]]:
    "Module -> {imported module: at module level}"
    mods = modules(root)
    return {m: imports(p, set(mods)) for m, p in mods.items()}

def cycles(g:dict) -> list[list[str]]:
    "Every import cycle, module-level and function-level imports alike (each as a list of modules)"
    found, state = [], {}
    def dfs(m, path):
        state[m] = 1; path.append(m)
        for d in g.get(m, {}):
            if state.get(d) == 1: found.append(path[path.index(d):] + [d])
            elif d not in state: dfs(d, path)
        path.pop(); state[m] = 2
    for m in g:
        if m not in state: dfs(m, [])
    return found

def largest_function(path:Path) -> tuple[str, int]:
    "(name, lines) of the longest function or method in `path`"
    best = ('', 0)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            best = max(best, (node.name, node.end_lineno - node.lineno + 1), key=lambda t: t[1])
    return best

def exported_cells(root:Path) -> list[tuple[str, int]]:
    "(notebook, lines) of every exported cell"
    out = []
    for nb in sorted((root/'nbs').glob('*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'code' and src.lstrip().startswith(('#| export', '#|export')):
                out.append((nb.name, len(src.strip().splitlines())))
    return out

def report(root:Path) -> str:
    g, mods = graph(root), modules(root)
    lines = ['module imports (package modules; * = only inside a function)']
    for m, deps in g.items(): lines.append(f"  {m:12s} <- {', '.join(d + ('' if top else '*') for d, top in deps.items()) or '-'}")
    lines.append(f"import cycles: {cycles(g) or 'none'}")
    lines.append('lines per module: ' + ', '.join(f"{m} {len(p.read_text().splitlines())}" for m, p in mods.items()))
    fn = max(((m,) + largest_function(p) for m, p in mods.items()), key=lambda t: t[2])
    lines.append(f"largest function: {fn[0]}.{fn[1]} ({fn[2]} lines)")
    cells = exported_cells(root)
    big = max(cells, key=lambda t: t[1])
    lines.append(f"exported cells: {len(cells)}, mean {sum(n for _, n in cells) / len(cells):.1f} lines, largest {big[1]} ({big[0]})")
    return '\n'.join(lines)

if __name__ == '__main__': print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent))
