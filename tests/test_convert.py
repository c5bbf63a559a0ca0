"""Conversion and folding on the structures of real model zoos, built here (no timm/torchvision in CI).

Run as a script (`python tests/test_convert.py`) it prints, for each structure, the layers converted / folded /
refused and the relative eval-output errors of the converted and folded networks.
"""
import copy, functools, warnings
from unittest import mock
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import batchless_nb.convert as convert_mod
from batchless_nb.norm import *
from batchless_nb.init import init_batchless
from batchless_nb.convert import *
from batchless_nb.convert import ConversionError, FoldTraceError

pytestmark = pytest.mark.filterwarnings('ignore::batchless_nb.norm.UnusedNLLWarning')


# ---- the zoos' own modules, written the way they write them ----
class BatchNormAct2d(nn.BatchNorm2d):
    "As timm's BatchNormAct2d: a BatchNorm2d whose forward normalizes, then applies self.drop, then self.act"
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4, f'expected 4D input (got {x.ndim}D input)'
        if self.momentum is None: exponential_average_factor = 0.0
        else: exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None: exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        return self.act(x)


# The same class under timm's module path: convert_batchnorm knows it by name, without timm installed
TimmBatchNormAct2d = type('BatchNormAct2d', (BatchNormAct2d,), {'__module__': 'timm.layers.norm_act'})


class FrozenBatchNorm2d(nn.Module):
    "As torchvision's FrozenBatchNorm2d: an eval-mode batch norm held in buffers"
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


# ---- ResNet: residual joins, a downsample branch ----
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1, self.relu = norm(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, norm=nn.BatchNorm2d, n_classes=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 5, 2, 2, bias=False), norm(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1, norm))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, norm))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, n_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(x, 1))


# ---- MobileNetV3 / EfficientNet: norm+act modules with a drop inside, depthwise convs, squeeze-excite ----
class SqueezeExcite(nn.Module):
    def __init__(self, c, rd):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(c, rd, 1), nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd, c, 1)

    def forward(self, x):
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, exp, bnact):
        super().__init__()
        mid = cin * exp
        self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), bnact(mid, act_layer=nn.SiLU)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)  # depthwise
        self.bn2 = bnact(mid, act_layer=nn.SiLU, drop_layer=functools.partial(nn.Dropout, 0.1))
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), bnact(cout, apply_act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(x)))
        return x + shortcut if self.has_skip else x


class DepthwiseSeparable(nn.Module):
    def __init__(self, c, bnact):
        super().__init__()
        self.conv_dw, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), bnact(c, act_layer=nn.SiLU)
        self.se = SqueezeExcite(c, max(1, c // 4))
        self.conv_pw, self.bn2 = nn.Conv2d(c, c, 1, bias=False), bnact(c, apply_act=False)

    def forward(self, x): return x + self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))


class EfficientNet(nn.Module):
    def __init__(self, bnact=TimmBatchNormAct2d, n_classes=5):
        super().__init__()
        self.conv_stem, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), bnact(8, act_layer=nn.SiLU)
        self.blocks = nn.Sequential(DepthwiseSeparable(8, bnact), InvertedResidual(8, 12, 2, 4, bnact),
                                    InvertedResidual(12, 12, 1, 4, bnact))
        self.conv_head, self.bn2 = nn.Conv2d(12, 24, 1, bias=False), bnact(24, act_layer=nn.Hardswish)
        self.drop, self.classifier = nn.Dropout(0.2), nn.Linear(24, n_classes)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(self.drop(x.mean((2, 3))))


