"""Kill / corrupt / resume trials of `batchless-nb train`, and the table of bad inputs with the messages they now get.

    python tests/benchmarks/reliability_trials.py [--kills 10] [--timer-kills 6] [--corruptions 10] [--write-kills 6] [--seed 0]
    python tests/benchmarks/reliability_trials.py --table

Each trial starts a run in a subprocess and ends it abruptly, then resumes it with `--resume` in a fresh process and
compares the end with an uninterrupted run: model.pt bitwise, and the history without times and memory.
- kills: SIGKILL at a random optimizer step, just before or just after that step's checkpoint;
- timer kills: SIGKILL after a random wall-clock time, wherever the run is (loading, training, writing);
- corruptions: a kill at a random step after at least two checkpoints, then the latest checkpoint damaged at random
  (truncated, emptied, a byte changed in tensor data or anywhere, deleted, replaced by garbage); in one trial of
  five the previous checkpoint too, when the resume must refuse (exit code 2) and leave the directory as it was;
- write kills: SIGKILL halfway through writing a random checkpoint, or between its two renames.
Run it under `nice -n 15`; each trial is two runs of about 10 s of CPU each."""
import argparse, json, os, random, shutil, signal, subprocess, sys, tempfile, textwrap, time, zipfile
from pathlib import Path
import torch

# digits CNN with BlN and dropout, 480 training samples in batches of 16: 30 steps an epoch, 60 in all, a checkpoint every 10
ARGS = ['train', '--dataset', 'digits', '--model', 'digits_cnn', '--norm', 'bln-log', '--batch-size', '16', '--epochs', '2',
        '--train-samples', '480', '--dropout', '0.25', '--checkpoint-every', '10', '--track-batches', '1', '--threads', '1', '--no-progress']
EVERY = 10

CHILD = textwrap.dedent('''
    import os, signal, sys
    mode, arg = sys.argv[1], sys.argv[2]
    import torch
    import batchless_nb.cli as cli
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    count = [0]
    if mode == 'step':  # at optimizer step k, before or after that step's checkpoint (Checkpoint's order is 50)
        k, when = int(arg.split(':')[0]), arg.split(':')[1]
        class Kill(cli.Callback):
            order = 40 if when == 'before' else 60
            def after_batch(self, learn):
                if learn.step == k: die()
        callbacks = cli._callbacks
        cli._callbacks = lambda *a: callbacks(*a) + [Kill()]
    elif mode == 'timer':  # after this many seconds, counted once the imports are done
        import threading
        threading.Timer(float(arg), die).start()
    elif mode == 'write':  # halfway through writing the n-th checkpoint
        save = torch.save
        def dying_save(obj, f, *a, **k):
            if isinstance(obj, dict) and 'sha256' in obj:
                count[0] += 1
                if count[0] == int(arg): f.write(b'PK' + bytes(50_000)); f.flush(); die()
            return save(obj, f, *a, **k)
        torch.save = dying_save
    elif mode == 'rename':  # between moving checkpoint.pt to checkpoint.prev.pt and moving the new one in
        replace = os.replace
        def dying_replace(a, b):
            replace(a, b)
            if str(b).endswith('checkpoint.prev.pt'):
                count[0] += 1
                if count[0] == int(arg): die()
        os.replace = dying_replace
    cli.main(sys.argv[3:])
''')


def _run(args:list, out:Path, child:tuple|None=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-c', CHILD, *child] if child else [sys.executable, '-m', 'batchless_nb.cli']
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    return subprocess.run([*cmd, *args, '--out', str(out)], capture_output=True, text=True, env=env, timeout=1800)


def _comparable(metrics:dict) -> dict:
    strip = lambda r: {k: v for k, v in r.items() if k not in ('time', 'peak_mem_mb')}
    return {'epochs': [strip(r) for r in metrics['history']['epochs']], 'steps': metrics['history']['steps']}


def _same_end(out:Path, ref:Path) -> bool:
    if not (out/'model.pt').is_file(): return False
    a, b = (torch.load(d/'model.pt', weights_only=True) for d in (out, ref))
    same_model = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return same_model and _comparable(json.loads((out/'metrics.json').read_text())) == _comparable(json.loads((ref/'metrics.json').read_text()))


def _resume(out:Path, ref:Path) -> tuple[str, str]:
    "Resume the run in `out`; its outcome and stderr"
    r = _run([*ARGS, '--resume'], out)
    err = r.stderr.strip()
    if r.returncode != 0: return f'resume failed (exit {r.returncode})', err
    return ('equal' if _same_end(out, ref) else 'MISMATCH'), err


# --- damage ---------------------------------------------------------------------------------------------------------

def _member_data_offset(raw:bytes, info:zipfile.ZipInfo) -> int:
    n, m = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], 'little'), int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], 'little')
    return info.header_offset + 30 + n + m

