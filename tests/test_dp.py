"DP-SGD with Opacus: per-sample gradients of every BlN parameter equal one backward per sample; DP-SGD trains the statistics."
import copy, gc, json, pickle, subprocess, sys, warnings, weakref
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip('opacus', reason="DP-SGD needs Opacus: pip install batchless_nb[dp]")
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import GradSampleHooks, GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
from batchless_nb.dp import nll_grad_samples  # importing it registers the grad samplers
from batchless_nb.norm import BatchlessNorm, BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, batchless_loss, batchless_param_groups, STD_PARAMS

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.filterwarnings('ignore:Full backward hook is firing'),  # torch, for a BlN on the raw input
              pytest.mark.filterwarnings('ignore:There is a performance drop')]  # functorch's batching fallback

F64 = torch.float64
# name -> (input shape, BlN class and kwargs, the layer between the two BlN layers)
LAYOUTS = {
    'bln1d_nc': ((6, 3), lambda c, **kw: BatchlessNorm1d(c, **kw), lambda c: nn.Linear(c, c)),
    'bln1d_ncl': ((6, 3, 5), lambda c, **kw: BatchlessNorm1d(c, **kw), lambda c: nn.Conv1d(c, c, 3, padding=1)),
    'bln2d': ((6, 3, 4, 5), lambda c, **kw: BatchlessNorm2d(c, **kw), lambda c: nn.Conv2d(c, c, 3, padding=1)),
    'bln3d': ((6, 3, 2, 3, 2), lambda c, **kw: BatchlessNorm3d(c, **kw), lambda c: nn.Conv3d(c, c, 1)),
    'channels_last': ((6, 5, 3), lambda c, **kw: BatchlessNorm(c, channel_dim=-1, **kw), lambda c: nn.Linear(c, c)),
}


def model(layout='bln2d', std_param='log', affine=True, nll_reduction='mean', seed=0):
    "BlN on the raw input (its NLL's gradient comes after its grad sampler, or alone without affine), a layer, BlN, head"
    torch.manual_seed(seed)
    shape, bln, mid = LAYOUTS[layout]
    c, kw = 3, dict(std_param=std_param, affine=affine, nll_reduction=nll_reduction)
    n_out = torch.Size(shape[1:]).numel()
    net = nn.Sequential(bln(c, **kw), mid(c), nn.LeakyReLU(0.3), bln(c, **kw), nn.Flatten(), nn.Linear(n_out, 4)).to(F64)
    with torch.no_grad():
        for m in (net[0], net[3]):
            m.set_stats(torch.randn(c, dtype=F64), torch.rand(c, dtype=F64) + 0.5)
            if affine: m.weight.normal_(); m.bias.normal_()
    x = torch.randn(*shape, dtype=F64) * 1.5 + 0.7
    return net, x, torch.randint(0, 4, (shape[0],))


def task_loss(out, y, reduction='mean'): return F.cross_entropy(out, y, reduction=reduction)


def loop_grads(net, x, y, nll_weight=1.0):
    "Per-sample gradients by one backward per sample on a copy of `net`"
    net, rows = copy.deepcopy(net), []
    for i in range(len(x)):
        net.zero_grad()
        (task_loss(net(x[i:i + 1]), y[i:i + 1]) + nll_weight * batchless_loss(net)).backward()
        rows.append({k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad})
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def opacus_grads(net, x, y, mode='hooks', nll_weight=1.0, loss_reduction='mean'):
    "Opacus's per-sample gradients (hooks, functorch, or hooks without wrapping the model)"
    if mode == 'no_wrap': wrapped = GradSampleHooks(net, loss_reduction=loss_reduction)
    else: wrapped = GradSampleModule(net, force_functorch=mode == 'functorch', loss_reduction=loss_reduction)
    run = net if mode == 'no_wrap' else wrapped
    (task_loss(run(x), y, loss_reduction) + nll_weight * batchless_loss(run)).backward()
    out = {k: p.grad_sample.clone() for k, p in net.named_parameters() if p.requires_grad}
    wrapped.remove_hooks()
    return out