# ---- DenseNet: concatenation, norms before convs ----
class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, inputs):
        prev = [inputs] if isinstance(inputs, torch.Tensor) else inputs
        out = self.conv1(self.relu1(self.norm1(torch.cat(prev, 1))))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth):
        super().__init__({f'denselayer{i + 1}': DenseLayer(cin + i * growth, growth) for i in range(n)})

    def forward(self, x):
        features = [x]
        for layer in self.values(): features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, n_classes=5):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module('conv0', nn.Conv2d(3, 8, 3, 2, 1, bias=False))
        self.features.add_module('norm0', nn.BatchNorm2d(8))
        self.features.add_module('relu0', nn.ReLU(inplace=True))
        self.features.add_module('denseblock1', DenseBlock(3, 8, 4))
        self.features.add_module('transition1', nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(inplace=True),
                                                              nn.Conv2d(20, 10, 1, bias=False), nn.AvgPool2d(2)))
        self.features.add_module('denseblock2', DenseBlock(2, 10, 4))
        self.features.add_module('norm5', nn.BatchNorm2d(18))
        self.classifier = nn.Linear(18, n_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- an MLP head: Linear -> BatchNorm1d on (N, C) input, and on (N, C, L) input ----
class TokenMLP(nn.Module):
    "Linear -> BatchNorm1d on (N, C, L): the Linear's features are the last axis, BatchNorm1d normalizes dim 1"
    def __init__(self, n_classes=5):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.tok, self.bn_tok = nn.Linear(6, 6), nn.BatchNorm1d(6)  # (N, 6, 6): both axes 6, so it runs
        self.head, self.bn_head = nn.Linear(36, 8), nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, n_classes)

    def forward(self, x):
        x = self.bn_tok(self.tok(self.conv(x)))
        return self.fc(F.relu(self.bn_head(self.head(torch.flatten(x, 1)))))


def bn(affine, track):
    # Without running stats, batch norm normalizes with each batch's statistics, even in eval mode: the converted
    # network matches it once initialised from that batch (init_batchless), up to BN's eps inside sqrt(var + eps),
    # which statistics measured from data do not have (4e-5 relative here with eps=1e-5): eps=1e-12 for those.
    return functools.partial(nn.BatchNorm2d, affine=affine, track_running_stats=track, eps=1e-5 if track else 1e-12)


def sync_resnet(): return nn.SyncBatchNorm.convert_sync_batchnorm(ResNet())


# name -> (builder, BN-like layers, foldable BN-like layers, convert kwargs)
STRUCTURES = {
    'resnet': (ResNet, 6, 6, {}),
    'efficientnet (timm-style BatchNormAct2d)': (EfficientNet, 10, 10, {}),
    'densenet': (DenseNet, 13, 6, {}),
    'resnet, frozen BN': (lambda: ResNet(FrozenBatchNorm2d), 6, 6, {}),
    'resnet, SyncBatchNorm': (sync_resnet, 6, 6, {}),
    'token mlp (Linear -> BN1d on 3D and 2D)': (TokenMLP, 2, 1, {}),
    **{f'resnet, affine={a}, track_running_stats={t}': (lambda a=a, t=t: ResNet(bn(a, t)), 6, 6, {})
       for a in (True, False) for t in (True, False)},
}


def _input(name, n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    shape = (n, 3, 6) if name.startswith('token') else (n, 3, 32, 32)
    return torch.randn(shape, generator=g, dtype=dtype)


def build(name, seed=0):
    "The structure in eval mode, with running stats from a few training batches and random affine parameters"
    torch.manual_seed(seed)
    model = STRUCTURES[name][0]()
    model.train()
    with torch.no_grad():
        for i in range(4): model(_input(name, 16) * (1 + i) + 0.5)
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.3)
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.normal_(0, 0.5); m.running_var.uniform_(0.5, 2)
    return model.eval()


def rel_err(a, b): return float((a - b).abs().max() / b.abs().max())


def converted(name, model=None, **kwargs):
    "The structure converted; a model without running stats is initialised from the input it is compared on"
    model = build(name) if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out, summary = convert_batchnorm(copy.deepcopy(model), return_summary=True, **kwargs)
    if 'track_running_stats=False' in name: init_batchless(out, _input(name), passes=2, dropout=False)
    return out.eval(), summary


@pytest.mark.parametrize('name', list(STRUCTURES))
def test_converted_eval_output(name):
    model = build(name)
    conv, summary = converted(name, model)
    n_bn = STRUCTURES[name][1]
    assert sum(c.get('converted', 0) for c in summary.counts().values()) == n_bn
    assert not summary.names('refused') and not summary.names('skipped')
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)) for m in conv.modules())
    assert len(batchless_modules(conv)) == n_bn
    x = _input(name)
    with torch.no_grad(): assert rel_err(conv(x), model(x)) < 1e-5


