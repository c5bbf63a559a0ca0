"""Every bad input and fault tried on the command line and on checkpoints, with the one line each now gets (issue 14).

The tables are the record: an argument, a run directory, a data file or a checkpoint that is wrong, and the start
of the one line the user reads. No case may end in a traceback, write or change a file before it is refused, or
advise loading with `weights_only=False`. `tests/benchmarks/reliability_trials.py --table` prints the tables with
the messages, and runs the random kill / corrupt / resume trials."""
import io, json, os, pickle, shutil, signal, struct, subprocess, sys, tarfile, textwrap, warnings, zipfile
from pathlib import Path
import numpy as np
import pytest
import torch
import batchless_nb.cli as cli
from batchless_nb.learner import (Learner, Checkpoint, CheckpointWarning, DivergedError, DivergenceCheck,
                                  NonFiniteLossError, previous_checkpoint)
from batchless_nb.core import set_seed
from batchless_nb.data import get_data, dataloaders
from batchless_nb.models import get_model

pytestmark = pytest.mark.usefixtures('one_thread')

# A small run: 96 training samples in batches of 32, 3 steps an epoch, dropout on (so the RNG states matter)
RUN = dict(dataset='digits', model='mlp', norm='bln-log', train_samples=96, batch_size=32, dropout=0.25, seed=0,
           checkpoint_every=2, track_batches=1, progress=False, threads=1)
TRAIN = ['train', '--model', 'mlp', '--train-samples', '96', '--batch-size', '32', '--epochs', '1', '--no-progress', '--threads', '1']


def main_result(argv:list, capsys) -> tuple[int, str]:
    "Exit code and stderr of `cli.main(argv)`, run in this process"
    try: cli.main(argv); code = 0
    except SystemExit as e: code = e.code
    return code, capsys.readouterr().err


def assert_one_line(err:str):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and 'Traceback' not in err and 'weights_only' not in err, err


def snapshot(d:Path) -> dict:
    "Every file under `d` with its bytes: what a refused command must leave as it was"
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()} if d.exists() else {}


# --- arguments: exit code 2, one line in argparse's style, nothing written ------------------------------------------