def assert_exact(got, want):
    assert got.keys() == want.keys()
    for k in want: torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize('mode', ['hooks', 'functorch'])
@pytest.mark.parametrize('std_param', list(STD_PARAMS))
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('nll_reduction', ['mean', 'channel_sum'])
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_per_sample_gradients_equal_a_loop(layout, nll_reduction, affine, std_param, mode):
    net, x, y = model(layout, std_param, affine, nll_reduction)
    want = loop_grads(net, x, y)
    assert want['0.mean'].abs().max() > 0 and want['3.mean'].abs().max() > 0  # the NLL's part is there to check
    assert_exact(opacus_grads(net, x, y, mode), want)


def test_hooks_on_the_model_itself():
    "make_private(wrap_model=False): Opacus's hooks without a wrapper module"
    net, x, y = model()
    assert_exact(opacus_grads(net, x, y, 'no_wrap'), loop_grads(net, x, y))


@pytest.mark.parametrize('loss_reduction', ['mean', 'sum'])
@pytest.mark.parametrize('nll_weight', [0.0, 0.5, 3.0])
def test_per_sample_gradients_decompose_the_loss_as_written(nll_weight, loss_reduction):
    "Any weight of the NLL: the per-sample gradients average (mean) or sum (sum) to autograd's gradient of the batch"
    net, x, y = model('bln2d', 'abs')
    ref = copy.deepcopy(net)
    (task_loss(ref(x), y, loss_reduction) + nll_weight * batchless_loss(ref)).backward()
    got = opacus_grads(net, x, y, nll_weight=nll_weight, loss_reduction=loss_reduction)
    for k, p in ref.named_parameters():
        reduced = got[k].mean(0) if loss_reduction == 'mean' else got[k].sum(0)
        torch.testing.assert_close(reduced, p.grad, rtol=1e-12, atol=1e-12, msg=k)


def test_sum_reduction_with_the_nll_times_the_batch_size_equals_a_loop():
    net, x, y = model('bln1d_ncl', 'inv')
    assert_exact(opacus_grads(net, x, y, nll_weight=len(x), loss_reduction='sum'), loop_grads(net, x, y))


@pytest.mark.parametrize('nll_first', [False, True])
def test_task_and_nll_in_separate_backwards(nll_first):
    net, x, y = model()
    want = loop_grads(net, x, y)
    gsm = GradSampleModule(net)
    out = gsm(x)
    losses = [task_loss(out, y), batchless_loss(gsm)]
    for loss in (losses[::-1] if nll_first else losses): loss.backward(retain_graph=True)
    assert_exact({k: p.grad_sample for k, p in net.named_parameters()}, want)


def test_gradient_accumulation_keeps_one_exact_entry_per_backward():
    net, x, y = model('channels_last', 'abs', nll_reduction='channel_sum')
    want = [loop_grads(net, x[:3], y[:3]), loop_grads(net, x[3:], y[3:])]
    gsm = GradSampleModule(net)
    for sl in (slice(0, 3), slice(3, None)): (task_loss(gsm(x[sl]), y[sl]) + batchless_loss(gsm)).backward()
    for j in range(2): assert_exact({k: p.grad_sample[j] for k, p in net.named_parameters()}, want[j])


def test_frozen_statistics_get_no_per_sample_gradient():
    net, x, y = model()
    net[3].mean.requires_grad_(False); net[0].log_std.requires_grad_(False)
    got = opacus_grads(net, x, y)
    assert '3.mean' not in got and '0.log_std' not in got and getattr(net[3].mean, 'grad_sample', None) is None
    assert_exact(got, loop_grads(net, x, y))


def test_unregistered_subclass_goes_through_functorch_and_stays_exact():
    class MyNorm(BatchlessNorm2d): pass
    net, x, y = model()
    net[3] = MyNorm(3, std_param='log').to(F64)
    with torch.no_grad(): net[3].set_stats(torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5)
    assert_exact(opacus_grads(net, x, y), loop_grads(net, x, y))