@pytest.mark.parametrize('name', list(STRUCTURES))
def test_folded_eval_output(name):
    model = build(name)
    conv, _ = converted(name, model)
    x = _input(name)
    folded, summary = fold_batchless(copy.deepcopy(conv), example_inputs=x, return_summary=True)
    assert len(summary.names('folded')) == STRUCTURES[name][2]
    assert len(batchless_modules(folded)) == STRUCTURES[name][1] - STRUCTURES[name][2]
    with torch.no_grad(): assert rel_err(folded(x), model(x)) < 1e-5
    # as batch norm: the unfolded layers become batch norm, which torch's own fusion and ONNX know
    as_bn = fold_batchless(copy.deepcopy(conv), example_inputs=x, unfolded='batchnorm')
    assert not batchless_modules(as_bn)
    with torch.no_grad(): assert rel_err(as_bn(x), model(x)) < 1e-5


def test_fold_without_example_inputs():
    "Without inputs, only the Linear -> BN1d whose rank the graph does not show stays unfolded"
    for name in STRUCTURES:
        conv, _ = converted(name)
        folded, summary = fold_batchless(copy.deepcopy(conv), return_summary=True)
        assert len(summary.names('folded')) == STRUCTURES[name][2], name
        x = _input(name)
        with torch.no_grad(): assert rel_err(folded(x), conv(x)) < 1e-5


def test_linear_on_3d_is_not_folded():
    conv, _ = converted('token mlp (Linear -> BN1d on 3D and 2D)')
    _, summary = fold_batchless(copy.deepcopy(conv), example_inputs=_input('token'), return_summary=True)
    assert summary.names('folded') == ['bn_head']
    row = dict((n, note) for n, _, _, note in summary.rows)['bn_tok']
    assert 'Linear puts its channels at dim 2 of its 3D output, but BatchlessNorm1d normalizes dim 1' in row


def _train_three_steps(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for i in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) + batchless_loss(model)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return model


@pytest.mark.parametrize('name', list(STRUCTURES))
def test_train_at_batch_size_one(name):
    conv, _ = converted(name)
    x, y = _input(name), torch.tensor([0, 1, 2, 3])
    _train_three_steps(conv, x, y)
    assert all(m.nll is not None for m in batchless_modules(conv).values())


def _grads(model, x, y, micro):
    model.zero_grad()
    for xs, ys in zip(x.split(micro), y.split(micro)):
        loss = F.cross_entropy(model(xs), ys) + batchless_loss(model)
        (loss * len(xs) / len(x)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('name', list(STRUCTURES))
def test_micro_batches_equal_a_batch(name):
    "4 micro-batches of 1 give the gradients of one batch of 4, in float64"
    conv, _ = converted(name)
    conv.double().train()
    for m in conv.modules():
        if isinstance(m, nn.Dropout): m.eval()  # the same masks in both runs: none
    x, y = _input(name, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    one, four = _grads(conv, x, y, 1), _grads(conv, x, y, 4)
    assert one.keys() == four.keys() and len(one) > 0
    assert {n for n in one if n.endswith(('.mean', '.log_std'))}  # the statistics get gradients too
    for n in one: torch.testing.assert_close(one[n], four[n], rtol=1e-10, atol=1e-10, msg=n)


# ---- conversion: the registry, refusals, the summary ----
def test_norm_act_converts_with_its_act_and_drop():
    conv, summary = converted('efficientnet (timm-style BatchNormAct2d)')
    assert summary.counts() == {'BatchNormAct2d': {'converted': 10}}
    blk = conv.blocks[1]
    assert type(blk.bn2) is BatchlessNormAct2d and type(blk.bn2.act) is nn.SiLU and type(blk.bn2.drop) is nn.Dropout
    assert type(blk.bn3.act) is nn.Identity and type(conv.bn2.act) is nn.Hardswish


def test_unknown_subclass_is_refused(monkeypatch):
    model = EfficientNet(bnact=BatchNormAct2d).eval()  # the class outside timm's module: not known by name
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match=r"test_convert.BatchNormAct2d \(a BatchNorm2d subclass without a "
                                              r"registered converter\)") as e:
        convert_batchnorm(model)
    assert 'register_converter(BatchNormAct2d, bln_act_from_bn_act)' in str(e.value)
    assert 'nothing was changed' in str(e.value)
    assert type(model.bn1) is BatchNormAct2d and model.state_dict().keys() == before.keys()
    with pytest.warns(UserWarning, match=r"left 10 layer\(s\) as they are"):
        _, summary = convert_batchnorm(copy.deepcopy(model), strict=False, return_summary=True)
    assert summary.counts() == {'BatchNormAct2d': {'refused': 10}}
    # per call, or registered once
    out = convert_batchnorm(copy.deepcopy(model), converters={BatchNormAct2d: bln_act_from_bn_act})
    assert type(out.bn1) is BatchlessNormAct2d
    monkeypatch.setitem(convert_mod.BN_CONVERTERS, BatchNormAct2d, bln_act_from_bn_act)
    assert type(convert_batchnorm(copy.deepcopy(model)).bn1) is BatchlessNormAct2d


def test_register_converter_decorator(monkeypatch):
    monkeypatch.setattr(convert_mod, 'BN_CONVERTERS', dict(convert_mod.BN_CONVERTERS))
    class Half(nn.BatchNorm2d):
        def forward(self, x): return super().forward(x) / 2

    @register_converter(Half)
    def half(m, **kwargs): return nn.Sequential(bln_from_bn(m, **kwargs), nn.Identity())

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Half(4)).eval()
    with torch.no_grad(): model[1].running_mean.normal_(); model[1].running_var.uniform_(0.5, 2)
    assert find_converter(model[1]) is half
    model = convert_batchnorm(model)
    assert type(model[1][0]) is BatchlessNorm2d
    with pytest.raises(TypeError, match="expected a class or a 'module.QualName'"): register_converter(3, half)


