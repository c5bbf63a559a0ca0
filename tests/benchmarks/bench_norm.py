"""One normalization layer, one training step (forward + NLL + backward): BlN vs BatchNorm, GroupNorm and identity.

For each input shape, every variant runs interleaved in one process (one step each per round); the figures are
medians over the rounds and ratios to nn.BatchNorm2d, so load on the machine affects all variants alike. Also
printed: the bytes autograd saves for backward (distinct storages packed by saved_tensors_hooks during the
forward) and the aten ops of one step (dispatched below autograd, see bench_step.count_ops). Variants:
identity (x * 1, the floor of a layer call), GN (nn.GroupNorm(32, C)), BN (nn.BatchNorm2d), BlN
(BatchlessNorm2d), reference (batchless_norm_reference, the elementwise definition), and with --baseline PATH
the BlN layer of another checkout's batchless_nb/norm.py, and with --cpp-kernel BlN with the opt-in C++ kernel
(BlN+cpp, `batchless_nb.kernel.use_cpp_kernel`).

--compile compiles every variant with torch.compile. On a machine with CUDA the GPU figures follow the CPU ones
(--device to choose one). --clock cpu times this process's CPU time (steadier on a shared machine).
Run: OMP_NUM_THREADS=1 python tests/benchmarks/bench_norm.py [--shape 64 64 32 32] [--shape 1 64 32 32] [--repeats 30]
"""
import argparse, os, sys, warnings
import torch, torch.nn as nn
sys.path.insert(0, os.path.dirname(__file__))
from bench_step import OpCounter, load_baseline, with_cpp_kernel
from timing import medians
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


def make_steps(shape, device, std_param='log', compile=False, baseline=None, cpp_kernel=False):
    C = shape[1]
    x = torch.randn(*shape, device=device).mul_(2).add_(1).requires_grad_()
    g = torch.randn(*shape, device=device)
    one = torch.ones((), device=device)
    layers = {'identity': None, 'GN': nn.GroupNorm(min(32, C), C), 'BN': nn.BatchNorm2d(C),
              'BlN': BatchlessNorm2d(C, std_param=std_param), 'reference': BatchlessNorm2d(C, std_param=std_param)}
    if baseline is not None: layers['BlN@baseline'] = baseline.BatchlessNorm2d(C, std_param=std_param)
    if cpp_kernel: layers['BlN+cpp'] = BatchlessNorm2d(C, std_param=std_param)
    steps = {}
    for k, layer in layers.items():
        if layer is not None: layer.to(device)
        if k == 'identity': f = lambda x: x * 1
        elif k == 'reference': f = (lambda l: lambda x: batchless_norm_reference(x, l.mean, l.std_parameter, l.weight,
                                                                                    l.bias, std_param))(layer)
        else: f = layer
        if compile: f = torch.compile(f)
        bln = k.startswith('BlN')

        def step(backward=True, f=f, layer=layer, bln=bln, ref=k == 'reference'):
            out = f(x)
            outs = list(out) if ref else [out] + ([layer.nll] if bln else [])
            if backward: torch.autograd.backward(outs, [g, one][:len(outs)])
            return outs[0]
        steps[k] = with_cpp_kernel(step) if k == 'BlN+cpp' else step
    return steps


def run(a, device):
    base = load_baseline(a.baseline) if a.baseline else None
    print(f"\n== device {device}, std_param={a.std_param!r}, {a.repeats} interleaved rounds, {a.clock} clock, compile={a.compile}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for shape in a.shape:
        torch.manual_seed(0)
        steps = make_steps(shape, device, a.std_param, a.compile, base, a.cpp_kernel and device.type == 'cpu')
        med = medians(steps, a.repeats, device, a.clock, warmup=3)
        mem = {k: saved_bytes(f) for k, f in steps.items()}
        ops = {}
        if not a.compile:
            for k, f in steps.items():
                with OpCounter() as c: f()
                ops[k] = sum(c.ops.values())
        print(f"input {tuple(shape)}:")
        print(f"  {'variant':14s} {'us/step':>10s} {'/BN':>7s} {'/GN':>7s} {'saved MiB':>10s} {'/BN':>7s}" + (f" {'ops':>5s}" if ops else ''))
        for k in steps:
            row = (f"  {k:14s} {med[k] * 1e6:10.1f} {med[k] / med['BN']:7.3f} {med[k] / med['GN']:7.3f} "
                   f"{mem[k] / 2**20:10.3f} {mem[k] / max(mem['BN'], 1):7.3f}")
            print(row + (f" {ops[k]:5d}" if ops else ''))


def main():
    warnings.filterwarnings('ignore', message='BatchlessNorm computed an NLL term')  # saved_bytes runs a forward alone
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', type=int, nargs=4, action='append', help='input shape N C H W (repeat for several)')
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--std-param', default='log', choices=['log', 'abs', 'inv'])
    p.add_argument('--compile', action='store_true', help='torch.compile every variant')
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall', help="wall time, or this process's CPU time")
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    p.add_argument('--device', choices=['cpu', 'cuda'], help='default: cpu, and cuda too when available')
    p.add_argument('--baseline', help="another checkout's batchless_nb/norm.py, timed as an extra variant")
    p.add_argument('--cpp-kernel', action='store_true', help='also BlN with the C++ kernel (CPU; built on first use)')
    a = p.parse_args()
    a.shape = a.shape or [[64, 64, 32, 32]]
    torch.set_num_threads(a.threads)
    for d in ([a.device] if a.device else ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])):
        run(a, torch.device(d))


if __name__ == '__main__':
    main()
