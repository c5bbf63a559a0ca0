"""BlN against every normalization a user would pick instead, on digits and the CIFAR-10 subset.

Batch sizes 1, 2, 8, 64, 256; no normalization, batch norm, GroupNorm, LayerNorm, Online Normalization, BlN-log with
the paper's update and BlN-log with the natural update (eta 0.01); seeds 0, 1, 2; 10 epochs; validated on the test
split (digits: 360 images, CIFAR-10 subset: 2,000). CIFAR-10 runs the paper CNN with its one-pass init on 1,000 images;
at batch 1 and 2 it trains on the first 2,000 of the 10,000 training images per epoch (a CPU cannot do more).

Each (dataset, batch size, seed) is one `batchless-nb sweep` in RUNS/DATASET/bsB-seedS, run under `nice -n 15` with one
thread, at most --jobs at once, seed 0 first (so a cut-short run already has a whole table of one seed). Sweeps resume:
run the same command again to continue. After each sweep the small files are collected into TO/DATASET: `results.csv`
and `results.json` (every finished cell) and per cell `metrics.json` with its per-epoch history only; no weights or
checkpoints. `--pilot` trains one seed for one epoch instead (in RUNS/pilot, nothing collected; CIFAR-10 on 2,000 images at
every batch size) and prints the CPU time per epoch of each cell of the full sweep (a pilot on fewer images scaled up, its
validation pass measured apart) and the estimated time of the full sweep.

    .venv/bin/python tests/benchmarks/comparisons.py digits                      # the digits sweep, resumable
    .venv/bin/python tests/benchmarks/comparisons.py cifar10 --data-path cifar-10-python.tar.gz
    .venv/bin/python tests/benchmarks/comparisons.py cifar10 --data-path cifar-10-python.tar.gz --pilot --batch-sizes 1 8 256
    .venv/bin/python tests/benchmarks/comparisons.py digits cifar10 --collect    # only collect what has finished
    # the short CIFAR-10 protocol (first 2,000 images at every batch size, 3 epochs, 3 seeds, BlN's three updates):
    .venv/bin/python tests/benchmarks/comparisons.py cifar10 --data-path cifar-10-python.tar.gz --train-samples 2000 \
        --epochs 3 --seeds 0 1 2 --batch-sizes 1 2 8 --stats-updates paper natural samples
"""
from __future__ import annotations
import argparse, functools, json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from collect_runs import per_epoch  # noqa: E402
from batchless_nb.runs import read_sweep, write_sweep  # noqa: E402

NORMS = ['none', 'bn', 'gn', 'ln', 'online', 'bln-log']
METHODS = NORMS + ['bln-log/natural0.01', 'bln-log/samples0.01']  # the sweeps' methods, in table order
UPDATES = ['paper', 'natural']  # BlN-log cells: the paper's update and the natural one (eta 0.01), unless --stats-updates
SMALL_BATCH_SAMPLES = 2000  # CIFAR-10 at batch <= 2: training images per epoch
DATASETS = {
    'digits': ['--dataset', 'digits'],
    'cifar10': ['--dataset', 'cifar10', '--model', 'paper_cnn', '--init-passes', '1'],
}

def sweep_args(dataset:str, batch_size:int, seed:int, epochs:int, data_path:str|None, pilot:bool=False,
               train_samples:int|None=None, updates:list[str]=UPDATES) -> list[str]:
    "The `batchless-nb sweep` arguments of one (dataset, batch size, seed), without --out; a CIFAR pilot trains on 2,000 images"
    bln = ['--stats-update', *updates] + (['--stats-eta', '0.01'] if set(updates) - {'paper'} else [])
    args = DATASETS[dataset] + ['--valid', 'test', '--norms', *NORMS, *bln, '--batch-sizes', str(batch_size),
                                '--seeds', str(seed), '--epochs', str(epochs), '--threads', '1', '--no-track-stats',
                                '--no-eval-stats']  # BlN as trained; `small_batches_study.py --recalibrate` adds eval-mode statistics
    if dataset == 'cifar10':
        if not data_path: raise SystemExit("cifar10 needs --data-path (the CIFAR-10 archive cifar-10-python.tar.gz or its directory)")
        args += ['--data-path', data_path]
    small = dataset == 'cifar10' and (batch_size <= 2 or pilot)  # a CPU trains CIFAR-10 at batch <= 2 on fewer images
    samples = train_samples or (SMALL_BATCH_SAMPLES if small else None)
    return args + (['--train-samples', str(samples)] if samples else [])

def run_sweep(args:list[str], out:Path, nice:int) -> tuple[Path, int, float, float]:
    "Run one sweep to the end (or its first error), logging to OUT.log; (out, return code, seconds, CPU seconds)"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ['nice', '-n', str(nice), sys.executable, '-m', 'batchless_nb.cli', 'sweep', *args, '--out', str(out)]
    t0 = time.perf_counter()
    with open(out.with_suffix('.log'), 'a') as log:
        log.write(f"\n$ {' '.join(cmd)}\n"); log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {'OMP_NUM_THREADS': '1'})
        _, status, use = os.wait4(proc.pid, 0)  # this process's own CPU time, whatever else runs (nice execs python)
        proc.returncode = os.waitstatus_to_exitcode(status)
    secs, cpu = time.perf_counter() - t0, use.ru_utime + use.ru_stime
    with open(out.with_suffix('.cpu.jsonl'), 'a') as f: f.write(json.dumps(dict(wall_s=secs, cpu_s=cpu, rc=proc.returncode)) + '\n')
    return out, proc.returncode, secs, cpu