def test_frozen_batchnorm():
    model = build('resnet, frozen BN')
    _, summary = converted('resnet, frozen BN', model)
    assert summary.counts() == {'FrozenBatchNorm2d': {'converted': 6}}
    kept, summary = convert_batchnorm(copy.deepcopy(model), frozen='skip', return_summary=True)
    assert summary.counts() == {'FrozenBatchNorm2d': {'skipped': 6}}
    assert type(kept.bn1) is FrozenBatchNorm2d and not batchless_modules(kept)
    # recognised by name, then checked for its buffers
    Odd = type('FrozenBatchNorm2d', (nn.Module,), {'__module__': 'somewhere'})
    with pytest.raises(ConversionError, match=r"expected a frozen batch norm with 1-D buffers"):
        convert_batchnorm(nn.Sequential(Odd()))


def test_frozen_norm_act():
    class FrozenBatchNormAct2d(FrozenBatchNorm2d):
        def __init__(self, c):
            super().__init__(c)
            self.drop, self.act = nn.Identity(), nn.ReLU()
        def forward(self, x): return self.act(self.drop(super().forward(x)))
    m = FrozenBatchNormAct2d(3)
    m.running_mean.normal_(); m.bias.normal_()
    bln = convert_batchnorm(m)
    x = torch.randn(2, 3, 4, 4)
    assert type(bln) is BatchlessNormAct2d
    torch.testing.assert_close(bln.eval()(x), m(x), rtol=1e-5, atol=1e-6)


def test_norm_act_with_other_children_is_refused(monkeypatch):
    class Weird(BatchNormAct2d):
        def __init__(self, c):
            super().__init__(c)
            self.extra = nn.Conv2d(c, c, 1)
    with pytest.raises(ConversionError, match=r"with the child modules `act` and optionally `drop` and no other"):
        convert_batchnorm(nn.Sequential(Weird(3)), converters={Weird: bln_act_from_bn_act})


def test_sync_batchnorm_round_trip():
    model = build('resnet, SyncBatchNorm')
    conv, _ = converted('resnet, SyncBatchNorm', model)
    assert type(conv.bn1) is BatchlessNorm and conv.bn1.channel_dim == 1
    back = to_batchnorm(conv.bn1)
    assert type(back) is nn.SyncBatchNorm
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(): torch.testing.assert_close(back(x), model.bn1(x), rtol=1e-5, atol=1e-5)
    folded = fold_batchless(copy.deepcopy(conv), unfolded='batchnorm')
    assert type(folded.bn1) is nn.Identity


