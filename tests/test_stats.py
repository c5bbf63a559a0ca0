"Natural-gradient updates of the statistics: exact under micro-batching, checkpointable."
import copy
import pytest, torch, torch.nn as nn
from batchless_nb.norm import BatchlessNorm1d, BatchlessNorm2d, batchless_loss, STD_PARAMS
from batchless_nb.natural import NaturalGradientSGD


@pytest.mark.parametrize('std_param', list(STD_PARAMS))
@pytest.mark.parametrize('reduction', ['mean', 'channel_sum'])
def test_micro_batches_take_the_batch_step(std_param, reduction):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), BatchlessNorm2d(3, std_param=std_param, nll_reduction=reduction),
                        nn.Flatten(), nn.Linear(27, 4), BatchlessNorm1d(4, std_param=std_param, nll_reduction=reduction)).double()
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64) * 2 + 1
    def stepped(chunks):
        m = copy.deepcopy(net)
        opt = NaturalGradientSGD(m, lr=0.3)
        for xc in x.chunk(chunks):
            m(xc)
            (batchless_loss(m) * len(xc) / len(x)).backward()
        opt.step()
        return [p.detach() for p in m.parameters()]
    full = stepped(1)
    for got in (stepped(2), stepped(8)):
        torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-12)


def test_width_invariant_step():
    "The step of a channel does not depend on how many channels share the layer's NLL mean"
    x = torch.randn(16, 1) * 2 + 3
    steps = []
    for width in (1, 64):
        layer = BatchlessNorm1d(width)
        opt = NaturalGradientSGD(layer, lr=0.5)
        layer(x.expand(-1, width)); batchless_loss(layer).backward(); opt.step()
        steps.append(layer.learned_stats()[0][0])
    torch.testing.assert_close(steps[0], steps[1])


def test_state_dict_round_trip():
    layer = BatchlessNorm1d(3, std_param='inv')
    opt = NaturalGradientSGD(layer, lr=0.05)
    again = NaturalGradientSGD(copy.deepcopy(layer), lr=0.9)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]['lr'] == 0.05 and again.param_groups[0]['std_param'] == 'inv'


def _train_paper_update(weight=1.0, gauge=True, opt=torch.optim.Adam, steps=40):
    "The paper's update by hand: `opt` trains everything on cross-entropy + weight * NLL; the trained parameters"
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), BatchlessNorm1d(8, gauge=gauge), nn.LeakyReLU(0.3), nn.Linear(8, 3),
                        BatchlessNorm1d(3, gauge=gauge)).double()
    o = opt(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 6, generator=g, dtype=torch.float64) * 2 + 1, torch.randint(0, 3, (4,), generator=g)
        o.zero_grad()
        (nn.functional.cross_entropy(net(x), y) + weight * batchless_loss(net)).backward()
        o.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_nll_weight_and_gauge_leave_adams_training_unchanged():
    """Two knobs that cannot matter under the paper's update: the NLL reads sg(x), so its weight in the loss only scales
    the statistics' gradients, which Adam divides by their own RMS (up to eps); the gauge subtracts a constant"""
    adam = _train_paper_update()
    for weight in (10.0, 0.1):  # what differs is Adam's eps (1e-8) against gradients 10x larger or smaller
        torch.testing.assert_close(_train_paper_update(weight=weight), adam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_train_paper_update(gauge=False), adam, rtol=1e-12, atol=1e-12)
    sgd = _train_paper_update(opt=torch.optim.SGD)  # where the weight does matter: an optimizer without the normalization
    assert not torch.allclose(_train_paper_update(weight=10.0, opt=torch.optim.SGD), sgd, rtol=1e-3)
