"Heavier checks of data-driven initialization: numerics, layer order, function preservation, data forms, DDP."
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from batchless_nb.init import init_batchless, _measure, _set_stats
from batchless_nb.norm import BatchlessNorm, BatchlessNorm1d, BatchlessNorm2d, batchless_modules


def layer_tensors(model, x, inputs=False):
    "Every BatchlessNorm layer's output (or input) on `x`, concatenated over its calls, by name"
    got, hs = {}, []
    for n, l in batchless_modules(model).items():
        def hook(mod, args, kwargs, out, n=n):
            t = args[0] if args else kwargs['input']
            got.setdefault(n, []).append((t if inputs else out).detach().double())
        hs.append(l.register_forward_hook(hook, with_kwargs=True))
    training = model.training
    model.eval()
    with torch.no_grad(): model(x)
    model.train(training)
    for h in hs: h.remove()
    return {n: torch.cat(ts) for n, ts in got.items()}

def channel_stats(t, channel_dim=1):
    "Per-channel mean and population std of `t` in float64"
    dims = [d for d in range(t.dim()) if d != channel_dim % t.dim()]
    return t.double().mean(dims), t.double().std(dims, unbiased=False)

def assert_standardised(model, x, tol=1e-4):
    "Each BatchlessNorm layer (weight 1, bias 0) outputs mean 0 and std 1 per channel on `x`"
    layers = batchless_modules(model)
    for n, out in layer_tensors(model, x).items():
        mean, std = channel_stats(out, layers[n].channel_dim)
        assert_close(mean, torch.zeros_like(mean), atol=tol, rtol=0, msg=f"mean of {n}")
        assert_close(std, torch.ones_like(std), atol=tol, rtol=0, msg=f"std of {n}")


class Reversed(nn.Module):
    "A chain whose layers are registered in the reverse of their forward order"
    def __init__(self, n=8, depth=4):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(n, n) for _ in range(depth)][::-1])
        self.norms = nn.ModuleList([BatchlessNorm1d(n) for _ in range(depth)])
    def forward(self, x):
        for i in reversed(range(len(self.lins))): x = torch.relu(self.norms[i](self.lins[i](x)) + 1)
        return x


class Branchy(nn.Module):
    "Two parallel conv branches, a residual join, an in-place ReLU after a norm and a keyword call"
    def __init__(self, c=4):
        super().__init__()
        self.head = BatchlessNorm1d(10)
        self.join = BatchlessNorm2d(c)
        self.conv_a, self.bn_a = nn.Conv2d(1, c, 3, padding=1), BatchlessNorm2d(c, std_param='abs')
        self.conv_b, self.bn_b = nn.Conv2d(1, c, 5, padding=2), BatchlessNorm2d(c, std_param='inv')
        self.conv_c, self.bn_c = nn.Conv2d(c, c, 3, padding=1), BatchlessNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c * 16, 10)
    def forward(self, x):
        a = self.relu(self.bn_a(self.conv_a(x)))
        b = self.bn_b(input=self.conv_b(x))
        c = self.bn_c(self.conv_c(a))
        y = torch.max_pool2d(self.join(c + b), 2)
        return self.head(self.fc(y.flatten(1)))

BRANCHY_STRATA = [['bn_a', 'bn_b'], ['bn_c'], ['join'], ['head']]

