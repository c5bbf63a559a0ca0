"""The largest task loss of a single training step on digits, per norm, batch size and learning rate: what the CLI's
default `--max-loss` (1e4) must stay above for runs that train, and below for runs that diverge.

    OMP_NUM_THREADS=1 nice -n 15 python tests/benchmarks/max_step_loss.py   # about 5 minutes on two busy cores

Batch size 1 trains on the first 400 samples only (2 epochs each); the bound itself is off (max_loss=None)."""
import torch
import batchless_nb.cli as cli
from batchless_nb.learner import Callback


class MaxLoss(Callback):
    "The largest micro-batch task loss seen"
    def __init__(self): self.max = 0.0
    def after_loss(self, learn): self.max = max(self.max, float(learn.task_loss.detach()))


if __name__ == '__main__':
    torch.set_num_threads(1)
    callbacks = cli._callbacks
    print(f"{'norm':8s} {'batch':>5s} {'lr':>6s} {'max step loss':>14s} {'final val loss':>15s} {'final val acc':>14s}")
    for norm in ('none', 'bn', 'bln-log'):
        for bs in (1, 4, 64):
            if norm == 'bn' and bs == 1: continue
            for lr in (1e-3, 1e-2, 1e-1, 1e6):
                m = MaxLoss()
                cli._callbacks = lambda *a: callbacks(*a) + [m]
                try:
                    s = cli.train(norm=norm, batch_size=bs, lr=lr, epochs=2, progress=False, threads=1, max_loss=None,
                                  train_samples=400 if bs == 1 else None)['summary']
                    end = f"{s['final_val_loss']:15.3g} {s['final_val_acc']:14.3f}"
                except FloatingPointError as e: end = f"  stopped: {str(e)[:60]}"
                print(f"{norm:8s} {bs:5d} {lr:6g} {m.max:14.3g} {end}", flush=True)
