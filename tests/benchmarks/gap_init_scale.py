"""Closing the gap (nbs/92_closing_the_gap.ipynb): how each network starts. Paper CNN on the CIFAR-10 subset, seed 0, before any step: cross-entropy and logit
std on 256 training images in train mode (dropout on, what the first steps see) and eval mode, for no normalization,
batch norm and BlN with the data-driven init as the paper measures it (eval mode, `dropout=False`), with dropout on
(`dropout=True`, now the default), with `preserve_function=True`, and without init. Writes a JSON list of rows to OUT.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/gap_init_scale.py CIFAR_ARCHIVE OUT.json
"""
import json, sys, warnings
import torch, torch.nn.functional as F
from batchless_nb.core import set_seed
from batchless_nb.data import get_data
from batchless_nb.init import init_batchless
from batchless_nb.models import get_model
from batchless_nb.norm import batchless_modules

def start(norm:str, init:str|None, x, y) -> dict:
    set_seed(0)
    m = get_model('paper_cnn', norm, input_shape=x.shape[1:], n_classes=10)
    if init == 'eval': init_batchless(m, x, n_samples=1000, passes=1, dropout=False)
    elif init == 'preserve_function': init_batchless(m, x, n_samples=1000, passes=1, preserve_function=True, dropout=False)
    elif init == 'train_mode': init_batchless(m, x, n_samples=1000, passes=1, dropout=True)
    row = dict(norm=norm, init=init or '-')
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the NLL of these probe forwards is not used
        for mode in ('train', 'eval'):
            m.train(mode == 'train'); torch.manual_seed(0)
            out = m(x[:256])
            row |= {f'{mode}_loss': F.cross_entropy(out, y[:256]).item(), f'{mode}_logit_std': out.std().item()}
    row['sigma_mean_per_layer'] = [l.learned_stats()[1].mean().item() for l in batchless_modules(m).values()]
    return row

if __name__ == '__main__':
    torch.set_num_threads(1)
    data = get_data('cifar10', valid='test', path=sys.argv[1])
    x, y = data.train.tensors[0][:1000], data.train.tensors[1][:1000]
    rows = [start('none', None, x, y), start('bn', None, x, y)] + \
           [start('bln-log', i, x, y) for i in ('eval', 'train_mode', 'preserve_function', None)]
    with open(sys.argv[2], 'w') as f: json.dump(rows, f, indent=1)
    for r in rows: print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != 'sigma_mean_per_layer'})