def branchy(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Branchy().to(dtype)

def images(n=120, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 16).to(dtype)


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize('passes', [1, 2])
@pytest.mark.parametrize('scale,offset', [(100., 1000.), (0.01, 1e4)])
def test_offset_data_no_cancellation(passes, scale, offset):
    "float32 data far from zero: the stats match float64 truth, where the naive E[x^2] - E[x]^2 does not"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, 2, 2, generator=g) * scale + offset
    model = nn.Sequential(BatchlessNorm2d(3))
    res = init_batchless(model, x, passes=passes, batch_size=37)
    true_mean, true_std = channel_stats(x)
    mean, std = res.stats['0']
    assert_close(mean, true_mean, rtol=0, atol=1e-6 * scale)
    assert_close(std, true_std, rtol=1e-6, atol=0)
    learned_mean, learned_std = model[0].learned_stats()  # float32 parameters: their rounding only
    assert_close(learned_mean.double(), true_mean, rtol=1e-7, atol=0)
    assert_close(learned_std.double(), true_std, rtol=1e-6, atol=0)
    naive = ((x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2).clamp_min(0).sqrt()
    assert ((naive.double() - true_std).abs() / true_std).max() > 1e-6  # so the check above can fail


def test_constant_channel_gets_eps():
    "A dead channel (std 0) gets std eps instead of 0 (log 0 = -inf for 'log')"
    x = torch.randn(50, 3); x[:, 1] = 0.
    model = nn.Sequential(BatchlessNorm1d(3))
    init_batchless(model, x)
    mean, std = model[0].learned_stats()
    assert torch.isfinite(model[0].log_std).all()
    assert_close(std[1], torch.tensor(model[0].eps))
    assert_close(model(x)[:, 1], torch.zeros(50))


# ---------------------------------------------------------------- order

def test_reversed_registration_order():
    torch.manual_seed(0)
    model = Reversed()
    names = list(batchless_modules(model))
    x = torch.randn(200, 8) * 3 + 2
    res = init_batchless(model, x)
    assert res.strata == [[n] for n in reversed(names)]
    assert_standardised(model, x)


def test_wrong_order_would_be_caught():
    "Measuring every layer in one round (ignoring the strata) leaves later layers unstandardised"
    torch.manual_seed(0)
    model = Reversed()
    x = torch.randn(200, 8) * 3 + 2
    layers = batchless_modules(model)
    with torch.no_grad():
        for n, m in _measure(model.eval(), layers, list(x.split(64)), 'cpu').items():
            _set_stats(layers[n], *m.stats(), preserve_function=False)
    with pytest.raises(AssertionError): assert_standardised(model, x)


def test_branchy_strata_and_stats():
    model = branchy()
    x = images()
    res = init_batchless(model, x, batch_size=32)
    assert res.strata == BRANCHY_STRATA
    assert list(res.stats) == list(batchless_modules(model))  # module order
    assert_standardised(model, x)


def test_shared_layer_uses_all_calls():
    "A layer applied to two parallel inputs is measured over both"
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(4, 3), nn.Linear(4, 3), BatchlessNorm1d(3)
        def forward(self, x): return torch.cat([self.bn(self.a(x)), self.bn(self.b(x) * 5)], 1)
    torch.manual_seed(0)
    model, x = Shared(), torch.randn(100, 4)
    init_batchless(model, x)
    with torch.no_grad(): both = torch.cat([model.a(x), model.b(x) * 5])
    mean, std = model.bn.learned_stats()
    assert_close(mean.double(), both.double().mean(0), atol=1e-5, rtol=0)
    assert_close(std.double(), both.double().std(0, unbiased=False), atol=1e-5, rtol=1e-5)


def test_layer_feeding_itself_is_an_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(3, 3), BatchlessNorm1d(3)
        def forward(self, x): return self.bn(self.lin(self.bn(x)))
    with pytest.raises(ValueError, match="cycle through"): init_batchless(Twice(), torch.randn(10, 3))


def test_unused_layer_warns_and_is_untouched():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.spare = BatchlessNorm1d(3), BatchlessNorm1d(3)
        def forward(self, x): return self.bn(x)
    model = Spare()
    with pytest.warns(UserWarning, match=r"\['spare'\] were not called"):
        res = init_batchless(model, torch.randn(10, 3) + 4)
    assert res.strata == [['bn']]
    assert list(res.stats) == ['bn']
    assert_close(model.spare.learned_stats()[0], torch.zeros(3))


def test_channels_last_layer():
    "channel_dim=-1 on (B, T, C)"
    model = nn.Sequential(nn.Linear(5, 6), BatchlessNorm(6, channel_dim=-1))
    x = torch.randn(30, 7, 5) * 2 - 1
    init_batchless(model, x)
    assert_standardised(model, x)


@pytest.mark.parametrize('passes,preserve', [(1, False), (2, False), (2, True)])
def test_number_of_forwards(passes, preserve):
    "One probe forward, then `passes` passes per stratum (one round in all with preserve_function)"
    model, x = branchy(), images(100)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    res = init_batchless(model, x, passes=passes, batch_size=30, preserve_function=preserve)
    rounds = 1 if preserve else len(res.strata)
    assert calls == [2] + [30, 30, 30, 10] * rounds * passes


# ---------------------------------------------------------------- preserve_function

@pytest.mark.parametrize('std_param', ['log', 'abs', 'inv'])
def test_preserve_function(std_param):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BatchlessNorm2d(4, std_param=std_param), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), BatchlessNorm2d(4, std_param=std_param), nn.Tanh(),
                          nn.Flatten(), nn.Linear(256, 6), BatchlessNorm1d(6, std_param=std_param))
    with torch.no_grad():
        for l in batchless_modules(model).values():
            l.set_stats(torch.randn(l.num_features), torch.rand(l.num_features) + 0.5)
            l.weight.uniform_(0.5, 2); l.bias.normal_()
            if std_param == 'inv': l.inv_std[::2] *= -1  # sigma = 1/inv_std is signed
    x = images(80)
    with torch.no_grad(): before = model(x)
    init_batchless(model, x, batch_size=32, preserve_function=True)
    with torch.no_grad(): after = model(x)
    assert_close(after, before, atol=1e-5, rtol=1e-5)
    layers = batchless_modules(model)
    for n, inp in layer_tensors(model, x, inputs=True).items():
        mean, std = layers[n].learned_stats()
        true_mean, true_std = channel_stats(inp)
        assert_close(mean.double(), true_mean, atol=1e-5, rtol=1e-5)
        assert_close(std.double(), true_std, atol=1e-5, rtol=1e-5)
        assert (std > 0).all()