def test_no_running_stats_any_affine():
    for affine in (True, False):
        with pytest.warns(UserWarning, match='without running stats'):
            model, summary = convert_batchnorm(ResNet(bn(affine, False)), return_summary=True)
        assert all(note.startswith('no running stats') for *_, note in summary.rows)
        assert all(m.affine == affine for m in batchless_modules(model).values())


def test_frozen_affine_parameters_stay_frozen():
    model = ResNet()
    model.bn1.weight.requires_grad_(False); model.bn1.bias.requires_grad_(False)
    conv = convert_batchnorm(model)
    assert not conv.bn1.weight.requires_grad and not conv.bn1.bias.requires_grad and conv.bn1.mean.requires_grad
    assert conv.bn1.log_std.requires_grad and conv.layer1[0].bn1.weight.requires_grad


def test_reserved_options_and_shared_layers():
    with pytest.raises(TypeError, match=r"convert_batchnorm sets \['affine'\] from each layer"):
        convert_batchnorm(nn.BatchNorm2d(3), affine=False)
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared)
    model, summary = convert_batchnorm(model, return_summary=True)
    assert model[1] is model[3] and type(model[1]) is BatchlessNorm2d and len(summary.rows) == 1
    _, summary = fold_batchless(copy.deepcopy(model), return_summary=True)
    assert summary.names('folded') == [] and 'called more than once or shared' in summary.rows[0][3]


def test_named_like_batchnorm_is_reported():
    class MyBatchNorm(nn.Module):
        def forward(self, x): return x
    with pytest.warns(UserWarning, match='named like a batch norm but not a torch one'):
        _, summary = convert_batchnorm(nn.Sequential(MyBatchNorm(), nn.BatchNorm1d(2)), return_summary=True)
    assert summary.counts() == {'MyBatchNorm': {'skipped': 1}, 'BatchNorm1d': {'converted': 1}}


# ---- folding: refusals, tracing ----
def test_fold_refuses_a_change_of_output():
    "If the analysis let a wrong fold through, the output check undoes everything and raises"
    conv, _ = converted('token mlp (Linear -> BN1d on 3D and 2D)')
    x = _input('token')
    with torch.no_grad(): want = conv(x)
    with mock.patch.object(convert_mod, '_axis_error', lambda *a: None):
        with pytest.raises(ValueError, match=r"fold_batchless changed the output by .* every change was undone"):
            fold_batchless(conv, example_inputs=x)
    assert type(conv.bn_tok) is BatchlessNorm1d and type(conv.bn_head) is BatchlessNorm1d
    with torch.no_grad(): torch.testing.assert_close(conv(x), want, rtol=0, atol=0)


def test_fold_leaves_shared_outputs_and_hooks():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), BatchlessNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(3, 4, 1), BatchlessNorm2d(4)
            self.conv3, self.bn3 = nn.Conv2d(3, 4, 1), BatchlessNorm2d(4)
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(x)) + self.bn3(self.conv3(x)) * self.conv3.weight.sum()
    model = TwoUses().eval()
    model.bn2.register_forward_hook(lambda m, a, o: o * 2)
    _, summary = fold_batchless(copy.deepcopy(model), return_summary=True)
    notes = {n: note for n, _, _, note in summary.rows}
    assert summary.names('folded') == []
    assert 'the output of conv is also used by' in notes['bn']
    assert 'bn2 has forward hooks' in notes['bn2']
    assert "reads conv3's parameters directly" in notes['bn3']