def damage(p:Path, how:str, rng:random.Random) -> str:
    "Damage the checkpoint `p` in the way `how`; a description"
    raw = p.read_bytes()
    if how == 'truncate':
        n = rng.randrange(1, len(raw)); p.write_bytes(raw[:n]); return f'truncated to {n} of {len(raw)} bytes'
    if how == 'empty': p.write_bytes(b''); return 'emptied'
    if how == 'delete': p.unlink(); return 'deleted'
    if how == 'garbage': p.write_bytes(rng.randbytes(rng.randrange(1, 5000))); return 'replaced by random bytes'
    b = bytearray(raw)
    if how == 'flip-tensor':
        infos = [i for i in zipfile.ZipFile(p).infolist() if '/data/' in i.filename and i.file_size > 0]
        info = rng.choice(infos)
        i = _member_data_offset(raw, info) + rng.randrange(info.file_size)
        b[i] ^= 1 << rng.randrange(8); p.write_bytes(bytes(b)); return f'one bit flipped in {info.filename} (byte {i})'
    if how == 'flip-any':
        i = rng.randrange(len(b)); b[i] ^= 1 << rng.randrange(8); p.write_bytes(bytes(b)); return f'one bit flipped at byte {i} of {len(b)}'
    raise ValueError(how)

DAMAGES = ('truncate', 'empty', 'delete', 'garbage', 'flip-tensor', 'flip-any')


def _snapshot(d:Path) -> dict: return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# --- trials ----------------------------------------------------------------------------------------------------------

