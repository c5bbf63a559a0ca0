"""Memory and time of one training step of the paper's CNN (32x32x3 inputs): BlN vs batch norm.

1. Peak memory of a training step at a fixed effective batch (default 256) vs the micro-batch size, with BlN
   (gradients accumulated over micro-batches, as `Learner` does; the result is the same for every micro-batch size).
   Batch norm needs the whole batch at once, so it is shown at micro-batch = batch only.
2. Step time of BlN vs BN (and no norm) on the same model and batch, as ratios of medians from one run with the
   variants interleaved.

What "peak memory" is here (CPU has no allocator counters like torch.cuda.max_memory_allocated): torch's profiler
with profile_memory=True records every tensor allocation and free of the step; the figure is the maximum of its
running total ("Total Allocated") over the step, i.e. the most bytes held at once by tensors allocated during the
step: activations saved for backward, temporaries, gradients (set to None before the step) and the optimizer's
temporaries. The parameters, the optimizer state and the input batch exist before the step and are not included
(they are listed separately). It counts tensor bytes, not what the process's malloc keeps from the OS.
On CUDA (run by default when available, or --device cuda) torch.cuda.max_memory_allocated minus the memory allocated before the step is used instead.

Run: python tests/benchmarks/bench_memory.py [--batch 256] [--micro 1 4 16 64 256] [--repeats 5] [--threads 2]
"""
import argparse, json, os, sys, tempfile
import torch
from torch.profiler import profile, ProfilerActivity
from batchless_nb.core import set_seed
from batchless_nb.models import paper_cnn
from batchless_nb.norm import batchless_loss
sys.path.insert(0, os.path.dirname(__file__))
from timing import medians  # tests/benchmarks/timing.py, beside this script

MB = 2**20


def make(norm, device):
    set_seed(0)
    model = paper_cnn(norm, dropout=0.0).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_step(model, opt, x, y, micro):
    "One optimizer step over (x, y) in micro-batches, each loss weighted by its share of the batch"
    n = len(x)
    for xm, ym in zip(x.split(micro), y.split(micro)):
        loss = torch.nn.functional.cross_entropy(model(xm), ym) + batchless_loss(model)
        (loss * (len(xm) / n)).backward()
    opt.step()


def peak_cpu(step) -> int:
    "Max of the profiler's running total of tensor bytes allocated during `step`"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof: step()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, 'trace.json'))
        with open(os.path.join(d, 'trace.json')) as f: events = json.load(f)['traceEvents']
    totals = [e['args']['Total Allocated'] for e in events if e.get('name') == '[memory]']
    return max([0] + totals)


def peak_cuda(step, device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_memory(norm, micro, x, y, device) -> int:
    model, opt = make(norm, device)
    train_step(model, opt, x, y, micro)  # warm-up: Adam state exists, as in any later step
    opt.zero_grad(set_to_none=True)
    step = lambda: train_step(model, opt, x, y, micro)
    return peak_cuda(step, device) if device.type == 'cuda' else peak_cpu(step)


def state_bytes(norm, device):
    model, opt = make(norm, device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params, 2 * params  # Adam: exp_avg and exp_avg_sq


def time_steps(norms, x, y, repeats, device):
    "Median step time per norm, the norms interleaved in each round"
    runs = {n: make(n, device) for n in norms}
    step = lambda m, o: (train_step(m, o, x, y, len(x)), o.zero_grad(set_to_none=True))
    return medians({n: (lambda m=m, o=o: step(m, o)) for n, (m, o) in runs.items()}, repeats, device, warmup=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=256, help='effective batch size')
    p.add_argument('--micro', type=int, nargs='+', default=[1, 4, 16, 64, 256], help='micro-batch sizes (BlN)')
    p.add_argument('--norm', default='bln-log', help='BlN variant for the memory sweep')
    p.add_argument('--time-batch', type=int, default=64, help='batch size of the timed steps')
    p.add_argument('--repeats', type=int, default=5, help='timed steps per variant')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--device', choices=['cpu', 'cuda'], help='default: cpu, and cuda too when available')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    for d in ([a.device] if a.device else ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])):
        run(a, torch.device(d))


def run(a, device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 3, 32, 32, generator=g).mul_(2).sub_(1).to(device)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)
    params, adam = state_bytes(a.norm, device)
    print(f"\n== paper CNN, {a.batch} inputs of 3x32x32, device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"before the step (not counted below): parameters {params / MB:.2f} MB, Adam state {adam / MB:.2f} MB, "
          f"input batch {x.numel() * x.element_size() / MB:.2f} MB")
    print(f"\npeak tensor memory of one training step, effective batch {a.batch} "
          f"({'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'torch.profiler allocation total'}):")
    print(f"{'norm':8s} {'micro':>6s} {'peak MB':>9s} {'vs micro=batch':>15s}")
    rows = [(a.norm, m, measure_memory(a.norm, m, x, y, device)) for m in sorted(a.micro, reverse=True)]
    rows.append(('bn', a.batch, measure_memory('bn', a.batch, x, y, device)))
    full = next(b for n, m, b in rows if n == a.norm and m == a.batch) if a.batch in a.micro else None
    for n, m, b in rows:
        rel = f"{b / full:15.3f}" if full else f"{'':15s}"
        print(f"{n:8s} {m:6d} {b / MB:9.2f} {rel}")
    tx, ty = x[:a.time_batch], y[:a.time_batch]
    norms = ['bn', a.norm, 'none']
    t = time_steps(norms, tx, ty, a.repeats, device)
    print(f"\nstep time, batch {a.time_batch}, median of {a.repeats} interleaved steps:")
    for n in norms: print(f"{n:8s} {t[n] * 1e3:9.1f} ms   ratio to bn {t[n] / t['bn']:.3f}")


if __name__ == '__main__':
    main()
