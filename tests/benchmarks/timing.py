"""Timing shared by the benchmark scripts: run the variants interleaved, one call each per round, and take medians,
so that load on a shared machine affects every variant alike. On CUDA every call is synchronized before and after."""
import statistics, time
import torch

def timeit(
    steps:dict, # name -> a callable; one call is one measurement
    repeats:int, # interleaved rounds
    device=None, # the steps' device (torch.device or str): on CUDA each call is synchronized
    warmup:int=2, # untimed calls of each step first (warm caches, compilation)
) -> dict: # {name: (median wall-clock seconds, median CPU seconds of this process)}
    "Time each callable in `steps`, the variants interleaved, one call each per round"
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == 'cuda' else (lambda: None)
    for f in steps.values():
        for _ in range(warmup): f()
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            sync(); t, c = time.perf_counter(), time.process_time(); f(); sync()
            cpu[k].append(time.process_time() - c); wall[k].append(time.perf_counter() - t)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}

def medians(steps:dict, repeats:int, device=None, clock:str='wall', warmup:int=2) -> dict:
    "{name: median seconds per call} by `clock`: 'wall', or 'cpu' (this process's CPU time; wall on CUDA, where the GPU works)"
    if clock not in ('wall', 'cpu'): raise ValueError(f"clock must be 'wall' or 'cpu' (got {clock!r})")
    on_cpu = clock == 'cpu' and (device is None or torch.device(device).type != 'cuda')
    return {k: v[on_cpu] for k, v in timeit(steps, repeats, device, warmup).items()}