def trials(n_kills:int, n_timer:int, n_corrupt:int, n_write:int, seed:int, root:Path):
    rng = random.Random(seed)
    ref = root/'straight'
    t0 = time.perf_counter()
    r = _run(ARGS, ref)
    assert r.returncode == 0, r.stderr
    summary = json.loads((ref/'metrics.json').read_text())['summary']
    steps, t_ref = summary['steps'], time.perf_counter() - t0
    print(f"uninterrupted run: {steps} steps, {t_ref:.0f}s wall clock", flush=True)
    rows = []

    def record(kind, what, outcome, err=''):
        warn = [l for l in err.splitlines() if ': warning: ' in l or ': error: ' in l]
        rows.append((kind, what, outcome, warn[0] if warn else ''))
        print(f"{kind:12s} {what:60s} -> {outcome}{'  | ' + warn[0] if warn else ''}", flush=True)

    for i in range(n_kills):
        k, when = rng.randrange(1, steps), rng.choice(['before', 'after'])
        out = root/f'kill{i}'
        r = _run(ARGS, out, ('step', f'{k}:{when}'))
        if r.returncode != -signal.SIGKILL: record('kill', f'step {k}, {when} its checkpoint', f'not killed (exit {r.returncode})'); continue
        record('kill', f'step {k}, {when} its checkpoint', *_resume(out, ref))
    for i in range(n_timer):
        t = rng.uniform(0, t_ref)
        out = root/f'timer{i}'
        r = _run(ARGS, out, ('timer', f'{t:.2f}'))
        what = f'after {t:.1f}s'
        if r.returncode == 0: record('timer kill', what, 'finished before the kill'); continue
        if not out.exists() or not (out/'config.json').exists():
            record('timer kill', what + ' (before config.json)', *_resume(out, ref)); continue
        record('timer kill', what + f" ({len(list(out.glob('.*.tmp')))} stale tmp)", *_resume(out, ref))
    for i in range(n_corrupt):
        k = rng.randrange(2 * EVERY + 1, steps)  # at least two checkpoints exist
        out = root/f'corrupt{i}'
        r = _run(ARGS, out, ('step', f'{k}:after'))
        how = rng.choice(DAMAGES)
        what = f'killed at step {k}; latest ' + damage(out/'checkpoint.pt', how, rng)
        if rng.random() < 0.2:  # both checkpoints: the resume must refuse and change nothing
            what += '; previous ' + damage(out/'checkpoint.prev.pt', rng.choice([d for d in DAMAGES if d != 'flip-any']), rng)
            before = _snapshot(out)
            r = _run([*ARGS, '--resume'], out)
            ok = r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and _snapshot(out) == before
            record('corrupt both', what, 'refused, directory unchanged' if ok else f'UNEXPECTED (exit {r.returncode})', r.stderr)
        else: record('corrupt', what, *_resume(out, ref))
    for i in range(n_write):
        mode = rng.choice(['write', 'rename'])
        n = rng.randrange(2 if mode == 'rename' else 1, steps // EVERY + 1)  # the n-th checkpoint (the first has nothing to rename)
        out = root/f'write{i}'
        r = _run(ARGS, out, (mode, str(n)))
        what = f"killed {'halfway through writing' if mode == 'write' else 'between the renames of'} checkpoint {n}"
        if r.returncode != -signal.SIGKILL: record('write kill', what, f'not killed (exit {r.returncode})'); continue
        stale = len(list(out.glob('.checkpoint.pt.*.tmp')))
        outcome, err = _resume(out, ref)
        record('write kill', what + f' ({stale} stale tmp)', outcome + ('' if not list(out.glob('.*.tmp')) else ', STALE TMP LEFT'), err)
    print('\noutcomes:')
    for kind in dict.fromkeys(r[0] for r in rows):
        got = [r[2] for r in rows if r[0] == kind]
        print(f"  {kind:12s} {len(got):3d} trials: " + ', '.join(f"{got.count(o)} {o}" for o in dict.fromkeys(got)))


# --- the table of bad inputs, with the messages they get now -------------------------------------------------------------

def table():
    "Run the cases of tests/test_reliability.py in this process and print each with the one line it gets"
    import contextlib, io, warnings
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import test_reliability as T
    import batchless_nb.cli as cli
    torch.set_num_threads(1)

    def main(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try: cli.main(argv); code = 0
            except SystemExit as e: code = e.code
        return code, err.getvalue().strip()

    def row(what, code, line): print(f"| {what} | {code} | `{line}` |", flush=True)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        print('| bad input | exit | message |\n|---|---|---|')
        for case in T.BAD_ARGS:
            args = case.values[0] if hasattr(case, 'values') else case[0]
            if hasattr(case, 'marks') and any(m.args and m.args[0] for m in case.marks): continue
            row(' '.join(args), *main(T._argv(args, d/'out')))
        finished = d/'finished'
        cli.train(**T.RUN | {'epochs': 2, 'out': finished})
        for case in T.BAD_RUN_DIRS:
            what, damage_, args, _ = case.values if hasattr(case, 'values') else case
            if hasattr(case, 'marks') and any(m.args and m.args[0] for m in case.marks): continue
            out = d/'rundir'
            shutil.rmtree(out, ignore_errors=True); out.unlink(missing_ok=True) if out.is_file() else None
            shutil.copytree(finished, out); damage_(out)
            row(f"run directory: {what} {' '.join(args)}", *main([*T.TRAIN, '--epochs', '3', '--checkpoint-every', '2', '--dropout', '0.25',
                                                                  '--track-batches', '1', *args, '--out', str(out)]))
            if out.is_file(): out.unlink()
        for what, make, _ in T.BAD_DATA:
            p = d/'data'/what.replace(' ', '_')/'cifar-10-python.tar.gz'; p.parent.mkdir(parents=True)
            make(p)
            row(f"--data-path: {what}", *main([*T.TRAIN[:3], '--dataset', 'cifar10', '--data-path', str(p if p.exists() else p.parent),
                                               '--out', str(d/'out'), '--no-progress', '--threads', '1']))
        cut = d/'cut'
        cli.train(**T.RUN | {'epochs': 2, 'out': cut})
        for case in T.BAD_CHECKPOINTS:
            what, damage_, _ = case
            out = d/'ckpt'
            shutil.rmtree(out, ignore_errors=True); shutil.copytree(cut, out)
            damage_(out/'checkpoint.pt')
            with warnings.catch_warnings(record=True):
                warnings.simplefilter('always')
                code, err = main([*T.TRAIN, '--epochs', '3', '--checkpoint-every', '2', '--dropout', '0.25', '--track-batches', '1',
                                  '--resume', '--out', str(out)])
            row(f"checkpoint.pt {what}, --resume", code, err)
        for norm in ('none', 'bn', 'bln-log'):
            row(f"--norm {norm} --lr 1e6", *main([*T.TRAIN, '--norm', norm, '--lr', '1e6', '--out', str(d/f'lr-{norm}')]))


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--table', action='store_true', help='print the table of bad inputs and their messages, run no trials')
    p.add_argument('--kills', type=int, default=10)
    p.add_argument('--timer-kills', type=int, default=6)
    p.add_argument('--corruptions', type=int, default=10)
    p.add_argument('--write-kills', type=int, default=6)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()
    if a.table: table()
    else:
        with tempfile.TemporaryDirectory() as d: trials(a.kills, a.timer_kills, a.corruptions, a.write_kills, a.seed, Path(d))
