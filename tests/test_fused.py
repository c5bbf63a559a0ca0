"""The fused training path of BatchlessNorm: precision far from zero, autograd (double backward, separate backward
calls), torch.func, autocast, memory formats, and the exact number of aten ops a training step dispatches."""
import sys, warnings
from pathlib import Path
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from batchless_nb.norm import *
sys.path.insert(0, str(Path(__file__).parent/'benchmarks'))
from bench_step import OpCounter, make_step  # the benchmark's op counter and step: these tests pin what it reports

STD = list(STD_PARAMS)
pytestmark = [pytest.mark.filterwarnings('ignore::batchless_nb.norm.UnusedNLLWarning'), pytest.mark.usefixtures('one_thread')]


def _grads(f, x, params, g, **kw):
    out, nll = f(x, *params, **kw)
    leaves = [t for t in [x, *params] if t is not None]
    return (out, nll, *torch.autograd.grad((out * g).sum() + nll, leaves))


@pytest.mark.parametrize('std_param', STD)
@pytest.mark.parametrize('offset,scale', [(1e4, 1e-2), (1e4, 1e-3), (1e3, 1e-3), (-300., 1e-3), (0., 1.)])
@pytest.mark.parametrize('mean_at', ['data', 'zero'])
def test_float32_far_from_zero_matches_float64_on_the_same_values(std_param, offset, scale, mean_at):
    "Output, NLL and every gradient in float32 vs float64 on the same float32 inputs and parameters"
    torch.manual_seed(0)
    x = (torch.randn(16, 4, 8, 8) * scale + offset).requires_grad_()
    mean = torch.full((4,), offset + 0.3 * scale) if mean_at == 'data' else torch.zeros(4)
    std = torch.tensor([0.5, 1., 2., 4.]) * scale  # not the data's spread: the std gradient stays away from 0
    p = param_from_std(std, std_param)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    params32 = [t.clone().requires_grad_() for t in (mean, p, w, b)]
    params64 = [t.double().requires_grad_() for t in (mean, p, w, b)]
    g = torch.randn_like(x)
    got = _grads(batchless_norm, x, params32, g, std_param=std_param)
    want = _grads(batchless_norm_reference, x.detach().double().requires_grad_(), params64, g.double(), std_param=std_param)
    out, nll, gx, gmean, gp, gw, gb = got
    # the output in units of its own spread; the NLL and its gradients relative to their size
    assert (out.double() - want[0]).abs().max() <= 1e-5 * max(1, want[0].abs().max())
    for name, a, b_ in [('nll', nll, want[1]), ('x', gx, want[2]), ('mean', gmean, want[3]), ('std param', gp, want[4]),
                        ('weight', gw, want[5]), ('bias', gb, want[6])]:
        err = ((a.double() - b_).abs() / b_.abs().clamp_min(1e-30)).max().item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize('std_param', STD)
@pytest.mark.parametrize('affine,channel_dim', [(True, 1), (False, 1), (True, -1)])
def test_gradcheck_and_gradgradcheck_float64(std_param, affine, channel_dim):
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 2, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    C = x.shape[channel_dim]
    mean = torch.randn(C, dtype=torch.float64).requires_grad_()
    p = param_from_std(torch.rand(C, dtype=torch.float64) + 0.5, std_param).requires_grad_()
    w, b = [torch.randn(C, dtype=torch.float64, requires_grad=True) for _ in range(2)] if affine else (None, None)
    kw = dict(std_param=std_param, channel_dim=channel_dim)
    # the output trains x, gamma, beta and the NLL trains mu, sigma (sg() keeps the rest apart); gauge=False
    # because gauging subtracts sg(log sigma), which a finite difference sees and the gradient by design does not
    out_fn = lambda x, *wb: batchless_norm(x, mean.detach(), p.detach(), *(wb or (None, None)), **kw)[0]
    nll_fn = lambda m, s: batchless_norm(x.detach(), m, s, w, b, gauge=False, **kw)[1]
    both_fn = lambda x, m, s: sum(t.sum() for t in batchless_norm(x, m, s, w, b, gauge=False, **kw))
    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(out_fn, inputs)
    assert torch.autograd.gradgradcheck(out_fn, inputs)
    assert torch.autograd.gradcheck(nll_fn, (mean, p))
    assert torch.autograd.gradgradcheck(nll_fn, (mean, p))
    # mixed second derivatives d^2/dx dmu: zero by sg(), as the reference says
    def hvp(f, *a):
        gx = torch.autograd.grad(f(*a), a, create_graph=True)[0]  # d/dx: zero derivatives when gx is a constant
        return torch.autograd.grad(gx.sum(), a, allow_unused=True) if gx.requires_grad else (None,) * len(a)
    got = hvp(both_fn, x, mean, p)
    ref = lambda x, m, s: sum(t.sum() for t in batchless_norm_reference(x, m, s, w, b, gauge=False, **kw))
    want = hvp(ref, x, mean, p)
    for a, b_, t in zip(got, want, (x, mean, p)):
        zero = torch.zeros_like(t)
        torch.testing.assert_close(zero if a is None else a, zero if b_ is None else b_, rtol=1e-9, atol=1e-12)


