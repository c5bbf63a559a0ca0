"""One process against two: `batchless-nb train` plain and under torchrun (2 processes, gloo on loopback, CPU).

For each setting, trains the digits CNN with BlN-log (shuffled batches of 64, seed 0) once in one plain process and
once with `torchrun --nproc_per_node=2` (micro-batches of 8 per process), and prints the largest parameter
difference, relative to each tensor's largest value. tests/test_ddp.py asserts the same bounds.
Run: python tests/benchmarks/ddp_one_vs_two.py [--epochs 2] [--out /tmp/ddp_one_vs_two]
"""
import argparse, os, socket, subprocess, sys, time
from pathlib import Path
import torch

SETTINGS = {'float64, dropout 0': ['--dtype', 'float64', '--dropout', '0'],
            'float64, dropout 0.25 (per-sample)': ['--dtype', 'float64', '--dropout', '0.25'],
            'float32, dropout 0': ['--dropout', '0'],
            'float32, dropout 0.25 (per-sample)': ['--dropout', '0.25']}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def train(nproc:int, out:Path, args:list) -> dict:
    env = os.environ | {'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo'}
    run = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port())] if nproc > 1 else [sys.executable]
    extra = ['--micro-batch-size', '8'] if nproc > 1 else []
    subprocess.run(run + ['-m', 'batchless_nb.cli', 'train', '--out', str(out), '--no-progress', '--threads', '1',
                          '--batch-size', '64', '--seed', '0', *extra, *args], env=env, check=True, capture_output=True)
    return torch.load(out/'model.pt', weights_only=True)


def max_rel_diff(a:dict, b:dict) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a if a[k].is_floating_point())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--out', default='/tmp/ddp_one_vs_two')
    a = p.parse_args()
    out = Path(a.out)/str(time.time_ns())
    print(f"digits CNN, BlN-log, batch 64 shuffled, {a.epochs} epochs, seed 0: 1 plain process vs torchrun with 2 processes")
    for name, args in SETTINGS.items():
        key = name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')
        one, two = (train(n, out/f'{key}-{n}', ['--epochs', str(a.epochs), *args]) for n in (1, 2))
        print(f"  {name:36s} max |one - two| / max |one| over tensors: {max_rel_diff(one, two):.3g}", flush=True)


if __name__ == '__main__': main()
