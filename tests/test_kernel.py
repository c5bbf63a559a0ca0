"""The opt-in C++ kernel (`use_cpp_kernel`): the same outputs, NLL and gradients as torch's path and the plain
reference for every option, float32 precision far from zero, whole training steps, where it steps aside, its errors,
and the aten ops a layer step dispatches with it. The first test builds the kernel (about a minute, then cached)."""
import math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import batchless_nb.kernel as kernel
from batchless_nb.kernel import use_cpp_kernel, cpp_kernel_enabled
from batchless_nb.norm import *
from batchless_nb.models import paper_cnn
from test_fused import OpCounter, _step_ops, pinned  # the op counter and pin of the other op-count tests
from test_norm import collected_after_training

STD = list(STD_PARAMS)
pytestmark = [pytest.mark.filterwarnings('ignore::batchless_nb.norm.UnusedNLLWarning'), pytest.mark.usefixtures('one_thread')]


def _grads(f, x, params, g, **kw):
    out, nll = f(x, *params, **kw)
    leaves = [t for t in [x, *params] if t is not None]
    return (out, nll, *torch.autograd.grad((out * g).sum() + 0.7 * nll, leaves))


def _inputs(shape, channel_dim, affine, std_param, dtype=torch.float64):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=dtype) * 2 + 1).requires_grad_()
    C = shape[channel_dim]
    p = param_from_std(torch.rand(C, dtype=dtype) + 0.5, std_param)
    wb = [torch.randn(C, dtype=dtype) for _ in range(2)] if affine else [None, None]
    params = [t if t is None else t.requires_grad_() for t in (torch.randn(C, dtype=dtype), p, *wb)]
    return x, params, torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize('std_param', STD)