BAD_ARGS = [  # (arguments after `train ...` (or a whole command), the message after 'batchless-nb CMD: error: ')
    (['--batch-size', '0'], "argument --batch-size: expected a positive integer (got '0')"),
    (['--batch-size', '-1'], "argument --batch-size: expected a positive integer (got '-1')"),
    (['--batch-size', '1.5'], "argument --batch-size: expected a positive integer (got '1.5')"),
    (['--epochs', '-2'], "argument --epochs: expected a positive integer (got '-2')"),
    (['--epochs', '0'], "argument --epochs: expected a positive integer (got '0')"),
    (['--checkpoint-every', '-5'], "argument --checkpoint-every: expected a positive integer (got '-5')"),
    (['--stats-every', '0'], "argument --stats-every: expected a positive integer (got '0')"),
    (['--track-batches', '0'], "argument --track-batches: expected a positive integer (got '0')"),
    (['--micro-batch-size', '0'], "argument --micro-batch-size: expected a positive integer (got '0')"),
    (['--train-samples', '0'], "argument --train-samples: expected a positive integer (got '0')"),
    (['--init-samples', '-3'], "argument --init-samples: expected a positive integer (got '-3')"),
    (['--threads', '0'], "argument --threads: expected a positive integer (got '0')"),
    (['--lr', 'inf'], "argument --lr: expected a finite positive number (got 'inf')"),
    (['--lr', 'nan'], "argument --lr: expected a finite positive number (got 'nan')"),
    (['--lr=-1e-3'], "argument --lr: expected a finite positive number (got '-1e-3')"),  # '--lr -1e-3': argparse takes -1e-3 for an option
    (['--stats-lr', 'nan'], "argument --stats-lr: expected a finite positive number (got 'nan')"),
    (['--stats-eta', '0'], "argument --stats-eta: expected a weight above 0 and at most 1 (got '0')"),
    (['--stats-eta', '1.5'], "argument --stats-eta: expected a weight above 0 and at most 1 (got '1.5')"),
    (['--valid-pct', '1'], "argument --valid-pct: expected a number between 0 and 1 (exclusive) (got '1')"),
    (['--dropout', '1'], "argument --dropout: expected a rate from 0 up to, not including, 1 (got '1')"),
    (['--max-loss', 'nan'], "argument --max-loss: expected a positive number (inf: no bound) (got 'nan')"),
    (['--norm', 'batchnorm'], "argument --norm: invalid choice: 'batchnorm' (choose from"),
    (['--dataset', 'mnist'], "argument --dataset: invalid choice: 'mnist' (choose from"),
    (['--init-passes', '3'], "argument --init-passes: invalid choice: 3 (choose from 1, 2)"),
    (['--device', 'gpu'], "argument --device: 'gpu' is not a device: expected cpu, cuda, cuda:N or mps"),
    pytest.param(['--device', 'cuda'], "argument --device: device 'cuda' needs CUDA, which this torch",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available here'), id='device-cuda-without-cuda'),
    (['sweep', '--batch-sizes', '4', '0'], "argument --batch-sizes: expected a positive integer (got '0')"),
    (['sweep', '--stats-eta', '0.1', 'nan'], "argument --stats-eta: expected a weight above 0 and at most 1 (got 'nan')"),
    (['demo', '--threads', '-1'], "argument --threads: expected a positive integer (got '-1')"),
]


def _argv(args:list, out:Path) -> list:
    return [*args, '--out', str(out)] if args[0] in ('sweep', 'demo') else [*TRAIN, *args, '--out', str(out)]


@pytest.mark.parametrize('args,message', BAD_ARGS, ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_bad_argument(tmp_path, capsys, args, message):
    code, err = main_result(_argv(args, tmp_path/'out'), capsys)
    cmd = args[0] if args[0] in ('sweep', 'demo') else 'train'
    assert code == 2 and err.startswith(f"batchless-nb {cmd}: error: {message}"), err
    assert err.rstrip().endswith(f"(see batchless-nb {cmd} --help)")
    assert_one_line(err)
    assert not (tmp_path/'out').exists()


def test_settings_checked_from_python_too(tmp_path):
    "`train` checks the same settings (a ValueError naming the setting) before anything is written"
    for k, v, msg in [('batch_size', 0, 'batch_size: expected a positive integer (got 0)'),
                      ('epochs', -2, 'epochs: expected a positive integer (got -2)'),
                      ('lr', float('inf'), 'lr: expected a finite positive number (got inf)'),
                      ('micro_batch_size', 2.5, 'micro_batch_size: expected a positive integer (got 2.5)'),
                      ('norm', 'batchnorm', "norm: expected one of ['none', 'bn'")]:
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
            cli.train(**RUN | {'out': tmp_path/'out', k: v})
    with pytest.raises(ValueError, match='batch_size: expected a positive integer'):
        cli.sweep(tmp_path/'sweep', batch_sizes=[4, 0], norms=['none'], verbose=False)
    assert not (tmp_path/'out').exists() and not (tmp_path/'sweep').exists()


# --- run directories: refused before training, exit code 2, the directory left as it was ----------------------------

@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> Path:
    "A finished 2-epoch run with a checkpoint every 2 steps: checkpoint.pt (step 6) and checkpoint.prev.pt (step 4)"
    out = tmp_path_factory.mktemp('finished')/'run'
    cli.train(**RUN | {'epochs': 2, 'out': out})
    return out


def _results_only(d:Path):
    for f in ('checkpoint.pt', 'checkpoint.prev.pt'): (d/f).unlink()

def _both_bad(d:Path):
    flip_tensor_byte(d/'checkpoint.pt'); (d/'checkpoint.prev.pt').write_bytes(b'')

def _file_as_out(d:Path): shutil.rmtree(d); d.write_text('not a directory')

def _read_only(d:Path): d.chmod(0o555)

BAD_RUN_DIRS = [  # (what was done to a finished run's directory, extra arguments, the message after 'error: ')
    ('nothing; no --resume', lambda d: None, [], "{out} already holds a run (checkpoint.pt, checkpoint.prev.pt, metrics.json, model.pt); "
                                                        "pass resume=True (--resume) to continue it or use another out directory"),
    ('both checkpoints deleted', _results_only, ['--resume'],
     "{out} holds results (metrics.json, model.pt) but no checkpoint to resume from, and --resume would train from scratch over them; "
     "use another out directory, or delete this one to start over"),
    ('latest flipped, previous emptied', _both_bad, ['--resume'],
     "{out} holds no usable checkpoint: {out}/checkpoint.pt is damaged: its content does not match the SHA-256 digest saved with it, "
     "and the previous checkpoint: {out}/checkpoint.prev.pt is empty (0 bytes); use another out directory, or delete this one to start over"),
    ('other settings', lambda d: None, ['--resume', '--lr', '0.01'], "{out} holds a run with other settings {{setting: (theirs, yours)}}: "
                                                                     "{{'lr': (0.001, 0.01)}}; resume with the same settings or use another --out"),
    ('--out is a file', _file_as_out, [], "cannot write to {out}: {out} is a file, not a directory; choose another out directory"),
    pytest.param('read-only --out', _read_only, ['--resume'], "cannot write to {out}: Permission denied in {out}; choose a writable out directory",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason='root writes to read-only directories'), id='read-only'),
]


@pytest.mark.parametrize('what,damage,args,message', BAD_RUN_DIRS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_run_directory(tmp_path, capsys, finished, what, damage, args, message):
    out = tmp_path/'run'
    shutil.copytree(finished, out)
    damage(out)
    before = snapshot(out)
    try:
        code, err = main_result([*TRAIN, '--epochs', '3', '--checkpoint-every', '2', '--dropout', '0.25', '--track-batches', '1',
                                 *args, '--out', str(out)], capsys)
    finally: out.chmod(0o755) if out.is_dir() else None
    assert code == 2 and err == f"batchless-nb train: error: {message.format(out=out)}\n", err
    assert snapshot(out) == before


def _sysfs_refuses() -> bool:
    "Whether /sys refuses new files (sysfs does, even to root): a directory to test an unwritable --out as root"
    import tempfile
    try: tempfile.TemporaryFile(dir='/sys').close()
    except OSError: return True
    return False


@pytest.mark.skipif(not Path('/sys').is_dir() or not _sysfs_refuses(), reason='no directory here refuses files to this user')
def test_unwritable_out_refused_before_training(capsys):
    "The read-only case above, where it cannot run as root: a --resume into a directory that takes no files"
    code, err = main_result([*TRAIN, '--resume', '--out', '/sys/batchless-run'], capsys)
    assert code == 2 and err == ("batchless-nb train: error: cannot write to /sys/batchless-run: Permission denied in /sys; "
                                 "choose a writable out directory\n"), err


def test_resume_of_an_unstarted_run_starts_afresh(tmp_path):
    "A directory with only the settings (killed before its first checkpoint) is no run to protect: --resume starts it"
    (tmp_path/'run').mkdir(); (tmp_path/'run'/'config.json').write_text('{}')
    r = cli.train(**RUN | {'epochs': 1, 'out': tmp_path/'run', 'resume': True})
    assert r['summary']['steps'] == 3


# --- data: exit code 1, one line naming the file, nothing written ------------------------------------------------------

def _archive(path:Path, labels=None, cut:int|None=None, garbage:bool=False):
    "A small CIFAR-10-format .tar.gz (20 images per batch); `labels` for both batches, `cut` bytes kept, or garbage"
    if garbage: path.write_bytes(b'this is not an archive' * 10); return
    rng, buf = np.random.default_rng(0), io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tf:
        for name in ('data_batch_1', 'test_batch'):
            raw = pickle.dumps({b'data': rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                                b'labels': labels if labels is not None else rng.integers(0, 10, 20).tolist()})
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}'); info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    raw = buf.getvalue()
    path.write_bytes(raw if cut is None else raw[:cut])

BAD_DATA = [  # (what, how to make the --data-path, the message after 'error: ')
    ('no CIFAR-10 there', lambda p: p.parent.mkdir(exist_ok=True), "CIFAR-10 not found at {p}"),
    ('not an archive', lambda p: _archive(p, garbage=True), "{p} is truncated or corrupt (ReadError: truncated header)"),
    ('truncated archive', lambda p: _archive(p, cut=600), "{p} is truncated or corrupt"),
    ('labels outside 0-9', lambda p: _archive(p, labels=[12] * 20), "cifar-10-batches-py/data_batch_1 in {p}: 20 of 20 labels are outside 0-9"),
]


@pytest.mark.parametrize('what,make,message', BAD_DATA, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_data(tmp_path, capsys, what, make, message):
    p = tmp_path/'data'/'cifar-10-python.tar.gz'
    p.parent.mkdir()
    make(p)
    where = p if p.exists() else p.parent.resolve()
    if not p.exists(): p = p.parent
    code, err = main_result([*TRAIN[:3], '--dataset', 'cifar10', '--data-path', str(p), '--out', str(tmp_path/'out'),
                             '--no-progress', '--threads', '1'], capsys)
    assert code == 1 and err.startswith(f"batchless-nb train: error: {message.format(p=where)}"), err
    assert_one_line(err)
    assert not (tmp_path/'out').exists()


# --- checkpoints: each damage falls back to the previous checkpoint, with one warning, and the run ends as if uncut ----

def flip_tensor_byte(path:Path, member:int=-1, at:int=3):
    "Change one byte of one tensor's data inside the torch zip archive `path` (the file still loads with torch)"
    info = [i for i in zipfile.ZipFile(path).infolist() if '/data/' in i.filename][member]
    raw = bytearray(path.read_bytes())
    n, m = struct.unpack('<HH', raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + n + m + at] ^= 0x10
    path.write_bytes(bytes(raw))

def flip_pickle_byte(path:Path, at:int=40):
    "Change one byte of the pickled structure (data.pkl) inside the archive"
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith('data.pkl'))
    raw = bytearray(path.read_bytes())
    n, m = struct.unpack('<HH', raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + n + m + at] ^= 0x01
    path.write_bytes(bytes(raw))

class _Evil:
    def __reduce__(self): return (os.system, ('touch PWNED',))

def _malicious(p:Path): torch.save({'model': _Evil(), 'opt': {}, 'step': 0}, p)  # a torch archive whose pickle runs a command

def _newer(p:Path):
    sd = torch.load(p, weights_only=True); sd['version'] = 99
    torch.save(sd, p)

def _model_state(p:Path): torch.save({'fc.weight': torch.zeros(2, 2)}, p)

def _v1(p:Path):
    "A checkpoint as batchless_nb wrote it before digests: format 1, no 'sha256'"
    sd = torch.load(p, weights_only=True); sd['version'] = 1; del sd['sha256']
    torch.save(sd, p)

BAD_CHECKPOINTS = [  # (what was done to checkpoint.pt (step 6 of a cut run), the warning's start); {p}: the file
    ('truncated to half', lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
     "{p} cannot be read (truncated or not a torch archive: failed finding central directory)"),
    ('truncated by 10 bytes', lambda p: p.write_bytes(p.read_bytes()[:-10]), "{p} cannot be read ("),
    ('emptied', lambda p: p.write_bytes(b''), "{p} is empty (0 bytes)"),
    ('byte flip in the first tensor', lambda p: flip_tensor_byte(p, 0), "{p} is damaged: its content does not match the SHA-256 digest saved with it"),
    ('byte flip in the last tensor', lambda p: flip_tensor_byte(p, -1), "{p} is damaged: its content does not match the SHA-256 digest saved with it"),
    ('byte flip in the middle tensor', lambda p: flip_tensor_byte(p, len(zipfile.ZipFile(p).infolist()) // 2, at=1),
     "{p} is damaged: its content does not match the SHA-256 digest saved with it"),
    ('byte flip in the pickle', flip_pickle_byte, "{p} "),
    ('deleted', lambda p: p.unlink(), "no checkpoint at {p}"),
    ('replaced by text', lambda p: p.write_text('hello'), "{p} is not a checkpoint: it does not start as the zip archives torch.save writes"),
    ('replaced by a plain pickle', lambda p: p.write_bytes(pickle.dumps({'model': {}, 'opt': {}, 'step': 0})),
     "{p} is not a checkpoint: it does not start as the zip archives torch.save writes"),
    ('replaced by a model state_dict', _model_state, "{p} is not a training checkpoint written by Learner.save (it holds a dict with keys ['fc.weight'])"),
    ('replaced by a malicious pickle', _malicious,
     "{p} cannot be read (it holds objects other than tensors and plain data, which the safe loader refuses)"),
    ('from a newer format', _newer, "{p} has format 99, newer than this batchless_nb reads (2): upgrade batchless_nb to resume it"),
]


@pytest.fixture(scope='module')
def straight(tmp_path_factory) -> dict:
    "The uncut 3-epoch run (9 steps): its model and history"
    out = tmp_path_factory.mktemp('straight')/'run'
    res = cli.train(**RUN | {'epochs': 3, 'out': out})
    return {'model': torch.load(out/'model.pt', weights_only=True), 'history': comparable(res['history'])}


@pytest.fixture(scope='module')
def cut(tmp_path_factory) -> Path:
    "The same run cut after 2 epochs: checkpoint.pt at step 6, checkpoint.prev.pt at step 4 (mid-epoch)"
    out = tmp_path_factory.mktemp('cut')/'run'
    cli.train(**RUN | {'epochs': 2, 'out': out})
    assert [torch.load(p, weights_only=True)['step'] for p in (out/'checkpoint.pt', out/'checkpoint.prev.pt')] == [6, 4]
    return out


def comparable(history:dict) -> dict:
    "A history without what depends on the machine (times, memory)"
    strip = lambda r: {k: v for k, v in r.items() if k not in ('time', 'peak_mem_mb')}
    return {'epochs': [strip(r) for r in history['epochs']], 'steps': history['steps']}


def assert_same_end(out:Path, res:dict, straight:dict):
    got = torch.load(out/'model.pt', weights_only=True)
    assert got.keys() == straight['model'].keys() and all(torch.equal(got[k], straight['model'][k]) for k in got)
    assert comparable(res['history']) == straight['history']


@pytest.mark.parametrize('what,damage,warning', BAD_CHECKPOINTS, ids=lambda v: v if isinstance(v, str) else None)
def test_damaged_checkpoint_falls_back(tmp_path, monkeypatch, cut, straight, what, damage, warning):
    out = tmp_path/'run'
    shutil.copytree(cut, out)
    monkeypatch.chdir(tmp_path)
    damage(out/'checkpoint.pt')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = cli.train(**RUN | {'epochs': 3, 'out': out, 'resume': True})
    msgs = [str(x.message) for x in w if issubclass(x.category, CheckpointWarning)]
    assert len(msgs) == 1 and msgs[0].startswith(warning.format(p=out/'checkpoint.pt')), msgs
    assert msgs[0].endswith(f"; using the previous checkpoint {out/'checkpoint.prev.pt'} (step 4) instead")
    assert 'weights_only' not in msgs[0] and '\n' not in msgs[0]
    assert not (tmp_path/'PWNED').exists()
    assert_same_end(out, res, straight)


def test_checkpoint_without_digest_still_loads(tmp_path, cut, straight):
    "A checkpoint of format 1 (before digests) resumes, unverified, without a warning (0.1.0's: tests/test_compat.py)"
    out = tmp_path/'run'
    shutil.copytree(cut, out)
    _v1(out/'checkpoint.pt')
    with warnings.catch_warnings():
        warnings.simplefilter('error', CheckpointWarning)
        res = cli.train(**RUN | {'epochs': 3, 'out': out, 'resume': True})
    assert_same_end(out, res, straight)


def test_cli_warning_is_one_line(tmp_path, capsys, cut):
    out = tmp_path/'run'
    shutil.copytree(cut, out)
    flip_tensor_byte(out/'checkpoint.pt')
    code, err = main_result([*TRAIN, '--epochs', '3', '--checkpoint-every', '2', '--dropout', '0.25', '--track-batches', '1',
                             '--resume', '--out', str(out)], capsys)
    assert code == 0 and err == (f"batchless-nb train: warning: {out/'checkpoint.pt'} is damaged: its content does not match the SHA-256 "
                                 f"digest saved with it; using the previous checkpoint {out/'checkpoint.prev.pt'} (step 4) instead\n")


def test_save_keeps_only_a_good_previous(tmp_path):
    "A damaged latest checkpoint is not kept as the previous one: the good previous stays"
    set_seed(0)
    learn = Learner(torch.nn.Linear(4, 2), (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4),
                    torch.randint(0, 2, (8,))), batch_size=4), None), progress=False, device='cpu')
    p = tmp_path/'c.pt'
    learn.fit(1); learn.save(p); learn.fit(1); learn.save(p)
    assert [torch.load(f, weights_only=True)['step'] for f in (p, previous_checkpoint(p))] == [4, 2]
    flip_tensor_byte(p)
    learn.fit(1); learn.save(p)
    assert [torch.load(f, weights_only=True)['step'] for f in (p, previous_checkpoint(p))] == [6, 2]


