"""Online Normalization (Chiley et al. 2019) against a plain transcription of the paper's equations.

The transcription below processes one sample at a time, exactly as Eq. 8a-c (forward) and 11a-b, 12a-b (backward)
are written, in float64, sharing no code with batchless_nb.online. The compensated backward is not the gradient of the
forward, so gradcheck does not apply to it (it does to eval mode, a fixed affine map)."""
import copy, io, math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from batchless_nb.online import *

F64 = dict(rtol=1e-10, atol=1e-10)
SHAPES = [(5, 3), (5, 3, 4), (5, 3, 4, 3), (5, 3, 2, 3, 2)]
LAYERS = {2: OnlineNorm1d, 3: OnlineNorm1d, 4: OnlineNorm2d, 5: OnlineNorm3d}


# ------------------------------------------------------------------ the transcription
def _col(t, x_t):
    "(C,) -> (C, 1, ...) against one sample x_t of shape (C, *positions)"
    return t.reshape(-1, *[1] * (x_t.dim() - 1))

def _mean_over_positions(t):
    return t.reshape(t.shape[0], -1).mean(1)

def transcribe_forward(x, mu, var, alpha_f, eps=1e-5):
    "Eq. 8a-c sample by sample: outputs y, the sigma_{t-1} each sample used, and the final mu, sigma^2"
    ys, sigmas = [], []
    for x_t in x:
        m = _mean_over_positions(x_t)                             # mu(x_t)
        v = _mean_over_positions((x_t - _col(m, x_t)) ** 2)       # sigma^2(x_t), biased
        sigma = torch.sqrt(var + eps)
        ys.append((x_t - _col(mu, x_t)) / _col(sigma, x_t))       # (8a)
        sigmas.append(sigma)
        mu, var = (alpha_f * mu + (1 - alpha_f) * m,              # (8b)
                   alpha_f * var + (1 - alpha_f) * v + alpha_f * (1 - alpha_f) * (m - mu) ** 2)  # (8c), old mu
    return torch.stack(ys), sigmas, mu, var

def transcribe_backward(grad_y, y, sigmas, e1, ey, alpha_b):
    "Eq. 11a-b, 12a-b sample by sample: the compensated input gradients and the final eps^(1), eps^(y)"
    grads = []
    for g_t, y_t, sigma in zip(grad_y, y, sigmas):
        xt_ = g_t - (1 - alpha_b) * _col(ey, y_t) * y_t            # (11a)
        ey = ey + _mean_over_positions(xt_ * y_t)                  # (11b)
        x_ = xt_ / _col(sigma, y_t) - (1 - alpha_b) * _col(e1, y_t)  # (12a)
        e1 = e1 + _mean_over_positions(x_)                         # (12b)
        grads.append(x_)
    return torch.stack(grads), e1, ey

def transcribe_ecm(z, ecm, ls_eps=1e-5, clamp_value=5.0):
    if ecm == 'ls': return z / torch.sqrt((z ** 2).reshape(z.shape[0], -1).mean(1) + ls_eps).reshape(-1, *[1] * (z.dim() - 1))
    if ecm == 'ac': return torch.clamp(z, -clamp_value, clamp_value)
    return z

def fresh(C, dtype=torch.float64):
    return dict(mu=torch.zeros(C, dtype=dtype), var=torch.ones(C, dtype=dtype),
                e1=torch.zeros(C, dtype=dtype), ey=torch.zeros(C, dtype=dtype))

def _data(shape, scale=3.0, shift=2.0):
    return torch.randn(*shape, dtype=torch.float64) * scale + shift


# ------------------------------------------------------------------ the op against the transcription
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('alphas', [(0.999, 0.99), (0.7, 0.6)])
def test_functional_matches_transcription(shape, alphas):
    "Outputs, running statistics, compensated input gradients and accumulators over several steps, float64"
    af, ab = alphas
    C = shape[1]
    state, ref = [*fresh(C).values()], fresh(C)
    for n in (5, 1, 3):  # steps of different batch sizes: the state carries over
        x = _data((n, *shape[1:])).requires_grad_()
        g = torch.randn(n, *shape[1:], dtype=torch.float64)
        y = online_norm(x, *state, alpha_fwd=af, alpha_bkw=ab)
        y.backward(g)
        y_ref, sigmas, ref['mu'], ref['var'] = transcribe_forward(x.detach(), ref['mu'], ref['var'], af)
        grad_ref, ref['e1'], ref['ey'] = transcribe_backward(g, y_ref, sigmas, ref['e1'], ref['ey'], ab)
        torch.testing.assert_close(y.detach(), y_ref, **F64)
        torch.testing.assert_close(x.grad, grad_ref, **F64)
        torch.testing.assert_close(state, [ref['mu'], ref['var'], ref['e1'], ref['ey']], **F64)
    assert ref['e1'].abs().sum() > 0 and ref['ey'].abs().sum() > 0  # the accumulators took part


