"""Training steps per second at each intra-op thread count, on small and large networks, idle and loaded.

Each OpenMP wait policy runs in its own process (OpenMP reads it once, at start), which trains each
backbone with SGD on random data of its dataset's shape at 1 thread and at every core, alternating,
for --seconds each. "loaded" adds, for the whole measurement, as many busy processes as the machine
has cores (other jobs on a shared machine); "as found" is the machine with whatever else it runs.

    .venv/bin/python benchmarks/threads.py            # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# name → (backbone, input shape, classes, batch size, backbone flags)
WORKLOADS = {
    "mlp digits b32": ("mlp", (1, 8, 8), 10, 32, {"mlp_hidden": "100,100"}),
    "mlp mnist b10": ("mlp", (1, 28, 28), 10, 10, {"mlp_hidden": "100,100"}),
    "mlp mnist 400-400 b32": ("mlp", (1, 28, 28), 10, 32, {"mlp_hidden": "400,400"}),
    "mlp mnist 1000-1000 b128": ("mlp", (1, 28, 28), 10, 128, {"mlp_hidden": "1000,1000"}),
    "resnet18 cifar b32": ("resnet18", (3, 32, 32), 10, 32, {"resnet_width": 64}),
    "vit-L3 cifar b100": ("vit", (3, 32, 32), 10, 100, {"vit_depth": 3, "vit_width": 48, "vit_heads": 3,
                                                         "vit_patch": 4, "vit_mlp_ratio": 4, "vit_act": "relu"}),
}
POLICIES = {"default wait": None, "passive wait": "PASSIVE"}  # OMP_WAIT_POLICY of the process


def worker(workloads: list[str], seconds: float) -> None:
    """Print, per workload and thread count (alternating), the training steps per second (its own process)."""
    import time

    import torch

    for workload in workloads:
        _, shape, n_classes, batch, _ = WORKLOADS[workload]
        net = build(workload)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x, y = torch.randn(batch, *shape), torch.randint(0, n_classes, (batch,))

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        for threads in (1, os.cpu_count(), 1, os.cpu_count()):
            torch.set_num_threads(threads)
            for _ in range(3):
                step()
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 2:
                step()
                steps += 1
            print(json.dumps({"workload": workload, "threads": threads,
                              "steps_per_s": steps / (time.perf_counter() - start)}), flush=True)


def build(workload: str):
    import torch  # noqa: F401  (the backbones need it)

    sys.path.insert(0, str(REPO_ROOT))
    from backbones import BACKBONES

    backbone, shape, n_classes, batch, flags = WORKLOADS[workload]
    parser = argparse.ArgumentParser()
    BACKBONES.get(backbone).add_args(parser)
    return BACKBONES.get(backbone)(argparse.Namespace(**{**vars(parser.parse_args([])), **flags}), shape, n_classes)


def step_flops_of(workloads: list[str]) -> dict[str, float]:
    """FLOPs of one training step of each workload, as `--num_threads 0` counts them (utils/threads.py)."""
    sys.path.insert(0, str(REPO_ROOT))
    from utils.threads import step_flops

    return {w: step_flops(build(w), WORKLOADS[w][1], WORKLOADS[w][3]) for w in workloads}


def measure(workloads: list[str], policy: str | None, seconds: float) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, __file__, "--worker", ",".join(workloads), "--seconds", str(seconds)],
                         env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured training time per setting")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker.split(","), args.seconds)
    workloads = args.workloads.split(",")
    flops = step_flops_of(workloads)
    print(f"{os.cpu_count()} cores; load average at start {os.getloadavg()}", flush=True)
    results: dict[tuple, list[float]] = {}
    for load in ("as found", "loaded"):
        spinners = [] if load == "as found" else [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count())]
        try:
            for _ in range(args.repeats):
                for name, policy in POLICIES.items():
                    for row in measure(workloads, policy, args.seconds):
                        results.setdefault((load, row["workload"], row["threads"], name), []).append(row["steps_per_s"])
                        print(load, name, row, flush=True)
        finally:
            for spinner in spinners:
                spinner.kill()
    columns = [(threads, name) for name in POLICIES for threads in (1, os.cpu_count())]
    print("\n| machine | workload | MFLOPs/step | " + " | ".join(f"{t} thr, {n}" for t, n in columns)
          + " | best / 1 thread | 2 thr / 1 thr, default wait |")
    print("|---|---|---|" + "---|" * (len(columns) + 2))
    for load in ("as found", "loaded"):
        for workload in workloads:
            rates = [statistics.median(results[(load, workload, t, n)]) for t, n in columns]
            print(f"| {load} | {workload} | {flops[workload] / 1e6:.4g} | " + " | ".join(f"{r:.3g}" for r in rates)
                  + f" | {max(rates) / rates[0]:.2f} | {rates[1] / rates[0]:.2f} |")
    print(f"\nload average at the end {os.getloadavg()}; 'loaded' adds {os.cpu_count()} busy processes")


if __name__ == "__main__":
    main()
