"""The paper's CNN, one Adam training step: BlN vs GroupNorm vs BatchNorm vs no normalization, at small batches.

A plain PyTorch step (zero_grad, cross_entropy + batchless_loss, backward, Adam.step) on 32x32x3 inputs, every
variant built with `paper_cnn(norm=...)` from the same seed. The variants run interleaved in one process, one
step each per round; the figures are medians over the rounds and their ratios, so load on the machine affects
all variants alike. BatchNorm is skipped at batch 1 (its dense layers need two values per channel).

Also printed: aten ops per step, counted two ways (see count_ops): the ops that reach the kernels (a
TorchDispatchMode below autograd: every op the layers, autograd and Adam run, nothing nested) and every
aten:: event of torch's profiler (nested calls and allocations included).

--compile compiles each model with torch.compile (default inductor) before timing. On a machine with CUDA the
figures are printed for the GPU too (--device cpu or cuda to choose one). --baseline PATH adds the BlN layer of
another checkout (its batchless_nb/norm.py) as a variant, to compare implementations side by side. --cpp-kernel adds
BlN with the opt-in C++ kernel (`batchless_nb.kernel.use_cpp_kernel`, built on first use) as a variant. BlN runs with
the paper's update (Adam trains the statistics) and, as `bln-log/natural`, with the natural update (eta 0.01, the
statistics outside Adam), which `batchless-nb train` uses for models with dropout such as this one.

Run: OMP_NUM_THREADS=1 python tests/benchmarks/bench_step.py [--batch 1 8] [--repeats 50] [--compile] [--foreach] [--cpp-kernel]
"""
import argparse, collections, importlib.util, os, sys
import torch, torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from batchless_nb.core import set_seed
from batchless_nb.models import paper_cnn
from batchless_nb.norm import BatchlessNorm, batchless_loss, stat_parameters
from batchless_nb.natural import NaturalGradientSGD
from batchless_nb.kernel import use_cpp_kernel
sys.path.insert(0, os.path.dirname(__file__))
from timing import medians  # tests/benchmarks/timing.py, beside this script


class OpCounter(TorchDispatchMode):
    "Counts the aten ops that reach the kernels while active (below autograd; composite ops counted as what they run)"
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step) -> tuple[int, int]:
    "(dispatched aten ops, profiler aten:: events) of one call of `step`"
    from torch.profiler import profile, ProfilerActivity
    with OpCounter() as c: step()
    with profile(activities=[ProfilerActivity.CPU]) as prof: step()
    return sum(c.ops.values()), sum(e.name.startswith('aten::') for e in prof.events())


def load_baseline(path):
    "The norm module of another checkout, imported under its own name (its relative imports read this checkout's package)"
    spec = importlib.util.spec_from_file_location('batchless_nb._baseline_norm', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def swap_norms(model, mod):
    "Replace every BatchlessNorm of `model` by `mod`'s class of the same name, with the same state"
    for name, m in list(model.named_modules()):
        if isinstance(m, BatchlessNorm):
            new = getattr(mod, type(m).__name__)(m.num_features, std_param=m.std_param)
            new.load_state_dict(m.state_dict())
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def make_step(norm, batch, device, foreach=None, compile=False, dropout=0.25, baseline=None, dropout_mode='per_sample',
              natural=False):
    "One training step; `natural`: BlN's statistics by `NaturalGradientSGD` (eta 0.01), outside Adam, as `train` does with dropout"
    set_seed(0)
    model = paper_cnn(norm, dropout=dropout, dropout_mode=dropout_mode)
    loss_fn = batchless_loss
    if baseline is not None: model, loss_fn = swap_norms(model, baseline), baseline.batchless_loss
    model = model.to(device)
    stats = {id(p) for p in stat_parameters(model)} if natural else set()
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in stats], lr=1e-3, foreach=foreach)
    opts = [opt, NaturalGradientSGD(model, 0.01)] if natural else [opt]
    if compile: model = torch.compile(model)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step():
        for o in opts: o.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + loss_fn(model)
        loss.backward()
        for o in opts: o.step()
    return step


def with_cpp_kernel(step):
    "`step` with the C++ kernel on, and off again after it (the other variants run torch's path)"
    def run(*args, **kwargs):
        with use_cpp_kernel(): return step(*args, **kwargs)
    return run


def run(a, device):
    base = load_baseline(a.baseline) if a.baseline else None
    print(f"\n== device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, Adam foreach={a.foreach}, "
          f"dropout {a.dropout} ({a.dropout_mode}), compile={a.compile}, {a.repeats} interleaved rounds, {a.clock} clock")
    for batch in a.batch:
        norms = [n for n in a.norms if not (n == 'bn' and batch < 2)]
        mk = lambda n, **kw: make_step(n, batch, device, a.foreach, a.compile, a.dropout, dropout_mode=a.dropout_mode, **kw)
        steps = {n: mk(n) for n in norms}
        if base is not None: steps['bln-log@baseline'] = mk('bln-log', baseline=base)
        if 'bln-log' in norms: steps['bln-log/natural'] = mk('bln-log', natural=True)
        if a.cpp_kernel and device.type == 'cpu':
            steps['bln-log+cpp'] = with_cpp_kernel(mk('bln-log'))
            if 'bln-log' in norms: steps['bln-log/natural+cpp'] = with_cpp_kernel(mk('bln-log', natural=True))
        med = medians(steps, a.repeats, device, a.clock, warmup=3)
        ops = {} if a.compile else {k: count_ops(s) for k, s in steps.items()}
        print(f"batch {batch}:")
        print(f"  {'norm':20s} {'ms/step':>9s} {'/none':>7s} {'/gn':>7s}" + (f" {'/bn':>7s}" if 'bn' in med else '')
              + ("" if a.compile else f" {'ops':>6s} {'prof ev':>8s}"))
        for k, t in med.items():
            row = f"  {k:20s} {t * 1e3:9.3f} {t / med['none']:7.3f} {t / med['gn']:7.3f}"
            if 'bn' in med: row += f" {t / med['bn']:7.3f}"
            if ops: row += f" {ops[k][0]:6d} {ops[k][1]:8d}"
            print(row)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--norms', nargs='+', default=['none', 'gn', 'bn', 'bln-log'])
    p.add_argument('--repeats', type=int, default=50, help='interleaved rounds (one step of each variant per round)')
    p.add_argument('--dropout', type=float, default=0.25, help="the paper's dropout after every norm")
    p.add_argument('--dropout-mode', choices=['per_sample', 'torch'], default='per_sample',
                   help="the models' per-sample dropout (a graph break per layer under --compile) or nn.Dropout")
    p.add_argument('--foreach', action='store_true', help="Adam(foreach=True) (CUDA's default; CPU's is per tensor)")
    p.add_argument('--compile', action='store_true', help='torch.compile each model')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    p.add_argument('--clock', choices=['wall', 'cpu'], default='wall',
                   help="CPU timings: wall time, or this process's CPU time (steadier on a shared machine)")
    p.add_argument('--device', choices=['cpu', 'cuda'], help='default: cpu, and cuda too when available')
    p.add_argument('--baseline', help="another checkout's batchless_nb/norm.py, timed as an extra variant")
    p.add_argument('--cpp-kernel', action='store_true', help='also BlN with the C++ kernel (CPU; built on first use)')
    a = p.parse_args()
    a.foreach = True if a.foreach else None
    torch.set_num_threads(a.threads)
    devices = [a.device] if a.device else ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    for d in devices: run(a, torch.device(d))


if __name__ == '__main__':
    main()