@pytest.mark.parametrize('ecm', ['ls', 'ac', None])
@pytest.mark.parametrize('shape', [(6, 4), (6, 4, 3, 3)])
def test_module_matches_transcription(ecm, shape):
    """The layer (normalize, gamma/beta, error checking) over training steps: outputs, input gradients,
    gamma/beta gradients and the state. Gamma/beta and the error checking are ordinary ops: their gradient is
    autograd's, chained into the transcribed compensated backward."""
    C = shape[1]
    layer = LAYERS[len(shape)](C, alpha_fwd=0.8, alpha_bkw=0.7, ecm=ecm, dtype=torch.float64)
    with torch.no_grad(): layer.weight.uniform_(0.5, 2.0); layer.bias.normal_()
    ref, clamped = fresh(C), False
    for step in range(3):
        x = _data(shape, scale=4.0).requires_grad_()  # large enough that clamping at 5 acts
        G = torch.randn(shape, dtype=torch.float64)
        layer.zero_grad()
        out = layer(x)
        (out * G).sum().backward()

        y_ref, sigmas, ref['mu'], ref['var'] = transcribe_forward(x.detach(), ref['mu'], ref['var'], 0.8)
        y_leaf = y_ref.clone().requires_grad_()
        w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
        bshape = [1, -1] + [1] * (len(shape) - 2)
        z = transcribe_ecm(y_leaf * w.view(bshape) + b.view(bshape), ecm)
        (z * G).sum().backward()
        grad_ref, ref['e1'], ref['ey'] = transcribe_backward(y_leaf.grad, y_ref, sigmas, ref['e1'], ref['ey'], 0.7)

        torch.testing.assert_close(out.detach(), z.detach(), **F64)
        torch.testing.assert_close(x.grad, grad_ref, **F64)
        torch.testing.assert_close((layer.weight.grad, layer.bias.grad), (w.grad, b.grad), **F64)
        torch.testing.assert_close([layer.running_mean, layer.running_var, layer.err_1, layer.err_y],
                                   [ref['mu'], ref['var'], ref['e1'], ref['ey']], **F64)
        clamped = clamped or bool((z.detach().abs() == 5).any())
        with torch.no_grad(): layer.weight.mul_(1.1); layer.bias.add_(0.1)  # as an optimizer step would
    assert layer.num_samples_tracked.item() == 3 * shape[0]
    assert clamped == (ecm == 'ac')  # the clamp was exercised


# ------------------------------------------------------------------ batch-size independence
def _run_chunks(layer, x, G, sizes):
    "Feed `x` in consecutive chunks of `sizes`, each with its own forward and backward"
    outs, grads, i = [], [], 0
    for n in sizes:
        xc = x[i:i + n].clone().requires_grad_()
        out = layer(xc)
        (out * G[i:i + n]).sum().backward()
        outs.append(out.detach()); grads.append(xc.grad); i += n
    return torch.cat(outs), torch.cat(grads)

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(8, 5), (8, 5, 7), (8, 5, 4, 4)])
def test_batch_of_B_equals_B_batches_of_1(dtype, shape):
    "Bitwise: outputs, input gradients and the state; gamma/beta gradients (summed in another order) to rounding"
    layer = LAYERS[len(shape)](shape[1], dtype=dtype)
    with torch.no_grad(): layer.weight.uniform_(0.5, 2.0); layer.bias.normal_()
    seq = copy.deepcopy(layer)
    x, G = torch.randn(shape, dtype=dtype) * 3 + 1, torch.randn(shape, dtype=dtype)
    for _ in range(2):  # a second step starts from a state the first one built
        layer.zero_grad(); seq.zero_grad()
        out_b, grad_b = _run_chunks(layer, x, G, [shape[0]])
        out_s, grad_s = _run_chunks(seq, x, G, [1] * shape[0])
        assert torch.equal(out_b, out_s) and torch.equal(grad_b, grad_s)
        for k, v in layer.state_dict().items():
            if k in ('weight', 'bias'): continue
            assert torch.equal(v, seq.state_dict()[k]), k
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((layer.weight.grad, layer.bias.grad), (seq.weight.grad, seq.bias.grad), **tol)

