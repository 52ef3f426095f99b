"""The memorization report: files, figures, and every summary number checked against an independent computation."""
from __future__ import annotations

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from memorization.report import rank_examples, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TRAIN, N_TEST, EPOCHS = 40, 6, [1, 2, 5]


@pytest.fixture
def inputs():
    """40 gray 8x8 train images with known scores (3 NaN, the 5 relabeled ones highest), 6 RGB 32x32 tests."""
    rng = np.random.default_rng(0)
    mem = np.linspace(-0.2, 0.6, N_TRAIN)
    mem[[0, 7, 13]] = np.nan
    noisy = np.zeros(N_TRAIN, bool)
    noisy[-5:] = True  # the five highest defined scores
    per_epoch_mem = np.stack([mem * 0.3, mem * 0.7, mem]).astype(np.float32)
    return dict(
        mem=mem, se=np.full(N_TRAIN, 0.05), n_in=rng.integers(3, 9, N_TRAIN), n_out=rng.integers(2, 8, N_TRAIN),
        train_images=rng.integers(0, 256, (N_TRAIN, 1, 8, 8), dtype=np.uint8),
        train_labels=rng.integers(0, 10, N_TRAIN),
        test_images=rng.integers(0, 256, (N_TEST, 3, 32, 32), dtype=np.uint8),
        test_labels=rng.integers(0, 10, N_TEST),
        influence=dict(topk_index=rng.integers(0, N_TRAIN, (N_TEST, 3)), topk_value=rng.random((N_TEST, 3)),
                       pair_train=np.array([39, 38, 5]), pair_test=np.array([0, 4, 2]),
                       pair_value=np.array([0.9, 0.5, 0.2]), histogram=np.array([100, 20, 0, 3]),
                       bins=np.array([-0.5, 0.0, 0.25, 0.5, 1.0]), threshold=0.15),
        per_epoch=dict(epochs=EPOCHS, mem=per_epoch_mem, train_loss=rng.random(N_TRAIN).astype(np.float32),
                       train_acc=np.array([0.5, 0.8, 0.99]), test_acc=np.array([0.45, 0.6, 0.7])),
        noisy_mask=noisy, summary={"dataset": "toy", "models": 12})


def read_summary(path) -> dict[str, str]:
    """summary.csv as a key -> value dict."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["key", "value"]
    return {key: value for key, value in rows[1:]}


def test_rank_examples_skips_nan_and_orders():
    mem = np.array([0.1, np.nan, 0.9, -0.3, 0.5, np.nan])
    assert rank_examples(mem, 10).tolist() == [2, 4, 0, 3]
    assert rank_examples(mem, 2).tolist() == [2, 4]
    assert rank_examples(mem, 3, most=False).tolist() == [3, 0, 4]
    assert rank_examples(np.full(4, np.nan), 3).size == 0


def test_full_report(tmp_path, inputs):
    plt.close("all")
    folder = tmp_path / "report"
    written = write_report(folder, **inputs)
    names = {path.name for path in written}
    assert names == {"mem_histogram.png", "most_memorized.png", "least_memorized.png", "influence_pairs.png",
                     "influence_histogram.png", "mem_per_epoch.png", "mem_vs_loss.png", "summary.md",
                     "summary.csv", "per_epoch.csv"}
    for path in written:
        assert path.parent == folder and path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
            with Image.open(path) as image:
                assert 200 <= image.width <= 4000 and 200 <= image.height <= 4000, (path.name, image.size)
    assert plt.get_fignums() == []

    mem = inputs["mem"]
    finite = mem[np.isfinite(mem)]
    values = read_summary(folder / "summary.csv")
    assert values["dataset"] == "toy" and values["models"] == "12"
    assert int(values["n"]) == N_TRAIN
    assert int(values["n_undefined"]) == 3
    assert float(values["mean"]) == pytest.approx(finite.mean())
    assert float(values["median"]) == pytest.approx(np.median(finite))
    assert float(values["fraction_ge_0.25"]) == pytest.approx(np.sum(finite >= 0.25) / finite.size)
    assert float(values["mean_se"]) == pytest.approx(0.05)
    assert int(values["min_n_in"]) == inputs["n_in"].min()
    assert float(values["median_n_out"]) == pytest.approx(np.median(inputs["n_out"]))
    assert int(values["influence_pairs_above_threshold"]) == 3
    defined = np.isfinite(mem)
    expected_auroc = roc_auc_score(inputs["noisy_mask"][defined], finite)
    assert expected_auroc == 1.0
    assert float(values["auroc_relabeled_vs_clean"]) == pytest.approx(1.0)

    with open(folder / "per_epoch.csv", newline="") as handle:
        epoch_rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in epoch_rows] == EPOCHS
    for row, scores, train_acc, test_acc in zip(epoch_rows, inputs["per_epoch"]["mem"],
                                                inputs["per_epoch"]["train_acc"], inputs["per_epoch"]["test_acc"]):
        scores = scores[np.isfinite(scores)]
        assert float(row["fraction_ge_0.25"]) == pytest.approx(np.mean(scores >= 0.25))
        assert float(row["mean"]) == pytest.approx(scores.mean())
        assert float(row["gap"]) == pytest.approx(train_acc - test_acc)
    fractions = [float(row["fraction_ge_0.25"]) for row in epoch_rows]
    assert fractions[0] < fractions[1] < fractions[2]

    markdown = (folder / "summary.md").read_text()
    assert "| n_undefined | 3 |" in markdown
    assert f"| mean | {finite.mean():.4g} |" in markdown
    assert "## Per epoch" in markdown and markdown.count("\n| 5 |") == 1


def test_most_memorized_grid_uses_highest_scores(tmp_path, inputs):
    """The grid shows exactly rank_examples' choice: the top defined scores, never NaN."""
    top = rank_examples(inputs["mem"], 4)
    assert top.tolist() == [39, 38, 37, 36]
    least = rank_examples(inputs["mem"], 2, most=False)
    assert least.tolist() == [1, 2]
    # Changing only the images outside the top 4 must leave the most-memorized grid pixel-identical.
    first = write_report(tmp_path / "a", **{**inputs, "grid_size": 4})
    images = inputs["train_images"].copy()
    others = np.setdiff1d(np.arange(N_TRAIN), top)
    images[others] = 255 - images[others]
    second = write_report(tmp_path / "b", **{**inputs, "grid_size": 4, "train_images": images})
    grid = [next(p for p in paths if p.name == "most_memorized.png") for paths in (first, second)]
    pixels = [np.asarray(Image.open(path)) for path in grid]
    assert np.array_equal(*pixels)
    least_grid = [next(p for p in paths if p.name == "least_memorized.png") for paths in (first, second)]
    assert not np.array_equal(*[np.asarray(Image.open(path)) for path in least_grid])
    assert plt.get_fignums() == []