def _layer_and_grads(order):
    "Gradients of (out * g).sum() + nll through a fresh layer, in one backward or two in `order`"
    torch.manual_seed(0)
    layer = BatchlessNorm2d(3)
    with torch.no_grad(): layer.set_stats(torch.randn(3), torch.rand(3) + 0.5); layer.weight.normal_()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    out = layer(x)
    losses = {'out': (out * g).sum(), 'nll': layer.nll}
    if order == 'both': (losses['out'] + losses['nll']).backward()
    else:
        for k in order: losses[k].backward()
    return [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize('order', [('out', 'nll'), ('nll', 'out')])
def test_separate_backward_calls_equal_one(order):
    "The output and the NLL may be backpropagated in two calls, either first, as two separate losses"
    for a, b in zip(_layer_and_grads(order), _layer_and_grads('both')):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_output_only():
    layer = BatchlessNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    layer(x); layer.nll.backward()  # the NLL alone: mu, sigma only
    assert x.grad is None and layer.weight.grad is None and layer.mean.grad.abs().sum() > 0
    layer.zero_grad()
    layer(x).sum().backward()  # the output alone: x, gamma, beta only
    assert layer.mean.grad is None and layer.log_std.grad is None and x.grad.abs().sum() > 0


def test_in_place_change_between_separate_backwards_keeps_the_forwards_gradients():
    "An optimizer step between the NLL's and the output's backward: the output's gradients are those of the forward that ran"
    def grads(step_between):
        torch.manual_seed(0)
        layer = BatchlessNorm2d(3)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        out = layer(x)
        layer.nll.backward()
        if step_between:
            with torch.no_grad(): layer.weight.mul_(2)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        return x.grad, layer.weight.grad, layer.bias.grad
    torch.testing.assert_close(grads(True), grads(False), rtol=0, atol=0)


def test_retain_graph_backward_twice():
    layer = BatchlessNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    loss = layer(x).square().sum() + layer.nll
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in layer.parameters()]
    loss.backward()
    for p, g in zip(layer.parameters(), first): torch.testing.assert_close(p.grad, 2 * g)


def test_saves_one_tensor_of_x_size_as_batchnorm():
    "What autograd keeps for backward: one tensor of x's size (d = x - sg(mu) in place of x) and (C,) tensors, as batch norm"
    def saved_sizes(layer):
        x = torch.randn(4, 8, 6, 6, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t): layer(x)
        return sorted(t.numel() for t in saved if t.numel() > 8)
    assert saved_sizes(BatchlessNorm2d(8)) == saved_sizes(nn.BatchNorm2d(8)) == [4 * 8 * 6 * 6]


@pytest.mark.parametrize('std_param', STD)
def test_vmap_per_sample_gradients_without_fallback_warnings(std_param):
    "torch.func per-sample gradients batch the node without falling back to a loop (no performance warning)"
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), BatchlessNorm2d(4, std_param=std_param), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3)).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    loss = lambda p, xi, yi: F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None]) + batchless_loss(net)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        net.zero_grad()
        (F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]) + batchless_loss(net)).backward()
        for k, p in net.named_parameters(): torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('std_param', STD)
def test_forward_mode_ad_matches_reference(std_param):
    "torch.func.jvp and torch.autograd.forward_ad run the plain form; tangents equal the reference's"
    from torch.func import jvp
    import torch.autograd.forward_ad as fwad
    torch.manual_seed(0)
    x, tx = torch.randn(3, 4, 5, dtype=torch.float64) * 2 + 1, torch.randn(3, 4, 5, dtype=torch.float64)
    params = [torch.randn(4, dtype=torch.float64), param_from_std(torch.rand(4, dtype=torch.float64) + .5, std_param),
              torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    tangents = [torch.randn(4, dtype=torch.float64) for _ in params]
    f = lambda fn: (lambda x, *ps: fn(x, *ps, std_param=std_param))
    want = jvp(f(batchless_norm_reference), (x, *params), (tx, *tangents))
    torch.testing.assert_close(jvp(f(batchless_norm), (x, *params), (tx, *tangents)), want, rtol=1e-10, atol=1e-12)
    with fwad.dual_level():
        duals = [fwad.make_dual(p, t) for p, t in zip((x, *params), (tx, *tangents))]
        got = [fwad.unpack_dual(o).tangent for o in f(batchless_norm)(*duals)]
    torch.testing.assert_close(tuple(got), want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_memory_formats_match_reference(memory_format):
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 5, 5) * 3 + 2).contiguous(memory_format=memory_format).requires_grad_()
    params = [torch.randn(6), torch.randn(6) * 0.3, torch.rand(6) + 0.5, torch.randn(6)]
    g = torch.randn(4, 6, 5, 5)
    got = _grads(batchless_norm, x, [t.clone().requires_grad_() for t in params], g)
    want = _grads(batchless_norm_reference, x, [t.clone().requires_grad_() for t in params], g)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got[0].is_contiguous(memory_format=memory_format)