def test_preserve_function_needs_affine():
    model = nn.Sequential(BatchlessNorm1d(3), BatchlessNorm1d(3, affine=False))
    with pytest.raises(ValueError, match=r"got affine=False for \['1'\]"):
        init_batchless(model, torch.randn(5, 3), preserve_function=True)


# ---------------------------------------------------------------- modes, data forms

def test_modes_batchnorm_and_grads_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), BatchlessNorm2d(4), nn.Flatten(),
                          nn.Linear(144, 3), BatchlessNorm1d(3))
    model.train(); model[1].eval()
    modes = [m.training for m in model.modules()]
    bn = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = images(64)
    init_batchless(model, x, dropout=False)  # eval mode throughout (the paper), so the check below can use eval mode
    assert [m.training for m in model.modules()] == modes
    for k, v in model[1].state_dict().items(): assert torch.equal(v, bn[k]), k
    assert all(p.grad is None for p in model.parameters())
    model.eval()  # dropout off for the check
    assert_standardised(model, x)


def test_data_forms_agree():
    x = images(100)
    y = torch.arange(100)
    ref = init_batchless(branchy(), x, n_samples=70, batch_size=16).stats
    forms = [(x, y), [x, y], TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=13),
             DataLoader(TensorDataset(x), batch_size=25), DataLoader(x, batch_size=64)]
    for data in forms:
        res = init_batchless(branchy(), data, n_samples=70, batch_size=16)
        assert res.n_samples == 70
        for n, (mean, std) in ref.items():
            assert_close(res.stats[n][0], mean, atol=1e-6, rtol=0)
            assert_close(res.stats[n][1], std, atol=1e-6, rtol=1e-6)


def test_shuffled_loader_reads_the_sample_once():
    "All strata and both passes see the same inputs, even from a shuffling loader"
    x = images(200)
    loader = lambda: DataLoader(x, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(3))
    order = torch.cat(list(loader()))[:90]
    res = init_batchless(branchy(), loader(), n_samples=90)
    ref = init_batchless(branchy(), order, n_samples=90)
    for n, (mean, std) in ref.stats.items():
        assert_close(res.stats[n][0], mean, atol=1e-6, rtol=0)
        assert_close(res.stats[n][1], std, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- DDP

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

CONFIGS = [(torch.float32, 1), (torch.float32, 2), (torch.float64, 1), (torch.float64, 2)]
SPLIT = 70  # rank 0 gets the first 70 inputs, rank 1 the other 50

def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        for dtype, passes in CONFIGS:
            x = images(120, dtype=dtype)
            mine = x[:SPLIT] if rank == 0 else x[SPLIT:]
            model = nn.parallel.DistributedDataParallel(branchy(dtype=dtype))
            res = init_batchless(model, mine, n_samples=len(mine), passes=passes, batch_size=16)
            results[(dtype, passes)] = ({n: l.learned_stats() for n, l in batchless_modules(model.module).items()},
                                        res.stats)
        torch.save(results, f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    for dtype, passes in CONFIGS:
        tol = 1e-6 if dtype == torch.float64 else 1e-5
        model = branchy(dtype=dtype)
        ref = init_batchless(model, images(120, dtype=dtype), passes=passes, batch_size=16)
        learned = {n: l.learned_stats() for n, l in batchless_modules(model).items()}
        for r, results in enumerate(ranks):
            got_learned, got_stats = results[(dtype, passes)]
            for n in learned:
                for a, b in zip(got_learned[n], learned[n]): assert_close(a, b, atol=tol, rtol=tol, msg=f"rank {r} {n}")
                for a, b in zip(got_stats[n], ref.stats[n]): assert_close(a, b, atol=tol, rtol=tol, msg=f"rank {r} {n}")
        for n in learned:  # every rank ends with the same parameters
            for a, b in zip(ranks[0][(dtype, passes)][0][n], ranks[1][(dtype, passes)][0][n]): assert torch.equal(a, b)
