"Sweep summaries over seeds: seed_stats, ties_with_best and results_table against a direct computation, on random sweeps."
import math, statistics
from hypothesis import given, settings, strategies as st
from batchless_nb.runs import seed_stats, ties_with_best, results_table
from batchless_nb.viz import plot_sweep

METHODS = ['none', 'bn', 'gn', 'bln-log', 'bln-log/natural0.01']

@st.composite
def sweeps(draw):
    "Rows of a random sweep: 1-4 methods x 1-3 batch sizes x 1-4 seeds, accuracies on a coarse grid (so ties happen)"
    methods = draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=4, unique=True))
    sizes = draw(st.lists(st.sampled_from([1, 8, 64]), min_size=1, max_size=3, unique=True))
    n_seeds = draw(st.integers(1, 4))
    acc = st.integers(0, 20).map(lambda k: 0.5 + k / 40)
    return [dict(norm=m.split('/')[0], method=m, batch_size=b, seed=s, best_val_acc=(a := draw(acc)), best_val_loss=1 - a)
            for m in methods for b in sizes for s in range(n_seeds)]

def _interval(vals:list, spread:str) -> tuple:
    m = statistics.mean(vals)
    if spread == 'range': return m, min(vals), max(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.
    return m, m - s, m + s

def _cells(rows:list, b:int) -> dict:
    out = {}
    for r in rows:
        if r['batch_size'] == b: out.setdefault(r['method'], []).append(r['best_val_acc'])
    return out

@settings(max_examples=150, deadline=None)
@given(sweeps(), st.sampled_from(['std', 'range']), st.randoms(use_true_random=False))
def test_ties_are_the_overlapping_intervals(rows, spread, rnd):
    "The best has the highest mean; a method is listed iff its interval reaches the best's; row order changes nothing"
    ties = ties_with_best(rows, spread=spread)
    assert sorted(ties) == sorted({r['batch_size'] for r in rows})
    shuffled = rows[:]; rnd.shuffle(shuffled)
    again = ties_with_best(shuffled, spread=spread)
    for b, (best, *close) in ties.items():
        iv = {m: _interval(v, spread) for m, v in _cells(rows, b).items()}
        top = max(x[0] for x in iv.values())
        assert iv[best][0] == top
        assert set(close) == {m for m, (_, lo, hi) in iv.items() if m != best and hi >= iv[best][1]}
        assert len(close) == len(set(close))
        if sum(x[0] == top for x in iv.values()) == 1: assert again[b][0] == best and set(again[b]) == set(ties[b])

@settings(max_examples=60, deadline=None)
@given(sweeps())
def test_losses_rank_the_other_way(rows):
    "With 1 - accuracy as a loss, the same methods tie with the same best (lower is better for a 'loss' metric)"
    flipped = [r | {'best_val_loss': 1 - r['best_val_acc']} for r in rows]
    acc, loss = ties_with_best(rows), ties_with_best(flipped, 'best_val_loss')
    for b in acc:
        assert set(acc[b]) == set(loss[b])

@settings(max_examples=25, deadline=None)
@given(sweeps())
def test_table_and_figure_show_the_same_numbers(rows):
    "results_table prints each cell's mean ± std, starred iff tied with the best; plot_sweep draws the same means and bars"
    import matplotlib.pyplot as plt
    st_ = seed_stats(rows)
    text = results_table(rows, ['best_val_acc'])
    ties = ties_with_best(rows)
    lines = {l.split()[0]: l for l in text.splitlines()[2:]}
    for (m, b), s in st_.items():
        cell = f"{s['mean']:.4f}" + (f" ± {s['hi'] - s['mean']:.4f}" if s['n'] > 1 else '') + ('*' if m in ties[b] else '')
        assert cell in lines[m], (cell, lines[m])
    axs = plot_sweep(rows, metrics=('best_val_acc',))
    methods = [t.get_text() for t in axs[0].get_legend().get_texts()]
    assert len(axs[0].containers) == len(methods)
    for c in axs[0].containers:
        xs, ys = c.lines[0].get_xdata(), c.lines[0].get_ydata()
        assert len(xs) == len({r['batch_size'] for r in rows})
        bars = [seg[:, 1] for seg in c.lines[2][0].get_segments()]
        for y, (lo, hi) in zip(ys, bars): assert math.isclose(hi - y, y - lo, abs_tol=1e-9)  # symmetric: ± std
    plt.close('all')

def test_one_seed_has_no_spread_and_nan_ranks_nowhere():
    rows = [dict(norm='bn', batch_size=8, seed=0, best_val_acc=0.9), dict(norm='gn', batch_size=8, seed=0, best_val_acc=0.9 - 1e-9),
            dict(norm='none', batch_size=8, seed=0, best_val_acc=float('nan'))]
    assert ties_with_best(rows) == {8: ['bn']}  # one seed each: only an exact equal would tie
    assert seed_stats(rows)['bn', 8] == dict(mean=0.9, lo=0.9, hi=0.9, n=1)
    assert 'nan' in results_table(rows, ['best_val_acc'])
