"""Speed and memory of the held-out memorization estimator against its arithmetic floor.

A synthetic store of K models x n training x m test examples (random inclusion masks at --ratio, 0/1
targets with per-example difficulty, memorized training examples and planted train->test pairs). It
times `memorization` and `influence(topk=10, threshold=0.15)` without the full matrix. The floor of
`influence` is its matrix products, 2*K*n*m FLOPs, at the float32 matmul rate measured in this process
on the same block shape ([block_rows, K] @ [K, m]), best of all the runs (one before each round), so load
from other processes makes the floor lower and the ratio more honest, not less. `influence` runs
--repeats rounds; the table gives the median and the range of its ratio to the floor. Its numba kernels
are compiled (or loaded from numba's cache) by a first call on a tiny store, timed and printed on its
own line, out of the ratio; `NUMBA_CACHE_DIR=$(mktemp -d)` makes that the cost of compiling them.
--compare FILE also times the `influence` of another estimator.py (for instance the pure-numpy one,
`git show edfd1aa:memorization/estimator.py > /tmp/numpy_estimator.py`) in the same process,
alternating with this one (each first in every other round), and checks that both give the same
outputs. Peak memory is ru_maxrss, reported after each step with the bytes of the synthetic
input itself; this estimator runs first, so its figure is its own. A benchmark, not a test: it prints a
table and never fails on a slow machine.

    .venv/bin/python benchmarks/estimator.py [--n_models 2000 --n_train 50000 --n_test 10000]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as eval_splits.py sets it; pass 28 for OpenBLAS's default

import numpy as np  # noqa: E402

GB = 1e9


def peak_rss() -> float:
    """Peak resident memory of this process so far, in GB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def synthetic_store(n_models: int, n_train: int, n_test: int, ratio: float, seed: int):
    """Inclusion mask and 0/1 targets, built a few models at a time so no float64 K x n array exists."""
    rng = np.random.default_rng(seed)
    difficulty = rng.beta(5, 1, n_train).astype(np.float32)  # P(right) on a training example left out
    difficulty[rng.choice(n_train, n_train // 20, replace=False)] = 0.0  # 5% right only when trained on
    test_difficulty = rng.beta(5, 1, n_test).astype(np.float32)
    planted_train = rng.choice(n_train, 200, replace=False)  # test j right exactly when train i was in
    planted_test = rng.choice(n_test, 200, replace=False)
    mask = np.empty((n_models, n_train), bool)
    target = np.empty((n_models, n_train), np.float32)
    test_target = np.empty((n_models, n_test), np.float32)
    for models in (slice(s, min(s + 100, n_models)) for s in range(0, n_models, 100)):
        size = models.stop - models.start
        mask[models] = rng.random((size, n_train), np.float32) < ratio
        target[models] = mask[models] | (rng.random((size, n_train), np.float32) < difficulty)
        test_target[models] = rng.random((size, n_test), np.float32) < test_difficulty
        test_target[models, planted_test] = mask[models][:, planted_train]
    return mask, target, test_target


def matmul_rate(block_rows: int, n_models: int, n_test: int, repeats: int = 3) -> float:
    """Best float32 GFLOP/s of [block_rows, K] @ [K, m], the product `influence` runs per block."""
    rng = np.random.default_rng(1)
    left = (rng.random((n_models, block_rows), np.float32) < 0.7).astype(np.float32).T  # transposed view, as there
    right = (rng.random((n_models, n_test), np.float32) < 0.7).astype(np.float32)
    out = np.empty((block_rows, n_test), np.float32)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(left, right, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * block_rows * n_models * n_test / best / GB


def blas_threads() -> str:
    """Threads of the BLAS numpy uses, from threadpoolctl where it is installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "?"
    threads = {str(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"}
    return ",".join(sorted(threads)) or "?"


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def load_estimator(path: str):
    """The estimator module at `path` (a copy of memorization/estimator.py), imported under its own name."""
    spec = importlib.util.spec_from_file_location(f"compared_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_call(estimator) -> tuple[float, str]:
    """Seconds of a first `influence` call on a tiny store (numba compiles or loads its kernels) and the
    cache's hits and misses."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    estimator.influence(rng.random((20, 30)) < 0.6, (rng.random((20, 10)) < 0.5).astype(np.float32), topk=3)
    seconds = time.perf_counter() - start
    kernels = [f for f in vars(estimator).values() if hasattr(f, "stats") and hasattr(f, "py_func")]
    hits = sum(sum(f.stats.cache_hits.values()) for f in kernels)
    misses = sum(sum(f.stats.cache_misses.values()) for f in kernels)
    return seconds, f"numba kernels: {hits} loaded from its cache, {misses} compiled"


def same_outputs(one: dict, other: dict) -> bool:
    """Whether two influence results hold equal arrays (NaN equal to NaN) of the same dtypes."""
    keys = ("topk_index", "topk_value", "pair_train", "pair_test", "pair_value", "histogram")
    return all(np.asarray(one[k]).dtype == np.asarray(other[k]).dtype
               and np.array_equal(one[k], other[k], equal_nan=one[k].dtype.kind == "f") for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_models", type=int, default=2000)
    parser.add_argument("--n_train", type=int, default=50_000)
    parser.add_argument("--n_test", type=int, default=10_000)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--block_rows", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of influence")
    parser.add_argument("--compare", metavar="FILE", help="another estimator.py to time alternately")
    args = parser.parse_args()
    n_models, n, m = args.n_models, args.n_train, args.n_test
    block_rows = min(args.block_rows, n)

    load_at_start = load_average()
    start = time.perf_counter()
    from memorization import estimator  # numba's import is part of it
    import_time = time.perf_counter() - start
    compile_time, cache = first_call(estimator)
    estimators = {"influence": estimator}
    if args.compare:
        estimators[f"influence of {args.compare}"] = load_estimator(args.compare)
        compare_first, _ = first_call(estimators[f"influence of {args.compare}"])

    rates = [matmul_rate(block_rows, n_models, m)]  # first: its buffers are smaller than the input built next
    before_input = peak_rss()
    mask, target, test_target = synthetic_store(n_models, n, m, args.ratio, args.seed)
    input_gb = (mask.nbytes + target.nbytes + test_target.nbytes) / GB
    after_input = peak_rss()

    start = time.perf_counter()
    scores = estimator.memorization(mask, target)
    mem_time = time.perf_counter() - start
    after_mem = peak_rss()

    times = {name: [] for name in estimators}
    peaks, results = {}, {}
    for round_ in range(args.repeats):
        if round_:
            rates.append(matmul_rate(block_rows, n_models, m))
        names = list(estimators) if round_ % 2 == 0 else list(estimators)[::-1]
        for name in names:
            start = time.perf_counter()
            results[name] = estimators[name].influence(mask, test_target, topk=10, threshold=0.15,
                                                       block_rows=block_rows)
            times[name].append(time.perf_counter() - start)
            peaks.setdefault(name, peak_rss())
    rates.append(matmul_rate(block_rows, n_models, m))

    rate = max(rates)
    flops = 2 * n_models * n * m
    floor = flops / (rate * GB)
    result = results["influence"]
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    import numba
    print(f"K={n_models} n={n} m={m} ratio={args.ratio} block_rows={block_rows}; {cpu_model()}, "
          f"{os.cpu_count()} cores, load average {load_at_start} at the start, {load_average()} at the end; "
          f"numpy {np.__version__}, {blas['name']} {blas['version']} ({blas_threads()} threads); "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads, {numba.threading_layer()} layer); "
          f"OPENBLAS_THREAD_TIMEOUT={os.environ['OPENBLAS_THREAD_TIMEOUT']}")
    print(f"input {input_gb:.2f} GB (mask {mask.nbytes / GB:.2f}, target {target.nbytes / GB:.2f}, "
          f"test_target {test_target.nbytes / GB:.2f}); peak RSS before it {before_input:.2f} GB, "
          f"after building it {after_input:.2f} GB")
    print(f"float32 matmul rate on [{block_rows}, {n_models}] @ [{n_models}, {m}]: best {rate:.0f} GFLOP/s, "
          f"{min(rates):.0f}-{max(rates):.0f} over {len(rates)} runs")
    print(f"import of the estimator (numba included) {import_time:.2f} s; first call on a tiny store "
          f"{compile_time:.2f} s ({cache})" + (f"; {args.compare}'s first call {compare_first:.2f} s"
                                                if args.compare else ""))
    print(f"undefined: {scores['n_undefined']} train scores, {result['n_undefined_train']} influence rows; "
          f"pairs > 0.15: {result['pair_value'].size}; memorized (mem >= 0.25): "
          f"{int(np.sum(scores['mem'] >= 0.25))}")
    if args.compare:
        print(f"same outputs as {args.compare}: {same_outputs(result, results[f'influence of {args.compare}'])}")
    print()
    print("| step | time s (median) | floor s | ratio (median) | ratio range | GFLOP/s | peak RSS GB | "
          "peak - input GB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| memorization | {mem_time:.2f} | - | - | - | - | {after_mem:.2f} | {after_mem - input_gb:.2f} |")
    for name, seconds in times.items():
        median = float(np.median(seconds))
        print(f"| {name} | {median:.2f} | {floor:.2f} | {median / floor:.2f} | "
              f"{min(seconds) / floor:.2f}-{max(seconds) / floor:.2f} | {flops / median / GB:.0f} | "
              f"{peaks[name]:.2f} | {peaks[name] - input_gb:.2f} |")


if __name__ == "__main__":
    main()
