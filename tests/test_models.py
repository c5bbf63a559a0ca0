"Checks of batchless_nb.models: the paper's network layer by layer, parameter counts, every norm in every model."
import math

import pytest
import torch
from torch import nn

from batchless_nb.data import dataloaders, get_data
from batchless_nb.models import MODELS, NORMS, digits_cnn, get_model, norm_layer, paper_cnn
from batchless_nb.norm import BatchlessNorm, batchless_loss, batchless_modules
from batchless_nb.online import OnlineNorm1d, OnlineNorm2d

BLN = [n for n in NORMS if n.startswith('bln-')]
INPUTS = {'paper_cnn': (3, 32, 32), 'digits_cnn': (1, 8, 8), 'mlp': (1, 8, 8)}


def n_params(m): return sum(p.numel() for p in m.parameters())


def _expected_norm(norm, dim):
    "The layer type the paper network should hold at a norm slot (dim 2: after a conv, 1: after a dense layer)"
    return {'none': nn.Identity, 'bn': nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d,
            'gn': nn.GroupNorm, 'ln': nn.GroupNorm if dim == 2 else nn.LayerNorm,
            'online': OnlineNorm2d if dim == 2 else OnlineNorm1d}.get(norm, BatchlessNorm)


@pytest.mark.parametrize('norm', NORMS)
def test_paper_cnn_layers_match_the_paper(norm):
    m = paper_cnn(norm)
    mods = list(m.children())
    # 3 conv stages of 5 modules, Flatten, 2 dense stages of 4, the logits layer
    assert len(mods) == 3 * 5 + 1 + 2 * 4 + 1
    c = 3
    for i, k in enumerate((7, 5, 3)):
        conv, act, nrm, drop, pool = mods[5 * i: 5 * i + 5]
        assert isinstance(conv, nn.Conv2d) and conv.in_channels == c and conv.out_channels == 64
        assert conv.kernel_size == (k, k) and conv.padding == 'same' and conv.stride == (1, 1)
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.3
        assert isinstance(nrm, _expected_norm(norm, 2))
        assert isinstance(drop, nn.Dropout) and drop.p == 0.25
        assert isinstance(pool, nn.MaxPool2d) and pool.kernel_size == 2
        c = 64
    assert isinstance(mods[15], nn.Flatten)
    for j, fan_in in enumerate((1024, 50)):
        fc, act, nrm, drop = mods[16 + 4 * j: 20 + 4 * j]
        assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (fan_in, 50)
        assert isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.3
        assert isinstance(nrm, _expected_norm(norm, 1))
        assert isinstance(drop, nn.Dropout) and drop.p == 0.25
    assert isinstance(mods[-1], nn.Linear) and (mods[-1].in_features, mods[-1].out_features) == (50, 10)
    if norm in BLN:
        assert [l.std_param for l in batchless_modules(m).values()] == [norm[4:]] * 5


