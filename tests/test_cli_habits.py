"""What a Mammoth user types works: --savecheck task|last, --loadcheck, --base_path (with Mammoth's data layout),
--num_workers, --non_verbose 1; a mistyped flag is answered in one line with the nearest flag, and a flag of a
component the command did not choose names that component and how to choose it; --help lists the chosen
components first, and every flag of the four scripts has a help line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import eval_splits
import main as main_py
import sweep as sweep_py
import train_splits
from continual.args import computational_config, full_parser, parse_args
from continual.catalogue import family
from datasets import DATASETS
from memorization import args as splits_args
from memorization import eval_args
from tests.test_dataset_files import MNIST_NAMES, write_idx, write_pickle
from utils.checkpoint import load_checkpoint
from utils.errors import ConfigError

BASE = ["--model", "sgd", "--lr", "0.1", "--seed", "0", "--device", "cpu"]
MAINS = {"main.py": main_py.main, "train_splits.py": train_splits.main, "eval_splits.py": eval_splits.main,
         "sweep.py": sweep_py.main}


def refusal(script: str, argv: list[str], capsys) -> str:
    """The one line a script prints when it refuses argv (exit status 2), without the `error: ` before it."""
    try:
        code = MAINS[script](argv)
    except SystemExit as stop:  # argparse's refusals end the parse itself
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err[len("error: "):]


# -- Mammoth's flags -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, savecheck", [([], None), (["--savecheck"], "last"), (["--savecheck", "task"], "task"),
                                              (["--savecheck", "last"], "last"), (["--savecheck=task"], "task")])
def test_savecheck_takes_mammoths_task_or_last_and_the_bare_flag_is_last(extra, savecheck):
    args = parse_args([*BASE, *extra])
    assert args.savecheck == savecheck and bool(args.savecheck) == bool(extra)


def test_a_sweep_cells_command_line_with_a_bare_savecheck_still_parses(tmp_path):
    # continual/sweep_runs.py run_cell appends exactly these flags to a cell's own
    args = parse_args([*BASE, "--non_verbose", "--savecheck", "--checkpoint_dir", str(tmp_path), "--num_threads", "1"])
    assert (args.savecheck, args.non_verbose, args.checkpoint_dir, args.num_threads) == ("last", True, str(tmp_path), 1)


def test_savecheck_refuses_another_value_in_one_line(capsys):
    assert "argument --savecheck: invalid choice: 'often'" in refusal("main.py", [*BASE, "--savecheck", "often"], capsys)


@pytest.mark.parametrize("text, expected", [
    ("savecheck: true\nnon_verbose: true\n", {"savecheck": "last", "non_verbose": True}),
    ("savecheck: task\nnon_verbose: false\n", {"savecheck": "task", "non_verbose": False}),
    ("savecheck: false\npermute_classes: true\n", {"savecheck": None, "permute_classes": True}),
    ("loadcheck: run.pt\nbase_path: /data/mammoth/\n", {"resume": "run.pt", "data_path": "/data/mammoth/"}),
])
def test_a_config_file_sets_them_by_either_name_and_as_true_or_false(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text("model: sgd\nlr: 0.1\n" + text)
    args = parse_args(["--config", str(path)])
    assert {name: getattr(args, name) for name in expected} == expected


def test_a_config_naming_one_flag_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: sgd\nlr: 0.1\nresume: a.pt\nloadcheck: b.pt\n")
    with pytest.raises(ConfigError, match=r"sets resume twice \(as loadcheck too\); keep one of the two names"):
        parse_args(["--config", str(path)])


def test_loadcheck_is_resume_and_a_checkpoint_written_by_mammoth_is_refused(tmp_path):
    path = tmp_path / "mammoth_task_4.pt"
    # Mammoth's `safe` checkpoint: the network's state with its arguments and results as plain data
    torch.save({"model": {"net.fc.weight": torch.zeros(2, 3)}, "optimizer": None, "scheduler": None,
                "args": {"model": "er", "savecheck": "task"}, "results": [[90.0]]}, path)
    args = parse_args([*BASE, "--loadcheck", str(path)])
    assert args.resume == str(path)
    with pytest.raises(ConfigError, match="is not a checkpoint of this framework"):
        load_checkpoint(args.resume)


def test_base_path_is_data_path_in_all_three_scripts(tmp_path):
    assert parse_args([*BASE, "--base_path", "/data/m/"]).data_path == "/data/m/"
    assert train_splits.parse_args(["--lr", "0.1", "--out", str(tmp_path), "--base_path", "/d"]).data_path == "/d"
    assert eval_splits.parse_args(["--run_dir", "r", "--out", "s.npy", "--base_path", "/d"]).data_path == "/d"


def test_num_workers_is_accepted_with_a_note_and_changes_nothing(capsys):
    plain = parse_args(BASE)
    assert capsys.readouterr().err == ""
    args = parse_args([*BASE, "--num_workers", "8"])
    note = capsys.readouterr().err.strip()
    assert note == ("note: --num_workers 8 changes nothing here: datasets are tensors in memory, read without loader "
                    "workers (--num_threads N sets the CPU threads)")
    assert not hasattr(args, "num_workers") and computational_config(args) == computational_config(plain)


@pytest.mark.parametrize("extra, expected", [
    (["--non_verbose"], {"non_verbose": True}), (["--non_verbose", "1"], {"non_verbose": True}),
    (["--non_verbose", "0"], {"non_verbose": False}), ([], {"non_verbose": False, "nowand": False}),
    (["--nowand", "1", "--ignore_other_metrics", "yes", "--permute_classes", "true"],
     {"nowand": True, "ignore_other_metrics": True, "permute_classes": True}),
])
def test_on_off_flags_take_mammoths_0_or_1(extra, expected):
    args = parse_args([*BASE, *extra])
    assert {name: getattr(args, name) for name in expected} == expected


def test_on_off_flags_refuse_another_word_in_one_line(capsys):
    assert refusal("main.py", [*BASE, "--non_verbose", "maybe"], capsys) == \
        "argument --non_verbose: 'maybe' is not on or off; write 1 or 0 (or nothing, for on)"
    assert train_splits.parse_args(["--lr", "0.1", "--out", "s", "--non_verbose", "1"]).non_verbose is True


# -- Mammoth's data layout -----------------------------------------------------------------------------------
def mnist_arrays(seed: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.permutation(np.arange(30) % 10),
            rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.permutation(np.arange(20) % 10))


def write_mnist(folder, arrays) -> None:
    folder.mkdir(parents=True)
    for name, array in zip(MNIST_NAMES, arrays):
        write_idx(folder / name, array)


def loaded(dataset: str, data_path) -> tuple[np.ndarray, ...]:
    """The dataset a main.py command with --base_path reads: train and test images and labels."""
    args = parse_args([*BASE, "--dataset", dataset, "--base_path", f"{data_path}/"])
    data = DATASETS.get(dataset)(args)
    return (data.train.images.numpy(), data.train.labels.numpy(), data.test.images.numpy(), data.test.labels.numpy())


@pytest.mark.parametrize("classes", [("MNIST", "MyMNIST"), ("MyMNIST",), ("MNIST",)])
def test_mnist_is_read_from_mammoths_folders(tmp_path, classes):
    """Mammoth's torchvision root is <base_path>/MNIST: its test set's class MNIST and its training set's class MyMNIST
    each keep all four files in <root>/<class>/raw."""
    train_x, train_y, test_x, test_y = mnist_arrays(0)
    for name in classes:
        write_mnist(tmp_path / "MNIST" / name / "raw", (train_x, train_y, test_x, test_y))
    images, labels, test_images, test_labels = loaded("seq-mnist", tmp_path)
    assert np.array_equal(images[:, 0], train_x) and np.array_equal(test_images[:, 0], test_x)
    assert labels.tolist() == train_y.tolist() and test_labels.tolist() == test_y.tolist()


def test_this_frameworks_layout_comes_first_and_an_incomplete_mammoth_folder_is_not_read(tmp_path):
    ours, mammoths = mnist_arrays(0), mnist_arrays(1)
    write_mnist(tmp_path / "MNIST" / "raw", ours)
    write_mnist(tmp_path / "MNIST" / "MNIST" / "raw", mammoths)
    assert np.array_equal(loaded("seq-mnist", tmp_path)[0][:, 0], ours[0])
    (tmp_path / "MNIST" / "raw" / MNIST_NAMES[2]).unlink()
    assert np.array_equal(loaded("seq-mnist", tmp_path)[0][:, 0], mammoths[0])
    (tmp_path / "MNIST" / "MNIST" / "raw" / MNIST_NAMES[0]).unlink()
    with pytest.raises(ConfigError) as error:
        loaded("seq-mnist", tmp_path)
    assert str(error.value).startswith(f"MNIST is not in {tmp_path / 'MNIST' / 'raw'}: missing t10k-images-idx3-ubyte;")
    assert "or in Mammoth's layout (MNIST/MNIST/raw or MNIST/MyMNIST/raw under --data_path)" in str(error.value)


@pytest.mark.parametrize("dataset, folder, files, label_key", [
    ("seq-cifar10", "CIFAR10/cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"),
    ("seq-cifar100", "CIFAR100/cifar-100-python", ["train", "test"], "fine_labels"),
])
def test_cifar_is_read_from_mammoths_folders(tmp_path, dataset, folder, files, label_key):
    rng = np.random.default_rng(3)
    n_classes = 10 if dataset == "seq-cifar10" else 100
    (tmp_path / folder).mkdir(parents=True)
    batches = []
    for i, name in enumerate(files):
        data = rng.integers(0, 256, (n_classes, 3072), dtype=np.uint8)
        labels = rng.permutation(n_classes)
        write_pickle(tmp_path / folder / name, {"data": data, label_key: labels.tolist()}, "py2" if i % 2 else "py3")
        batches.append((data.reshape(-1, 3, 32, 32), labels))
    images, labels, test_images, test_labels = loaded(dataset, tmp_path)
    assert np.array_equal(images, np.concatenate([b[0] for b in batches[:-1]]))
    assert labels.tolist() == np.concatenate([b[1] for b in batches[:-1]]).tolist()
    assert np.array_equal(test_images, batches[-1][0]) and test_labels.tolist() == batches[-1][1].tolist()


# -- mistakes named in one line ------------------------------------------------------------------------------
@pytest.mark.parametrize("script, argv, sentence", [
    ("main.py", [*BASE, "--bufer_size", "200"], "unrecognized arguments: --bufer_size; did you mean --buffer_size?"),
    ("main.py", ["--modle", "sgd", "--lr", "0.1"], "unrecognized arguments: --modle; did you mean --model?"),
    ("main.py", ["--model", "sgd", "--lrr", "0.1", "--n_epoch", "2"],
     "unrecognized arguments: --lrr --n_epoch; did you mean --lr for --lrr, --n_epochs for --n_epoch?"),
    ("main.py", [*BASE, "--no_such_flag", "1"], "unrecognized arguments: --no_such_flag; `python main.py --help` lists "
                                                "the flags"),
    ("main.py", [*BASE, "--download", "1"], "unrecognized arguments: 1; no flag before them takes them (`python main.py "
                                            "--help` shows what each flag takes)"),
    ("train_splits.py", ["--lr", "0.1", "--ot", "store"], "unrecognized arguments: --ot; did you mean --out?"),
    ("eval_splits.py", ["--run_dir", "r", "--out", "s.npy", "--influence_topkk", "3"],
     "unrecognized arguments: --influence_topkk; did you mean --influence_topk?"),
    ("sweep.py", ["sweeps/random_label_digits.yaml", "--max_paralel", "2"],
     "unrecognized arguments: --max_paralel; did you mean --max_parallel?"),
])
def test_a_mistyped_flag_is_named_with_the_nearest_flag_in_one_line(capsys, script, argv, sentence):
    assert refusal(script, argv, capsys) == sentence


def owners(kind: str, flag: str) -> list[str]:
    return [c.NAME for c in family(kind).classes() if any(flag in names for names, _ in c.flags)]


def test_a_flag_of_a_model_not_chosen_names_the_models_that_declare_it(capsys):
    models = owners("model", "--alpha")
    assert len(models) > 1 and "sgd" not in models
    which = f"{', '.join(models[:-1])} or {models[-1]}"
    assert refusal("main.py", [*BASE, "--alpha", "0.3"], capsys) == (
        f"--alpha belongs to the model {which}, not to the chosen model sgd; choose one of them with --model or drop "
        f"--alpha")
    assert refusal("main.py", ["--lr", "0.1", "--alpha", "0.3"], capsys) == (
        f"--alpha belongs to the model {which}, and no model is chosen; choose one of them with --model or drop --alpha")
    assert refusal("main.py", [*BASE, "--alpah", "0.3"], capsys) == (
        f"unrecognized arguments: --alpah; the nearest flag, --alpha, belongs to the model {which}, not to the chosen "
        f"model sgd; choose one of them with --model, or drop --alpah")


@pytest.mark.parametrize("script, argv, sentence", [
    ("main.py", [*BASE, "--vit_depth", "3"], "--vit_depth belongs to the backbone vit, not to the chosen backbone "
                                             "mlp; choose it with --backbone vit or drop --vit_depth"),
    ("main.py", [*BASE, "--loss_keep", "high"], "--loss_keep belongs to the buffer policy loss, not to the chosen "
                                                "buffer policy reservoir; choose it with --buffer_policy loss or drop "
                                                "--loss_keep"),
    ("main.py", [*BASE, "--redo_tau", "0.1"], "--redo_tau belongs to the plasticity method redo, which is not in "
                                              "--plasticity (none); add redo to --plasticity or drop the flag"),
    ("train_splits.py", ["--lr", "0.1", "--out", "s", "--vit_depth", "3"],
     "--vit_depth belongs to the backbone vit, not to the chosen backbone mlp; choose it with --backbone vit or drop "
     "--vit_depth"),
])
def test_a_flag_of_a_component_not_chosen_names_it_and_how_to_choose_it(capsys, script, argv, sentence):
    assert owners("backbone", "--vit_depth") == ["vit"] and owners("buffer policy", "--loss_keep") == ["loss"]
    assert family("dataset").get("seq-digits").DEFAULT_BACKBONE == "mlp"
    assert refusal(script, argv, capsys) == sentence


# -- --help ----------------------------------------------------------------------------------------------------
def help_groups(argv: list[str], capsys) -> tuple[list[str], list[str]]:
    """main.py --help's lines and the titles of its groups, in order."""
    with pytest.raises(SystemExit) as stop:
        parse_args([*argv, "--help"])
    lines = capsys.readouterr().out.splitlines()
    assert stop.value.code == 0
    return lines, [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]


