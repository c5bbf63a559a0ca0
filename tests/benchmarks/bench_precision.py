"""Precision of BatchlessNorm in float32 far from zero: errors against float64 on the same float32 values.

Activations x = offset + scale * z (z standard normal, 16x4x8x8, float32); the learned mean sits at the data
(offset + 0.3 scale), the learned std at 2 x scale, so the NLL gradients are of order one. The reference is
batchless_norm_reference in float64 on x, mu, sigma, gamma, beta cast from their float32 values, so the table
shows what the float32 computation loses, not what float32 storage loses. Columns: the output's max error in
units of its standard deviation, and the max relative errors of the NLL and of its gradients for the mean and
log sigma. --baseline PATH adds the rows of another checkout's batchless_nb/norm.py, --cpp-kernel those of the opt-in
C++ kernel (`batchless_nb.kernel.use_cpp_kernel`).

Run: python tests/benchmarks/bench_precision.py [--baseline PATH] [--cpp-kernel]
"""
import argparse, os, sys
import torch
sys.path.insert(0, os.path.dirname(__file__))
from bench_step import load_baseline
import batchless_nb.norm as norm
from batchless_nb.kernel import use_cpp_kernel


def errors(mod, offset, scale, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(16, 4, 8, 8) * scale + offset
    mean, log_std = torch.full((4,), offset + 0.3 * scale), torch.full((4,), 2 * scale).log()
    w, b = torch.ones(4), torch.zeros(4)
    res = []
    for f, dtype in ((mod.batchless_norm, torch.float32), (norm.batchless_norm_reference, torch.float64)):
        p = [t.to(dtype).requires_grad_() for t in (mean, log_std, w, b)]
        out, nll = f(x.to(dtype), *p)
        res.append((out.double(), nll.double(), *[g.double() for g in torch.autograd.grad(nll, p[:2])]))
    (o, n, gm, gs), (o64, n64, gm64, gs64) = res
    rel = lambda a, b: ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()
    return (o - o64).abs().max().item() / o64.std().item(), rel(n, n64), rel(gm, gm64), rel(gs, gs64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--baseline', help="another checkout's batchless_nb/norm.py, for a before/after table")
    p.add_argument('--cpp-kernel', action='store_true', help='also the rows of the C++ kernel (built on first use)')
    a = p.parse_args()
    mods = {'this': norm} | ({'baseline': load_baseline(a.baseline)} if a.baseline else {}) | ({'cpp': norm} if a.cpp_kernel else {})
    print(f"{'impl':9s} {'offset':>7s} {'scale':>6s} {'out (std units)':>16s} {'NLL rel':>9s} {'dNLL/dmean':>11s} {'dNLL/dlogstd':>13s}")
    for offset in (0., 1e2, 1e3, 1e4):
        for scale in (1., 1e-2, 1e-3):
            for name, mod in mods.items():
                with use_cpp_kernel(name == 'cpp'): e = errors(mod, offset, scale)
                print(f"{name:9s} {offset:7.0e} {scale:6.0e} {e[0]:16.1e} {e[1]:9.1e} {e[2]:11.1e} {e[3]:13.1e}")


if __name__ == '__main__':
    main()
