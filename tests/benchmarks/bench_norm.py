"""BatchlessNorm2d vs nn.BatchNorm2d: one training step (forward + NLL + backward), CPU fp32.

Prints time and saved-for-backward bytes as ratios BlN/BN measured side by side in one run
(interleaved repeats, medians), plus the plain autograd reference for context.
Run: python tests/benchmarks/bench_norm.py [--shape 64 64 32 32] [--repeats 30]
"""
import argparse, statistics, time
import torch, torch.nn as nn
from batchless_nb.norm import BatchlessNorm2d, batchless_norm_reference


def saved_bytes(step):
    "Bytes of distinct storages autograd saves for backward during `step`'s forward"
    seen = {}
    def pack(t):
        if t.numel(): seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(seen.values())


def make_steps(shape, std_param='log'):
    C = shape[1]
    x = torch.randn(*shape).mul_(2).add_(1).requires_grad_()
    g = torch.randn(*shape)
    bn, bln = nn.BatchNorm2d(C), BatchlessNorm2d(C, std_param=std_param)
    ref = BatchlessNorm2d(C, std_param=std_param)

    def bn_step(backward=True):
        out = bn(x)
        if backward: out.backward(g)
        return out

    def bln_step(backward=True):
        out = bln(x)
        if backward: torch.autograd.backward([out, bln.nll], [g, torch.ones(())])
        return out

    def ref_step(backward=True):
        out, nll = batchless_norm_reference(x, ref.mean, ref.std_parameter, ref.weight, ref.bias, std_param)
        if backward: torch.autograd.backward([out, nll], [g, torch.ones(())])
        return out

    return {'BN': bn_step, 'BlN': bln_step, 'reference': ref_step}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', type=int, nargs=4, default=[64, 64, 32, 32])
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--std-param', default='log', choices=['log', 'abs', 'inv'])
    a = p.parse_args()
    torch.manual_seed(0)
    steps = make_steps(a.shape, a.std_param)
    times = {k: [] for k in steps}
    for f in steps.values(): f(); f()  # warm up
    for _ in range(a.repeats):
        for k, f in steps.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: saved_bytes(f) for k, f in steps.items()}
    print(f"input {tuple(a.shape)} fp32 on CPU, std_param={a.std_param!r}, {a.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for k in steps:
        print(f"{k:>10}: {med[k] * 1e3:8.2f} ms/step  {mem[k] / 2**20:8.3f} MiB saved for backward")
    for k in ('BlN', 'reference'):
        print(f"ratio {k}/BN: time {med[k] / med['BN']:.3f}  saved bytes {mem[k] / mem['BN']:.4f}")


if __name__ == '__main__':
    main()
