"CLI: python -m entry point, and sweeps interrupted inside a cell resume to the same result."
import contextlib, io, json, subprocess, sys
import pytest
import torch
import batchless_nb.cli as cli
import batchless_nb.callbacks as callbacks
from batchless_nb.learner import Checkpoint



pytestmark = pytest.mark.usefixtures('one_thread')

def test_python_m_train(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'batchless_nb.cli', 'train', '--model', 'mlp', '--epochs', '1', '--batch-size', '32',
                        '--out', str(tmp_path), '--no-progress', '--threads', '1'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)['best_val_acc'] > 0.3
    assert {p.name for p in tmp_path.iterdir()} == {'checkpoint.pt', 'config.json', 'metrics.json', 'model.pt', 'stats.npz'}


def test_help_lists_commands():
    r = subprocess.run([sys.executable, '-m', 'batchless_nb.cli', '--help'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in ('train', 'sweep', 'demo'))


class _Interrupted(Exception): pass


def test_sweep_resumes_inside_a_cell(tmp_path, monkeypatch):
    "Interrupt the second cell right after its step-30 checkpoint; the rerun finishes it from there, as if never cut"
    grid = dict(model='digits_cnn', norms=['none', 'bln-log'], batch_sizes=[16], seeds=[0], epochs=2, dropout=0.25,
                checkpoint_every=10, verbose=False)
    straight = cli.sweep(tmp_path/'straight', **grid)

    class CutCheckpoint(Checkpoint):
        def after_batch(self, learn):
            super().after_batch(learn)
            if 'bln-log' in str(self.path) and learn.step == 30: raise _Interrupted
    monkeypatch.setattr(cli, 'Checkpoint', CutCheckpoint)
    with pytest.raises(_Interrupted): cli.sweep(tmp_path/'cut', **grid)
    assert [r['norm'] for r in json.loads((tmp_path/'cut'/'results.json').read_text())['rows']] == ['none']
    monkeypatch.setattr(cli, 'Checkpoint', Checkpoint)

    assert torch.load(tmp_path/'cut'/'cells'/'bln-log-bs16-seed0'/'checkpoint.pt', weights_only=True)['step'] == 30

    starts = []  # (norm, step) at which each rerun's fit starts
    class Recording(callbacks.Learner):
        def fit(self, n_epochs=1, cbs=None):
            starts.append((self.step, n_epochs))
            return super().fit(n_epochs, cbs)
    monkeypatch.setattr(callbacks, 'Learner', Recording)
    resumed = cli.sweep(tmp_path/'cut', **grid)
    assert starts == [(30, 2)]  # only the cut cell ran, from its checkpoint: the rest of epoch 1, then epoch 2
    for r1, r2 in zip(straight, resumed, strict=True):
        assert r1['best_val_loss'] == r2['best_val_loss'] and r1['final_train_nll'] == r2['final_train_nll']
    a, b = (torch.load(d/'cells'/'bln-log-bs16-seed0'/'model.pt', weights_only=True) for d in (tmp_path/'straight', tmp_path/'cut'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _digits(out, epochs=1, **kw):
    return cli.train(model='mlp', epochs=epochs, batch_size=64, train_samples=256, out=out, progress=False, threads=1, **kw)


def test_eval_stats_on_by_default_for_bln_with_dropout(tmp_path):
    "BlN runs with dropout validate and save with eval-mode statistics unless told not to; without dropout, or without BlN, not"
    on = _digits(tmp_path/'on', dropout=0.25)
    off = _digits(tmp_path/'off', dropout=0.25, eval_stats=False, **cli.AUTO_STATS_UPDATE)  # the update `on` chose
    assert on['config']['eval_stats'] is True and off['config']['eval_stats'] is False
    assert _digits(tmp_path/'no_dropout')['config']['eval_stats'] is False
    assert _digits(tmp_path/'gn', norm='gn', dropout=0.25)['config']['eval_stats'] is False
    assert json.loads((tmp_path/'on'/'config.json').read_text())['eval_stats'] is True
    # the same training; only the saved statistics and what validation saw differ
    a, b = (torch.load(tmp_path/d/'model.pt', weights_only=True) for d in ('on', 'off'))
    stats = {k for k in a if k.endswith(('.mean', '.log_std'))}
    assert stats and all(torch.equal(a[k], b[k]) for k in a if k not in stats)
    assert all(not torch.equal(a[k], b[k]) for k in stats)


def test_stats_update_by_default_follows_eval_stats(tmp_path):
    """Named by no one, the statistics update is the natural one at eta 0.01 where eval-mode statistics are on (BlN with
    dropout), else the paper's: the same training as asking for it by name; a stats_eta without a moving average is refused"""
    chosen = lambda r: (r['config']['stats_update'], r['config']['stats_eta'])
    auto = _digits(tmp_path/'auto', dropout=0.25)
    assert chosen(auto) == ('natural', 0.01) and auto['config']['eval_stats'] is True
    named = _digits(tmp_path/'named', dropout=0.25, stats_update='natural', stats_eta=0.01)
    a, b = (torch.load(tmp_path/d/'model.pt', weights_only=True) for d in ('auto', 'named'))
    untimed = lambda r: [{k: v for k, v in e.items() if k not in ('time', 'peak_mem_mb')} for e in r['history']['epochs']]
    assert all(torch.equal(a[k], b[k]) for k in a) and untimed(auto) == untimed(named)
    assert chosen(_digits(tmp_path/'auto_eta', dropout=0.25, stats_eta=0.05)) == ('natural', 0.05)
    assert chosen(_digits(tmp_path/'paper', dropout=0.25, stats_update='paper')) == ('paper', None)
    assert chosen(_digits(tmp_path/'no_eval', dropout=0.25, eval_stats=False)) == ('paper', None)  # the paper's recipe
    assert chosen(_digits(tmp_path/'no_dropout')) == ('paper', None)
    assert chosen(_digits(tmp_path/'gn', norm='gn', dropout=0.25)) == ('paper', None)
    with pytest.raises(ValueError, match=r"stats_eta=0.05 weighs a moving average, but the statistics update is 'paper' "
                                         r"\(chosen as this run has no eval-mode statistics\)"):
        _digits(tmp_path/'eta', stats_eta=0.05)
    assert not (tmp_path/'eta').exists() or not any((tmp_path/'eta').iterdir())
    with pytest.raises(ValueError, match=r"stats_lr=0.01 is the statistics' learning rate under the paper's update, but the "
                                         r"update is 'natural' \(chosen as this run measures eval-mode statistics\)"):
        _digits(tmp_path/'lr', dropout=0.25, stats_lr=1e-2)


def test_options_the_named_update_does_not_use_are_refused(tmp_path):
    "An eta with the paper's update, or a learning rate with a moving average, would be ignored: refused before anything is written"
    with pytest.raises(ValueError, match=r"stats_eta=0.05 weighs a moving average, but the statistics update is 'paper' \(Adam"):
        _digits(tmp_path/'eta', stats_update='paper', stats_eta=0.05)
    with pytest.raises(ValueError, match=r"stats_lr=0.01 is the statistics' learning rate under the paper's update, but the update is 'samples'"):
        _digits(tmp_path/'lr', stats_update='samples', stats_lr=1e-2)
    assert not (tmp_path/'eta').exists() and not (tmp_path/'lr').exists()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        cli.main(["train", "--stats-update", "paper", "--stats-eta", "0.05", "--out", str(tmp_path/"cli")])
    assert 'stats_eta=0.05 weighs a moving average' in err.getvalue() and not (tmp_path/'cli').exists()


def test_dp_sgd_keeps_the_papers_update_with_dropout(tmp_path):
    "Under DP-SGD no eval-mode statistics are measured (they would read the private data), so the update stays the paper's"
    pytest.importorskip('opacus')
    res = _digits(tmp_path, dropout=0.25, dp_noise=1.0, track_stats=False)
    assert (res['config']['eval_stats'], res['config']['stats_update']) == (False, 'paper')


def test_a_run_resumes_with_its_own_stats_update(tmp_path):
    "A resumed run keeps the update it was made with: the paper's (named, or the default of an older version) or the chosen one"
    _digits(tmp_path/'paper', dropout=0.25, stats_update='paper')
    res = _digits(tmp_path/'paper', epochs=2, dropout=0.25, resume=True)
    assert (res['config']['stats_update'], res['config']['stats_eta'], res['config']['eval_stats']) == ('paper', None, True)
    _digits(tmp_path/'auto', dropout=0.25)
    res = _digits(tmp_path/'auto', epochs=2, dropout=0.25, resume=True)
    assert (res['config']['stats_update'], res['config']['stats_eta'], len(res['history']['epochs'])) == ('natural', 0.01, 2)
    with pytest.raises(cli.RunDirError, match="stats_update"):  # asked for explicitly: another setting than the run's
        _digits(tmp_path/'auto', epochs=3, dropout=0.25, resume=True, stats_update='paper')


def test_sweep_rows_name_the_update_each_bln_cell_ran(tmp_path):
    "The default BlN cell is named by its norm and its row says which update it ran; a named update is a method of its own"
    grid = dict(norms=['gn', 'bln-log'], batch_sizes=[64], seeds=[0], epochs=1, model='mlp', dropout=0.25, train_samples=128,
                verbose=False)
    rows = cli.sweep(out=tmp_path/'default', **grid)
    assert [(r['method'], r['stats_update'], r['stats_eta']) for r in rows] == [('gn', None, None), ('bln-log', 'natural', 0.01)]
    rows = cli.sweep(out=tmp_path/'named', stats_updates=['paper', 'samples'], **grid)
    assert [(r['method'], r['stats_update'], r['stats_eta']) for r in rows] == [
        ('gn', None, None), ('bln-log', 'paper', None), ('bln-log/samples0.01', 'samples', 0.01)]
    with pytest.raises(ValueError, match="name the same cells"):
        cli.sweep(out=tmp_path/'both', stats_updates=[None, 'paper'], **grid)
    assert not (tmp_path/'both').exists()
    with pytest.raises(ValueError, match="stats_lr=0.01 is the statistics' learning rate under the paper's update, but the update is 'samples'"):
        cli.sweep(out=tmp_path/'lr', stats_updates=['samples'], stats_lr=1e-2, **grid)  # refused before the GroupNorm cell trains
    assert not (tmp_path/'lr').exists()


def test_a_run_resumes_with_its_own_eval_stats_setting(tmp_path):
    "A run made before the option existed (its config has no eval_stats) resumes as it ran, without eval-mode statistics"
    _digits(tmp_path, eval_stats=False)
    cfg = json.loads((tmp_path/'config.json').read_text())
    del cfg['eval_stats']
    (tmp_path/'config.json').write_text(json.dumps(cfg))
    res = _digits(tmp_path, epochs=2, resume=True)
    assert res['config']['eval_stats'] is False and len(res['history']['epochs']) == 2
    with pytest.raises(cli.RunDirError, match="eval_stats"):  # asked for explicitly: another setting than the run's
        _digits(tmp_path, epochs=3, resume=True, eval_stats=True)


def test_eval_stats_refused_without_bln(tmp_path):
    "Asked for on a model without BlN layers, it has nothing to measure: an error before anything is written"
    with pytest.raises(ValueError, match="eval_stats measures the statistics of BlN layers; norm 'gn' has none"):
        _digits(tmp_path/'gn', norm='gn', eval_stats=True)
    assert not (tmp_path/'gn').exists() or not any((tmp_path/'gn').iterdir())


def test_sweep_eval_stats_applies_to_its_bln_cells(tmp_path):
    cli.sweep(out=tmp_path, norms=['gn', 'bln-log'], batch_sizes=[64], seeds=[0], epochs=1, model='mlp', dropout=0.25,
              train_samples=256, eval_stats=True)
    cfg = lambda n: json.loads((tmp_path/'cells'/f'{n}-bs64-seed0'/'config.json').read_text())['eval_stats']
    assert (cfg('gn'), cfg('bln-log')) == (False, True)


def test_cpp_kernel_trains_as_torchs_path(tmp_path, kernel_calls):
    "A run with the C++ kernel (float64) ends where the run without it does; in a sweep it is a setting of the BlN cells"
    a, b = (_digits(tmp_path/d, dtype='float64', cpp_kernel=k) for d, k in (('torch', False), ('cpp', True)))
    assert b['config']['cpp_kernel'] is True
    assert abs(a['summary']['final_val_loss'] - b['summary']['final_val_loss']) < 1e-9
    wa, wb = (torch.load(tmp_path/d/'model.pt', weights_only=True) for d in ('torch', 'cpp'))
    for k in wa: torch.testing.assert_close(wb[k], wa[k], rtol=1e-8, atol=1e-10, msg=k)
    assert kernel_calls  # the kernel ran the second run's layers
    cli.sweep(out=tmp_path/'sweep', norms=['gn', 'bln-log'], batch_sizes=[64], seeds=[0], epochs=1, model='mlp',
              train_samples=128, cpp_kernel=True)
    cfg = lambda n: json.loads((tmp_path/'sweep'/'cells'/f'{n}-bs64-seed0'/'config.json').read_text())['cpp_kernel']
    assert (cfg('gn'), cfg('bln-log')) == (False, True)


def test_cpp_kernel_under_dp_sgd_trains_as_torchs_path(tmp_path, kernel_calls):
    "Opacus's per-sample gradients from the kernel's layers: the same DP-SGD run (float64) as with torch's ops"
    pytest.importorskip('opacus')
    runs = [_digits(tmp_path/str(k), dtype='float64', dp_noise=1.0, cpp_kernel=k, track_stats=False) for k in (False, True)]
    assert runs[0]['summary']['final_val_loss'] == pytest.approx(runs[1]['summary']['final_val_loss'], abs=1e-12)
    wa, wb = (torch.load(tmp_path/d/'model.pt', weights_only=True) for d in ('False', 'True'))
    for k in wa: torch.testing.assert_close(wb[k], wa[k], rtol=1e-10, atol=1e-12, msg=k)
    assert kernel_calls  # the kernel ran the second run's layers


def test_cpp_kernel_refused_where_it_would_not_run(tmp_path):
    with pytest.raises(ValueError, match="norm 'gn' has none"): _digits(tmp_path/'gn', norm='gn', cpp_kernel=True)
    with pytest.raises(ValueError, match="does not run under amp"): _digits(tmp_path/'amp', amp='bf16', cpp_kernel=True)
    assert not (tmp_path/'gn').exists() and not (tmp_path/'amp').exists()


def test_eval_stats_refused_under_dp():
    pytest.importorskip('opacus')
    with pytest.raises(ValueError, match="eval-mode statistics are measured on the private training data"):
        cli.train(model='mlp', epochs=1, dp_noise=1.0, eval_stats=True, progress=False)
