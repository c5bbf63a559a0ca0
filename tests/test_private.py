"""DP-SGD in the Learner (batchless_nb.private) against DP-SGD written out by hand.

The reference takes the same Poisson-sampled batches, computes each sample's gradient with a backward of that sample
alone (its task loss plus its BlN NLL), clips it to `max_grad_norm`, sums, adds Gaussian noise from torch's global
generator in the DP optimizer's parameter order, divides by the expected batch size and takes an SGD step. The
learner (with and without micro-batches) must end with its parameters (float64, 1e-12), also across empty batches,
and report the epsilon an accountant gives for the steps taken.
"""
import copy
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from opacus.accountants import RDPAccountant
from batchless_nb.core import set_seed
from batchless_nb.data import get_data
from batchless_nb.models import get_model
from batchless_nb.norm import batchless_loss
from batchless_nb.private import private_learner, poisson_loader, dp_callback

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')
SIGMA, C, LR = 0.7, 0.5, 0.1


def _data(n):
    d = get_data('digits')
    x, y = d.train.tensors
    return x[:n].double(), y[:n]


def _loader(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def _model(norm):
    set_seed(0)
    return get_model('mlp', norm, input_shape=(1, 8, 8), sizes=(16, 16)).double()


def reference(model, batches, order, expected):
    "DP-SGD by hand: per-sample gradients one sample at a time, clip, sum, noise (in `order`), average, SGD"
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=LR)
    for x, y in batches:
        summed = {k: torch.zeros_like(p) for k, p in params.items()}
        for i in range(len(x)):
            model.zero_grad()
            (F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) + batchless_loss(model)).backward()
            norm = torch.cat([p.grad.flatten() for p in params.values()]).norm()
            f = (C / (norm + 1e-6)).clamp(max=1.0)
            for k, p in params.items(): summed[k] += f * p.grad
        for k in order:
            p = params[k]
            p.grad = (summed[k] + torch.normal(0, SIGMA * C, p.shape, dtype=p.dtype)) / expected
        opt.step()
    return model


def _learner(norm, x, y, batch_size, micro_batch_size=None):
    return private_learner(_model(norm), (_loader(x, y, batch_size), None), noise_multiplier=SIGMA, max_grad_norm=C,
                           target_delta=1e-3, opt_func=torch.optim.SGD, lr=LR, micro_batch_size=micro_batch_size,
                           progress=False, device='cpu')


@pytest.mark.parametrize('norm', ['bln-log', 'bln-inv', 'gn', 'none'])
@pytest.mark.parametrize('micro_batch_size', [None, 3])
def test_learner_is_dp_sgd(norm, micro_batch_size):
    x, y = _data(120)
    learn = _learner(norm, x, y, 16, micro_batch_size)
    ref_model = copy.deepcopy(learn.model)
    names = {id(p): k for k, p in learn.model.named_parameters()}
    torch.manual_seed(1); learn.fit(2)
    order = [names[id(p)] for g in learn.opt.param_groups for p in g['params']]
    batches = poisson_loader(_loader(x, y, 16))
    dl = batches.batch_sampler
    torch.manual_seed(1)
    reference(ref_model, [b for _ in range(2) for b in batches], order, dl.sample_rate * dl.num_samples)
    for (k, p), q in zip(learn.model.named_parameters(), ref_model.parameters()):
        assert (p - q).abs().max() <= 1e-12 * q.abs().max(), k


def test_empty_batches_and_epsilon():
    "20 samples, expected batch 1: many Poisson batches are empty; their steps add noise alone and are counted"
    x, y = _data(20)
    learn = _learner('bln-log', x, y, 1)
    ref_model = copy.deepcopy(learn.model)
    names = {id(p): k for k, p in learn.model.named_parameters()}
    torch.manual_seed(1); learn.fit(3)
    dl = poisson_loader(_loader(x, y, 1))
    batches = [b for _ in range(3) for b in dl]
    assert sum(len(b[0]) == 0 for b in batches) >= 10
    order = [names[id(p)] for g in learn.opt.param_groups for p in g['params']]
    torch.manual_seed(1)
    reference(ref_model, batches, order, 0.05 * 20)
    for (k, p), q in zip(learn.model.named_parameters(), ref_model.parameters()):
        assert (p - q).abs().max() <= 1e-12 * q.abs().max(), k
    acc = RDPAccountant()
    acc.history = [(SIGMA, 0.05, 60)]
    assert learn.step == 60
    assert learn.history['epochs'][-1]['epsilon'] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-12)
    assert [r['delta'] for r in learn.history['epochs']] == [1e-3] * 3
    assert dp_callback(learn).epsilon() == learn.history['epochs'][-1]['epsilon']
