"""Human-readable report of held-out memorization scores: figures, summary.md and CSV tables."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

MAX_HEATMAP_ROWS = 200  # rows of the per-epoch heatmap; more examples are subsampled evenly
MAX_PAIRS = 10  # influence pairs drawn
MIN_DISPLAY_PIXELS = 32  # tiny images are upsampled (nearest neighbour) to at least this size


def rank_examples(mem: np.ndarray, count: int, most: bool = True) -> np.ndarray:
    """Indices of up to `count` examples with a defined score, highest first (most) or lowest first."""
    mem = np.asarray(mem, dtype=float)
    finite = np.flatnonzero(np.isfinite(mem))
    order = np.argsort(-mem[finite] if most else mem[finite], kind="stable")
    return finite[order[:max(int(count), 0)]]


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite entries of `values` as a flat float array."""
    values = np.asarray(values, dtype=float).ravel()
    return values[np.isfinite(values)]


def _stats(values: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Mean, median and fraction >= threshold of the finite values (NaN when there are none)."""
    values = _finite(values)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    return float(values.mean()), float(np.median(values)), float(np.mean(values >= threshold))


def save_figure(figure, path: Path, written: list[Path]) -> None:
    """Save `figure` as a PNG at `path`, always close it, and record the path."""
    try:
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    written.append(path)


def _show(axes, image: np.ndarray) -> None:
    """Draw one uint8 [C, H, W] image, upsampled by nearest neighbour, grayscale when C == 1."""
    image = np.asarray(image)
    if image.dtype != np.uint8:  # tolerate float images: stretch to 0..255
        low, high = float(image.min()), float(image.max())
        image = ((image - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
    factor = max(1, math.ceil(MIN_DISPLAY_PIXELS / max(image.shape[-2], 1)))
    image = image.repeat(factor, axis=-2).repeat(factor, axis=-1)
    if image.shape[0] == 1:
        axes.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        axes.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    axes.axis("off")


def _caption(axes, text: str) -> None:
    """Write `text` centred under the image in `axes`."""
    axes.text(0.5, -0.04, text, transform=axes.transAxes, ha="center", va="top", fontsize=7)


def _image_grid(images: np.ndarray, labels: np.ndarray, index: np.ndarray, mem: np.ndarray, title: str):
    """Grid of the images at `index` with label and score under each."""
    columns = max(1, min(8, len(index)))
    rows = max(1, math.ceil(len(index) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.4 * columns + 0.4, 1.7 * rows + 0.6), squeeze=False)
    for slot, ax in enumerate(axes.flat):
        ax.axis("off")
        if slot < len(index):
            i = int(index[slot])
            _show(ax, images[i])
            _caption(ax, f"#{i} y={int(labels[i])}\nmem={mem[i]:.2f}")
    if len(index) == 0:
        axes[0, 0].text(0.5, 0.5, "no defined scores", ha="center", va="center")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _mem_histogram(mem: np.ndarray, noisy_mask: np.ndarray | None, threshold: float):
    """Histogram of the finite scores (relabeled vs clean when a mask is given), threshold marked."""
    defined = np.isfinite(mem)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    values = mem[defined]
    bins = np.linspace(min(values.min(), threshold), max(values.max(), threshold), 41) if values.size else 40
    if noisy_mask is None:
        axes.hist(values, bins=bins, color="tab:blue")
    else:
        for chosen, name, color in ((~noisy_mask, "clean", "tab:blue"), (noisy_mask, "relabeled", "tab:red")):
            part = mem[defined & chosen]
            axes.hist(part, bins=bins, alpha=0.55, color=color, label=f"{name} (n={part.size})")
    axes.axvline(threshold, color="black", linestyle="--", label=f"memorized threshold {threshold:g}")
    axes.legend()
    axes.set_xlabel("memorization score")
    axes.set_ylabel("examples")
    axes.set_title(f"Memorization scores (n={mem.size}, undefined/NaN: {int((~defined).sum())})")
    figure.tight_layout()
    return figure


def _top_pairs(influence: dict, n_train: int, n_test: int) -> list[tuple[int, int, float]]:
    """Up to MAX_PAIRS (train, test, value) pairs: the stored pairs, else the largest top-k entries."""
    values = np.asarray(influence.get("pair_value", []), dtype=float)
    if values.size:
        order = np.argsort(-values, kind="stable")[:MAX_PAIRS]
        return [(int(influence["pair_train"][o]), int(influence["pair_test"][o]), float(values[o])) for o in order]
    index, value = np.asarray(influence["topk_index"]), np.asarray(influence["topk_value"], dtype=float)
    if value.size == 0 or value.shape[0] != n_test or index.max() >= n_train:
        return []  # top-k rows are assumed to be test examples holding train indices
    flat = np.argsort(-np.nan_to_num(value, nan=-np.inf), axis=None, kind="stable")[:MAX_PAIRS]
    return [(int(index[t, s]), int(t), float(value[t, s])) for t, s in zip(*np.unravel_index(flat, value.shape))]


def _influence_pairs(pairs: list, train_images, train_labels, test_images, test_labels):
    """Columns of train image (top) and the test image it influences (bottom)."""
    columns = max(1, len(pairs))
    figure, axes = plt.subplots(2, columns, figsize=(1.5 * columns + 0.4, 4.2), squeeze=False)
    for column, ax in enumerate(axes.T):
        ax[0].axis("off")
        ax[1].axis("off")
        if column < len(pairs):
            train, test, value = pairs[column]
            _show(ax[0], train_images[train])
            _caption(ax[0], f"train #{train} y={int(train_labels[train])}")
            _show(ax[1], test_images[test])
            _caption(ax[1], f"test #{test} y={int(test_labels[test])}\ninfl={value:.3f}")
    if not pairs:
        axes[0, 0].text(0.5, 0.5, "no pairs", ha="center", va="center")
    figure.suptitle("Highest-influence pairs (train above, test below)")
    figure.tight_layout()
    return figure


def _influence_histogram(influence: dict):
    """Influence value histogram with log-scale counts and the pair threshold marked."""
    counts, bins = np.asarray(influence["histogram"]), np.asarray(influence["bins"], dtype=float)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.stairs(counts, bins, fill=True)
    if (counts > 0).any():
        axes.set_yscale("log")
    if influence.get("threshold") is not None:
        axes.axvline(float(influence["threshold"]), color="black", linestyle="--", label="pair threshold")
        axes.legend()
    axes.set_xlabel("influence")
    axes.set_ylabel("train-test pairs")
    axes.set_title("Influence of training examples on test examples")
    figure.tight_layout()
    return figure


def _mem_per_epoch(per_epoch_mem: np.ndarray, epochs: list[int]):
    """Heatmap of examples (sorted by final score, evenly subsampled) by recorded epoch."""
    final = per_epoch_mem[-1]
    order = np.concatenate([rank_examples(final, final.size), np.flatnonzero(~np.isfinite(final))])
    if order.size > MAX_HEATMAP_ROWS:
        order = order[np.linspace(0, order.size - 1, MAX_HEATMAP_ROWS).round().astype(int)]
    matrix = per_epoch_mem[:, order].T
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    figure, axes = plt.subplots(figsize=(max(5, 0.5 * len(epochs) + 3), 6))
    image = axes.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="coolwarm", vmin=-limit,
                        vmax=limit, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="memorization")
    step = max(1, len(epochs) // 15)
    axes.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs][::step])
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"examples, highest final score on top ({len(order)} of {final.size})")
    axes.set_title("Memorization per epoch")
    figure.tight_layout()
    return figure


def _mem_vs_loss(final: np.ndarray, loss: np.ndarray, noisy_mask: np.ndarray | None):
    """Scatter of final memorization against final training loss (relabeled in red)."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    groups = [(np.ones(final.size, bool), "examples", "tab:blue")] if noisy_mask is None else \
        [(~noisy_mask, "clean", "tab:blue"), (noisy_mask, "relabeled", "tab:red")]
    for chosen, name, color in groups:
        axes.scatter(loss[chosen], final[chosen], s=6, alpha=0.5, color=color, label=name, rasterized=True)
    if noisy_mask is not None:
        axes.legend()
    axes.set_xlabel("training loss (final epoch, mean over models that trained on it)")
    axes.set_ylabel("final memorization")
    axes.set_title("Memorization vs training loss")
    figure.tight_layout()
    return figure


def _forgetting_vs_mem(mem: np.ndarray, forgetting: np.ndarray, rho: float):
    """Memorization against forgetting events: every example, and the mean per unit-wide bin of forgetting."""
    both = np.isfinite(mem) & np.isfinite(forgetting)
    x, y = forgetting[both], mem[both]
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.scatter(x, y, s=6, alpha=0.3, color="tab:blue", label="examples", rasterized=True)
    bins = np.floor(x)
    centres = np.unique(bins)
    axes.plot(centres + 0.5, [y[bins == c].mean() for c in centres], "o-", color="black",
              label="mean per bin [k, k + 1)")
    axes.legend()
    axes.set_xlabel("forgetting events (mean over models that trained on the example)")
    axes.set_ylabel("memorization")
    axes.set_title(f"Memorization vs forgetting events (Spearman {rho:.3f}, n={int(both.sum())})")
    figure.tight_layout()
    return figure


def summary_rows(mem: np.ndarray, se: np.ndarray, n_in: np.ndarray, n_out: np.ndarray, influence: dict | None = None,
                 noisy_mask: np.ndarray | None = None, summary: dict | None = None,
                 threshold: float = 0.25, forgetting: np.ndarray | None = None) -> list[tuple[str, object]]:
    """The summary table as (key, value) rows, every number computed from the inputs."""
    mem = np.asarray(mem, dtype=float)
    noisy_mask = None if noisy_mask is None else np.asarray(noisy_mask, dtype=bool)
    mean, median, fraction = _stats(mem, threshold)
    rows: list[tuple[str, object]] = [("n", int(mem.size)), ("n_undefined", int((~np.isfinite(mem)).sum())),
             ("mean", mean), ("median", median), (f"fraction_ge_{threshold:g}", fraction),
             ("mean_se", float(_finite(se).mean()) if _finite(se).size else math.nan),
             ("min_n_in", int(np.min(n_in))), ("median_n_in", float(np.median(n_in))),
             ("min_n_out", int(np.min(n_out))), ("median_n_out", float(np.median(n_out)))]
    if influence is not None:
        rows += [("influence_threshold", influence.get("threshold")),
                 ("influence_pairs_above_threshold", int(np.asarray(influence.get("pair_value", [])).size))]
    if noisy_mask is not None:
        defined = np.isfinite(mem)
        labels = noisy_mask[defined]
        rows += [("n_relabeled", int(noisy_mask.sum())), ("mean_relabeled", _stats(mem[noisy_mask], threshold)[0]),
                 ("mean_clean", _stats(mem[~noisy_mask], threshold)[0])]
        if labels.any() and not labels.all():
            rows.append(("auroc_relabeled_vs_clean", float(roc_auc_score(labels, mem[defined]))))
    if forgetting is not None:
        from memorization.forgetting import spearman_defined  # it imports torch, which the rest does not need

        rows.append(("spearman_forgetting_mem", spearman_defined(np.asarray(forgetting, dtype=float), mem)))
    return _given_rows(summary or {}, rows) + rows


def _given_rows(given: dict, computed: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The caller's rows; a key also computed here is dropped when equal, else kept as given_<key>."""
    known, rows = dict(computed), []
    for key, value in given.items():
        if key not in known:
            rows.append((key, value))
        elif not _same(value, known[key]):
            rows.append((f"given_{key}", value))
    return rows


def _same(a: object, b: object) -> bool:
    """Whether two table values agree (floats to 1e-9, NaN equal to NaN)."""
    try:
        return bool(np.isclose(float(a), float(b), rtol=1e-9, atol=1e-12, equal_nan=True))
    except (TypeError, ValueError):
        return a == b


def per_epoch_rows(per_epoch: dict, threshold: float = 0.25) -> list[dict]:
    """One row per recorded epoch: mean, median, fraction >= threshold, accuracies and their gap."""
    rows = []
    for e, epoch in enumerate(per_epoch["epochs"]):
        mean, median, fraction = _stats(per_epoch["mem"][e], threshold)
        train_acc, test_acc = float(per_epoch["train_acc"][e]), float(per_epoch["test_acc"][e])
        rows.append({"epoch": int(epoch), "mean": mean, "median": median, f"fraction_ge_{threshold:g}": fraction,
                     "train_acc": train_acc, "test_acc": test_acc, "gap": train_acc - test_acc})
    return rows


MEANINGS = {
    "n": "training examples", "n_undefined": "examples never left out or never included (NaN score)",
    "mean": "mean of defined scores", "median": "median of defined scores",
    "mean_se": "mean standard error of defined scores", "min_n_in": "fewest models that trained on an example",
    "median_n_in": "median models that trained on an example", "min_n_out": "fewest models that left an example out",
    "median_n_out": "median models that left an example out", "influence_threshold": "influence pair threshold",
    "influence_pairs_above_threshold": "train-test pairs with influence above the threshold",
    "n_relabeled": "relabeled (noisy) examples", "mean_relabeled": "mean defined score of relabeled examples",
    "mean_clean": "mean defined score of clean examples",
    "auroc_relabeled_vs_clean": "AUROC of the score separating relabeled from clean (defined scores)",
    "spearman_forgetting_mem": "Spearman correlation of forgetting events with memorization (both defined)",
    "datamodel_fit_models": "datamodels: models the LASSO was fitted on",
    "datamodel_val_models": "datamodels: models held out to choose each test example's regularisation",
    "datamodel_val_r2_mean": "datamodels: mean validation R² per test example",
    "datamodel_val_r2_median": "datamodels: median validation R² per test example",
    "datamodel_val_spearman": "datamodels: Spearman of predicted and actual margins of the validation models",
    "datamodel_nonzeros_mean": "datamodels: mean nonzero θ per test example",
    "datamodel_influence_pearson_median": "datamodels: median over test examples of Pearson(θ_j, influence_j)",
    "datamodel_topk_overlap_mean": "datamodels: mean share of the top-k by θ also in the top-k by influence",
    "datamodel_unconverged": "datamodels: test examples whose chosen fit stopped at the iteration limit",
    "datamodel_fit_seconds": "datamodels: seconds of the LASSO fits",
}


def _format(value: object) -> str:
    """A value for the markdown table (4 significant digits for floats)."""
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _write_markdown(path: Path, rows: list, epoch_rows: list[dict], sections: list[str] = ()) -> None:
    """summary.md: the key/value table, then the per-epoch table when there is one."""
    lines = ["# Memorization report", "", "| quantity | value | meaning |", "|---|---|---|"]
    for key, value in rows:
        meaning = "share of defined scores at or above the threshold" if str(key).startswith("fraction_ge_") else \
            MEANINGS.get(key, "")
        lines.append(f"| {key} | {_format(value)} | {meaning} |")
    if epoch_rows:
        header = list(epoch_rows[0])
        lines += ["", "## Per epoch", "", "gap = train_acc - test_acc; fraction over defined scores at that epoch.", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_format(row[key]) for key in header) + " |" for row in epoch_rows]
    path.write_text("\n".join([*lines, *sections]) + "\n")


def write_report(folder: Path, *, mem: np.ndarray, se: np.ndarray, n_in: np.ndarray, n_out: np.ndarray,
                 train_images: np.ndarray | None, train_labels: np.ndarray | None,
                 test_images: np.ndarray | None = None, test_labels: np.ndarray | None = None,
                 influence: dict | None = None,
                 per_epoch: dict | None = None, noisy_mask: np.ndarray | None = None,
                 summary: dict | None = None, threshold: float = 0.25, grid_size: int = 32,
                 forgetting: np.ndarray | None = None, datamodels: dict | None = None,
                 sections: list[str] = ()) -> list[Path]:
    """Write figures, summary.md, summary.csv (and per_epoch.csv) into `folder`; return the paths.
    `forgetting` (forgetting events per example, same rows as `mem`) adds forgetting_vs_mem.png;
    `datamodels` (memorization.datamodels.write_datamodels' "report") datamodel_vs_influence.png and a section;
    `sections` are more markdown lines for summary.md (the proxy table, the attribution scores)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mem = np.asarray(mem, dtype=float)
    noisy_mask = None if noisy_mask is None else np.asarray(noisy_mask, dtype=bool)
    written: list[Path] = []
    save_figure(_mem_histogram(mem, noisy_mask, threshold), folder / "mem_histogram.png", written)
    have_images = train_images is not None and train_labels is not None  # eval_splits passes None without a plan
    for most, name in ((True, "most"), (False, "least")) if have_images else ():
        index = rank_examples(mem, grid_size, most=most)
        title = f"{name.capitalize()} memorized ({len(index)} of {int(np.isfinite(mem).sum())} defined)"
        save_figure(_image_grid(train_images, train_labels, index, mem, title), folder / f"{name}_memorized.png", written)
    if influence is not None:
        if have_images and test_images is not None and test_labels is not None:
            pairs = _top_pairs(influence, len(train_images), len(test_images))
            figure = _influence_pairs(pairs, train_images, train_labels, test_images, test_labels)
            save_figure(figure, folder / "influence_pairs.png", written)
        save_figure(_influence_histogram(influence), folder / "influence_histogram.png", written)
    epoch_rows: list[dict] = []
    if per_epoch is not None:
        per_epoch_mem = np.asarray(per_epoch["mem"], dtype=float)
        save_figure(_mem_per_epoch(per_epoch_mem, list(per_epoch["epochs"])), folder / "mem_per_epoch.png", written)
        loss = np.asarray(per_epoch["train_loss"], dtype=float)
        save_figure(_mem_vs_loss(per_epoch_mem[-1], loss, noisy_mask), folder / "mem_vs_loss.png", written)
        epoch_rows = per_epoch_rows(per_epoch, threshold)
    rows = summary_rows(mem, se, n_in, n_out, influence, noisy_mask, summary, threshold, forgetting)
    if forgetting is not None:
        rho = next(value for key, value in rows if key == "spearman_forgetting_mem")
        figure = _forgetting_vs_mem(mem, np.asarray(forgetting, dtype=float), rho)
        save_figure(figure, folder / "forgetting_vs_mem.png", written)
    if datamodels is not None:
        from memorization.datamodels import report_section, scatter_figure

        save_figure(scatter_figure(datamodels), folder / "datamodel_vs_influence.png", written)
    _write_markdown(folder / "summary.md", rows, epoch_rows,
                    [*(report_section(datamodels) if datamodels else []), *sections])
    written.append(folder / "summary.md")
    with open(folder / "summary.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("key", "value"), *rows])
    written.append(folder / "summary.csv")
    if epoch_rows:
        with open(folder / "per_epoch.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(epoch_rows[0]))
            writer.writeheader()
            writer.writerows(epoch_rows)
        written.append(folder / "per_epoch.csv")
    return written
