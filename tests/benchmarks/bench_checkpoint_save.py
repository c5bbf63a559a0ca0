"""Time of `Learner.save` for the paper CNN (BlN, Adam state): keeping the previous checkpoint (which first reads and
verifies the latest) against not keeping it, interleaved in one run.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_checkpoint_save.py [--pairs 40]
"""
import argparse, statistics, tempfile, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader, TensorDataset
from batchless_nb.callbacks import batchless_learner
from batchless_nb.models import get_model


def main(pairs:int):
    torch.set_num_threads(1)
    dl = DataLoader(TensorDataset(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))), batch_size=32)
    learn = batchless_learner(get_model('paper_cnn', 'bln-log', input_shape=(3, 32, 32)), (dl, None), progress=False, device='cpu')
    learn.fit(1)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)/'c.pt'
        learn.save(p)
        t = {True: [], False: []}
        for _ in range(pairs):
            for keep in (True, False):
                t0 = time.perf_counter(); learn.save(p, keep_previous=keep); t[keep].append(time.perf_counter() - t0)
        keep, plain = statistics.median(t[True]), statistics.median(t[False])
        print(f"checkpoint {p.stat().st_size / 1e6:.2f} MB; median save {plain * 1e3:.0f} ms without keeping the previous, "
              f"{keep * 1e3:.0f} ms keeping it (ratio {keep / plain:.2f}), {pairs} interleaved pairs")


if __name__ == '__main__':
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument('--pairs', type=int, default=40)
    main(a.parse_args().pairs)
