"""Launchers: run independent jobs in-process, in a local process pool, on Ray, or on SLURM.

Every launcher takes a picklable top-level function and a list of argument tuples and yields the
results as the jobs finish, in the driver process, which alone writes to MLflow.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from utils.errors import ConfigError

LAUNCHERS = ("local", "pool", "ray", "slurm")
POLL_SECONDS = 1.0
REPO_ROOT = Path(__file__).resolve().parents[1]


def _repo_on_pythonpath() -> dict[str, str]:
    """Workers import the project's modules by name: put the repository on their PYTHONPATH."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    return {"PYTHONPATH": os.environ["PYTHONPATH"]}


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at `address`, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    # Ray runs its workers at nice 15 by default: on a machine shared with other work they then get a
    # fraction of the CPU (measured: 502 s against 82 s for the process pool under load). A local cluster
    # started here runs them at normal priority; a cluster at --address keeps its own setting.
    system_config = None if address else {"worker_niceness": 0}
    try:
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": _repo_on_pythonpath()},
                 _system_config=system_config)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(f"cannot connect to the Ray cluster at {address} ({error}); start it or omit --address "
                          f"for a local cluster") from None


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launcher")
    group.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: in this process; pool: --workers local processes; ray: a Ray cluster; "
                            "slurm: job arrays through submitit")
    group.add_argument("--workers", type=int, default=2, help="processes of --launcher pool")
    group.add_argument("--address", default=None,
                       help="Ray cluster address (default: start a local cluster)")
    group.add_argument("--gpus_per_task", type=float, default=0.0, help="GPUs per Ray task (fractions allowed)")
    group.add_argument("--cpus_per_task", type=float, default=1.0, help="CPUs per Ray task")
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--time", type=int, default=60, help="SLURM time limit per job, in minutes")
    group.add_argument("--gpus_per_node", type=int, default=0, help="GPUs per SLURM job")
    group.add_argument("--max_parallel", type=int, default=None,
                       help="jobs running at once on any launcher (pool: processes, overriding --workers; ray: "
                            "tasks in flight; slurm: array tasks; default: --workers, the cluster's capacity, 64)")
    group.add_argument("--slurm_folder", default=None, help="submitit logs (default: <out>/slurm)")
    group.add_argument("--submitit_cluster", default="slurm", choices=("slurm", "local", "debug"),
                       help="with --launcher slurm: 'local' runs the array on submitit's local executor and 'debug' "
                            "in this process, both for a debug run without SLURM")


def check_launcher(args: argparse.Namespace) -> None:
    """Refuse, before any work, a launcher this machine cannot run."""
    import shutil

    if args.launcher == "slurm" and args.submitit_cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm needs SLURM, and sbatch is not on this machine's PATH; run it on a "
                          "SLURM login node, or add --submitit_cluster local for a local debug run")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError(f"--max_parallel must be at least 1, got {args.max_parallel}")
    if getattr(args, "workers", 1) < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")


def run_jobs(function: Callable, jobs: Iterable[tuple], args: argparse.Namespace, log_folder: Path,
             stop: Callable[[object], bool] | None = None, poll: Callable[[], None] | None = None) -> Iterator:
    """Yield function(*job) for every job as it finishes, on the launcher chosen by --launcher.

    Jobs are taken from `jobs` only when one can start (local, pool, ray), so a generator can decide
    late, e.g. claim work shared with other drivers. Once stop(result) is true, no further job starts;
    those already running finish and are yielded. A SLURM array takes every job and runs to its end.
    `poll()` is called about every POLL_SECONDS while jobs run (progress); with it, a local job runs
    in a background thread so that this thread can call it.
    """
    check_launcher(args)
    stop = stop or (lambda result: False)
    if args.launcher == "local":
        for job in jobs:
            result = function(*job) if poll is None else _in_thread(function, job, poll)
            yield result
            if stop(result):
                return
        return
    poll = poll or (lambda: None)
    if args.launcher == "pool":
        yield from _pool(function, iter(jobs), pool_workers(args), stop, poll)
    elif args.launcher == "ray":
        yield from _ray(function, iter(jobs), args, stop, poll)
    else:
        jobs = list(jobs)
        if jobs:
            yield from _slurm(function, jobs, args, log_folder, poll)


def _in_thread(function: Callable, job: tuple, poll: Callable[[], None]):
    """function(*job) in a daemon thread (an interrupted driver does not wait for it), polling meanwhile."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["result"] = function(*job)
        except BaseException as error:  # handed to the calling thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        poll()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def pool_workers(args: argparse.Namespace) -> int:
    return args.max_parallel or args.workers


def die_with_parent(parent: int) -> None:
    """A pool worker's start: end this process when the driver that started it ends. A driver killed with -9
    cannot stop its workers, and a worker waiting for its next job never learns that nobody will send one
    (the queue's pipe stays open in its siblings): it would hold its memory forever."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _pool(function: Callable, jobs: Iterator[tuple], workers: int, stop: Callable[[object], bool],
          poll: Callable[[], None]) -> Iterator:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    _repo_on_pythonpath()
    # spawn, not fork: forking a process that already started torch's thread pools can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        running, stopped = set(), False
        while True:
            while not stopped and len(running) < workers and (job := next(jobs, None)) is not None:
                running.add(pool.submit(function, *job))
            if not running:
                return
            done, running = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            poll()
            for future in done:
                result = future.result()
                yield result
                stopped = stopped or stop(result)


def _ray(function: Callable, jobs: Iterator[tuple], args: argparse.Namespace, stop: Callable[[object], bool],
         poll: Callable[[], None]) -> Iterator:
    import ray

    start_ray(args.address)
    # Retried on worker loss (max_retries); an exception raised by the function itself is not retried.
    remote = ray.remote(function).options(num_cpus=args.cpus_per_task, num_gpus=args.gpus_per_task, max_retries=3)
    # Tasks beyond what the cluster can run at once would only queue; bounding them lets `stop` take effect.
    capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // max(args.cpus_per_task, 1e-9)))
    pending, stopped = [], False
    while True:
        while not stopped and len(pending) < (args.max_parallel or capacity) and (job := next(jobs, None)) is not None:
            pending.append(remote.remote(*job))
        if not pending:
            return
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
        poll()
        if done:
            result = ray.get(done[0])
            yield result
            stopped = stopped or stop(result)


def _slurm(function: Callable, jobs: list[tuple], args: argparse.Namespace, log_folder: Path,
           poll: Callable[[], None]) -> Iterator:
    import submitit

    _repo_on_pythonpath()  # submitted jobs inherit the driver's environment
    executor = submitit.AutoExecutor(folder=str(args.slurm_folder or log_folder), cluster=args.submitit_cluster)
    parameters = {"timeout_min": args.time}
    if executor.cluster == "slurm":
        parameters.update(slurm_partition=args.partition, slurm_array_parallelism=args.max_parallel or 64,
                          gpus_per_node=args.gpus_per_node)
    executor.update_parameters(**parameters)
    submitted = executor.map_array(function, *zip(*jobs))
    waiting = list(submitted)
    while waiting:
        for handle in list(waiting):
            if handle.done():
                waiting.remove(handle)
                yield handle.result()
        if waiting:
            time.sleep(0.5)
            poll()
