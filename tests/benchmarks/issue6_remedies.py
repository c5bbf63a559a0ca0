"""Issue 6, other remedies for the paper's recipe (Adam trains the BlN statistics) at batch 64 on the CIFAR-10 subset:
the width-invariant NLL (nll_reduction='channel_sum'), no data-driven init, and a separate stats learning rate.
Each run writes config.json + metrics.json (as `batchless-nb train`) and model.pt to OUT/cells/NAME.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/issue6_remedies.py OUT CIFAR_ARCHIVE [NAME ...]
"""
import json, sys
from pathlib import Path
import torch
from batchless_nb.core import set_seed
from batchless_nb.data import get_data, dataloaders
from batchless_nb.models import get_model
from batchless_nb.learner import Learner, InitBatchless, StatsTracker, save_json
from batchless_nb.cli import summarize

REMEDIES = {  # name -> (model options, learner options, data-driven init)
    'bln-log-channel_sum': (dict(nll_reduction='channel_sum'), {}, True),
    'bln-log-no_init': ({}, {}, False),
    'bln-log-stats_lr1e-2': ({}, dict(stats_lr=1e-2), True),
    'bln-log-natural0.1-no_init': ({}, dict(stats_update='natural', stats_eta=0.1), False),
}

def run(out:Path, name:str, data, batch_size=64, epochs=3, seed=0):
    model_kw, learn_kw, init = REMEDIES[name]
    d = out/'cells'/f'{name}-bs{batch_size}-seed{seed}'
    if (d/'metrics.json').exists(): return
    set_seed(seed)
    model = get_model('paper_cnn', 'bln-log', input_shape=data.input_shape, n_classes=data.n_classes, **model_kw)
    cbs = [StatsTracker()] + ([InitBatchless(n_samples=1000, passes=1)] if init else [])
    learn = Learner(model, dataloaders(data, batch_size=batch_size, seed=seed), lr=1e-3, cbs=cbs, progress=False, seed=seed, **learn_kw)
    learn.fit(epochs)
    config = dict(dataset='cifar10', model='paper_cnn', norm='bln-log', batch_size=batch_size, seed=seed, epochs=epochs,
                  remedy=name, init=init, **model_kw, **learn_kw, dropout=None, dtype='float32', sync_bn=False, valid='test',
                  valid_pct=0.2, split_seed=0, data_path=str(data_path))
    d.mkdir(parents=True, exist_ok=True)
    save_json(config, d/'config.json')
    save_json({'config': config, 'summary': summarize(learn.history), 'history': learn.history}, d/'metrics.json')
    torch.save(learn.model.state_dict(), d/'model.pt')
    s = summarize(learn.history)
    print(f"{name}: best test acc {s['best_val_acc']:.4f} final {s['final_val_acc']:.4f} ({s['time_s']:.0f}s)", flush=True)

if __name__ == '__main__':
    torch.set_num_threads(1)
    out, data_path = Path(sys.argv[1]), sys.argv[2]
    data = get_data('cifar10', valid='test', path=data_path)
    for name in sys.argv[3:] or REMEDIES: run(out, name, data)
