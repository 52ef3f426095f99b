"""The text and figure maer_digits.py writes: the results markdown (tables, paired differences, per-bucket
forgetting, proxy correlations, a reading of the numbers, how to reproduce them) and the bucket figure."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from continual.evaluation import BUCKETS
from maer_digits_stats import acc_fm, mean_std, paired, significant, task_counts
from utils.mlflow_logger import git_commit

PAPER_SPEARMAN = 0.73  # learned_iteration vs subset-training scores, CIFAR-100, as the memorization-in-CL paper reports it


# -- formatting ----------------------------------------------------------------------------------------------
def fmt(values, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def verdict(d: float, se: float, a: str = "min", b: str = "max") -> str:
    if not significant(d, se):
        return f"no clear difference between {a} and {b}"
    return f"{a} clearly better than {b}" if d > 0 else f"{b} clearly better than {a}"


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores available, shared with other jobs; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), CPU")


# -- the figure ----------------------------------------------------------------------------------------------
def plot_buckets(panels: list[tuple[str, dict]], path: Path, n_tasks: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"low": "tab:blue", "middle": "tab:orange", "high": "tab:red"}
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 2.9), dpi=90, sharey=True, squeeze=False)
    x = np.arange(2, n_tasks + 1)
    for ax, (title, summary) in zip(axes[0], panels):
        for b in BUCKETS:
            past = summary[b]["past"]
            if not np.isfinite(past).any():
                continue
            mean = np.nanmean(past, axis=0)
            std = np.nanstd(past, axis=0, ddof=1) if len(past) > 1 else np.zeros_like(mean)
            ax.plot(x, mean, "o-", color=colours[b], label=b, markersize=4)
            ax.fill_between(x, mean - std, mean + std, color=colours[b], alpha=0.15, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("after training task", fontsize=8)
        ax.set_xticks(x)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train acc. of past tasks (%)", fontsize=8)
    axes[0][0].legend(fontsize=7, title="memorization", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# -- the results text ----------------------------------------------------------------------------------------
def report(args, runner, results, n_tasks, scores, labels, counts, mem_summary, clean, noisy_summary, noisy_counts,
           noisy_in_high, noisy_auroc, spearman, same_as_scores_only, elapsed, started_at, load_before,
           load_after) -> str:
    af = {key: [acc_fm(r["matrix"]) for r in rs] for key, rs in results.items()}
    acc = {key: [v[0] for v in vs] for key, vs in af.items()}
    fm = {key: [v[1] for v in vs] for key, vs in af.items()}
    columns = [("er", "reservoir"), ("random", "control")] + [(p, s) for s in ("scores", "proxy") for p in args.policies]
    names = {("er", "reservoir"): "ER (reservoir)", ("random", "control"): "random (quotas)"} | {
        (p, s): f"{p} ({s})" for p, s in columns[2:]}
    n_seeds = len(args.seeds)
    lines = ["# Memorization-aware replay on seq-digits", ""]
    lines += [
        f"seq-digits (scikit-learn's 8×8 digits: 1438 training / 359 test images, 5 tasks × 2 classes), "
        f"MLP backbone (the dataset's default), SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs per "
        f"task; seeds {', '.join(map(str, args.seeds))}; mean ± std over the {n_seeds} seeds (std with ddof 1). "
        f"Acc = final class-IL accuracy (mean of the last row of the accuracy matrix, %); FM = forgetting after "
        f"the last task (mean over earlier tasks of best earlier accuracy − final accuracy, %). "
        f"`scores` = `maer --mem_scores mem.npy --mem_proxy none`, scores from {mem_summary['n_models']} split "
        f"MLPs (hidden {args.split_hidden}, {args.split_epochs} epochs, ratio {args.split_ratio}, batch "
        f"{args.split_batch}, lr {args.split_lr}, target prob); `proxy` = `maer --mem_proxy learned_iteration` "
        f"without scores; `random` = `maer --buffer_policy min --mem_scores <uniform random values> --mem_proxy none`, "
        f"the same per-task quotas and end-of-task re-selection as min/middle/max with a random choice, which "
        f"separates the effect of memorization from that of maer's buffer scheme. sgd (no buffer): Acc {fmt(acc[('sgd', 'none', 0)])}, FM {fmt(fm[('sgd', 'none', 0)])}.",
        ""]
    for title, table in (("Final class-IL accuracy Acc (%)", acc), ("Forgetting FM (%)", fm)):
        lines += [f"**{title}**", "", "| buffer | " + " | ".join(names[c] for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for b in args.buffers:
            lines.append(f"| {b} | " + " | ".join(fmt(table[(m, s, b)]) for m, s in columns) + " |")
        lines.append("")

    # min vs max, paired over seeds
    lines += ["**Paired differences over seeds** (Acc points; mean ± standard error over the per-seed differences; "
              "in brackets the seeds where the first is higher)", "",
              "| buffer | min − max (scores) | min − max (proxy) | best scores policy − random | "
              "best proxy policy − random | random − ER |",
              "|---|---|---|---|---|---|"]
    diffs = {}
    for b in args.buffers:
        cells = []
        for s in ("scores", "proxy"):
            if "min" in args.policies and "max" in args.policies:
                d = paired(acc[("min", s, b)], acc[("max", s, b)])
                diffs[(s, b)] = d
                cells.append(f"{d[0]:+.1f} ± {d[1]:.1f} ({d[2]}/{d[3]})")
            else:
                cells.append("–")
        for s in ("scores", "proxy"):
            best = max(args.policies, key=lambda p: np.mean(acc[(p, s, b)]))
            d = paired(acc[(best, s, b)], acc[("random", "control", b)])
            cells.append(f"{best} {d[0]:+.1f} ± {d[1]:.1f} ({d[2]}/{d[3]})")
        d = paired(acc[("random", "control", b)], acc[("er", "reservoir", b)])
        cells.append(f"{d[0]:+.1f} ± {d[1]:.1f} ({d[2]}/{d[3]})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")

    # buckets
    t = (0.1, 0.25)
    high_tasks = task_counts(scores, labels, 2)
    lines += [f"## Forgetting per memorization bucket (ER, reservoir, buffer {args.bucket_buffer})", "",
              f"Buckets of the subset-training scores: low ≤ {t[0]} < middle ≤ {t[1]} < high. Clean labels: "
              f"low {counts['low']}, middle {counts['middle']}, high {counts['high']} of {len(scores)} training "
              f"examples (high per task: {', '.join(map(str, high_tasks))}); {100 * np.mean(scores == 0):.0f}% of "
              f"the scores are exactly 0 (the in- and out-of-subset models agree to float16 precision)."]
    if noisy_summary is not None:
        mean_counts = {k: np.mean([c[k] for c in noisy_counts]) for k in BUCKETS}
        flipped_high = np.mean([h for h, _ in noisy_in_high])
        flipped = np.mean([n for _, n in noisy_in_high])
        lines[-1] += (f" The clean high bucket is small, so the analysis is repeated with {int(100 * args.label_noise)}% "
                      f"of the training labels flipped (`--label_noise {args.label_noise}`, drawn from each seed; one "
                      f"score file per seed from {args.noise_models} split MLPs, AUROC of the scores for the flipped "
                      f"examples {fmt(noisy_auroc, 3)}): mean bucket sizes low {mean_counts['low']:.0f}, middle "
                      f"{mean_counts['middle']:.0f}, high {mean_counts['high']:.0f}; {flipped_high:.0f} of the "
                      f"{flipped:.0f} flipped examples are in the high bucket. Training accuracy is measured "
                      f"against the (noisy) training labels.")
    else:
        lines[-1] += f" (The label-noise repetition was not run: --noise_analysis {args.noise_analysis}.)"
    lines += ["", f"Training accuracy (%) of the examples of each past task (tasks 1–{n_tasks - 1}), right after "
                  f"learning the task and after the last task; forgetting = the difference, averaged over those tasks; "
                  f"mean ± std over seeds.", "",
              "| labels | bucket | right after learning | after the last task | forgetting |", "|---|---|---|---|---|"]
    for title, summary in (("clean", clean), (f"noise {args.label_noise}", noisy_summary)):
        if summary is None:
            continue
        for b in BUCKETS:
            lines.append(f"| {title} | {b} | {fmt(summary[b]['learned'])} | {fmt(summary[b]['end'])} | "
                         f"{fmt(summary[b]['forgetting'])} |")
    lines += ["", "![training accuracy of past tasks per memorization bucket](maer_digits_buckets.png)", ""]

    # spearman
    lines += ["## Online proxies against the subset-training scores", "",
              f"`maer --mem_scores mem.npy --mem_proxy X --buffer_policy {args.spearman_policy} --buffer_size "
              f"{args.spearman_buffer}` (the scores choose the buffer; the proxy is only recorded). Spearman "
              f"correlation over each task's training examples where the proxy is defined, after each task; mean "
              f"over the {n_tasks} tasks, then mean ± std over seeds.", "",
              "| proxy | Spearman with the scores | per task (mean over seeds) | paper (CIFAR-100) |", "|---|---|---|---|"]
    for proxy, per_seed in spearman.items():
        per_seed = np.array(per_seed)
        lines.append(f"| {proxy} | {fmt(np.nanmean(per_seed, axis=1), 2)} | "
                     f"{', '.join(f'{v:.2f}' for v in np.nanmean(per_seed, axis=0))} | "
                     f"{PAPER_SPEARMAN if proxy == 'learned_iteration' else '–'} |")
    if same_as_scores_only:
        lines += ["", f"Recording a proxy beside the scores left the runs unchanged: "
                      f"{sum(same_as_scores_only)} of {len(same_as_scores_only)} accuracy matrices identical to the "
                      f"`--mem_proxy none` runs of the same seed."]
    lines.append("")

    # reading
    lines += ["## What the numbers show", ""]
    small, large = args.buffers[0], args.buffers[-1]
    for s, label in (("scores", "subset-training scores"), ("proxy", "the learned-iteration proxy")):
        if (s, small) not in diffs:
            continue
        ds, dl = diffs[(s, small)], diffs[(s, large)]
        min_wins_small = significant(*ds[:2]) and ds[0] > 0
        max_wins_large = significant(*dl[:2]) and dl[0] < 0
        gap_closes = dl[0] < ds[0] and significant(ds[0] - dl[0], float(np.hypot(ds[1], dl[1])))
        if min_wins_small and gap_closes:
            reading = ("This follows the paper's pattern: the least memorized examples are the better choice for the "
                       "smallest buffer and the advantage shrinks as the buffer grows"
                       + (f", here to the point where max is better at buffer {large}." if max_wins_large else "."))
        elif min_wins_small or max_wins_large:
            reading = "This matches the paper's pattern only in part."
        elif not significant(*ds[:2]) and not significant(*dl[:2]):
            reading = "So the paper's pattern is not reproduced here: the choice of examples makes no measurable difference."
        else:
            reading = "This runs against the paper's pattern."
        lines.append(
            f"- With {label}: at buffer {small}, min − max = {ds[0]:+.1f} ± {ds[1]:.1f} points ({ds[2]}/{ds[3]} "
            f"seeds favour min): {verdict(*ds[:2])}; at buffer {large}, {dl[0]:+.1f} ± {dl[1]:.1f} ({dl[2]}/{dl[3]}): "
            f"{verdict(*dl[:2])}. " + reading)
        vs = {(p, b): paired(acc[(p, s, b)], acc[("random", "control", b)]) for p in ("min", "max") for b in (small, large)
              if p in args.policies}
        if len(vs) == 4:
            mark = lambda d: f"{d[0]:+.1f} ± {d[1]:.1f}{'*' if significant(*d[:2]) else ''}"
            note = []
            if not (significant(*vs[("min", small)][:2]) and vs[("min", small)][0] > 0) and \
                    significant(*vs[("max", small)][:2]) and vs[("max", small)][0] < 0:
                note.append(f"at buffer {small} the gap comes from max doing worse than a random choice, not from "
                            f"min doing better")
            if significant(*vs[("max", large)][:2]) and vs[("max", large)][0] > 0:
                note.append(f"at buffer {large} max beats a random choice")
            lines.append(f"  Against the random control with the same quotas ({label}; * = significant): min "
                         f"{mark(vs[('min', small)])}, max {mark(vs[('max', small)])} at buffer {small}; min "
                         f"{mark(vs[('min', large)])}, max {mark(vs[('max', large)])} at buffer {large}"
                         + (": " + "; ".join(note) if note else "") + ".")
    n_comparisons = 2 * len(args.buffers) * len(args.policies)
    lines.append(f"- Significance here means outside the 95% paired-t interval over the {n_seeds} seeds; with "
                 f"{n_comparisons} policy comparisons against each reference, about {0.05 * n_comparisons:.0f} "
                 f"would cross it by chance.")
    for reference, label in ((("random", "control"), "the random control (same quotas)"),
                             (("er", "reservoir"), "reservoir ER")):
        beats = []
        for s in ("scores", "proxy"):
            for b in args.buffers:
                for p in args.policies:
                    d = paired(acc[(p, s, b)], acc[(*reference, b)])
                    if significant(d[0], d[1]):
                        beats.append(f"{p} ({s}) at buffer {b}: {d[0]:+.1f} ± {d[1]:.1f}")
        lines.append(f"- Against {label}, significant Acc differences: "
                     + ("; ".join(beats) if beats else "none") + ".")
    control = [(b, paired(acc[("random", "control", b)], acc[("er", "reservoir", b)])) for b in args.buffers]
    lines.append("- The random control against reservoir ER (the buffer scheme alone, no memorization): "
                 + "; ".join(f"buffer {b}: {d[0]:+.1f} ± {d[1]:.1f}" for b, d in control) + ".")
    if noisy_summary is not None or clean:
        parts = []
        for title, summary in (("clean", clean), ("noisy", noisy_summary)):
            if summary is None:
                continue
            f = {b: mean_std(summary[b]["forgetting"])[0] for b in BUCKETS}
            parts.append(f"{title}: low {f['low']:.1f}, middle {f['middle']:.1f}, high {f['high']:.1f} points")
        f = {b: mean_std(clean[b]["forgetting"])[0] for b in BUCKETS}
        order = " (the more memorized, the more forgotten)" if f["low"] < f["middle"] < f["high"] else ""
        lines.append(f"- Forgetting per bucket under ER, buffer {args.bucket_buffer} (mean over seeds) — "
                     + "; ".join(parts) + f"{order if noisy_summary is None else ''}." + (
                         f" On clean labels{order or ' the order is not monotone'}." if noisy_summary is not None else ""))
    spear = {p: mean_std(np.nanmean(np.array(v), axis=1))[0] for p, v in spearman.items()}
    lines.append("- Spearman with the scores: " + ", ".join(f"{p} {v:.2f}" for p, v in spear.items())
                 + f" (paper, learned_iteration on CIFAR-100: {PAPER_SPEARMAN})"
                 + (f"; on digits {100 * np.mean(scores == 0):.0f}% of the scores are tied at exactly 0, which limits "
                    f"any rank correlation with them." if np.mean(scores == 0) > 0.1 else "."))
    ties = [(p, b) for (p, s, b) in results if s == "scores, random ties"]
    if ties:
        lines.append("- Ties: with the scores' ties broken at random instead of in dataset order, Acc "
                     + "; ".join(f"{p} at buffer {b} {fmt(acc[(p, 'scores, random ties', b)])} (dataset order "
                                 f"{fmt(acc[(p, 'scores', b)])})" for p, b in sorted(ties, key=lambda x: (x[1], x[0])))
                     + ".")
    typical_se = np.nanmedian([d[1] for d in diffs.values()]) if diffs else float("nan")
    lines.append(
        f"- Caveats: digits is tiny (about 290 training images per task; a buffer of {large} holds "
        f"{100 * large / len(scores):.0f}% of the training set and, at the end, {large // n_tasks} images of each "
        f"task), and {n_seeds} seeds give paired standard errors of about {typical_se:.1f} points; "
        f"these runs say how the policies behave on this "
        f"small problem, not how they behave on CIFAR or ImageNet.")
    lines.append("")

    # reproduction
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " .venv/bin/python experiments/maer_digits.py"
    command += "".join(f" {a}" for a in sys.argv[1:])
    phases = "; ".join(f"{k} {v / 60:.1f} min" for k, v in runner.seconds.items())
    lines += ["## Reproduce", "", "```bash", command, "```", "",
              f"{runner.n_runs} main.py runs plus {1 + (len(args.seeds) if noisy_summary is not None else 0)} "
              f"split trainings, in one process, {elapsed / 60:.1f} min wall time ({phases}), started "
              f"{started_at:%Y-%m-%d %H:%M} UTC, git {git_commit()}. Machine: {machine()}; load average "
              f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end. Every run is in the MLflow store "
              f"`{Path(args.out).name}/mlflow.db` of the output folder (experiment `maer_digits`; the split trainings "
              f"in `maer_digits-splits`).", ""]
    return "\n".join(lines)
