"CLI: python -m entry point, and sweeps interrupted inside a cell resume to the same result."
import json, subprocess, sys
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
