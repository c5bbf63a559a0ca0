"The package's modules import in one direction, and the generic Learner knows nothing of batchless normalization."
from pathlib import Path
from structure import cycles, graph

ROOT = Path(__file__).parent.parent
# The order modules may import in: each only from modules before it (optional ones included where they exist)
ORDER = ['core', 'kernel', 'norm', 'moments', 'init', 'natural', 'convert', 'online', 'dp', 'registry', 'data', 'models', 'resume',
         'distributed', 'learner', 'callbacks', 'track', 'private', 'runs', 'viz', 'explore', 'cli', 'stats']


def test_no_import_cycles():
    assert cycles(graph(ROOT)) == []


def test_modules_import_in_one_direction():
    g = graph(ROOT)
    assert set(g) <= set(ORDER), f"modules missing from ORDER: {set(g) - set(ORDER)}"
    later = {m: [d for d in deps if ORDER.index(d) > ORDER.index(m)] for m, deps in g.items()}
    assert {m: d for m, d in later.items() if d} == {}


def test_learner_knows_no_normalization():
    bln = {'norm', 'moments', 'init', 'natural', 'convert', 'online', 'dp', 'registry', 'callbacks', 'track'}
    assert set(graph(ROOT)['learner']) & bln == set()
    src = (ROOT/'batchless_nb'/'learner.py').read_text()
    assert [n for n in ('batchless_loss', 'batchless_modules', 'NaturalGradientSGD', 'init_batchless', 'stats_update') if n in src] == []
