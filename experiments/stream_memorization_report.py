"""What `stream_memorization.py` writes from its numbers: the results markdown (settings, the three tables, the
per-task memorization matrices, a reading of the numbers, how to reproduce them)."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from maer_digits_report import machine  # noqa: E402  (beside this file: the script's folder is on sys.path)
from utils.mlflow_logger import git_commit

P_LEVEL = 0.05  # the level at which a Welch p-value is read as a difference


def shown(folder: str) -> str:
    """A folder inside the repository as a path relative to its root, any other as given."""
    repo = Path(__file__).resolve().parents[1]
    return str(Path(folder).relative_to(repo)) if Path(folder).is_relative_to(repo) else folder


def f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def p_text(p) -> str:
    if p is None or not np.isfinite(p):
        return "—"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def label(s: dict) -> str:
    return f"{s['dataset']}{' (10% relabeled)' if s['dataset'] == 'seq-digits' else ''}, {s['epochs']} ep/task"


def name(s: dict) -> str:
    return f"{label(s)}, buffer {s['buffer']}"


def table_over_tasks(streams: list[dict]) -> list[str]:
    lines = ["| dataset | ER buffer | final class-IL acc (%) | mean mem, own task end | mean mem, stream end | "
             "task 1: after task 1 → after task T | new task (diagonal mean) | tasks 1..T−1 at stream end | "
             "AUROC own task → end | target examples' mean mem, own → end | "
             "other examples' mean mem, own → end | "
             "target examples' accuracy at own task end, learners with / without | other examples' accuracy, "
             "with / without |", "|" + "---|" * 13]
    for s in streams:
        m, t = np.array(s["task_means"], dtype=float), s["n_tasks"]
        sm = s["summary"]
        kind = "singletons" if s["positive_kind"] == "singleton" else "relabeled"
        auroc_own = sm.get(f"auroc_{s['positive_kind']}_own_task")
        auroc_end = sm.get(f"auroc_{s['positive_kind']}")
        lines.append(
            f"| {label(s)} | {s['buffer']} | {f(sm['final_accuracy_mean'], 1)} | {f(sm['mean_own_task'])} | "
            f"{f(sm['mean'])} | {f(m[0, 0])} → {f(m[t - 1, 0])} | {f(float(np.mean(np.diag(m))))} | "
            f"{f(float(np.mean(m[t - 1, :t - 1])))} | {kind}: {f(auroc_own)} → {f(auroc_end)} | "
            f"{f(s['positive_mem_own'])} → {f(s['positive_mem_end'])} (n={s['positives']}) | "
            f"{f(s['other_mem_own'])} → {f(s['other_mem_end'])} | "
            f"{f(s['positive_acc_with'])} / {f(s['positive_acc_without'])} | "
            f"{f(s['other_acc_with'])} / {f(s['other_acc_without'])} |")
    return lines


def matrices(streams: list[dict]) -> list[str]:
    lines = []
    for s in streams:
        m, t = np.array(s["task_means"], dtype=float), s["n_tasks"]
        lines += ["", f"{label(s)}, ER buffer {s['buffer']}:", "",
                  "| after task | " + " | ".join(f"task {j + 1}" for j in range(t)) + " |", "|---|" + "---|" * t]
        lines += [f"| {i + 1} | " + " | ".join(f(m[i, j]) if j <= i else "" for j in range(t)) + " |"
                  for i in range(t)]
    return lines


def table_forgetting(streams: list[dict]) -> list[str]:
    lines = ["| dataset | ER buffer | n high (≥ 0.25) | n low (< 0.1) | forgetting high | forgetting low | gap "
             "(high − low) | Welch p | Spearman(mem, forgetting) | accuracy own → end, high | "
             "accuracy own → end, "
             "low | target examples among high |", "|" + "---|" * 12]
    for s in streams:
        sm = s["summary"]
        lines.append(
            f"| {label(s)} | {s['buffer']} | {sm['n_high_mem']} | {sm['n_low_mem']} | {f(sm['forgetting_high_mem'])} | "
            f"{f(sm['forgetting_low_mem'])} | {f(sm['forgetting_gap'])} | {p_text(sm.get('forgetting_gap_p'))} | "
            f"{f(sm.get('spearman_mem_forgetting'))} | {f(s['high_acc_own'])} → {f(s['high_acc_end'])} | "
            f"{f(s['low_acc_own'])} → {f(s['low_acc_end'])} | {f(s['high_positive_share'], 2)} "
            f"({'singletons' if s['positive_kind'] == 'singleton' else 'relabeled'}) |")
    return lines


def proxy_section(p: dict, settings: dict) -> list[str]:
    groups = ", ".join(f"{n} models {s:.1f} s" for n, s in p["group_seconds"])
    noise = f", --label_noise {settings['digits_noise']}" if p["dataset"] == "seq-digits" else ""
    return [f"### {p['dataset']}{noise}", "",
            f"{p['n_models']} MLPs (hidden {p['hidden']}) on random halves (balanced), {p['epochs']} epochs, "
            f"SGD lr {settings['lr']} momentum 0.9, batch 32, a record after every epoch, trained as ensembles of 16 "
            f"(group training times: {groups}); share of (model, included example) pairs fitted after the last "
            f"epoch: {f(p['train_acc_last_epoch'])}. A model's training seconds are its 1/16 share of its "
            f"ensemble's.", "", p["proxy_note"], "", p["proxy_table"], "",
            f"Subset estimator from all {p['n_models']} models: mean memorization {f(p['mean'])}, "
            f"{f(100 * p['fraction_memorized'], 1)}% at or above 0.25, AUROC {p['auroc_kind']} {f(p['auroc'])}. "
            f"LDS of the influence matrix (computed from the first {p['lds_scored_models']} models) on the last "
            f"{p['lds_models']} models (--lds_holdout {settings['lds_holdout']}): {f(p['lds'])} over "
            f"{p['lds_defined']} test examples (the rest are constant over the held-out models); on the "
            f"{p['lds_scored_models']} models it was computed from (in-sample) the same score is "
            f"{f(p['lds_in_sample'])}.", ""]


def _auroc(s: dict, own: bool) -> float:
    return s["summary"].get(f"auroc_{s['positive_kind']}" + ("_own_task" if own else ""), float("nan"))


def by_buffer(streams: list[dict], value) -> str:
    """`value` of each setting as 'label: v at buffer b1 / v at b2', one group per dataset and epochs."""
    groups: dict[str, list[dict]] = {}
    for s in streams:
        groups.setdefault(label(s), []).append(s)
    return "; ".join(f"{key}: " + " / ".join(f"{value(s)} at buffer {s['buffer']}" for s in group)
                     for key, group in groups.items())


def reading(streams: list[dict], proxies: list[dict]) -> list[str]:
    lines = ["## What the numbers show", ""]
    change = [s["summary"]["mean"] - s["summary"]["mean_own_task"] for s in streams]
    task1 = [np.array(s["task_means"])[-1, 0] - np.array(s["task_means"])[0, 0] for s in streams]
    drop = [_auroc(s, True) - _auroc(s, False) for s in streams]
    lines.append(
        f"- Over tasks (table 1): mean memorization is higher at the stream's end than at the end of each example's "
        f"own task in {sum(c > 0 for c in change)} of {len(streams)} settings (differences {min(change):+.3f} to "
        f"{max(change):+.3f}); task 1's examples end the stream more memorized than after task 1 in "
        f"{sum(t > 0 for t in task1)} of {len(streams)} (by {min(task1):+.3f} to {max(task1):+.3f}). The AUROC of "
        f"memorization for the target examples is lower at the stream's end than at the end of their own task in "
        f"{sum(d > 0 for d in drop)} of {len(streams)} settings; the drop is "
        + by_buffer(streams, lambda s: f"{_auroc(s, True) - _auroc(s, False):.3f}") + ".")
    unfitted = [s for s in streams if s["positive_acc_with"] - s["positive_acc_without"] < 0.05]
    if unfitted:
        lines.append(
            "- In " + " and ".join(name(s) for s in unfitted) + " the learners did not fit the target examples (their "
            "accuracy at the end of their own task with / without them: "
            + ", ".join(f"{f(s['positive_acc_with'])} / {f(s['positive_acc_without'])}" for s in unfitted)
            + "), and their memorization stays near 0"
            + (" (no example reaches 0.25)." if all(s["summary"]["n_high_mem"] == 0 for s in unfitted) else "."))
    testable = [s for s in streams if np.isfinite(s["summary"].get("forgetting_gap_p", float("nan")))]
    more = [s for s in testable if s["summary"]["forgetting_gap_p"] < P_LEVEL and s["summary"]["forgetting_gap"] > 0]
    less = [s for s in testable if s["summary"]["forgetting_gap_p"] < P_LEVEL and s["summary"]["forgetting_gap"] < 0]
    gaps = [s["summary"]["forgetting_gap"] for s in testable]
    lines.append(
        f"- Forgetting (table 2): high-memorization examples are forgotten more than low-memorization ones at "
        f"p < {P_LEVEL} in {len(more)} of the {len(testable)} settings where both buckets hold examples"
        + (f" (gaps {min(gaps):.3f} to {max(gaps):.3f})" if gaps else "")
        + (f"; less in {len(less)}" if less else "")
        + (f"; {len(streams) - len(testable)} settings have no high-memorization example"
           if len(testable) < len(streams) else "")
        + ". Spearman(memorization at own task end, forgetting) over all examples of tasks 1-4: "
        + by_buffer(streams, lambda s: f(s["summary"].get("spearman_mem_forgetting")))
        + ". The high bucket starts from a lower accuracy at the end of its task than the low bucket in every "
          "testable setting" * all(s["high_acc_own"] < s["low_acc_own"] for s in testable)
        + ("; part of the high bucket is neither singleton nor relabeled (share of target examples "
           + ", ".join(f(s["high_positive_share"], 2) for s in testable) + ")."
           if any(s["high_positive_share"] < 1 for s in testable) else "."))
    for p in proxies:
        rows = p["proxy_rows"][1:]
        ranked = sorted(rows, key=lambda r: -r["spearman"] if np.isfinite(r["spearman"]) else np.inf)
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        overlap = second is not None and second["spearman_hi"] >= best["spearman_lo"]
        kind = "relabeled" if p["auroc_kind"] == "relabeled" else "singleton"
        top = max(rows, key=lambda r: r.get(f"auroc_{kind}", -1))
        lines.append(
            f"- Proxies on {p['dataset']} (table 3): the highest Spearman with the estimator is {best['name']}'s "
            f"{f(best['spearman'])} [{f(best['spearman_lo'])}, {f(best['spearman_hi'])}]"
            + (f", its interval overlapping {second['name']}'s ({f(second['spearman'])})" if overlap else
               (f", above the interval of {second['name']} ({f(second['spearman'])})" if second else ""))
            + f"; the best proxy AUROC for {p['auroc_kind']} is {top['name']}'s {f(top.get(f'auroc_{kind}'))}, the "
              f"estimator's {f(p['auroc'])}. The influence matrix's LDS on held-out models is {f(p['lds'])} "
              f"(in-sample {f(p['lds_in_sample'])}): from {p['lds_scored_models']} models it does not predict "
              f"models it was not computed from." * (abs(p["lds"]) < 0.1)
            + f"The influence matrix's LDS on held-out models is {f(p['lds'])}." * (abs(p["lds"]) >= 0.1))
    return lines


def write_results(numbers: dict, path: Path) -> str:
    a = numbers["settings"]
    streams, proxies = numbers["streams"], numbers["proxies"]
    load = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    command = "OMP_NUM_THREADS=1 .venv/bin/python experiments/stream_memorization.py " + " ".join(numbers["argv"])
    sizes = {s["dataset"]: s["n_train"] for s in streams}
    learner = {f"{s['dataset']} ER {s['buffer']}": s["summary"]["learner_seconds_mean"] for s in streams}
    lines = [
        "# Memorization inside the continual stream, forgetting by memorization, and single-run proxies", "",
        f"Written by `{command.strip()}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC (repository commit "
        f"{git_commit()}). Machine: {machine()}; load average (1, 5, 15 min, as `uptime` shows it) "
        f"{load(numbers['load_start'])} at the start and {load(numbers['load_end'])} at the end. "
        f"{numbers['total_seconds']:.0f} s in all; models trained by this run: "
        f"{sum(s['trained'] for s in streams)} stream learners, {sum(p['trained'] for p in proxies)} subset models "
        f"(a rerun trains only what its stores lack).", "",
        "| step | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in numbers["seconds"].items()], "",
        "Mean training seconds per learner (from the store's timing): "
        + ", ".join(f"{k} {v:.2f}" for k, v in learner.items()) + ".", "",
        "## Settings", "",
        f"- Stream plans: `train_splits.py --plan_kind stream --cl_model er --buffer_size B --n_models {a['learners']} "
        f"--subset_ratio {a['subset_ratio']} --lr {a['lr']} --seed {a['seed']}`, B in {a['buffers']}; every other "
        f"setting is main.py's default (SGD without momentum, the dataset's batch size 32, MLP 64-100-100-10, "
        f"reservoir buffer, replay batch = batch). seq-longtail: {a['longtail_epochs']} epoch(s) per task (its "
        f"default is 10). seq-digits: `--label_noise {a['digits_noise']}` (a seeded {a['digits_noise']:.0%} of the "
        f"training labels changed to the other class of the same task) so that it has examples that must be "
        f"memorized, {a['digits_epochs']} epoch(s) per task"
        + (f", and again with {a['digits_fit_epochs']} epochs per task"
           + (" (the stationary digits store's epochs)" if a["digits_fit_epochs"] == a["digits_subset_epochs"] else "")
           + ", set "
           f"after the {a['digits_epochs']}-epoch learners left the relabeled examples unfitted (their accuracy "
           f"at the end of their task is the same with and without them, table 1)" if a["digits_fit_epochs"] else "")
        + ". 5 tasks of 2 classes each. Each learner trains on a balanced share of every task ("
        + ", ".join(f"{d} about {round(n * a['subset_ratio'])} of {n} examples" for d, n in sizes.items())
        + f"), so a buffer of {max(a['buffers'])} can hold most of a learner's data.",
        "- Stream evaluation: `eval_splits.py --run_dir STORE --out .../mem.npy` (target: softmax probability of the "
        "label over the classes seen so far; memorization = mean over the learners with the example − mean over "
        "those without, at each task boundary). Target examples: the 80 singletons of seq-longtail "
        "(`known_answer()['singleton']`), the relabeled examples of seq-digits.",
        "- Forgetting of an example: class-IL accuracy on it of the learners that trained on it, at the end of its "
        "own task minus at the end of the stream (tasks 1-4). High memorization: ≥ 0.25 at the end of its own task; "
        "low: < 0.1. Welch's t-test between the two.",
        f"- Stationary subset stores: `train_splits.py --n_models {a['subset_models']} --subset_ratio "
        f"{a['subset_ratio']} --lr {a['lr']} --batch_size 32 --record_epochs 1,...,E --ensemble 16 --seed "
        f"{a['seed']}` (momentum 0.9, train_splits.py's default); seq-longtail E = {a['longtail_subset_epochs']} (MLP "
        f"100-100), seq-digits E = {a['digits_subset_epochs']} with `--mlp_hidden {a['digits_subset_hidden']} "
        f"--label_noise {a['digits_noise']}` (the recipe of maer_digits.py: with 30 epochs of the default MLP the "
        f"relabeled examples stay unfitted, training accuracy about 0.91). Evaluated twice: `--proxies --proxy_boot "
        f"{a['proxy_boot']}` (proxies of model 0 against the estimator of the others) and, apart, `--lds_holdout "
        f"{a['lds_holdout']}`.", "",
        "## 1. Memorization over tasks (ER)", "",
        "Mean memorization of the examples seen so far; \"own task end\" is each example at the end of the task that "
        "brought it, \"stream end\" after task 5. Class-IL accuracy: mean over learners of the final row of the "
        "accuracy matrix (test set). AUROC: memorization as a detector of the target examples (singletons / "
        "relabeled).", "", *table_over_tasks(streams), "",
        "Mean memorization of task j's examples after task t (the [T, T] matrices summarised above):",
        *matrices(streams), "",
        "## 2. Forgetting of high- against low-memorization examples (ER, in-stream)", "",
        "Over the examples of tasks 1-4; memorization at the end of each example's own task. \"Target examples "
        "among high\": share of the high bucket that are singletons / relabeled.", "", *table_forgetting(streams), "",
        "## 3. Single-run proxies against the subset estimator (stationary training)", "",
        *[line for p in proxies for line in proxy_section(p, a)],
        *reading(streams, proxies), "",
        "## Reproduce", "", "```bash",
        "OMP_NUM_THREADS=1 .venv/bin/python experiments/stream_memorization.py           # this file",
        "OMP_NUM_THREADS=1 .venv/bin/python experiments/stream_memorization.py --quick   # smoke test",
        "```", "",
        f"Stores, score files, the per-boundary reports (`stream/<dataset>-er<B>-e<E>_scores/mem_report/`) and every "
        f"run's printout (`runs.log`) are in `{shown(a['out'])}/`; "
        f"its MLflow store is `mlflow.db` there.", ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