@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_any_split_of_the_stream_gives_the_same_result(sizes):
    "However a stream of samples is cut into batches, each sample's output and input gradient are the same"
    n = sum(sizes)
    torch.manual_seed(n)
    x, G = torch.randn(n, 3, 2, 2, dtype=torch.float64) * 2, torch.randn(n, 3, 2, 2, dtype=torch.float64)
    whole, parts = OnlineNorm2d(3, dtype=torch.float64), OnlineNorm2d(3, dtype=torch.float64)
    out_w, grad_w = _run_chunks(whole, x, G, [n])
    out_p, grad_p = _run_chunks(parts, x, G, sizes)
    assert torch.equal(out_w, out_p) and torch.equal(grad_w, grad_p)
    assert all(torch.equal(a, b) for a, b in zip(whole.buffers(), parts.buffers()))

def test_output_of_a_sample_ignores_later_samples():
    "Sample t is normalized with the statistics of samples < t: changing later samples leaves it unchanged"
    x = torch.randn(6, 4, 3, 3)
    x2 = x.clone(); x2[3:] = torch.randn(3, 4, 3, 3) * 10
    a, b = OnlineNorm2d(4, alpha_fwd=0.5)(x), OnlineNorm2d(4, alpha_fwd=0.5)(x2)
    assert torch.equal(a[:3], b[:3]) and not torch.allclose(a[3:], b[3:])


# ------------------------------------------------------------------ the paper's claims about the backward
def test_compensation_removes_the_gradient_components_along_1_and_y():
    """Over a stream, the passed-back gradient loses its mean (eps^(1)) and its component along y (eps^(y)),
    as batch norm's gradient does within a batch; 1/sigma alone keeps both."""
    torch.manual_seed(0)
    state = [torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
             torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    mean_c, corr_c, mean_p, corr_p = [], [], [], []
    for step in range(150):
        x = (torch.randn(8, 4, 5, dtype=torch.float64) * 3 + 2).requires_grad_()
        inv_std = (state[1] + 1e-5).rsqrt().view(1, -1, 1)
        y = online_norm(x, *state, alpha_fwd=0.99)
        g = 0.7 + 1.5 * y.detach() + torch.randn_like(y)  # along 1, along y, and noise
        y.backward(g)
        if step >= 100:
            yd = y.detach()
            mean_c.append(x.grad.mean()); corr_c.append((x.grad * yd).mean())
            mean_p.append((g * inv_std).mean()); corr_p.append((g * inv_std * yd).mean())
    avg = lambda v: torch.stack(v).mean().item()
    assert abs(avg(mean_c)) < 0.05 and abs(avg(corr_c)) < 0.05
    assert avg(mean_p) > 0.1 and avg(corr_p) > 0.2


# ------------------------------------------------------------------ modes, state, errors
def test_start_of_training_uses_the_initial_guess():
    "mu_0 = 0, sigma^2_0 = 1: the first sample passes through up to sqrt(1 + eps)"
    layer = OnlineNorm1d(5, affine=False, ecm=None, dtype=torch.float64)
    x = _data((1, 5))
    torch.testing.assert_close(layer(x), x / math.sqrt(1 + 1e-5), **F64)
    layer.reset_running_stats()
    assert layer.running_mean.abs().sum() == 0 and (layer.running_var == 1).all() and layer.num_samples_tracked == 0

def test_eval_mode_uses_the_running_statistics():
    layer = OnlineNorm2d(4, alpha_fwd=0.9, ecm='ls', dtype=torch.float64)
    with torch.no_grad(): layer.weight.uniform_(0.5, 2.0); layer.bias.normal_()
    for _ in range(3): layer(_data((8, 4, 3, 3))).sum().backward()
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _data((5, 4, 3, 3))
    c = lambda t: t.view(1, -1, 1, 1)
    expected = transcribe_ecm(((x - c(layer.running_mean)) / torch.sqrt(c(layer.running_var) + 1e-5))
                              * c(layer.weight) + c(layer.bias), 'ls')
    torch.testing.assert_close(layer(x), expected, **F64)
    torch.testing.assert_close(layer(x[2:3]), expected[2:3], **F64)  # per sample: no batch dependence
    layer(x.requires_grad_()).sum().backward()
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())  # nothing updated
    # eval mode is a fixed map, so its backward is the true gradient
    assert torch.autograd.gradcheck(lambda t: layer(t), (_data((2, 4, 2, 2)).requires_grad_(),))

