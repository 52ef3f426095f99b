"""--config values go through the command line's parser: its types, choices, ranges and required flags."""
from __future__ import annotations

import pytest

import main
import train_splits
from continual.args import parse_args


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_a_config_sets_required_flags_and_the_command_line_still_wins(tmp_path):
    config = write(tmp_path, "model: sgd\nlr: 0.05\ncovariates: true\nlast_k: [50, 10]\nseed: null\n")
    args = parse_args(["--config", config])
    assert (args.model, args.lr, args.covariates, args.last_k, args.seed) == ("sgd", 0.05, True, [50, 10], None)
    assert parse_args(["--config", config, "--lr", "0.2", "--model", "er", "--buffer_size", "10"]).lr == 0.2


@pytest.mark.parametrize("text, sentence", [
    ("model: sgd\nlr: true\n", "sets lr: True, which --lr does not take"),
    ("model: sgd\nlr: 0.1\nlast_k: [0]\n", "--last_k must be positive integers"),
    ("model: sgd\nlr: 0.1\ncovariates: 1\n", "sets covariates: 1, but --covariates is on or off; write true or false"),
    ("model: sgd\nlr: 0.1\nn_epochs: {a: 1}\n", "sets n_epochs: {'a': 1}, which --n_epochs does not take"),
    ("model: sgd\nlr: -1\n", "--lr must be in (0, inf), got -1.0"),
])
def test_bad_config_values_are_refused_as_the_command_line_refuses_them(tmp_path, capsys, text, sentence):
    code = main.main(["--config", write(tmp_path, text), "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and sentence in err and "Traceback" not in err


def test_a_float_epoch_count_in_a_config_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", write(tmp_path, "model: sgd\nlr: 0.1\nn_epochs: 2.5\n")])
    assert exit_info.value.code == 2 and "argument --n_epochs: invalid int value: '2.5'" in capsys.readouterr().err


def test_a_train_splits_config_goes_through_the_same_parser(tmp_path, capsys):
    config = write(tmp_path, "lr: 0.1\nn_epochs: 2\nrecord_epochs: 1\n")
    args = train_splits.parse_args(["--config", config, "--out", str(tmp_path / "s")])
    assert (args.lr, args.n_epochs, args.record_epochs) == (0.1, 2, [1, 2])
    code = train_splits.main(["--config", write(tmp_path, "lr: true\n"), "--out", str(tmp_path / "s")])
    assert code == 2 and "sets lr: True, which --lr does not take" in capsys.readouterr().err


def test_every_published_configuration_parses_and_sets_its_values():
    """Each configs/best entry, per dataset, model and buffer size, goes through the parser it is meant for,
    and the run gets the entry's values (a misspelt key or a value out of range would end the run)."""
    import yaml

    from continual.args import CONFIG_DIR

    checked = 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        for model, entries in yaml.safe_load(path.read_text()).items():
            if model == "source":
                continue
            for key, values in entries.items():
                argv = ["--dataset", path.stem, "--model", model, "--model_config", "best"]
                args = parse_args(argv + ([] if key == "any" else ["--buffer_size", str(key)]))
                assert {k: getattr(args, k) for k in values} == values, (path.name, model, key)
                checked += 1
    assert checked > 100
