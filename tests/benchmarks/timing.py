"""Timing shared by the benchmark scripts: run the variants interleaved, one call each per round, and take medians,
so that load on a shared machine affects every variant alike."""
import statistics, time

def timeit(steps:dict, repeats:int) -> dict:
    "{name: (median wall-clock seconds, median CPU seconds)} of each callable in `steps`, after two warm-up calls each"
    wall, cpu = {k: [] for k in steps}, {k: [] for k in steps}
    for f in steps.values(): f(); f()  # warm up
    for _ in range(repeats):
        for k, f in steps.items():
            t, c = time.perf_counter(), time.process_time(); f()
            cpu[k].append(time.process_time() - c); wall[k].append(time.perf_counter() - t)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}
