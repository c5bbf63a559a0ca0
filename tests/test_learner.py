"Learner: micro-batch equivalence, exact resume, non-finite stop, AMP and compile on CPU."
import copy, json
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from batchless_nb.core import set_seed
from batchless_nb.data import get_data, dataloaders
from batchless_nb.models import get_model
from batchless_nb.learner import Learner, Callback, CancelFitException, Checkpoint, NonFiniteLossError, Recorder
from batchless_nb.callbacks import batchless_learner, bln_callback, InitBatchless
from batchless_nb.track import TrackStats



pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def data(): return get_data('digits')


def params(learn): return torch.cat([p.detach().flatten() for p in learn.model.parameters()])


def train(data, norm, micro_batch_size, model='mlp', epochs=1, dtype=torch.float64, batch_size=64, learner_kw=None, **kw):
    set_seed(0)
    m = get_model(model, norm, input_shape=data.input_shape, dropout=0.0, **kw).to(dtype)
    learn = batchless_learner(m, dataloaders(data, batch_size=batch_size, seed=0), micro_batch_size=micro_batch_size,
                              progress=False, device='cpu', **(learner_kw or {}))
    learn.fit(epochs)
    return learn


@pytest.mark.parametrize('norm', ['none', 'bln-log', 'bln-inv'])
@pytest.mark.parametrize('model', ['mlp', 'digits_cnn'])
def test_micro_batch_equivalence_float64(data, norm, model):
    "Micro-batches of 1 and 7 (a partial last one) give the parameters of whole batches of 64 (and 62 at the end)"
    whole = train(data, norm, None, model)
    ref = params(whole)
    for mbs in (1, 7):
        learn = train(data, norm, mbs, model)
        assert (params(learn) - ref).abs().max() <= 1e-9 * ref.abs().max()
        h, hw = learn.history['epochs'][-1], whole.history['epochs'][-1]
        assert h['train_loss'] == pytest.approx(hw['train_loss'], rel=1e-12)
        assert h['train_nll'] == pytest.approx(hw['train_nll'], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize('norm', ['bln-log', 'bln-abs', 'bln-inv'])
@pytest.mark.parametrize('model', ['mlp', 'digits_cnn'])
def test_micro_batch_equivalence_natural_float64(data, norm, model):
    "The natural-gradient statistics step on the accumulated gradient: micro-batches of 1 and 7 == whole batches"
    kw = dict(learner_kw=dict(stats_update='natural', stats_eta=0.3))
    whole = train(data, norm, None, model, **kw)
    assert bln_callback(whole).opt is not None and all(len(g['params']) == 2 for g in bln_callback(whole).opt.param_groups)
    ref = params(whole)
    for mbs in (1, 7):
        learn = train(data, norm, mbs, model, **kw)
        assert (params(learn) - ref).abs().max() <= 1e-9 * ref.abs().max()
        assert learn.history['epochs'][-1]['train_nll'] == pytest.approx(whole.history['epochs'][-1]['train_nll'], rel=1e-9, abs=1e-12)
    paper = train(data, norm, None, model)  # and the statistics did take another path than under Adam
    assert (params(paper) - ref).abs().max() > 1e-3


def test_micro_batch_equivalence_float32(data):
    whole, ones = train(data, 'bln-log', None, dtype=torch.float32), train(data, 'bln-log', 1, dtype=torch.float32)
    ref = params(whole)
    assert (params(ones) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_batch_norm_depends_on_micro_batch(data):
    "The counter-example: BN normalizes each micro-batch with its own statistics"
    assert (params(train(data, 'bn', 8)) - params(train(data, 'bn', None))).abs().max() > 1e-3


class StopAt(Callback):
    def __init__(self, step): self.at = step
    def after_batch(self, learn):
        if learn.step == self.at: raise CancelFitException()


def make(data, *cbs, norm='bln-log', **kw):
    set_seed(0)
    m = get_model('digits_cnn', norm, input_shape=data.input_shape, dropout=0.25)
    return batchless_learner(m, dataloaders(data, batch_size=64, seed=0), micro_batch_size=16, progress=False, device='cpu',
                             cbs=[Recorder(log_every=4), InitBatchless(n_samples=300), TrackStats(every=5), *cbs], **kw)


def comparable(h):
    "History without wall-clock time and memory"
    h = copy.deepcopy(h)
    for r in h['epochs']: del r['time'], r['peak_mem_mb']
    return h


@pytest.mark.parametrize('norm', ['bln-log', 'bn'])
def test_resume_equals_uninterrupted(data, norm, tmp_path):
    "2 epochs straight == 1 epoch, save, new Learner, load, 1 epoch (dropout on, so the RNG state matters)"
    straight = make(data, norm=norm); straight.fit(2)
    first = make(data, norm=norm); first.fit(1); first.save(tmp_path/'ckpt.pt')
    resumed = make(data, norm=norm).load(tmp_path/'ckpt.pt'); resumed.fit(1)
    assert torch.equal(params(resumed), params(straight))
    for (n, b), (_, b2) in zip(resumed.model.named_buffers(), straight.model.named_buffers()): assert torch.equal(b, b2), n
    assert comparable(resumed.history) == comparable(straight.history)
    json.dumps(resumed.history)


def test_resume_mid_epoch(data, tmp_path):
    "Cut at step 23, resume from the step-20 checkpoint in a new Learner"
    straight = make(data); straight.fit(2)
    make(data, Checkpoint(tmp_path/'ckpt.pt', every_steps=10), StopAt(23)).fit(2)
    resumed = make(data).load(tmp_path/'ckpt.pt')
    assert (resumed.epoch, resumed.step, resumed.step_in_epoch) == (1, 20, 2)
    resumed.fit(1)
    assert torch.equal(params(resumed), params(straight))
    assert comparable(resumed.history) == comparable(straight.history)


def test_resume_natural_stats(data, tmp_path):
    "stats_update='natural' resumes exactly too, and a checkpoint of the other kind is refused"
    kw = dict(stats_update='natural', stats_eta=0.05)
    straight = make(data, **kw); straight.fit(2)
    make(data, Checkpoint(tmp_path/'ckpt.pt', every_steps=10), StopAt(23), **kw).fit(2)
    resumed = make(data, **kw).load(tmp_path/'ckpt.pt')
    assert bln_callback(resumed).opt.param_groups[0]['lr'] == 0.05
    resumed.fit(1)
    assert torch.equal(params(resumed), params(straight))
    assert comparable(resumed.history) == comparable(straight.history)
    with pytest.raises(ValueError, match="saved with stats_update='natural'"): make(data).load(tmp_path/'ckpt.pt')


def test_resume_twice_in_one_process(data):
    "A cancelled fit continued by another fit call on the same learner"
    straight = make(data); straight.fit(2)
    learn = make(data, StopAt(7)); learn.fit(2)
    learn.cbs = [cb for cb in learn.cbs if not isinstance(cb, StopAt)]
    learn.fit(2)
    assert torch.equal(params(learn), params(straight))


@pytest.mark.parametrize('norm', ['none', 'bln-log'])
def test_non_finite_loss_stops_and_keeps_checkpoint(data, norm, tmp_path):
    x, y = data.train.tensors[0][:129].clone(), data.train.tensors[1][:129]
    set_seed(0)
    learn = batchless_learner(get_model('mlp', norm, input_shape=data.input_shape), (DataLoader(TensorDataset(x, y), batch_size=64), None),
                              progress=False, device='cpu', cbs=[Checkpoint(tmp_path/'ckpt.pt', every_steps=1)])
    learn.fit(1)
    before = params(learn)
    x[128] = float('inf')
    with pytest.raises(NonFiniteLossError, match='non-finite'): learn.fit(1)
    assert learn.step == 5 and torch.isfinite(params(learn)).all()
    ckpt = torch.load(tmp_path/'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 5
    learn2 = batchless_learner(get_model('mlp', norm, input_shape=data.input_shape), (DataLoader(TensorDataset(x, y), batch_size=64), None),
                               progress=False, device='cpu').load(tmp_path/'ckpt.pt')
    assert torch.equal(params(learn2), params(learn)) and not torch.equal(params(learn2), before)


def test_non_finite_gradient_stops(data):
    "A finite loss with a NaN gradient is refused too: sqrt(0 * u) is 0, its gradient inf * 0"
    set_seed(0)
    learn = batchless_learner(get_model('mlp', 'bln-log', input_shape=data.input_shape), dataloaders(data, batch_size=64, seed=0),
                              progress=False, device='cpu', loss_func=lambda p, y: (p.square().mean() * 0).sqrt())
    before = params(learn)
    with pytest.raises(NonFiniteLossError, match='non-finite gradients'): learn.fit(1)
    assert learn.step == 0 and torch.equal(params(learn), before)


def test_amp_bf16_cpu(data):
    set_seed(0)
    learn = batchless_learner(get_model('digits_cnn', 'bln-log', input_shape=data.input_shape), dataloaders(data, batch_size=64, seed=0),
                              amp='bf16', micro_batch_size=16, progress=False, device='cpu', cbs=[InitBatchless()])
    learn.fit(1)
    h = learn.history['epochs'][-1]
    assert h['valid_acc'] > 0.3 and all(v == v for v in h['nll'].values())


def test_channels_last(data):
    a = train(data, 'bln-log', None, 'digits_cnn', dtype=torch.float32)
    set_seed(0)
    m = get_model('digits_cnn', 'bln-log', input_shape=data.input_shape, dropout=0.0)
    b = batchless_learner(m, dataloaders(data, batch_size=64, seed=0), progress=False, device='cpu', channels_last=True)
    b.fit(1)
    assert (params(a) - params(b)).abs().max() <= 1e-4 * params(a).abs().max()


@pytest.mark.parametrize('backend', ['aot_eager', True])
def test_compile_runs(data, backend):
    "torch.compile (inductor needs a C++ compiler on CPU) gives what eager gives"
    eager = train(data, 'bln-log', 48, dtype=torch.float32)
    set_seed(0)
    m = get_model('mlp', 'bln-log', input_shape=data.input_shape, dropout=0.0)
    learn = batchless_learner(m, dataloaders(data, batch_size=64, seed=0), micro_batch_size=48, progress=False, device='cpu',
                              compile=backend)
    learn.fit(1)
    h, he = learn.history['epochs'][-1], eager.history['epochs'][-1]
    assert h['train_nll'] == pytest.approx(he['train_nll'], rel=1e-4)  # BlN's NLL reaches the loss under compile
    assert (params(learn) - params(eager)).abs().max() <= 1e-4 * params(eager).abs().max()


def test_errors(data):
    dls = dataloaders(data, batch_size=8)
    with pytest.raises(ValueError, match='micro_batch_size must be a positive'): Learner(torch.nn.Linear(2, 2), dls, micro_batch_size=0)
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        Learner(torch.nn.Linear(2, 2), dls, progress=False).load('/nonexistent/ckpt.pt')
    bad = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)
    with pytest.raises(ValueError, match=r'expected batches of \(inputs, targets\)'):
        Learner(torch.nn.Linear(2, 2), (bad, None), progress=False).fit(1)


def _dropout_run(data, micro_batch_size=None, num_workers=0, mode='per_sample'):
    set_seed(0)
    m = get_model('digits_cnn', 'bln-log', input_shape=data.input_shape, dropout=0.25, dropout_mode=mode).double()
    learn = batchless_learner(m, dataloaders(data, batch_size=64, seed=0, num_workers=num_workers),
                              micro_batch_size=micro_batch_size, progress=False, device='cpu')
    learn.fit(1)
    return learn


def test_per_sample_dropout_micro_batches_float64(data):
    "Per-sample dropout (the models' default): micro-batches of 5 train as the whole batch; torch's dropout does not"
    whole, parts = _dropout_run(data), _dropout_run(data, 5)
    assert (params(parts) - params(whole)).abs().max() <= 1e-12 * params(whole).abs().max()
    torch_whole, torch_parts = _dropout_run(data, mode='torch'), _dropout_run(data, 5, mode='torch')
    assert (params(torch_parts) - params(torch_whole)).abs().max() > 1e-6 * params(torch_whole).abs().max()


def test_sample_indices_with_worker_processes(data):
    "Loader workers load ahead; each batch still gets its own samples' indices, so the training is the same"
    from batchless_nb.resume import indexed_batches
    ds = TensorDataset(torch.arange(50) * 10)
    dl = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0), num_workers=2)
    for (b,), i in indexed_batches(dl): assert b.tolist() == (i * 10).tolist()
    assert (params(_dropout_run(data, num_workers=2)) - params(_dropout_run(data))).abs().max() == 0
