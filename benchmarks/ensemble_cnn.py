"""Models per hour of CNN ensembles: the engine's train_group with K models against a plain one-model loop.

The same models of a plan built as train_splits.py builds it, on CIFAR-shaped files written to a
temporary folder: same seeds, subsets, batches, augmentation, optimizer and epochs, then one prediction
pass over every training and test image. "engine": one `train_group` call with K model ids; "loop": the
straightforward way (as `trained_alone` in tests/test_split_ensembles.py), one network, its own optimizer,
a plain forward and backward, on the first models (--alone_models: for fp32, for the other variants).

Variants (--variants, each a '+'-joined set): fp32; bf16 (`torch.autocast(<device>, bfloat16)`, for the
engine by replacing `memorization.training.autocast` in this process only); channels_last (the loop:
`net.to(memory_format=channels_last)`; the engine: weights and inputs laid out so that the grouped
convolution vmap makes of K convolutions gets channels_last tensors); compile (torch.compile of the loop's
network and of the engine's vmapped training forward). A step that fails says `failed: <reason>` in its
row. A warm-up precedes the timed repeats (their order alternates; medians). It never fails on a slow machine.

    .venv/bin/python benchmarks/ensemble_cnn.py         # about 10 min on 2 busy cores; on CUDA: benchmarks/gpu.sh
    .venv/bin/python benchmarks/ensemble_cnn.py --sizes 4 8 --n_train 160 --n_test 32   # about 2.5 min
"""
from __future__ import annotations

import argparse
import contextlib
import pickle
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import dataclass
from operator import truediv
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, vmap  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import memorization.training as engine  # noqa: E402
import train_splits  # noqa: E402
from benchmarks._timing import benchmark_parser, describe_device, end_load_line, machine_line  # noqa: E402
from benchmarks.engine_throughput import synchronize  # noqa: E402
from memorization.driver import make_plan  # noqa: E402
from memorization.training import EVAL_BATCH, build_backbones, load_plan_data, recipe, train_group  # noqa: E402
from utils.optimizers import build_optimizer, build_schedule  # noqa: E402

NHWC = torch.channels_last
COMPILE = {"backend": "inductor"}  # torch.compile's options (--compile_backend)