def _order(row:dict) -> tuple:
    return (row['batch_size'], METHODS.index(row['method']) if row['method'] in METHODS else len(METHODS), row['method'], row['seed'])

def collect(runs:Path, to:Path) -> int:
    """Merge the finished cells of every sweep in `runs` into `to`: results.csv/.json, cells/*/metrics.json cut to epochs, and
    each cell's recalibrated.json (its test accuracy with eval-mode statistics, `small_batches_study.py --recalibrate`).
    The cells collected into `to` before stay, unless a sweep in `runs` has the same (method, batch size, seed)"""
    subs = []
    for sub in sorted(p for p in runs.glob('bs*-seed*') if p.is_dir()):
        s, rows = read_sweep(sub)
        if s is None: continue
        subs.append(({k: v for k, v in s.items() if k not in ('data_path', 'progress')}, rows))  # where the archive was: no result
        for row in rows:
            src = sub/'cells'/f"{row['method'].replace('/', '-')}-bs{row['batch_size']}-seed{row['seed']}"/'metrics.json'
            dest = to/'cells'/src.parent.name/'metrics.json'
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(per_epoch(json.loads(src.read_text())), indent=1))
            if (recal := src.parent/'recalibrated.json').is_file(): (dest.parent/recal.name).write_text(recal.read_text())
    key = lambda row: (row['method'], row['batch_size'], row['seed'])
    fresh = {key(r) for _, rs in subs for r in rs}
    before, old = read_sweep(to)
    if before is not None: subs.append((before, [r for r in old if key(r) not in fresh]))
    if not subs: return 0
    common = {k: v for k, v in subs[0][0].items() if all(k in s and s[k] == v for s, _ in subs)}
    rows = [r | {k: v for k, v in s.items() if k not in common} for s, rs in subs for r in rs]  # e.g. train_samples at batch <= 2
    write_sweep(to, common, sorted(rows, key=_order))
    return len(rows)

@functools.lru_cache(maxsize=None)
def valid_cpu(dataset:str, norm:str, data_path:str|None) -> float:
    "CPU seconds of one validation pass (the test images, eval batches of 256) of a fresh model with `norm`, one thread"
    import torch
    from batchless_nb.cli import DEFAULT_MODELS
    from batchless_nb.data import get_data
    from batchless_nb.models import get_model
    torch.set_num_threads(1)
    data = get_data(dataset, valid='test', **({'path': data_path} if dataset == 'cifar10' else {}))
    model = get_model(DEFAULT_MODELS[dataset], norm, input_shape=data.input_shape, n_classes=data.n_classes).eval()
    x = data.valid.tensors[0]
    with torch.no_grad():
        model(x[:256])  # warm-up
        t0 = time.process_time()
        for xb in x.split(256): model(xb)
    return time.process_time() - t0

@functools.lru_cache(maxsize=None)
def startup_cpu(dataset:str, data_path:str|None) -> float:
    "CPU seconds a sweep process spends before its first cell: starting Python, importing the package, loading the data"
    code = ("import sys; from batchless_nb.cli import sweep; from batchless_nb.data import get_data; "
            "get_data(sys.argv[1], valid='test', **({'path': sys.argv[2]} if sys.argv[1] == 'cifar10' else {}))")
    proc = subprocess.Popen([sys.executable, '-c', code, dataset, data_path or ''], env=os.environ | {'OMP_NUM_THREADS': '1'})
    _, status, use = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status): raise SystemExit(f"could not load {dataset} (data path {data_path!r})")
    return use.ru_utime + use.ru_stime

def full_samples(dataset:str, batch_size:int) -> int|None:
    "Training images per epoch of the full sweep (None: all of them)"
    return SMALL_BATCH_SAMPLES if dataset == 'cifar10' and batch_size <= 2 else {'cifar10': 10_000}.get(dataset)

