"""BlN with the package's default settings, trained as a user would train it, against GroupNorm, LayerNorm, batch
norm and no normalization (the README's tables come from comparisons.py and small_batches_study.py, which test each
BlN run both with its learned and with eval-mode statistics), at batch sizes 1, 2, 8, 16 and 64, 3 seeds, on the CIFAR-10 subset (the paper CNN,
3 epochs, tested on the 2,000 test images; batch 1 and 2 train on the first 2,000 training images per epoch) and on
digits (the digits CNN, 3 epochs, the 360 test digits). Resumable: rerun the same command to continue; finished
runs are skipped, an interrupted one resumes from its checkpoint. Prints the table (test accuracy after the last
epoch, mean +- standard deviation over the seeds) and writes it to OUT/table.csv.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tests/benchmarks/small_batches_compare.py OUT \\
        --data-path /path/to/cifar-10-python.tar.gz [--datasets cifar10 digits] [--jobs 2]

Each run is `batchless_nb.cli.train` with the package defaults except the protocol above; BlN runs with the statistics
update and eval-mode statistics `train` chooses from the model (CIFAR-10's CNN has dropout: the natural update and
eval-mode statistics; the digits CNN has none: the paper's update, statistics as trained). Times on one core (no other load): digits about 4 minutes for everything; CIFAR-10 about 70 s per
run at batch 1, 60 s at 2, 200-300 s at 8, 150-200 s at 16 and 64, about 3 hours in all for 72 runs (1.5 hours
with `--jobs 2` on two free cores).
"""
import argparse, json, multiprocessing as mp, os, sys
from pathlib import Path
import pandas as pd
sys.path.insert(0, os.path.dirname(__file__))
from small_batches_study import protocol  # the study's fixed settings, beside this script

NORMS = ['bln-log', 'gn', 'ln', 'bn', 'none']
BATCH_SIZES = [1, 2, 8, 16, 64]
SEEDS = [0, 1, 2]


def cells(datasets, norms=NORMS, batch_sizes=BATCH_SIZES, seeds=SEEDS) -> list[tuple]:
    "(dataset, norm, batch size, seed), the slow CIFAR-10 batch sizes last; batch norm skipped at batch size 1"
    return [(d, n, b, s) for d in datasets for b in batch_sizes for s in seeds for n in norms if not (n == 'bn' and b == 1)]

def run(out:Path, dataset:str, norm:str, batch_size:int, seed:int, data_path:str|None) -> dict:
    import torch
    from batchless_nb.cli import train
    torch.set_num_threads(1)
    d = out/dataset/f'{norm}-bs{batch_size}-seed{seed}'
    m = d/'metrics.json'
    if not (m.exists() and len(json.loads(m.read_text())['history']['epochs']) >= 3):  # the study tests as trained; here train chooses
        train(**protocol(dataset, batch_size, data_path) | dict(eval_stats=None), norm=norm, batch_size=batch_size, seed=seed,
              out=d, resume=True, progress=False)
    r = json.loads(m.read_text())
    row = dict(dataset=dataset, norm=norm, batch_size=batch_size, seed=seed, test_acc=r['summary']['final_val_acc'],
               stats_update=r['config'].get('stats_update') if norm.startswith('bln') else None,
               stats_eta=r['config'].get('stats_eta') if norm.startswith('bln') else None, time_s=r['summary']['time_s'])
    print(f"{dataset} {norm} bs {batch_size} seed {seed}: test acc {row['test_acc']:.4f} ({row['time_s']:.0f}s)", flush=True)
    return row

def table(rows:list[dict]) -> pd.DataFrame:
    "dataset x norm rows, batch size columns: 'mean +- std (n)' of the test accuracy over the seeds"
    df = pd.DataFrame(rows)
    g = df.groupby(['dataset', 'norm', 'batch_size']).test_acc
    cell = lambda s: f"{s.mean():.3f} +- {s.std(ddof=1) if len(s) > 1 else float('nan'):.3f}" + (f" ({len(s)})" if len(s) != 3 else '')
    t = g.apply(cell).unstack('batch_size')
    order = [n for n in NORMS if n in set(df.norm)]
    return t.reindex(pd.MultiIndex.from_tuples([(d, n) for d in dict.fromkeys(df.dataset) for n in order if (d, n) in t.index]))

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('out', type=Path)
    p.add_argument('--data-path', help='the CIFAR-10 archive')
    p.add_argument('--datasets', nargs='+', default=['digits', 'cifar10'], choices=['digits', 'cifar10'])
    p.add_argument('--norms', nargs='+', default=NORMS)
    p.add_argument('--batch-sizes', nargs='+', type=int, default=BATCH_SIZES)
    p.add_argument('--seeds', nargs='+', type=int, default=SEEDS)
    p.add_argument('--jobs', type=int, default=1, help='runs at once (one thread each)')
    a = p.parse_args()
    if 'cifar10' in a.datasets and not a.data_path: p.error('--data-path is needed for cifar10')
    todo = [(a.out, *c, a.data_path) for c in cells(a.datasets, a.norms, a.batch_sizes, a.seeds)]
    if a.jobs > 1:
        with mp.get_context('spawn').Pool(a.jobs, maxtasksperchild=1) as pool: rows = pool.starmap(run, todo, chunksize=1)
    else: rows = [run(*t) for t in todo]
    t = table(rows)
    t.to_csv(a.out/'table.csv')
    pd.DataFrame(rows).to_csv(a.out/'runs.csv', index=False)
    with pd.option_context('display.width', 200, 'display.max_columns', 20): print(t)