def write_cifar_like(root: Path, n_train: int, n_test: int, classes: int, seed: int = 0) -> None:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) pickles of learnable random images:
    uniform noise plus a band of rows (class mod 10) and, for 100 classes, of columns (class div 10), lit
    on a random 40% of its pixels."""
    rng = np.random.default_rng(seed)
    folder, key, parts = (("cifar-10-batches-py", "labels", [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)]
                           + [("test_batch", n_test)]) if classes == 10 else
                          ("cifar-100-python", "fine_labels", [("train", n_train), ("test", n_test)]))
    (root / folder).mkdir(parents=True)
    for name, n in parts:
        labels = rng.integers(0, classes, n)
        band = np.zeros((n, 3, 32, 32), bool)
        for row, c in enumerate(labels):
            band[row, :, 3 * (c % 10):3 * (c % 10) + 3] = True
            band[row, :, :, 3 * (c // 10):3 * (c // 10) + 3] |= classes > 10
        images = rng.integers(0, 140, (n, 3, 32, 32)) + 100 * (band & (rng.random(band.shape) < 0.4))
        (root / folder / name).write_bytes(pickle.dumps({"data": images.astype(np.uint8).reshape(n, -1),
                                                         key: labels.tolist()}))


def build_plan(cli: argparse.Namespace, backbone: str, n_models: int, data_path: str, *extra: str):
    width = {"resnet18": ["--resnet_width", str(cli.resnet_width)],
             "airbench": ["--airbench_width", str(cli.airbench_width)]}.get(backbone, [])
    return make_plan(train_splits.parse_args([
        "--dataset", f"seq-cifar{cli.classes}", "--backbone", backbone, *width, "--batch_size", str(cli.batch_size),
        "--lr", str(cli.lr), "--optim_mom", "0.9", "--subset_ratio", "0.5", "--n_epochs", str(cli.epochs),
        "--n_models", str(n_models), "--data_path", data_path, "--out", str(Path(data_path) / "store"),
        "--device", cli.device, "--non_verbose", *extra]))


def has(variant: str, part: str) -> bool:
    return part in variant.split("+")


def precision(variant: str):
    """The autocast of a variant, called with the device as the engine calls its `autocast`."""
    return lambda device: (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if has(variant, "bf16")
                           else contextlib.nullcontext())


_COMPILED: dict = {}  # one compiled training forward per variant, K and architecture, shared by every Ensemble


def variant_ensemble(variant: str) -> type:
    """The engine's Ensemble with the variant's layout and compilation (the engine's own class for fp32/bf16)."""
    if not (has(variant, "channels_last") or has(variant, "compile")):
        return engine.Ensemble

    class VariantEnsemble(engine.Ensemble):
        def __init__(self, nets, training):
            super().__init__(nets, training)
            if has(variant, "channels_last"):  # [K, O, C, kh, kw] stored as [K, O, kh, kw, C]: vmap's grouped
                for name, p in self.params.items():  # weight [K·O, C, kh, kw] is then channels_last, uncopied
                    if p.dim() == 5:
                        self.params[name] = p.detach().permute(0, 1, 3, 4, 2).contiguous().permute(
                            0, 1, 4, 2, 3).requires_grad_()
                self.parameters = list(self.params.values())
                self.optimizer = build_optimizer(self.parameters, training)
            if has(variant, "compile"):
                key = (variant, tuple((k, tuple(v.shape)) for k, v in self.params.items()))
                if key not in _COMPILED:
                    net = self.net
                    _COMPILED[key] = (net, torch.compile(vmap(lambda p, b, x: functional_call(net, (p, b), (x,)),
                                                              in_dims=(0, 0, 0), randomness="different"), **COMPILE))
                self.net, self._forward = _COMPILED[key]

        def __call__(self, x, shared_input=False):
            if has(variant, "channels_last"):  # [K, B, C, H, W] stored as [B, H, W, K, C]: [B, K·C, H, W] is NHWC
                x = x.contiguous(memory_format=NHWC) if shared_input else \
                    x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
            return super().__call__(x, shared_input)

    return VariantEnsemble


def engine_variant(variant: str, eval_seconds: list):
    """The engine run as the variant asks (this process only), its prediction passes timed into eval_seconds."""
    original = engine.predictions

    def timed_predictions(*args):
        synchronize(args[2].device)
        start = time.perf_counter()
        out = original(*args)  # ends with .cpu(): the device has finished
        eval_seconds.append(time.perf_counter() - start)
        return out
    return mock.patch.multiple(engine, autocast=precision(variant), Ensemble=variant_ensemble(variant),
                               predictions=timed_predictions)


@dataclass
class Run:
    seconds: float  # the whole call, prediction pass included
    eval_seconds: float
    train_acc: list[float]  # per model, final predictions on its own subset
    test_acc: list[float]
    cpu_seconds: float = 0.0  # of this process: what other jobs on the machine disturb less


def run_engine(plan, data, model_ids: list[int], device: str, variant: str) -> Run:
    eval_seconds: list[float] = []
    with engine_variant(variant, eval_seconds):
        synchronize(device)
        start, cpu = time.perf_counter(), time.process_time()
        results = train_group(plan, model_ids, data, device)
        synchronize(device)
    return Run(time.perf_counter() - start, sum(eval_seconds),
               [float(results[i]["correct_train"][-1][plan.inclusion_mask[i]].mean()) for i in model_ids],
               [float(results[i]["correct_test"][-1].mean()) for i in model_ids], time.process_time() - cpu)


def run_loop(plan, data, model_id: int, device: str, variant: str) -> Run:
    """The straightforward way: one network, its own optimizer, plain forward and backward."""
    training, autocast = recipe(plan.settings["training"]), precision(variant)
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    (net,) = build_backbones(plan, [model_id], data, device)
    layout = (lambda x: x.contiguous(memory_format=NHWC)) if has(variant, "channels_last") else (lambda x: x)
    net = net.to(memory_format=NHWC) if has(variant, "channels_last") else net
    optimizer = build_optimizer(net.parameters(), training)
    forward = torch.compile(net, **COMPILE) if has(variant, "compile") else net
    subset = torch.as_tensor(plan.inclusion_mask[model_id]).nonzero()[:, 0]
    orders, augmentation = (torch.Generator().manual_seed(int(plan.model_seed[model_id]) + k) for k in (1, 2))
    batch = training.batch_size
    schedule = build_schedule(optimizer, training.lr_schedule, -(-len(subset) // batch), training.n_epochs,
                              training.lr_milestones, training.lr_warmup)
    for _ in range(training.n_epochs):
        rows = subset[torch.randperm(len(subset), generator=orders)].to(device)
        for first in range(0, len(rows), batch):
            step = rows[first:first + batch]
            x = layout(data.dataset.train_transform(data.train_images.index_select(0, step), augmentation))
            with autocast(device):
                logits = forward(x).float()
            loss = F.cross_entropy(logits, data.train_labels[step], label_smoothing=training.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    synchronize(device)
    eval_start, correct, _ = time.perf_counter(), [], net.eval()
    with torch.no_grad():
        for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
            hits = []
            for first in range(0, len(labels), EVAL_BATCH):
                with autocast(device):
                    logits = net(layout(data.dataset.test_transform(images[first:first + EVAL_BATCH]))).float()
                hits.append(logits.argmax(1) == labels[first:first + EVAL_BATCH])
            correct.append(torch.cat(hits).cpu().numpy())
    end = time.perf_counter()
    return Run(end - start, end - eval_start, [float(correct[0][plan.inclusion_mask[model_id]].mean())],
               [float(correct[1].mean())], time.process_time() - cpu)


class ConvInputs(TorchDispatchMode):
    """Dtype and layout of every convolution input below vmap (the tensors its batching rule made)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            x = args[1] if func.overloadpacket is torch.ops.aten.convolution_backward else args[0]
            self.__dict__.setdefault("calls", []).append(
                (str(x.dtype)[6:], x.dim() == 4 and x.is_contiguous(memory_format=NHWC) and not x.is_contiguous()))
        return func(*args, **(kwargs or {}))


def probe(plan, data, device: str, variant: str) -> str:
    """What the engine's convolutions ran in for this variant: one K=2 step, recorded below vmap."""
    if has(variant, "compile"):
        return "not probed (compiled)"
    ensemble = variant_ensemble(variant)(build_backbones(plan, [0, 1], data, device),
                                         recipe(plan.settings["training"]))
    x = data.dataset.test_transform(data.train_images[:2 * plan.settings["training"]["batch_size"]])
    with ConvInputs() as mode:
        with precision(variant)(device):
            logits = ensemble(x.view(2, -1, *x.shape[1:])).float()
        logits.sum().backward()
    calls = mode.__dict__.get("calls", [])
    return (f"{len(calls)} convolution calls (forward and backward), {sum(n for _, n in calls)} "
            f"of them on channels_last inputs, in {'/'.join(sorted({d for d, _ in calls}))}")


def flops_per_model(plan, data, device: str) -> float:
    """FLOPs (FlopCounterMode: convolutions and matmuls) of training one model and of its prediction pass."""
    (net,) = build_backbones(plan, [0], data, device)
    x = data.dataset.test_transform(data.train_images[:2])
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(net(x), data.train_labels[:2]).backward()
    with FlopCounterMode(display=False) as evaluate, torch.no_grad():
        net.eval()(x)
    return (int(plan.inclusion_mask[0].sum()) * plan.settings["training"]["n_epochs"] * train.get_total_flops()
            + (len(data.train_labels) + len(data.test_labels)) * evaluate.get_total_flops()) / 2


def attempt(work):  # (result, "") or (None, "failed: ...")
    try:
        return work(), ""
    except Exception as error:  # a row that says so, not a crash
        return None, f"failed: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


def measure(backbone: str, cli: argparse.Namespace, scratch: str) -> dict:
    """Runs of every step (the warm-up first), the probe of each variant, the work of one model."""
    # The warm-up runs on a tenth of the classes, but compiled variants on the plan itself: they compile for its shapes.
    (plan, data), (small_plan, small_data) = [(p, load_plan_data(p, scratch, cli.device)) for p in (
        build_plan(cli, backbone, max(*cli.sizes, *cli.alone_models), scratch, *extra)
        for extra in ([], ["--classes", f"0,{cli.classes // 10}"]))]
    steps = [("loop", v, 0) for v in cli.variants] + [
        ("engine", v, k) for v in cli.variants for k in cli.sizes if v == "fp32" or k in cli.variant_sizes]
    runs, errors = {step: [] for step in steps}, {}
    for repeat in range(-1, cli.repeats):
        for way, variant, size in (steps if repeat % 2 == 0 else steps[::-1]):
            if (way, variant, size) in errors:
                continue
            p, d = (plan, data) if repeat >= 0 or has(variant, "compile") else (small_plan, small_data)
            alone = cli.alone_models[variant != "fp32"]
            run, error = attempt(lambda: [run_loop(p, d, i, cli.device, variant) for i in range(alone)]
                                 if way == "loop" else [run_engine(p, d, list(range(size)), cli.device, variant)])
            label = f"  {backbone} {'warm-up' if repeat < 0 else f'repeat {repeat}'}: {variant} {way} K={size or 1}"
            if error:
                errors[(way, variant, size)] = error
            else:
                runs[(way, variant, size)].append(run)
            print(f"{label}: {error}" if error else f"{label} {sum(r.seconds for r in run) / (size or len(run)):.2f} "
                  "s/model", flush=True)
    return {"steps": steps, "runs": runs, "errors": errors, "flops": flops_per_model(plan, data, cli.device),
            "probes": {v: " ".join(filter(None, attempt(lambda: probe(plan, data, cli.device, v))))
                       for v in cli.variants},
            "images": int(plan.inclusion_mask[0].sum()), "eval_images": len(data.train_labels) + len(data.test_labels)}


# A step's timed repeats: seconds and CPU seconds per model (each repeat), prediction seconds per model,
# accuracies per model, and for compiled variants the warm-up (its first model) less a timed run.
Summary = namedtuple("Summary", "seconds cpu eval_seconds train_acc test_acc compile_seconds")


def summarise(result: dict, way: str, variant: str, size: int) -> Summary | str:
    if (key := (way, variant, size)) in result["errors"] or len(result["runs"][key]) < 2:
        return result["errors"].get(key, "no timed run")
    warm, *timed = result["runs"][key]
    seconds, cpu, evaluation = ([sum(getattr(r, f) for r in run) / (size or len(run)) for run in timed]
                                for f in ("seconds", "cpu_seconds", "eval_seconds"))
    return Summary(seconds, cpu, statistics.median(evaluation), [a for r in timed[0] for a in r.train_acc],
                   [a for r in timed[0] for a in r.test_acc],
                   warm[0].seconds - statistics.median(seconds) * (size or 1) if has(variant, "compile") else None)


HEADER = ("| backbone | variant | K | loop s/model | engine s/model | engine speed-up (range) | in CPU time "
          "| models/h loop | models/h engine | of which predicting, loop / engine | GFLOP/s loop / engine "
          "| train acc % per model, loop / engine | test acc % mean, loop / engine | note |")


def report(results: dict, cli: argparse.Namespace) -> list[str]:
    """The table, the probes, the accuracy check and the projection."""
    lines, problems, projections = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)], [], []
    for backbone, result in results.items():
        best = None  # (seconds per model, prediction seconds per model, which)
        for _, variant, size in [s for s in result["steps"] if s[0] == "engine"]:
            loop, ens = summarise(result, "loop", variant, 0), summarise(result, "engine", variant, size)
            if isinstance(loop, str) or isinstance(ens, str):
                why = [f"{w}: {s}" for w, s in (("loop", loop), ("engine", ens)) if isinstance(s, str)]
                lines.append(f"| {backbone} | {variant} | {size} |" + " - |" * 10 + f" {'; '.join(why)} |")
                continue
            ups = [a / b for a, b in zip(loop.seconds, ens.seconds)]
            lo, en = statistics.median(loop.seconds), statistics.median(ens.seconds)
            pairs = list(zip(loop.train_acc, ens.train_acc, loop.test_acc, ens.test_acc))
            note = "; ".join([f"{w} compiled in about {s:.0f} s" for w, s in (
                ("the loop's first model", loop.compile_seconds), ("the engine", ens.compile_seconds)) if s is not None]
                + ["the engine's convolutions ran in float32: autocast does not reach them inside vmap"]
                * (has(variant, "bf16") and "in float32" in result["probes"][variant]))
            lines.append(f"| {backbone} | {variant} | {size} | {lo:.2f} | {en:.2f} | {statistics.median(ups):.2f}x "
                         f"({min(ups):.2f}-{max(ups):.2f}) | {statistics.median(map(truediv, loop.cpu, ens.cpu)):.2f}x "
                         f"| {3600 / lo:,.0f} | {3600 / en:,.0f} "
                         f"| {loop.eval_seconds:.2f} / {ens.eval_seconds:.2f} "
                         f"| {result['flops'] / lo / 1e9:.1f} / {result['flops'] / en / 1e9:.1f} | "
                         + " ".join(f"{100 * a:.1f}/{100 * b:.1f}" for a, b, _, _ in pairs)
                         + f" | {100 * statistics.mean(p[2] for p in pairs):.1f} / "
                         f"{100 * statistics.mean(p[3] for p in pairs):.1f} | {note} |")
            problems += [f"{backbone} {variant} K={size} model {i}: {split} {100 * a:.1f}% in the loop, "
                         f"{100 * b:.1f}% in the engine" for i, (ta, tb, sa, sb) in enumerate(pairs)
                         for split, a, b in (("train", ta, tb), ("test", sa, sb)) if abs(a - b) > 0.01]
            for s, which in ((loop, f"loop {variant}"), (ens, f"engine {variant} K={size}")):
                if best is None or statistics.median(s.seconds) < best[0]:
                    best = (statistics.median(s.seconds), s.eval_seconds, which)
        if best is None:
            projections.append(f"{backbone}: no successful row to project from")
            continue
        seconds, eval_seconds, which = best
        epochs, images, eval_images = (cli.plan_epochs or cli.epochs, cli.plan_images or result["images"],
                                       cli.plan_eval_images or result["eval_images"])
        projected = ((seconds - eval_seconds) * epochs * images / (cli.epochs * result["images"])
                     + eval_seconds * eval_images / result["eval_images"])
        projections.append(f"{backbone}: best {3600 / seconds:,.0f} models/h ({which}); {cli.plan_models:,} models "
                           f"× {epochs} epochs × {images:,} training images, {eval_images:,} predicted: "
                           f"{cli.plan_models * projected / 3600:,.1f} {'GPU-' * cli.device.startswith('cuda')}"
                           f"hours ({projected:.1f} s per model)")
    lines += ["", "inside the engine's vmap, one K=2 step of each variant:"]
    lines += [f"  {b} {v}: {text}" for b, r in results.items() for v, text in r["probes"].items()]
    lines += ["", "accuracy: " + ("the same within one point for every model" if not problems else "; ".join(problems))]
    return lines + ["", "projection (the time beyond the prediction pass scales with epochs × training images, that "
                    "pass with its images):"] + ["  " + p for p in projections]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.set_defaults(device="cpu")
    add = parser.add_argument
    add("--backbones", nargs="+", default=["reduced_resnet18", "airbench"],
        choices=["reduced_resnet18", "resnet18", "airbench"])
    add("--resnet_width", type=int, default=64, help="base width of resnet18")
    add("--airbench_width", type=float, default=0.5, help="0.5: a quarter of the paper's network, for CPUs")
    add("--sizes", type=int, nargs="+", default=[4, 8, 16], help="ensemble sizes K (fp32)")
    add("--variants", nargs="+", default=["fp32", "bf16", "channels_last"],
        help="each a '+'-joined set of fp32, bf16, channels_last, compile")
    add("--variant_sizes", type=int, nargs="+", help="K of the variants but fp32 (default: the smallest of --sizes)")
    add("--compile", action="store_true", help="add the variant 'compile' (fp32 + torch.compile)")
    add("--compile_backend", default="inductor", help="torch.compile's backend (aot_eager: no code generation)")
    add("--alone_models", type=int, nargs=2, default=[2, 1], help="models the loop trains: fp32, other variants")
    add("--epochs", type=int, default=1)
    add("--n_train", type=int, default=320, help="training images (a multiple of 5)")
    add("--n_test", type=int, default=64)
    add("--classes", type=int, choices=[10, 100], default=10, help="CIFAR-10 or CIFAR-100 files")
    add("--batch_size", type=int, default=32)
    add("--lr", type=float, default=0.05)
    add("--repeats", type=int, default=1, help="timed runs of every step after the warm-up")
    add("--threads", type=int, default=1, help="torch intra-op threads on CPU; 0: torch's default")
    add("--plan_models", type=int, default=2000, help="projection: models")
    add("--plan_epochs", type=int, default=0, help="projection: epochs (default: --epochs)")
    add("--plan_images", type=int, default=0, help="projection: training images per model (default: measured)")
    add("--plan_eval_images", type=int, default=0, help="projection: images predicted per model (default: measured)")
    cli = parser.parse_args()
    cli.variants += ["compile"] * (cli.compile and "compile" not in cli.variants)
    cli.variant_sizes, COMPILE["backend"] = cli.variant_sizes or [min(cli.sizes)], cli.compile_backend
    if cli.threads and torch.device(cli.device).type == "cpu":
        torch.set_num_threads(cli.threads)
    print(machine_line(describe_device(cli.device), f"{cli.repeats} repeats", f"{cli.n_train} training and "
                       f"{cli.n_test} test images (CIFAR-{cli.classes}-shaped), subset ratio 0.5, batch "
                       f"{cli.batch_size}, {cli.epochs} epochs"), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        write_cifar_like(Path(scratch), cli.n_train, cli.n_test, cli.classes)
        for backbone in cli.backbones:  # each backbone's report as soon as it is measured
            results = {backbone: measure(backbone, cli, scratch)}
            print(end_load_line())
            print("\n".join(report(results, cli)), flush=True)


if __name__ == "__main__":
    main()