def test_batch_second():
    "batch_first=False: (T, N, C) sequences with BatchlessNorm(channel_dim=-1)"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), BatchlessNorm(3, channel_dim=-1, std_param='inv')).to(F64)
    with torch.no_grad(): net[1].set_stats(torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5)
    x = torch.randn(5, 4, 3, dtype=F64)
    loss = lambda out, m: out.square().sum((0, 2)).mean() + batchless_loss(m)
    ref, rows = copy.deepcopy(net), []
    for i in range(x.shape[1]):
        ref.zero_grad(); loss(ref(x[:, i:i + 1]), ref).backward()
        rows.append({k: p.grad.clone() for k, p in ref.named_parameters()})
    gsm = GradSampleModule(net, batch_first=False)
    loss(gsm(x), gsm).backward()
    assert_exact({k: p.grad_sample for k, p in net.named_parameters()},
                 {k: torch.stack([r[k] for r in rows]) for k in rows[0]})


def test_nll_grad_samples_in_float32_with_float64_statistics():
    "bf16/fp32 activations: the statistics' precision, like the layer"
    layer = BatchlessNorm2d(3, dtype=F64)
    x = torch.randn(4, 3, 2, 2)
    g32 = nll_grad_samples(layer, x)
    g64 = nll_grad_samples(layer, x.double())
    assert g32[0].dtype == F64
    torch.testing.assert_close(g32, g64, rtol=0, atol=0)


def test_a_privately_trained_model_is_garbage_collected():
    "The record of a forward, which the NLL's hook holds, holds the layer and Opacus's hooks weakly"
    net, x, y = model()
    wrapped = GradSampleModule(net)
    (task_loss(wrapped(x), y) + batchless_loss(wrapped)).backward()
    wrapped.remove_hooks()
    ref = weakref.ref(net)
    del net, wrapped
    gc.collect()
    assert ref() is None


@pytest.mark.filterwarnings('ignore::batchless_nb.norm.UnusedNLLWarning')
def test_misuse_raises():
    net, x, y = model()
    gsm = GradSampleModule(net)
    gsm(x)
    with pytest.raises(RuntimeError, match="previous one has not been through a backward yet"): gsm(x)
    assert net[3]._dp_record is not None  # pending: copies and pickles of the layer leave it behind
    assert copy.deepcopy(net[3])._dp_record is None and pickle.loads(pickle.dumps(net[3]))._dp_record is None
    gsm.remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ghost = GradSampleModuleFastGradientClipping(model()[0], max_grad_norm=1.0)
    with pytest.raises(NotImplementedError, match="grad_sample_mode 'ghost'"): ghost(x)
    ghost.remove_hooks()
    ew = GradSampleModuleExpandedWeights(model()[0])
    with pytest.raises(RuntimeError, match="Expanded Weights"): ew(x)
    with pytest.raises(ValueError, match="where Opacus expects the batch"):
        GradSampleModule(nn.Sequential(nn.Linear(3, 3), BatchlessNorm(4, channel_dim=0)))(torch.randn(4, 3))


def test_ghost_clipping_with_frozen_statistics():
    "Ghost clipping is refused only where it would leave the statistics untrained"
    net, x, y = model()
    for m in (net[0], net[3]): m.mean.requires_grad_(False); m.log_std.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ghost = GradSampleModuleFastGradientClipping(net, max_grad_norm=1.0)
    task_loss(ghost(x), y).backward()
    assert net[3].weight._norm_sample.shape == (len(x),) and (net[3].weight._norm_sample > 0).all()