@pytest.mark.parametrize('gauge', [True, False])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('reduction', NLL_REDUCTIONS)
@pytest.mark.parametrize('shape', [(3, 4, 5, 2), (6, 4), (2, 4, 7)])
def test_matches_torch_path_and_reference_float64(kernel_calls, std_param, gauge, affine, reduction, shape):
    x, params, g = _inputs(shape, 1, affine, std_param)
    kw = dict(std_param=std_param, gauge=gauge, nll_reduction=reduction)
    want = _grads(batchless_norm, x, params, g, **kw)
    ref = _grads(batchless_norm_reference, x, params, g, **kw)
    with use_cpp_kernel():
        got = _grads(batchless_norm, x, params, g, **kw)
    assert len(kernel_calls) == 1
    for a, b, r in zip(got, want, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('std_param', STD)
@pytest.mark.parametrize('offset,scale', [(1e4, 1e-2), (1e4, 1e-3), (-300., 1e-3), (0., 1.)])
def test_float32_far_from_zero_matches_float64_on_the_same_values(kernel_calls, std_param, offset, scale):
    torch.manual_seed(0)
    x = (torch.randn(16, 4, 8, 8) * scale + offset).requires_grad_()
    mean, std = torch.full((4,), offset + 0.3 * scale), torch.tensor([0.5, 1., 2., 4.]) * scale
    params32 = [t.clone().requires_grad_() for t in (mean, param_from_std(std, std_param), torch.rand(4) + 0.5, torch.randn(4))]
    params64 = [t.detach().double().requires_grad_() for t in params32]
    g = torch.randn_like(x)
    with use_cpp_kernel(): got = _grads(batchless_norm, x, params32, g, std_param=std_param)
    want = _grads(batchless_norm_reference, x.detach().double().requires_grad_(), params64, g.double(), std_param=std_param)
    assert len(kernel_calls) == 1
    assert (got[0].double() - want[0]).abs().max() <= 1e-5 * max(1, want[0].abs().max())
    for name, a, b in zip(['nll', 'x', 'mean', 'std param', 'weight', 'bias'], got[1:], want[1:]):
        err = ((a.double() - b) / b.abs().clamp_min(1e-30)).abs().max().item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize('std_param', STD)
@pytest.mark.parametrize('affine', [True, False])
def test_gradcheck_float64(kernel_calls, std_param, affine):
    "First-order gradients against finite differences: the output's for x, gamma, beta; the NLL's for mu and sigma"
    x, (mean, p, w, b), _ = _inputs((3, 4, 2, 3), 1, affine, std_param)
    kw = dict(std_param=std_param, gauge=False)  # the gauge subtracts sg(log sigma), which a finite difference sees
    out_fn = lambda x, *wb: batchless_norm(x, mean.detach(), p.detach(), *(wb or (None, None)), **kw)[0]
    nll_fn = lambda m, s: batchless_norm(x.detach(), m, s, w, b, **kw)[1]
    with use_cpp_kernel():
        assert torch.autograd.gradcheck(out_fn, (x, w, b) if affine else (x,))
        assert torch.autograd.gradcheck(nll_fn, (mean, p))
    assert kernel_calls


def test_training_steps_of_the_paper_cnn_match_torch_path(kernel_calls):
    "Three Adam steps of the paper CNN in float64 (dropout off): the same parameters with the kernel as without"
    def train(cpp):
        torch.manual_seed(0)
        model = paper_cnn('bln-log', dropout=0.0).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
        with use_cpp_kernel(cpp):
            for _ in range(3):
                opt.zero_grad()
                (F.cross_entropy(model(x), y) + batchless_loss(model)).backward()
                opt.step()
        return model.state_dict()
    want, got = train(False), train(True)
    assert len(kernel_calls) == 3 * 5  # every step, every one of the 5 layers
    for k in want: torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_separate_backwards_and_in_place_change_between_them_keep_the_forwards_gradients(kernel_calls):
    def grads(step_between):
        torch.manual_seed(0)
        layer = BatchlessNorm2d(3)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        with use_cpp_kernel(): out = layer(x)
        layer.nll.backward()
        if step_between:
            with torch.no_grad(): layer.weight.mul_(2); layer.mean.add_(1)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        return x.grad, layer.weight.grad, layer.bias.grad, layer.mean.grad
    torch.testing.assert_close(grads(True), grads(False), rtol=0, atol=0)
    assert len(kernel_calls) == 2


def test_non_finite_activations_raise_or_give_nan(kernel_calls):
    layer = BatchlessNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 0] = float('inf')
    before = [p.clone() for p in layer.parameters()]
    with use_cpp_kernel():
        with pytest.raises(NonFiniteActivationError, match='1 of 3 channels'): layer(x)
        layer.check_finite = False
        layer(x)
    assert math.isnan(layer.nll.item())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_double_backward_raises_naming_the_switch(kernel_calls):
    layer = BatchlessNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with use_cpp_kernel(): out = layer(x)
    with pytest.raises(RuntimeError, match=r'first-order gradients only.*use_cpp_kernel\(False\)'):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_ops_pass_torch_library_opcheck():
    "The kernel's forwards are torch.library ops whose schemas tell the truth (nothing mutated) and whose autograd is registered"
    kernel.build_cpp_kernel()  # registers the ops
    x, (mu, p, w, b), _ = _inputs((2, 3, 4, 4), 1, True, 'log')
    args = (x, mu, p, w, b, 0, 1e-5, True, True, True)  # 'log', eps, gauge, 'mean' reduction, check_finite
    checks = ('test_schema', 'test_autograd_registration')  # no fake kernels: under torch.compile the layer runs torch's ops
    torch.library.opcheck(torch.ops.batchless_nb.normalize.default, args, test_utils=checks)
    out, chan = torch.ops.batchless_nb.normalize(*args)
    torch.library.opcheck(torch.ops.batchless_nb.gaussian_nll.default, (mu, p, chan), test_utils=checks)
    nll = torch.ops.batchless_nb.gaussian_nll(mu, p, chan)
    ref_out, ref_nll = batchless_norm(x, mu, p, w, b)
    torch.testing.assert_close((out, nll), (ref_out, ref_nll))


def test_ops_called_directly_refuse_tensors_of_another_dtype():
    "The ops are public (torch.ops.batchless_nb): one called with mismatched dtypes or shapes raises instead of misreading memory"
    kernel.build_cpp_kernel()
    x, (mu, p, w, b), _ = _inputs((2, 3, 4, 4), 1, True, 'log')
    with pytest.raises(RuntimeError, match="tensors of the input's dtype Double on the CPU.*got Float on cpu"):
        torch.ops.batchless_nb.normalize(x, mu.float(), p, w, b, 0, 1e-5, True, True, True)
    out, chan = torch.ops.batchless_nb.normalize(x, mu, p, w, b, 0, 1e-5, True, True, True)
    with pytest.raises(RuntimeError, match=r"gradient of the input's shape .* and dtype Double \(got .*Float\)"):
        torch.ops.batchless_nb.normalize_backward(out.float(), x, chan, True, True)
    with pytest.raises(RuntimeError, match=r"the \(8, 3\) rows of its forward in Double \(got \[8, 3\] in Float\)"):
        torch.ops.batchless_nb.gaussian_nll(mu, p, chan.float())
    with pytest.raises(RuntimeError, match="one gradient of the rows' dtype Double"):
        torch.ops.batchless_nb.gaussian_nll_backward(torch.ones((), dtype=torch.float32), chan)