@pytest.mark.parametrize('norm', NORMS)
@pytest.mark.parametrize('in_channels,input_size,n_classes', [(3, 32, 10), (1, 8, 5), (3, (16, 24), 7)])
def test_paper_cnn_parameter_count(norm, in_channels, input_size, n_classes):
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    conv = (in_channels * 64 * 49 + 64) + (64 * 64 * 25 + 64) + (64 * 64 * 9 + 64)
    dense = (64 * (h // 8) * (w // 8) * 50 + 50) + (50 * 50 + 50) + (50 * n_classes + n_classes)
    per_channel = 4 if norm in BLN else 0 if norm == 'none' else 2
    m = paper_cnn(norm, in_channels=in_channels, input_size=input_size, n_classes=n_classes)
    assert n_params(m) == conv + dense + per_channel * (3 * 64 + 2 * 50)
    assert m(torch.randn(2, in_channels, h, w)).shape == (2, n_classes)


def test_paper_cnn_size_on_cifar():
    "The number quoted in the docs: 203,174 weights, +1,168 BlN parameters"
    assert n_params(paper_cnn('none')) == 203_174 and n_params(paper_cnn('bln-log')) == 204_342


@pytest.mark.parametrize('name', list(MODELS))
@pytest.mark.parametrize('norm', NORMS)
def test_every_model_trains_with_every_norm(name, norm):
    "Forward in both modes, and one backward reaches every parameter (BlN statistics through the NLL)"
    torch.manual_seed(0)
    m = get_model(name, norm, input_shape=INPUTS[name]).train()
    x, y = torch.randn(4, *INPUTS[name]), torch.randint(0, 10, (4,))
    out = m(x)
    assert out.shape == (4, 10)
    bl = batchless_loss(m)
    if norm in BLN: assert bl.item() != 0 and bl.requires_grad
    else: assert bl.item() == 0
    (nn.functional.cross_entropy(out, y) + bl).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    with torch.no_grad(): assert m.eval()(x).shape == (4, 10)
    assert batchless_loss(m).item() == 0


@pytest.mark.parametrize('norm', BLN)
def test_task_loss_alone_does_not_train_the_statistics(norm):
    m = digits_cnn(norm).train()
    nn.functional.cross_entropy(m(torch.randn(6, 1, 8, 8)), torch.randint(0, 10, (6,))).backward()
    for layer in batchless_modules(m).values():
        assert layer.mean.grad is None and layer.std_parameter.grad is None
        assert layer.weight.grad is not None


@pytest.mark.parametrize('norm', BLN + ['none', 'gn', 'ln'])
def test_batch_of_one(norm):
    assert paper_cnn(norm).train()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bln_kwargs_reach_every_layer():
    m = paper_cnn('bln-abs', nll_reduction='channel_sum', init_std=2.0)
    for layer in batchless_modules(m).values():
        assert layer.nll_reduction == 'channel_sum'
        assert torch.allclose(layer.learned_stats()[1], torch.full((layer.num_features,), 2.0))


def test_keras_init_default_and_torch_init():
    k, t = paper_cnn('none'), paper_cnn('none', keras_init=False)
    assert all(m.bias.abs().sum() == 0 for m in k.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert t.conv1.bias.abs().sum() > 0
    fan_in, fan_out = 3 * 49, 64 * 49  # Glorot-uniform bound sqrt(6 / (fan_in + fan_out))
    assert k.conv1.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))


def test_state_dict_keys():
    keys = list(paper_cnn('bln-log').state_dict())
    assert keys[:6] == ['conv1.weight', 'conv1.bias', 'norm1.mean', 'norm1.log_std', 'norm1.weight', 'norm1.bias']
    assert 'norm4.inv_std' in paper_cnn('bln-inv').state_dict()


def test_norm_layer_errors():
    with pytest.raises(ValueError, match=r"unknown norm 'BN'; choose one of \['none', 'bn', 'bln-abs'"):
        norm_layer('BN', 4)
    with pytest.raises(ValueError, match="unknown norm 'bln'"):
        get_model('mlp', 'bln')
    with pytest.raises(ValueError, match="unknown model 'cnn'"):
        get_model('cnn')
    with pytest.raises(TypeError):  # a misspelt BlN option is not silently dropped
        norm_layer('bln-log', 4, nll_reducton='mean')


@pytest.mark.parametrize('c', [1, 3, 50, 64, 96, 100])
def test_gn_groups_divide_channels(c):
    g = norm_layer('gn', c).num_groups
    assert c % g == 0 and g <= 32
    assert all(c % h for h in range(g + 1, 33))  # no larger valid count up to 32


@pytest.mark.parametrize('norm', ['none', 'bn', 'bln-log'])
def test_digits_cnn_learns(norm):
    "Three epochs on the digits reach well above chance; the model stays small"
    torch.manual_seed(0)
    d = get_data('digits')
    dls = dataloaders(d, batch_size=32, seed=0)
    m = get_model('digits_cnn', norm, input_shape=d.input_shape)
    assert n_params(m) < 5000
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        m.train()
        for xb, yb in dls.train:
            loss = nn.functional.cross_entropy(m(xb), yb) + batchless_loss(m)
            opt.zero_grad(); loss.backward(); opt.step()
    m.eval()
    with torch.no_grad():
        acc = sum((m(x).argmax(1) == y).sum().item() for x, y in dls.valid) / len(d.valid)
    assert acc > 0.8


def test_mlp_on_gaussian_data():
    d = get_data('gaussian', shape=(5,), n_classes=3)
    m = get_model('mlp', 'bln-log', input_shape=d.input_shape, n_classes=d.n_classes, sizes=(8,))
    assert m(d.train.tensors[0][:4]).shape == (4, 3)
    assert [type(l).__name__ for l in batchless_modules(m).values()] == ['BatchlessNorm1d']


def _digits_accuracy(model_name, norm, epochs=3, batch_size=16):
    torch.manual_seed(0)
    d = get_data('digits')
    dls = dataloaders(d, batch_size=batch_size, seed=0)
    m = get_model(model_name, norm, input_shape=d.input_shape)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(epochs):
        m.train()
        for xb, yb in dls.train:
            loss = nn.functional.cross_entropy(m(xb), yb) + batchless_loss(m)
            opt.zero_grad(); loss.backward(); opt.step()
    m.eval()
    with torch.no_grad(): return sum((m(x).argmax(1) == y).sum().item() for x, y in dls.valid) / len(d.valid)


@pytest.mark.parametrize('model_name', list(MODELS))
def test_group_norm_trains_at_least_as_well_as_none(model_name):
    "A GN model of each architecture learns the digits at least as well as no normalization: a collapsed GN cannot pass"
    gn, none = _digits_accuracy(model_name, 'gn'), _digits_accuracy(model_name, 'none')
    assert gn >= none - 0.01 and gn > 0.8, (gn, none)