# --- kills during a write (a subprocess SIGKILLs itself), then --resume ------------------------------------------------

KILLER = textwrap.dedent('''
    import os, signal, sys, torch
    mode, n = sys.argv[1], int(sys.argv[2])
    count = [0]
    if mode == 'write':  # die halfway through writing the n-th checkpoint
        save = torch.save
        def dying_save(obj, f, *a, **k):
            if isinstance(obj, dict) and 'sha256' in obj:
                count[0] += 1
                if count[0] == n: f.write(b'PK' + bytes(1000)); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *a, **k)
        torch.save = dying_save
    else:  # die between moving checkpoint.pt to checkpoint.prev.pt and moving the new one in
        replace = os.replace
        def dying_replace(a, b):
            replace(a, b)
            if str(b).endswith('checkpoint.prev.pt'):
                count[0] += 1
                if count[0] == n: os.kill(os.getpid(), signal.SIGKILL)
        os.replace = dying_replace
    from batchless_nb.cli import main
    main(sys.argv[3:])
''')

def cli_args(out:Path, epochs:int) -> list:
    return [*TRAIN[:-2], '--threads', '1', '--epochs', str(epochs), '--checkpoint-every', '2', '--dropout', '0.25',
            '--track-batches', '1', '--out', str(out)]


@pytest.mark.parametrize('mode,n,resumes_at', [('write', 3, 3), ('rename', 3, 4)])
def test_kill_during_a_checkpoint_write(tmp_path, capsys, straight, mode, n, resumes_at):
    """Killed while writing its 3rd checkpoint (of steps 2, 3, 4, 6, ...), the run resumes from the 2nd (step 3); killed
    between the renames of its 4th (step 6), from the 3rd, then the previous one (step 4). Either ends as if uncut."""
    out = tmp_path/'run'
    r = subprocess.run([sys.executable, '-c', KILLER, mode, str(n), *cli_args(out, 3)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert len(list(out.glob('.checkpoint.pt.*.tmp'))) == 1  # the killed writer's temporary
    if mode == 'write': assert torch.load(out/'checkpoint.pt', weights_only=True)['step'] == resumes_at
    else: assert not (out/'checkpoint.pt').exists() and torch.load(out/'checkpoint.prev.pt', weights_only=True)['step'] == resumes_at
    code, err = main_result([*cli_args(out, 3)[:-2], '--resume', '--out', str(out)], capsys)
    assert code == 0, err
    if mode == 'rename': assert err == (f"batchless-nb train: warning: no checkpoint at {out/'checkpoint.pt'}; using the previous "
                                        f"checkpoint {out/'checkpoint.prev.pt'} (step 4) instead\n")
    else: assert err == ''
    assert not list(out.glob('.*.tmp'))  # the killed writer's temporary is gone
    res = json.loads((out/'metrics.json').read_text())
    assert_same_end(out, res, straight)


# --- divergence: stopped before the step, the last good checkpoint named ----------------------------------------------

@pytest.mark.parametrize('norm', ['none', 'bn', 'bln-log'])
def test_lr_1e6_stops_every_norm(tmp_path, capsys, norm):
    "--lr 1e6 used to end with exit code 0 and a validation loss of 5e26 for none and bn"
    out = tmp_path/'run'
    code, err = main_result([*TRAIN, '--norm', norm, '--lr', '1e6', '--out', str(out)], capsys)
    assert code == 1 and err.startswith('batchless-nb train: error: ') and 'no checkpoint was written yet' in err, err
    assert ('training diverged at step 1' if norm != 'bln-log' else 'non-finite activations at step 1') in err
    assert_one_line(err)
    assert not (out/'model.pt').exists()


def test_divergence_names_the_last_good_checkpoint(tmp_path):
    "A run that diverges after a checkpoint (here: its learning rate raised to 1e6 after epoch 1) names that checkpoint"
    data = get_data('digits')
    set_seed(0)
    learn = Learner(get_model('mlp', 'none', input_shape=data.input_shape), dataloaders(data, batch_size=64, seed=0),
                    progress=False, device='cpu', cbs=[Checkpoint(tmp_path/'c.pt'), DivergenceCheck()])
    learn.fit(1)
    for g in learn.opt.param_groups: g['lr'] = 1e6
    with pytest.raises(DivergedError, match=f"the last good checkpoint is {tmp_path/'c.pt'} \\(step 18\\)") as e:
        learn.fit(1)
    assert isinstance(e.value, NonFiniteLossError) and learn.step == 19  # one step at 1e6 taken, the next refused
    assert torch.load(tmp_path/'c.pt', weights_only=True)['step'] == 18
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
