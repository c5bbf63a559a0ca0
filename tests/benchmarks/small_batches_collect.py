"""Copy the small result files of the small-batch study into the repo (nbs/results/small_batches/<dir name>/...):
per run config.json, recalibrated.json and metrics.json cut to its per-epoch records; with --stats also stats.npz,
its sampled values cut to the first 16 per channel (as `collect_runs.py` does). Weights and checkpoints stay behind.

    .venv/bin/python tests/benchmarks/small_batches_collect.py /tmp/study-cifar /tmp/compare [--stats] [--to DIR]
"""
import argparse, json, shutil, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from collect_runs import per_epoch, trimmed
from batchless_nb.track import StatsLog

SMALL = ('config.json', 'recalibrated.json', 'table.csv', 'runs.csv')

def collect(src:Path, to:Path, stats:bool=False, k:int=16):
    dest = to/src.name
    for f in src.rglob('*'):
        out = dest/f.relative_to(src)
        if f.name == 'metrics.json':
            m = json.loads(f.read_text())
            if len(m['history']['epochs']) < m['config']['epochs']: continue  # unfinished
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(per_epoch(m), indent=1))
        elif f.name in SMALL or (stats and f.name == 'stats.npz'):
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.name == 'stats.npz': trimmed(StatsLog.load(f), k).save(out)
            else: shutil.copy2(f, out)

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('dirs', nargs='+', type=Path)
    p.add_argument('--to', type=Path, default=Path('nbs/results/small_batches'))
    p.add_argument('--stats', action='store_true', help='also the tracked statistics (stats.npz), trimmed')
    p.add_argument('--samples', type=int, default=16, help='sampled values kept per channel with --stats')
    a = p.parse_args()
    for d in a.dirs: collect(d, a.to, a.stats, a.samples)