def estimate(pilot:Path, epochs:int, n_seeds:int, jobs:int, data_path:str|None=None) -> str:
    """CPU seconds per epoch of the full sweep, per batch size (exact: each pilot sweep's own CPU time) and per cell
    (approximate: a sweep's CPU split by its cells' wall-clock times, which a loaded machine distorts)"""
    per_b, per_cell, scaled = {}, {}, False
    for sub in sorted(pilot.glob('bs*-seed*')):
        settings, rows = read_sweep(sub)
        cpu = sub.with_suffix('.cpu.jsonl')
        if not rows or not cpu.is_file(): continue
        runs = [json.loads(l) for l in cpu.read_text().splitlines()]
        if len(runs) > 1 or runs[0]['rc'] != 0: continue  # resumed or failed: the CPU time is not the cells'
        ds, b = settings['dataset'], rows[0]['batch_size']
        n, full = settings.get('train_samples'), full_samples(ds, b)
        start, cells = startup_cpu(ds, data_path), (runs[0]['cpu_s'] - startup_cpu(ds, data_path)) / settings['epochs']
        if n and full and n < full:  # trained on fewer images: scale the training part, not the validation passes
            v = sum(valid_cpu(ds, r['norm'], data_path) for r in rows)
            cells, scaled = (cells - v) * full / n + v, True
        per_b[b] = (start, cells)
        wall = sum(r['time_s'] for r in rows)
        per_cell |= {(r['method'], b): cells * r['time_s'] / wall for r in rows}
    if not per_b: return f"no complete pilot sweeps in {pilot}"
    sizes = sorted(per_b)
    lines = [f"CPU seconds per epoch of the full sweep, one thread (CIFAR-10 at batch <= 2: {SMALL_BATCH_SAMPLES} images per epoch"
             + ('; scaled up from pilots on fewer images' if scaled else '') + ')',
             f"{'':22s}" + ''.join(f"{b:>8d}" for b in sizes),
             f"{'all methods':22s}" + ''.join(f"{per_b[b][1]:8.0f}" for b in sizes),
             'per method, approximately (split by wall-clock time):']
    for m in [m for m in METHODS if any(k[0] == m for k in per_cell)]:
        lines.append(f"  {m:20s}" + ''.join(f"{per_cell[m, b]:8.0f}" if (m, b) in per_cell else f"{'-':>8s}" for b in sizes))
    total = sum((start + cells * epochs) * n_seeds for start, cells in per_b.values())
    lines.append(f"the full sweep of these batch sizes ({epochs} epochs, {n_seeds} seeds): {total / 3600:.1f} h of CPU, "
                 f"about {total / 3600 / jobs:.1f} h on {jobs} idle cores (process start-up: {per_b[sizes[0]][0]:.0f}s each)")
    return '\n'.join(lines)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('datasets', nargs='+', choices=list(DATASETS))
    p.add_argument('--data-path', help='CIFAR-10 archive (cifar-10-python.tar.gz) or its directory')
    p.add_argument('--runs', type=Path, default=Path('/tmp/comparisons'), help='where the sweeps run (checkpoints, weights)')
    p.add_argument('--to', type=Path, default=Path('nbs/results/comparisons'), help='where the small files are collected')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 2, 8, 64, 256])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--stats-updates', nargs='+', default=UPDATES, help="BlN's statistics updates (natural, samples: eta 0.01)")
    p.add_argument('--train-samples', type=int, help='train on the first N images at every batch size; runs and results go to DATASET-N')
    p.add_argument('--jobs', type=int, default=2, help='sweeps at once (at most 2 on a shared 2-core machine)')
    p.add_argument('--nice', type=int, default=15)
    p.add_argument('--pilot', action='store_true', help='one seed, one epoch, into RUNS/pilot; print times and the estimate')
    p.add_argument('--collect', action='store_true', help='only collect the finished cells')
    p.add_argument('--dry-run', action='store_true', help='print the sweep commands')
    a = p.parse_args(argv)
    seeds, epochs = ([a.seeds[0]], 1) if a.pilot else (a.seeds, a.epochs)
    root = a.runs/'pilot' if a.pilot else a.runs
    jobs = [(d, b, s) for d in a.datasets for s in seeds for b in a.batch_sizes]  # seed by seed: early stops leave whole tables
    name = lambda d: d if a.train_samples is None else f'{d}-{a.train_samples}'  # where a dataset's runs and results go
    if a.dry_run:
        for d, b, s in jobs: print('batchless-nb sweep', *sweep_args(d, b, s, epochs, a.data_path, a.pilot, a.train_samples, a.stats_updates),
                                   '--out', root/name(d)/f'bs{b}-seed{s}')
        return
    if not a.collect:
        def one(job):
            d, b, s = job
            out, rc, secs, cpu = run_sweep(sweep_args(d, b, s, epochs, a.data_path, a.pilot, a.train_samples, a.stats_updates),
                                           root/name(d)/f'bs{b}-seed{s}', a.nice)
            print(f"{'done' if rc == 0 else f'FAILED (exit {rc}, see {out}.log)'}: {d} batch {b} seed {s} in {secs:.0f}s "
                  f"({cpu:.0f}s of CPU)", flush=True)
            if rc == 0 and not a.pilot: collect(root/name(d), a.to/name(d))
            return rc
        with ThreadPoolExecutor(a.jobs) as pool: failed = sum(rc != 0 for rc in pool.map(one, jobs))
        if failed: print(f"{failed} sweeps failed; run the same command again to resume them")
    for d in a.datasets:
        if a.pilot: print(f"\n{d}:\n" + estimate(root/d, a.epochs, len(a.seeds), a.jobs, a.data_path))
        else: print(f"{name(d)}: {collect(root/name(d), a.to/name(d))} cells collected into {a.to/name(d)}")

if __name__ == '__main__': main()