def test_untraceable_model():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = convert_batchnorm(ResNet()).eval()
        def forward(self, x): return self.net(x) if x.sum() > 0 else -self.net(x)
    model, x = Untraceable().eval(), torch.randn(2, 3, 32, 32).abs()
    with pytest.raises(FoldTraceError, match=r"torch.fx cannot trace Untraceable .*fallback=True"):
        fold_batchless(copy.deepcopy(model))
    folded, summary = fold_batchless(copy.deepcopy(model), example_inputs=x, fallback=True, return_summary=True)
    assert len(summary.names('folded')) == 6 and summary.notes
    with torch.no_grad(): assert rel_err(folded(x), model(x)) < 1e-5
    # the nn.Sequential fallback, where a Sequential's own children cannot be traced
    class Branchy(nn.Module):
        def forward(self, x): return x if x.sum() > 0 else -x
    seq = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Branchy(), nn.Flatten(),
                                          nn.Linear(4 * 30 * 30, 5), nn.BatchNorm1d(5))).eval()
    folded, summary = fold_batchless(copy.deepcopy(seq), fallback=True, return_summary=True)
    assert summary.names('folded') == ['1', '5']
    with torch.no_grad(): assert rel_err(folded(x), seq(x)) < 1e-5
    # or keep the untraceable module as a single call
    folded, summary = fold_batchless(copy.deepcopy(seq), leaf_modules=(Branchy,), return_summary=True)
    assert summary.names('folded') == ['1', '5'] and not summary.notes


def test_fold_into_transposed_grouped_conv():
    for layer in (nn.ConvTranspose1d(4, 6, 3, groups=2), nn.ConvTranspose3d(2, 4, 2, bias=False), nn.Conv1d(4, 6, 1)):
        k = {nn.ConvTranspose1d: 1, nn.ConvTranspose3d: 3, nn.Conv1d: 1}[type(layer)]
        norm = {1: BatchlessNorm1d, 3: BatchlessNorm3d}[k](_n := layer.out_channels, std_param='abs').eval()
        with torch.no_grad(): norm.set_stats(torch.randn(_n), torch.rand(_n) + 0.5); norm.weight.normal_()
        x = torch.randn(2, layer.in_channels, *[4] * k)
        torch.testing.assert_close(fold_into(layer, norm)(x), norm(layer(x)), rtol=1e-5, atol=1e-5)


def test_summary_is_logged(caplog):
    with caplog.at_level('INFO', logger='batchless_nb.convert'):
        convert_batchnorm(ResNet())
    assert 'convert: 6 converted' in caplog.text and 'BatchNorm2d: 6 converted' in caplog.text


def test_init_from_data_with_norm_act():
    "Data-driven init finds the BatchlessNormAct layers (they are BatchlessNorm layers) and orders them"
    conv, _ = converted('efficientnet (timm-style BatchNormAct2d)')
    res = init_batchless(conv, _input('efficientnet', 8), passes=2)
    assert len(res.stats) == 10 and len(res.strata) > 3
    with torch.no_grad(): assert torch.isfinite(conv(_input('efficientnet'))).all()


def test_root_layers():
    bln = convert_batchnorm(nn.BatchNorm2d(3))
    assert fold_batchless(bln) is bln
    assert type(fold_batchless(bln, unfolded='batchnorm')) is nn.BatchNorm2d
    act = convert_batchnorm(TimmBatchNormAct2d(3, act_layer=nn.ReLU))
    assert type(act) is BatchlessNormAct2d
    seq = to_batchnorm(act)
    assert [type(m) for m in seq] == [nn.BatchNorm2d, nn.Identity, nn.ReLU]
    with pytest.raises(ValueError, match=r"expected a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear to fold into"):
        fold_into(nn.ReLU(), bln)
    with pytest.raises(ValueError, match=r"it also applies drop and act"): fold_into(nn.Conv2d(3, 3, 1), act)


def table():
    "Per structure: layers converted / folded / refused, relative eval-output errors of converted and folded"
    rows = []
    for name in STRUCTURES:
        model = build(name)
        conv, cs = converted(name, model)
        x = _input(name)
        folded, fs = fold_batchless(copy.deepcopy(conv), example_inputs=x, return_summary=True)
        with torch.no_grad(): ec, ef = rel_err(conv(x), model(x)), rel_err(folded(x), model(x))
        n = lambda s, o: sum(c.get(o, 0) for c in s.counts().values())
        rows.append(f"| {name} | {n(cs, 'converted')} | {n(fs, 'folded')} / {len(fs.rows)} | {n(cs, 'refused')} | "
                    f"{ec:.1e} | {ef:.1e} |")
    head = "| structure | converted | folded / BlN | refused | conv. rel. err | folded rel. err |\n|---|---|---|---|---|---|"
    return "\n".join([head, *rows])


if __name__ == '__main__':
    print(table())
