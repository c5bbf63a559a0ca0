"Heavier checks of the BatchlessNorm layer against independent references."
import copy, gc, itertools, warnings, weakref
import pytest, torch, torch.nn as nn
from hypothesis import given, settings, strategies as st
from batchless_nb.norm import *
from batchless_nb.convert import convert_batchnorm, to_batchnorm, fold_into

STD = list(STD_PARAMS)
# layers here are often run without using their NLL; test_unused_nll_warns checks the warning itself
pytestmark = pytest.mark.filterwarnings('ignore::batchless_nb.norm.UnusedNLLWarning')
dev_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(C, dtype, std_param, affine=True):
    mean = torch.randn(C, dtype=dtype)
    std = torch.rand(C, dtype=dtype) + 0.5
    p = {'log': std.log(), 'abs': std, 'inv': 1 / std}[std_param]
    ps = [mean, p] + ([torch.rand(C, dtype=dtype) + 0.5, torch.randn(C, dtype=dtype)] if affine else [None, None])
    return [t.requires_grad_() if t is not None else None for t in ps]


def _both(x, params, **kw):
    "Outputs, NLLs and all gradients of the fast path and of the reference"
    g = torch.randn_like(x)
    res = []
    for f in (batchless_norm, batchless_norm_reference):
        out, nll = f(x, *params, **kw)
        leaves = [t for t in [x, *params] if t is not None]
        grads = torch.autograd.grad((out * g).sum() + 3 * nll, leaves)
        res.append((out, nll, grads))
    return res


@pytest.mark.parametrize('std_param,dtype,gauge,affine,reduction,channel_dim', [
    (s, d, g, a, r, c) for s, d, g, a, r, c in itertools.product(
        STD, [torch.float32, torch.float64], [True, False], [True, False], NLL_REDUCTIONS, [1, -1])])
def test_fast_path_matches_reference(std_param, dtype, gauge, affine, reduction, channel_dim):
    x = (torch.randn(6, 5, 4, 3, dtype=dtype) * 2 + 3).requires_grad_()
    C = x.shape[channel_dim]
    params = _params(C, dtype, std_param, affine)
    (o1, n1, g1), (o2, n2, g2) = _both(x, params, std_param=std_param, gauge=gauge, channel_dim=channel_dim,
                                       nll_reduction=reduction)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((o1, n1, g1), (o2, n2, g2), **tol)


@pytest.mark.parametrize('std_param', STD)
def test_gradcheck_float64(std_param):
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    mean, std, w, b = _params(2, torch.float64, std_param)
    # the output path trains x, gamma, beta; the NLL trains mu, sigma: check each where sg() is not in the way
    out_fn = lambda x, w, b: batchless_norm(x, mean.detach(), std.detach(), w, b, std_param=std_param)[0]
    # gauging subtracts sg(log sigma): a finite difference sees it, the gradient by design does not
    nll_fn = lambda m, s: batchless_norm(x.detach(), m, s, std_param=std_param, gauge=False)[1]
    assert torch.autograd.gradcheck(out_fn, (x, w, b))
    assert torch.autograd.gradcheck(nll_fn, (mean, std))
    assert torch.autograd.gradgradcheck(nll_fn, (mean, std))


def test_stop_gradients():
    "The task loss does not train mu/sigma; the NLL does not train x or gamma/beta"
    layer = BatchlessNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.mean.grad is None or layer.mean.grad.abs().max() == 0
    assert layer.log_std.grad is None or layer.log_std.grad.abs().max() == 0
    x.grad = None; layer.zero_grad()
    layer(x); layer.nll.backward()
    assert x.grad is None and layer.weight.grad is None
    assert layer.mean.grad.abs().max() > 0


def test_micro_batches_give_batch_gradients():
    "k micro-batches with accumulation == one batch of k, float64, to 1e-9 relative"
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.3), BatchlessNorm2d(4, std_param='inv'),
                        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), BatchlessNorm1d(6), nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 2, 5, 5, dtype=torch.float64) * 3 + 1, torch.randint(0, 3, (8,))
    def grads(chunks):
        net.zero_grad()
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            w = len(xc) / len(x)
            (w * (nn.functional.cross_entropy(net(xc), yc) + batchless_loss(net))).backward()
        return [p.grad.clone() for p in net.parameters()]
    full = grads(1)
    for k in (2, 8):
        for a, b in zip(grads(k), full):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_batch_size_one_trains():
    "With one instance per step, mu and sigma still converge to the data's statistics"
    torch.manual_seed(0)
    layer = BatchlessNorm1d(3)
    true_mean, true_std = torch.tensor([2., -1., 0.5]), torch.tensor([0.5, 3., 1.])
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    for _ in range(3000):
        x = torch.randn(1, 3) * true_std + true_mean
        layer(x); opt.zero_grad(); batchless_loss(layer).backward(); opt.step()
    mean, std = layer.learned_stats()
    torch.testing.assert_close(mean, true_mean, atol=0.25 * true_std.max().item(), rtol=0)
    torch.testing.assert_close(std, true_std, rtol=0.2, atol=0)