def test_autocast_bf16_output_in_input_dtype_stats_fp32():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), BatchlessNorm2d(4))
    x = torch.randn(2, 3, 6, 6) * 3 + 1
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x)
        assert out.dtype == torch.bfloat16 and net[1].nll.dtype == torch.float32
    (out.float().sum() + net[1].nll).backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in net.parameters())


def test_eval_is_one_affine_map_in_place_of_the_input():
    "Inference computes (x - mu) * s + beta too, without the NLL, and the same values as training"
    layer = BatchlessNorm2d(3)
    with torch.no_grad(): layer.set_stats(torch.tensor([1e4, -5., 0.]), torch.tensor([1e-3, 2., 1.]))
    x = torch.randn(2, 3, 4, 4) * torch.tensor([1e-3, 2., 1.]).view(3, 1, 1) + torch.tensor([1e4, -5., 0.]).view(3, 1, 1)
    with torch.no_grad(): eval_out = layer.eval()(x)
    train_out = layer.train()(x)
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)
    want = (x.double() - layer.mean.double().view(3, 1, 1)) * torch.exp(-layer.log_std.double()).view(3, 1, 1)
    torch.testing.assert_close(eval_out.double(), want, rtol=0, atol=1e-5)


# ---- aten ops per training step: exact counts (torch 2.13, the version the Makefile installs) ----

def _step_ops(norm, batch=2, foreach=None, natural=False):
    """Aten ops of one paper-CNN training step as bench_step.py times and counts it (after a first step, which creates
    Adam's state); `natural`: BlN's statistics by `NaturalGradientSGD` (train's default with dropout)"""
    step = make_step(norm, batch, torch.device('cpu'), foreach, natural=natural)
    step()
    with OpCounter() as c: step()
    return sum(c.ops.values())


pinned = pytest.mark.skipif(not torch.__version__.startswith('2.13.'), reason="op counts are pinned for torch 2.13")


@pinned
def test_aten_ops_of_one_layer_step():
    "One BatchlessNorm2d step (forward, NLL, backward of both) dispatches 26 aten ops, nn.BatchNorm2d 4"
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    def ops(layer, nll):
        out = layer(x)  # warm: the constants BlN caches exist
        torch.autograd.backward([out, layer.nll] if nll else [out], [torch.ones_like(out)] + ([torch.ones(())] if nll else []))
        g, one = torch.ones_like(out), torch.ones(())
        with OpCounter() as c:
            out = layer(x)
            torch.autograd.backward([out, layer.nll] if nll else [out], [g, one] if nll else [g])
        return c.ops
    bln, bn = ops(BatchlessNorm2d(8), True), ops(nn.BatchNorm2d(8), False)
    assert sum(bln.values()) == 31, bln  # 26 + 5 add_ into the gradients of x, mu, sigma, gamma, beta
    assert sum(bn.values()) == 7, bn  # 4 + 3 add_ into the gradients of x, gamma, beta


@pinned
def test_aten_ops_per_paper_cnn_step():
    "Exact counts of the paper CNN's Adam step (batch 2, dropout 0.25): they may only go down"
    counts = {n: _step_ops(n) for n in ('none', 'gn', 'bn', 'bln-log')}
    assert counts == {'none': 212, 'gn': 342, 'bn': 332, 'bln-log': 543}, counts  # bln-log before issue 13: 654
    # Adam(foreach=True), CUDA's default, dispatches per list of tensors, not per tensor as on CPU: what is left is the layers'
    foreach = {n: _step_ops(n, foreach=True) for n in ('bn', 'bln-log')}
    assert foreach == {'bn': 187, 'bln-log': 328}, foreach  # before issue 13: 439
    # the natural update (train's default for BlN with dropout): the statistics leave Adam, one foreach step moves them all
    assert (_step_ops('bln-log', natural=True), _step_ops('bln-log', foreach=True, natural=True)) == (462, 317)  # per-layer steps: 521, 376


@pinned
@pytest.mark.xfail(strict=True, reason="issue 13's goal, not reached: BlN dispatches 26 ops per layer step where batch "
                   "norm has one fused kernel each way, and Adam runs per parameter tensor (BlN has 2 more per layer); "
                   "with the C++ kernel 435 against 332 (test_kernel.py), the rest being Adam's; with the natural update "
                   "(the statistics outside Adam, train's default with dropout) 462, and 354 with the kernel: autograd "
                   "detaches each of the 10 new gradients, the NLL has a node of its own each way (so that it and the "
                   "output may be backpropagated apart), the natural update is an optimizer of its own (5 foreach ops "
                   "and the profiler's 4)")
def test_paper_cnn_step_with_bln_dispatches_no_more_ops_than_with_batchnorm():
    assert _step_ops('bln-log') <= _step_ops('bn')