def _dp_train(mode='hooks', with_nll=True, steps=80, stats_lr=0.3):
    "DP-SGD on inputs with known channel statistics; each BlN's distance to its input's true (mean, log std), before and after"
    torch.manual_seed(0)
    mean, std = torch.tensor([3., -2.]), torch.tensor([2., .5])
    data = torch.randn(512, 2, 6, 6) * std.view(1, 2, 1, 1) + mean.view(1, 2, 1, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.randint(0, 3, (512,))), batch_size=64)
    net = nn.Sequential(BatchlessNorm2d(2, nll_reduction='channel_sum'), nn.Conv2d(2, 4, 3), nn.LeakyReLU(0.3),
                        BatchlessNorm2d(4, nll_reduction='channel_sum'), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    true = lambda: [(mean, std), tuple(torch.std_mean(net[2](net[1](net[0](data))).detach(), (0, 2, 3))[::-1])]
    def dist(stats):
        d = [(m.mean - tm).norm() + (m.learned_stats()[1].log() - ts.log()).norm() for m, (tm, ts) in zip((net[0], net[3]), stats)]
        return torch.stack(d).detach()
    before = [(net[0].mean.detach().clone(), net[0].learned_stats()[1]), (net[3].mean.detach().clone(), net[3].learned_stats()[1])]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        gsm, opt, loader = PrivacyEngine().make_private(module=net, optimizer=torch.optim.SGD(batchless_param_groups(net, stats_lr=stats_lr), lr=0.5),
                                                        data_loader=loader, noise_multiplier=0.5, max_grad_norm=2.0,
                                                        grad_sample_mode=mode)
        step = 0
        while step < steps:
            for xb, yb in loader:
                opt.zero_grad()
                loss = task_loss(gsm(xb), yb)
                (loss + batchless_loss(gsm) if with_nll else loss).backward()
                opt.step(); step += 1
                if step == steps: break
    with torch.no_grad():
        stats = true()
        start = torch.stack([(bm - tm).norm() + (bs.log() - ts.log()).norm() for (bm, bs), (tm, ts) in zip(before, stats)])
        return start, dist(stats)


@pytest.mark.filterwarnings('ignore::batchless_nb.norm.UnusedNLLWarning')  # the run without the NLL, on purpose
@pytest.mark.parametrize('mode', ['hooks', 'functorch'])
def test_make_private_trains_the_statistics(mode):
    start, end = _dp_train(mode)
    assert (end < 0.2 * start).all(), (start, end)
    start, end_without = _dp_train(mode, with_nll=False)  # what plain Opacus did: zero per-sample gradients, noise only
    assert (end_without > 0.8 * start).all(), (start, end_without)


_PLAIN_OPACUS = r'''
import json, sys, torch, torch.nn as nn, warnings
warnings.simplefilter('ignore')
out = {}
sys.modules['opacus'] = None  # as if not installed
try: import batchless_nb.dp
except ImportError as e: out['import_error'] = str(e)
del sys.modules['opacus']
from opacus import GradSampleModule
from batchless_nb.norm import BatchlessNorm2d, batchless_loss
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(2, 3, 3), BatchlessNorm2d(3), nn.Flatten(), nn.Linear(27, 2))
gsm = GradSampleModule(net)
(gsm(torch.randn(4, 2, 5, 5) + 2).square().mean() + batchless_loss(gsm)).backward()
out['plain_mean_grad_sample'] = net[1].mean.grad_sample.abs().max().item()
out['true_mean_grad'] = net[1].mean.grad.abs().max().item()
import batchless_nb.dp  # too late for this wrapped model
try: (gsm(torch.randn(4, 2, 5, 5)).square().mean() + batchless_loss(gsm)).backward()
except RuntimeError as e: out['late_import_error'] = str(e)
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def plain_opacus():
    r = subprocess.run([sys.executable, '-c', _PLAIN_OPACUS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_without_this_module_opacus_gives_the_statistics_zero_per_sample_gradients(plain_opacus):
    assert plain_opacus['plain_mean_grad_sample'] == 0 and plain_opacus['true_mean_grad'] > 0


def test_import_without_opacus_says_how_to_install(plain_opacus):
    assert 'pip install batchless_nb[dp]' in plain_opacus['import_error']


def test_import_after_wrapping_raises(plain_opacus):
    assert 'Import batchless_nb.dp before wrapping the model' in plain_opacus['late_import_error']