@pytest.mark.parametrize('std_param', STD)
def test_train_and_eval_give_the_same_output(std_param):
    layer = BatchlessNorm3d(3, std_param=std_param)
    with torch.no_grad(): layer.set_stats(torch.randn(3), torch.rand(3) + 0.5); layer.weight.normal_()
    x = torch.randn(2, 3, 2, 3, 4)
    torch.testing.assert_close(layer.train()(x), layer.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize('std_param', STD)
def test_state_dict_round_trip(std_param):
    a = BatchlessNorm2d(5, std_param=std_param)
    with torch.no_grad():
        for p in a.parameters(): p.normal_()
    b = BatchlessNorm2d(5, std_param=std_param)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert list(a.state_dict()) == ['mean', STD_PARAMS[std_param], 'weight', 'bias']


@pytest.mark.parametrize('bn_cls,shape', [(nn.BatchNorm1d, (4, 6)), (nn.BatchNorm1d, (4, 6, 5)),
                                          (nn.BatchNorm2d, (4, 6, 3, 3)), (nn.BatchNorm3d, (4, 6, 2, 3, 3))])
@pytest.mark.parametrize('std_param', STD)
def test_convert_batchnorm_matches_eval(bn_cls, shape, std_param):
    bn = bn_cls(6)
    bn.train()
    for _ in range(5): bn(torch.randn(*shape) * 3 + 2)
    with torch.no_grad(): bn.weight.normal_(); bn.bias.normal_()
    bn.eval()
    bln = convert_batchnorm(copy.deepcopy(bn), std_param=std_param)
    x = torch.randn(*shape) * 3 + 2
    torch.testing.assert_close(bln(x), bn(x), rtol=1e-5, atol=1e-5)


def test_convert_sync_batchnorm():
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.SyncBatchNorm(4))
    with torch.no_grad(): net[1].running_mean.normal_(); net[1].running_var.uniform_(0.5, 2)
    converted = convert_batchnorm(copy.deepcopy(net))
    assert type(converted[1]) is BatchlessNorm and converted[1].channel_dim == 1
    x = torch.randn(3, 2, 4, 4)
    bn = net[1]
    want = (net[0](x) - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var + bn.eps).sqrt().view(1, -1, 1, 1)
    torch.testing.assert_close(converted(x), want * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('std_param', STD)
@pytest.mark.parametrize('conv,norm,shape', [(nn.Conv1d(3, 4, 3), BatchlessNorm1d, (2, 3, 7)),
                                              (nn.Conv2d(3, 4, 3, groups=1), BatchlessNorm2d, (2, 3, 7, 7)),
                                              (nn.Conv3d(3, 4, 3), BatchlessNorm3d, (2, 3, 5, 5, 5)),
                                              (nn.Linear(3, 4), BatchlessNorm1d, (2, 3))])
def test_fold_into_matches(conv, norm, shape, std_param):
    bln = norm(4, std_param=std_param)
    with torch.no_grad():
        bln.set_stats(torch.randn(4), torch.rand(4) + 0.3); bln.weight.normal_(); bln.bias.normal_()
    x = torch.randn(*shape)
    torch.testing.assert_close(fold_into(conv, bln)(x), bln(conv(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(to_batchnorm(bln)(conv(x)), bln(conv(x)), rtol=1e-5, atol=1e-5)


def test_bad_input_errors():
    layer = BatchlessNorm2d(4)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 2D input\)"): layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"expected 4 channels at dim 1 \(got 5"): layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"expected a floating-point input \(got torch.int32\)"):
        layer(torch.ones(2, 4, 3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"std_param must be one of"): BatchlessNorm1d(3, std_param='softplus')
    with pytest.raises(ValueError, match=r"nll_reduction must be one of"): BatchlessNorm1d(3, nll_reduction='sum')
    with pytest.raises(ValueError, match=r"num_features must be a positive"): BatchlessNorm1d(0)
    with pytest.raises(ValueError, match=r"init_std must be positive"): BatchlessNorm1d(3, init_std=0)
    with pytest.raises(ValueError, match=r"channels at dim 3 \(got 3D input\)"): BatchlessNorm(4, channel_dim=3)(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"expected a BatchlessNorm1d/2d/3d"): to_batchnorm(BatchlessNorm(3, channel_dim=-1))


def test_non_finite_input():
    layer = BatchlessNorm1d(3)
    x = torch.randn(4, 3); x[1, 2] = float('inf')
    with pytest.raises(ValueError, match=r"got NaN or inf in 1 of 3 channels"): layer(x)
    layer.check_finite = False
    layer(x)
    assert torch.isnan(layer.nll)
    layer.eval(); layer(x)  # inference never checks: only training updates the statistics


def test_unused_nll_warns():
    layer = BatchlessNorm1d(3)
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for _ in range(3): (layer(x).sum() + batchless_loss(layer)).backward()
        for _ in range(3): layer(x).sum().backward(); layer.nll.backward()  # used directly: fine too
        with torch.no_grad(): layer(x); layer(x)  # no gradient: nothing could have been trained
    with pytest.warns(UnusedNLLWarning, match=r"batchless_loss\(model\)"):
        layer(x).sum().backward(); layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer = BatchlessNorm1d(3).eval()
        layer(x).sum().backward(); layer(x)  # eval computes no NLL: nothing to forget


def collected_after_training(make_layer, use_nll:bool) -> bool:
    "Whether a layer that ran a training forward (and a backward of its NLL, or not) is garbage collected once dropped"
    layer = make_layer()
    out = layer(torch.randn(4, 3, 2, 2))
    if use_nll: (out.sum() + batchless_loss(layer)).backward()
    ref = weakref.ref(layer)
    del layer, out
    gc.collect()
    return ref() is None


@pytest.mark.parametrize('use_nll', [True, False])
def test_a_trained_layer_is_garbage_collected(use_nll):
    "The unused-NLL check's hook holds the layer weakly: the layer holds its NLL, the NLL's node the hook"
    assert collected_after_training(lambda: BatchlessNorm2d(3), use_nll)


def test_autocast_bf16_keeps_stats_in_fp32():
    net = nn.Sequential(nn.Linear(8, 6), BatchlessNorm1d(6))
    x = torch.randn(16, 8) * 4 + 2
    ref = net(x); ref_nll = net[1].nll
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(x)
        nll = batchless_loss(net)
    assert net[0](x).dtype == torch.float32 and nll.dtype == torch.float32
    assert net[1].mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(nll, ref_nll, rtol=0.02, atol=0.02)
    (out.float().sum() + nll).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(2, 4, 3), BatchlessNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    compiled = torch.compile(copy.deepcopy(net))
    x = torch.randn(5, 2, 5, 5)
    for m in (net, compiled):
        loss = m(x).square().mean() + batchless_loss(m)
        loss.backward()
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    for (n, a), b in zip(net.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)


@dev_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu():
    layer = BatchlessNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    out = layer(x); nll = layer.nll
    gpu = copy.deepcopy(layer).cuda()
    torch.testing.assert_close(gpu(x.cuda()).cpu(), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.nll.cpu(), nll, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), channels=st.integers(1, 5), spatial=st.lists(st.integers(1, 4), max_size=2),
       std_param=st.sampled_from(STD), gauge=st.booleans(), affine=st.booleans(),
       channels_last=st.booleans(), reduction=st.sampled_from(NLL_REDUCTIONS),
       scale=st.floats(0.01, 100), offset=st.floats(-1000, 1000))
def test_property_fast_equals_reference(batch, channels, spatial, std_param, gauge, affine, channels_last,
                                        reduction, scale, offset):
    shape = [batch] + ([*spatial, channels] if channels_last else [channels, *spatial])
    x = (torch.randn(*shape, dtype=torch.float64) * scale + offset).requires_grad_()
    params = _params(channels, torch.float64, std_param, affine)
    with torch.no_grad(): params[0].add_(offset)
    (o1, n1, g1), (o2, n2, g2) = _both(x, params, std_param=std_param, gauge=gauge,
                                       channel_dim=-1 if channels_last else 1, nll_reduction=reduction)
    torch.testing.assert_close((o1, n1, g1), (o2, n2, g2), rtol=1e-8, atol=1e-8)
    assert o1.shape == x.shape and n1.dim() == 0


def test_empty_training_batch_raises_a_clear_error():
    layer = BatchlessNorm2d(4)
    with pytest.raises(ValueError, match=r"expected at least one value per channel in training \(got an empty batch of "
                                         r"shape \(0, 4, 3, 3\)\)"):
        layer(torch.randn(0, 4, 3, 3))
    with pytest.raises(ValueError, match=r"empty batch of shape \(0, 5\)"): BatchlessNorm1d(5)(torch.randn(0, 5))
    assert layer.eval()(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)  # inference maps nothing to nothing


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16, torch.float16])
def test_dtype_mismatch_outside_autocast_raises_a_clear_error(dtype):
    layer = BatchlessNorm2d(4)
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    with pytest.raises(ValueError, match=rf"expected a torch.float32 input, the dtype of the layer's parameters \(got {dtype}\); "
                                         rf"convert the input with .to\(torch.float32\) or the model with .to\({dtype}\)"):
        layer(x)
    assert layer.to(dtype)(x).dtype == dtype  # a layer of the input's dtype is fine


def test_lower_precision_input_under_autocast_is_accepted():
    layer = BatchlessNorm2d(4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(torch.randn(2, 4, 3, 3).bfloat16())
    assert out.dtype == torch.bfloat16 and layer.nll.dtype == torch.float32
