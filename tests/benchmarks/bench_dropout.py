"""Per-sample dropout vs torch's dropout: one training step of the paper's CIFAR-10 CNN with each, side by side.

A step is what the Learner does per batch: forward inside `sample_keys` (the samples' dataset indices, the step,
the seed), cross-entropy + BlN's NLL, backward, Adam step. The same network (BlN-log, dropout 0.25 after each of
its 5 norms) is built with `dropout_mode='per_sample'` and `dropout_mode='torch'`, and with dropout 0 for context;
steps are timed interleaved (medians of wall-clock and CPU time; with one torch thread the CPU time is the cost).
Also the dropout layers alone: the forward of the 5 dropout layers at the paper CNN's activation shapes.
Run: python tests/benchmarks/bench_dropout.py [--batch 64] [--repeats 30] [--threads 1] [--device cpu]
"""
import argparse
import torch, torch.nn as nn, torch.nn.functional as F
from batchless_nb.core import sample_keys
from batchless_nb.norm import batchless_loss
from batchless_nb.models import paper_cnn, PerSampleDropout
from timing import timeit  # tests/benchmarks/timing.py, beside this script


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def train_steps(batch, device):
    "One training step of the paper CNN per dropout mode"
    x, y = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1, torch.randint(0, 10, (batch,), device=device)
    idx = torch.randperm(50_000)[:batch]
    models = {'torch': paper_cnn(dropout=0.25, dropout_mode='torch'), 'per_sample': paper_cnn(dropout=0.25),
              'no dropout': paper_cnn(dropout=0.0)}
    def step(m):
        m.to(device).train()
        opt, n = torch.optim.Adam(m.parameters()), [0]
        def f():
            with sample_keys(idx, n[0], seed=0): out = m(x)
            (F.cross_entropy(out, y) + batchless_loss(m)).backward()
            opt.step(); opt.zero_grad(set_to_none=True); n[0] += 1
            _sync(device)
        return f
    return {k: step(m) for k, m in models.items()}


def dropout_steps(batch, device):
    "The forward of the paper CNN's 5 dropout layers at their activation shapes, per mode"
    shapes = [(batch, 64, 32, 32), (batch, 64, 16, 16), (batch, 64, 8, 8), (batch, 50), (batch, 50)]
    xs = [torch.randn(s, device=device) for s in shapes]
    idx = torch.randperm(50_000)[:batch]
    def step(layers):
        def f():
            with sample_keys(idx, 0, seed=0):
                for l, x in zip(layers, xs): l(x)
            _sync(device)
        return f
    return {'torch': step([nn.Dropout(0.25).train() for _ in xs]),
            'per_sample': step([PerSampleDropout(0.25, stream=i).train() for i in range(len(xs))])}


def report(title, med, base='torch'):
    print(f"{title:44s} wall ms (ratio)      CPU ms (ratio)")
    bw, bc = med[base]
    for k, (w, c) in med.items():
        print(f"  {k:42s} {w*1e3:8.2f} ({w/bw:5.3f})   {c*1e3:8.2f} ({c/bc:5.3f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    device = torch.device(a.device)
    print(f"paper CNN (BlN-log, dropout 0.25), batch {a.batch} of 3x32x32, device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {a.repeats} interleaved repeats, medians")
    report('training step (fwd + loss + bwd + Adam)', timeit(train_steps(a.batch, device), a.repeats))
    report('the 5 dropout layers alone (forward)', timeit(dropout_steps(a.batch, device), a.repeats))


if __name__ == '__main__': main()