def test_minimal_report_without_optional_inputs(tmp_path):
    """Only scores and RGB images: the core figures and tables, no AUROC, no per-epoch file."""
    rng = np.random.default_rng(1)
    mem = np.array([np.nan, 0.3, 0.1, 0.5])
    written = write_report(tmp_path, mem=mem, se=np.array([np.nan, 0.1, 0.2, 0.3]), n_in=np.array([4, 3, 2, 5]),
                           n_out=np.array([0, 1, 2, 3]),
                           train_images=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),
                           train_labels=np.arange(4))
    assert {path.name for path in written} == {"mem_histogram.png", "most_memorized.png", "least_memorized.png",
                                               "summary.md", "summary.csv"}
    values = read_summary(tmp_path / "summary.csv")
    assert "auroc_relabeled_vs_clean" not in values
    assert float(values["fraction_ge_0.25"]) == pytest.approx(2 / 3)
    assert float(values["mean_se"]) == pytest.approx(0.2)
    assert int(values["min_n_out"]) == 0
    assert plt.get_fignums() == []


def test_caller_summary_keys_do_not_duplicate_computed_ones(tmp_path):
    """eval_splits passes its own n_undefined/mean: equal ones appear once, disagreeing ones as given_<key>."""
    mem = np.array([np.nan, 0.3, 0.1, 0.5])
    given = {"n_models": 3, "n_undefined": 1, "mean": float(np.nanmean(mem)), "median": 99.0}
    write_report(tmp_path, mem=mem, se=np.full(4, 0.1), n_in=np.full(4, 2), n_out=np.full(4, 2),
                 train_images=np.zeros((4, 1, 8, 8), np.uint8), train_labels=np.arange(4), summary=given)
    with open(tmp_path / "summary.csv", newline="") as handle:
        keys = [row[0] for row in csv.reader(handle)][1:]
    assert len(keys) == len(set(keys))
    values = read_summary(tmp_path / "summary.csv")
    assert values["n_models"] == "3" and values["given_median"] == "99.0"
    assert float(values["median"]) == pytest.approx(0.3)
    assert "given_mean" not in values and "given_n_undefined" not in values


def test_report_without_images(tmp_path, inputs):
    """Without a plan eval_splits has no images: the image figures are skipped, the rest is written."""
    del inputs["test_images"], inputs["test_labels"]
    written = write_report(tmp_path, **{**inputs, "train_images": None, "train_labels": None})
    names = {path.name for path in written}
    assert not names & {"most_memorized.png", "least_memorized.png", "influence_pairs.png"}
    assert {"mem_histogram.png", "influence_histogram.png", "mem_per_epoch.png", "summary.csv"} <= names
    assert plt.get_fignums() == []
