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
