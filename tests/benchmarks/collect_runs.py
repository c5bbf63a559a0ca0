"""Copy the small result files of finished sweeps or studies into the repo (default nbs/results/closing_the_gap/<dir name>/...):
results.json/.csv, table.csv, runs.csv, and per cell config.json, lag.json, recalibrated.json and metrics.json with its
history cut to the per-epoch records (the per-step records make it 10-50x larger); with --stats also stats.npz, its
per-channel value samples (kept for histograms) cut to the first 16, about 10x smaller. Weights and checkpoints stay behind.
--finished-only leaves out the runs that have not trained all their epochs.

    .venv/bin/python tests/benchmarks/collect_runs.py /tmp/gap/cifar-long-bln [more sweep dirs] [--stats] [--to DIR]
    .venv/bin/python tests/benchmarks/collect_runs.py /tmp/study-digits --finished-only --to nbs/results/small_batches
"""
import argparse, json, shutil
from pathlib import Path
from batchless_nb.track import StatsLog

SMALL = ('results.json', 'results.csv', 'config.json', 'lag.json', 'recalibrated.json', 'table.csv', 'runs.csv')

def trimmed(log:StatsLog, k:int=16) -> StatsLog:
    "A copy of `log` keeping the first `k` sampled values per channel"
    sd = log.state_dict()
    for fields in sd['data'].values(): fields['sample'] = fields['sample'][..., :k].clone()
    return StatsLog.from_state_dict(sd)

def per_epoch(metrics:dict) -> dict:
    "`metrics` (as metrics.json holds it) with only the per-epoch records of its history"
    return metrics | {'history': {'epochs': metrics['history']['epochs']}}

def collect(sweep:Path, to:Path, stats:bool=False, k:int=16, finished_only:bool=False):
    "Copy the small files of `sweep` (a sweep or study directory) into `to`/`sweep.name`"
    dest = to/sweep.name
    for f in sweep.rglob('*'):
        out = dest/f.relative_to(sweep)
        if f.name == 'metrics.json':
            m = json.loads(f.read_text())
            if finished_only and len(m['history']['epochs']) < m['config']['epochs']: continue
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(per_epoch(m), indent=1))
        elif f.name in SMALL or (stats and f.name == 'stats.npz'):
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.name == 'stats.npz': trimmed(StatsLog.load(f), k).save(out)
            else: shutil.copy2(f, out)

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('sweeps', nargs='+', type=Path)
    p.add_argument('--to', type=Path, default=Path('nbs/results/closing_the_gap'))
    p.add_argument('--stats', action='store_true', help='also the tracked statistics (stats.npz), trimmed')
    p.add_argument('--samples', type=int, default=16, help='sampled values kept per channel with --stats')
    p.add_argument('--finished-only', action='store_true', help='leave out runs that have not trained all their epochs')
    a = p.parse_args()
    for s in a.sweeps: collect(s, a.to, a.stats, a.samples, a.finished_only)
