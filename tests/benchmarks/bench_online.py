"""OnlineNorm2d vs nn.GroupNorm: one training step (forward + backward) per layer, CPU fp32.

Prints median times and their ratios to GroupNorm(32, C), measured side by side in one run (interleaved repeats,
medians), as wall-clock time and as the process's CPU time (on a shared machine a step that is descheduled counts in
the first, not the second; with one torch thread the CPU time is the cost), with batch norm and BatchlessNorm2d (forward + NLL + backward) for context, and Online Normalization's
variants: the default (layer scaling), activation clamping, and the bare normalize step (no affine, no ecm).
Also the eval-mode forward (a fixed affine map) against GroupNorm's, and with --model a whole training step
(forward, cross-entropy, backward) of the paper's CIFAR-10 CNN with each norm (OnlineNorm1d/2d in place of its
batch-norm layers; GroupNorm(32) on the convolutions and one group on the dense layers), batch from --shape.
Run: python tests/benchmarks/bench_online.py [--shape 8 64 16 16] [--repeats 50] [--threads 1] [--model]
"""
import argparse, os
import torch, torch.nn as nn
from batchless_nb.norm import BatchlessNorm2d, batchless_loss
from batchless_nb.online import OnlineNorm1d, OnlineNorm2d
from batchless_nb.models import paper_cnn
from timing import timeit  # tests/benchmarks/timing.py, beside this script


def make_steps(shape):
    C = shape[1]
    x = torch.randn(*shape).mul_(2).add_(1).requires_grad_()
    g = torch.randn(*shape)
    layers = {'GroupNorm(32)': nn.GroupNorm(min(32, C), C), 'BatchNorm2d': nn.BatchNorm2d(C),
              'BatchlessNorm2d': BatchlessNorm2d(C), 'OnlineNorm2d (ls)': OnlineNorm2d(C),
              'OnlineNorm2d (ac)': OnlineNorm2d(C, ecm='ac'), 'OnlineNorm2d (bare)': OnlineNorm2d(C, affine=False, ecm=None)}

    def train_step(layer):
        def step():
            out = layer(x)
            if isinstance(layer, BatchlessNorm2d): torch.autograd.backward([out, layer.nll], [g, torch.ones(())])
            else: out.backward(g)
        return step

    def eval_step(layer):
        def step():
            with torch.no_grad(): layer(x)
        return step

    train = {k: train_step(m.train()) for k, m in layers.items()}
    evals = {k: eval_step(m) for k, m in layers.items() if k in ('GroupNorm(32)', 'OnlineNorm2d (ls)')}
    return train, evals, layers


def _swap_bn(model, make):
    "Replace every BatchNorm1d/2d of `model` by make(bn)"
    for name, child in model.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)): setattr(model, name, make(child))
        else: _swap_bn(child, make)
    return model

def model_steps(batch):
    "One training step of the paper CNN per norm"
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    on = lambda bn: (OnlineNorm2d if isinstance(bn, nn.BatchNorm2d) else OnlineNorm1d)(bn.num_features)
    gn = lambda bn: nn.GroupNorm(32 if isinstance(bn, nn.BatchNorm2d) else 1, bn.num_features)
    models = {'GroupNorm(32)': _swap_bn(paper_cnn('bn'), gn), 'no norm': paper_cnn('none'), 'BatchNorm': paper_cnn('bn'),
              'BlN (log)': paper_cnn('bln-log'), 'OnlineNorm (ls)': _swap_bn(paper_cnn('bn'), on)}
    def step(m):
        def f():
            m.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            (loss + batchless_loss(m)).backward()
        return f
    return {k: step(m.train()) for k, m in models.items()}


def report(title, med, base='GroupNorm(32)'):
    print(f"{title:40s}     wall (ratio)           CPU (ratio)")
    bw, bc = med[base]
    for k, (w, c) in med.items():
        print(f"  {k:36s} {w * 1e3:8.3f} ms (x{w / bw:5.2f})  {c * 1e3:8.3f} ms (x{c / bc:5.2f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', type=int, nargs=4, default=[8, 64, 16, 16])
    p.add_argument('--repeats', type=int, default=50)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--model', action='store_true', help="also time a training step of the paper CNN per norm")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train, evals, layers = make_steps(a.shape)
    print(f"shape {tuple(a.shape)}, {a.threads} thread(s), torch {torch.__version__}, median of {a.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    report("training step (forward + backward):", timeit(train, a.repeats))
    for m in layers.values(): m.eval()
    report("eval forward:", timeit(evals, a.repeats))
    if a.model: report(f"paper CNN training step, batch {a.shape[0]}:", timeit(model_steps(a.shape[0]), a.repeats))


if __name__ == '__main__':
    main()