def test_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(0)
    def make():
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), OnlineNorm2d(6), nn.ReLU(), nn.Flatten(),
                             nn.Linear(6 * 6 * 6, 8), OnlineNorm1d(8, ecm='ac'), nn.ReLU(), nn.Linear(8, 3))
    def step(net, opt, x, y):
        loss = F.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step(); return loss.item()
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))) for _ in range(5)]
    net = make(); opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for x, y in data[:3]: step(net, opt, x, y)
    assert list(net[1].state_dict()) == ['weight', 'bias', 'running_mean', 'running_var', 'err_1', 'err_y',
                                         'num_samples_tracked']
    buf = io.BytesIO(); torch.save({'net': net.state_dict(), 'opt': opt.state_dict()}, buf); buf.seek(0)
    saved = torch.load(buf)
    torch.manual_seed(1)
    net2 = make(); opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    net2.load_state_dict(saved['net']); opt2.load_state_dict(saved['opt'])
    assert net2[1].num_samples_tracked.item() == 12
    for x, y in data[3:]: assert step(net, opt, x, y) == step(net2, opt2, x, y)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()): assert torch.equal(a, b), k

def test_tiny_model_trains_with_adam():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), OnlineNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < 0.5 * losses[0]

def test_non_finite_batches_leave_the_state_unchanged():
    layer = OnlineNorm1d(3, ecm=None)
    layer(torch.randn(4, 3)).sum().backward()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3); x[1, 0] = float('nan')
    out = layer(x)
    assert out[1:, 0].isnan().all() and not out[:, 1:].isnan().any()  # visible in the output
    assert torch.equal(layer.running_mean[0], state['running_mean'][0])  # not in the state
    assert not torch.equal(layer.running_mean[1:], state['running_mean'][1:])  # the finite channels moved on
    x = torch.randn(4, 3, requires_grad=True)
    out = layer(x)
    out.backward(torch.tensor([[1., float('inf'), 1.]] * 4))  # as in an AMP step with an overflow
    assert not x.grad[:, 1].isfinite().all() and x.grad[:, 0].isfinite().all()
    assert torch.isfinite(layer.err_1).all() and torch.isfinite(layer.err_y).all()
    assert torch.equal(layer.err_y[1], state['err_y'][1])

def test_errors_say_what_was_expected():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"): OnlineNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"): OnlineNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected 5D input"): OnlineNorm3d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected 3 channels at dim 1 \(got 4"): OnlineNorm1d(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="floating-point"): OnlineNorm1d(3)(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"alpha_bkw must be a decay rate in \(0, 1\)"): OnlineNorm1d(3, alpha_bkw=0)
    with pytest.raises(ValueError, match="ecm must be one of"): OnlineNorm1d(3, ecm='layer')
    with pytest.raises(ValueError, match="num_features"): OnlineNorm1d(0)

def test_layer_options_repr_and_reset():
    layer = OnlineNorm2d(4, affine=False, ecm='ac', device='cpu', dtype=torch.float64)
    assert layer.weight is None and layer.bias is None and list(layer.parameters()) == []
    assert repr(layer) == "OnlineNorm2d(4, alpha_fwd=0.999, alpha_bkw=0.99, eps=1e-05, affine=False, ecm='ac')"
    assert layer.running_mean.dtype == torch.float64
    layer(torch.randn(3, 4, 2, 2, dtype=torch.float64) + 5)
    assert layer.running_mean.abs().sum() > 0
    layer.reset_parameters()
    assert layer.running_mean.abs().sum() == 0 and layer.num_samples_tracked == 0
    assert OnlineNorm1d(3)(torch.randn(0, 3)).shape == (0, 3)  # an empty batch changes nothing

def test_narrow_inputs_keep_statistics_in_the_buffer_dtype():
    "bf16 activations into a float32 layer: output in bf16, statistics in float32 and close to a float32 run"
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    a, b = OnlineNorm2d(4, alpha_fwd=0.9), OnlineNorm2d(4, alpha_fwd=0.9)
    out_bf = a(x.bfloat16().requires_grad_())
    out_bf.float().sum().backward()
    out = b(x)
    assert out_bf.dtype == torch.bfloat16 and a.running_mean.dtype == torch.float32
    torch.testing.assert_close(out_bf.float(), out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-2, atol=1e-2)
    a.eval(); b.eval()
    out_bf, out = a(x.bfloat16()), b(x)
    assert out_bf.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf.float(), out, rtol=2e-2, atol=2e-2)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, G = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 2, torch.randn(8, 4, 5, 5, dtype=torch.float64)
    cpu = OnlineNorm2d(4, alpha_fwd=0.9, dtype=torch.float64)
    gpu = copy.deepcopy(cpu).cuda()
    out_c, grad_c = _run_chunks(cpu, x, G, [8])
    out_g, grad_g = _run_chunks(gpu, x.cuda(), G.cuda(), [8])
    torch.testing.assert_close((out_g.cpu(), grad_g.cpu()), (out_c, grad_c), **F64)
    torch.testing.assert_close([b.cpu() for b in gpu.buffers()], list(cpu.buffers()), **F64)