def test_help_lists_the_chosen_components_first_then_main_pys_flags_then_the_others(capsys):
    lines, groups = help_groups(["--model", "derpp", "--plasticity", "redo"], capsys)
    assert lines[0] == ("usage: main.py --model NAME [--dataset NAME] [--backbone NAME] [--buffer_policy NAME] "
                        "[--plasticity NAMES] [flags below]") and lines[1] == ""
    backbone = family("dataset").get("seq-digits").DEFAULT_BACKBONE  # the default dataset's
    common = groups.index("what to run")
    assert groups[:common] == ["options", f"backbone {backbone}", "model derpp", "plasticity method redo"]
    assert groups[common:common + 4] == ["what to run", "training", "data", "logging and checkpoints"]
    others = groups[common + 4:]
    # the kinds the command names show only what it chose; the backbone, left at its default, shows the others
    assert not any(title.startswith(("model ", "plasticity method ")) for title in others)
    shown = [c.NAME for c in family("backbone").classes() if c.flags and c.NAME != backbone]
    assert len(shown) >= 3 and all(f"backbone {name} (with --backbone {name})" in others for name in shown)


def test_help_without_a_model_shows_every_model_and_method_after_main_pys_flags(capsys):
    _, groups = help_groups([], capsys)
    for kind, flag in (("model", "--model"), ("plasticity method", "--plasticity")):
        names = [c.NAME for c in family(kind).classes() if c.flags]
        assert len(names) >= 5 and all(groups.index(f"{kind} {name} (with {flag} {name})") >
                                       groups.index("logging and checkpoints") for name in names)


def every_parser():
    yield "main.py", full_parser(["--help"])[0]  # --help's parser: every component's flags
    for backbone in family("backbone").classes():
        yield "train_splits.py", splits_args.build_parser(family, backbone)
    yield "eval_splits.py", eval_args.build_parser()
    yield "sweep.py", sweep_py.build_parser()


def test_every_flag_of_the_four_scripts_has_a_help_line():
    count, missing = 0, []
    for script, parser in every_parser():
        for action in parser._actions:
            count += 1
            if not (action.help or "").strip():
                missing.append(f"{script} {'/'.join(action.option_strings) or action.dest}")
    assert count > 300 and missing == []