@pytest.mark.parametrize('use_nll', [True, False])
def test_a_layer_trained_by_the_kernel_is_garbage_collected(kernel_calls, use_nll):
    with use_cpp_kernel(): assert collected_after_training(lambda: BatchlessNorm2d(3), use_nll)
    assert len(kernel_calls) == 1


def test_wrong_parameter_size_raises():
    with use_cpp_kernel(), pytest.raises(RuntimeError, match='per-channel tensors of 3 values.*got 4'):
        batchless_norm(torch.randn(2, 3, 4), torch.zeros(4), torch.zeros(4))


def test_steps_aside_where_it_cannot_run(kernel_calls):
    "Eval mode, channels-last memory, another channel dim, bf16 autocast, torch.func and forward-mode AD run torch's path"
    layer = BatchlessNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    with use_cpp_kernel():
        layer.eval(); layer(x); layer.train()
        layer(x.to(memory_format=torch.channels_last))
        batchless_norm(torch.randn(3, 5, 4), torch.zeros(4), torch.zeros(4), channel_dim=-1)
        with torch.autocast('cpu', dtype=torch.bfloat16): layer(x.bfloat16())
        params = dict(layer.named_parameters())
        torch.func.vmap(lambda xi: torch.func.functional_call(layer, params, (xi[None],)))(x)
        with torch.autograd.forward_ad.dual_level():
            layer(torch.autograd.forward_ad.make_dual(x, torch.randn_like(x)))
        assert len(kernel_calls) == 0
        layer(x)
    assert len(kernel_calls) == 1


def test_switch_is_a_call_and_a_block_and_a_failed_build_changes_nothing(monkeypatch):
    assert not cpp_kernel_enabled()
    use_cpp_kernel()
    try:
        assert cpp_kernel_enabled()
        with use_cpp_kernel(False): assert not cpp_kernel_enabled()
        assert cpp_kernel_enabled()
    finally: use_cpp_kernel(False)
    assert not cpp_kernel_enabled()
    import torch.utils.cpp_extension as ext
    def fail(*a, **k): raise RuntimeError('Ninja is required to load C++ extensions')
    monkeypatch.setattr(ext, 'load_inline', fail)
    monkeypatch.setitem(kernel._STATE, 'module', None)
    with pytest.raises(RuntimeError, match=r'needs a C\+\+ compiler and ninja.*Ninja is required'): use_cpp_kernel()
    assert not cpp_kernel_enabled()


@pinned
def test_aten_ops_of_one_layer_step():
    """One BatchlessNorm2d step (forward, NLL, backward of both) with the kernel: its 4 ops and 5 add_ into the gradients, as
    nn.BatchNorm2d has its 2 (forward, backward) and 3 add_; each op allocates what it returns inside, as torch's do"""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    def ops(layer, nll):
        g, one = torch.ones(2, 8, 4, 4), torch.ones(())
        for count in (False, True):  # the first call warms up
            with OpCounter() as c:
                out = layer(x)
                torch.autograd.backward([out, layer.nll] if nll else [out], [g, one] if nll else [g])
        return c.ops
    with use_cpp_kernel(): bln = ops(BatchlessNorm2d(8), True)
    bn = ops(nn.BatchNorm2d(8), False)
    assert bln == {'batchless_nb.normalize.default': 1, 'batchless_nb.gaussian_nll.default': 1,
                   'batchless_nb.normalize_backward.default': 1, 'batchless_nb.gaussian_nll_backward.default': 1,
                   'aten.add_.Tensor': 5}, bln  # add_ into x, mu, sigma, gamma, beta's .grad
    assert sum(bn.values()) == 7, bn


@pinned
def test_aten_ops_per_paper_cnn_step():
    """The paper CNN's Adam step with the kernel (test_fused.py counts the others: BN 332, and 187 with foreach). The rest of
    the gap to batch norm is BlN's 2 extra parameter tensors per layer (Adam's work on them, or the natural update's 5 foreach
    ops; autograd's detach of each new gradient), the NLL's own node each way, and the NLL terms' sum"""
    with use_cpp_kernel(): counts = [_step_ops('bln-log', foreach=f, natural=n) for n in (False, True) for f in (None, True)]
    # Adam on the statistics, then the natural update (train's default with dropout); before the kernel's calls were ops
    # of their own (the allocations in them counted one by one), before the natural update's 5 foreach ops and the NLL
    # terms' sum by add: 459, 244, 380, 235
    assert counts == [435, 220, 354, 209], counts
