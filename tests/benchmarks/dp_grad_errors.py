"""Largest error of Opacus's per-sample gradients of a BlN model against one backward per sample (float64).

For each Opacus mode (hooks, functorch) and std parametrization: the max over the 20 models of tests/test_dp.py
(5 layouts x affine on/off x nll_reduction 'mean'/'channel_sum'; each with a BlN on the raw input and one after a
layer) and over every parameter of max |opacus - loop| (abs) and max |opacus - loop| / max |loop| per parameter (rel).
Needs Opacus. Run: python tests/benchmarks/dp_grad_errors.py
"""
import itertools, os, sys, warnings
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from test_dp import LAYOUTS, model, loop_grads, opacus_grads
from batchless_nb.norm import STD_PARAMS

warnings.filterwarnings('ignore')
torch.set_num_threads(1)
print(f"{'mode':10} {'std_param':9} {'max abs':>9} {'max rel':>9}  models")
for mode, sp in itertools.product(('hooks', 'functorch'), STD_PARAMS):
    abs_err = rel_err = 0.0
    n = 0
    for layout, affine, red in itertools.product(LAYOUTS, (True, False), ('mean', 'channel_sum')):
        net, x, y = model(layout, sp, affine, red)
        want, got = loop_grads(net, x, y), opacus_grads(net, x, y, mode)
        for k in want:
            err = (got[k] - want[k]).abs().max().item()
            abs_err, rel_err = max(abs_err, err), max(rel_err, err / want[k].abs().max().clamp_min(1e-300).item())
        n += 1
    print(f"{mode:10} {sp:9} {abs_err:9.1e} {rel_err:9.1e}  {n}")
