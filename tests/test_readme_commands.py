"""Every command the README shows is accepted as written; those on the embedded data run, shortened by
flags appended at the end (the last value of a flag wins): first those that make score files, then
those that read them (the README's maer example says it follows the train_splits.py one)."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = ("main.py", "train_splits.py", "eval_splits.py", "sweep.py")
SHORTER = {"main.py": ["--n_epochs", "1", "--n_tasks", "2", "--non_verbose"],
           "train_splits.py": ["--n_models", "4", "--n_epochs", "3", "--non_verbose"],
           "eval_splits.py": [], "sweep.py": []}
LOO_SHORTER = ["--loo_examples", "random:4", "--loo_seeds", "2", "--n_epochs", "3", "--non_verbose"]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python SCRIPT ...` line in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if len(tokens) >= 2 and tokens[0] == "python" and tokens[1] in SCRIPTS:
                commands.append((tokens[1], tokens[2:]))
    return commands


def test_the_readme_shows_commands_of_every_script():
    assert {script for script, _ in readme_commands()} == set(SCRIPTS)


@pytest.mark.slow
def test_every_readme_command_is_accepted_and_those_on_embedded_data_run(tmp_path, monkeypatch):
    import eval_splits
    import sweep
    import train_splits
    from continual.args import parse_args
    from continual.run import run
    from continual.sweep_spec import load_sweep
    from datasets import DATASETS
    from memorization.eval_driver import score_store

    monkeypatch.chdir(tmp_path)  # the README's relative paths (runs/, scores/) land here
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    (tmp_path / "sweeps").symlink_to(REPO_ROOT / "sweeps")
    uri = ["--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    ran = []
    for script, argv in sorted(readme_commands(), key=lambda command: "--mem_scores" in command[1]):
        if argv == ["--help"]:
            continue
        if script == "main.py":
            args = parse_args(argv)
            if DATASETS.get(args.dataset).EMBEDDED and "--data_path" not in argv:
                # Fewer tasks would move relabeled examples between tasks: not for a run reading score files.
                shorter = SHORTER[script][:2] + SHORTER[script][4:] if "--mem_scores" in argv else SHORTER[script]
                run(parse_args([*argv, *shorter, *uri]))
                ran.append(" ".join(argv))
        elif script == "train_splits.py":
            args = train_splits.parse_args(argv)
            if DATASETS.get(args.dataset).EMBEDDED:
                shorter = LOO_SHORTER if args.plan_kind == "loo" else SHORTER[script]
                train_splits.run_plan(train_splits.parse_args([*argv, *shorter, *uri]))
                ran.append(" ".join(argv))
        elif script == "eval_splits.py":
            args = eval_splits.parse_args(argv)
            if Path(args.run_dir).exists():
                score_store(eval_splits.parse_args([*argv, *uri]))
                ran.append(" ".join(argv))
        else:
            load_sweep(sweep.parse_args(argv).sweep_file)
    assert any("--mem_scores" in command for command in ran), ran  # the scores chain ran end to end
    assert len(ran) >= 6, ran
    assert os.path.exists(tmp_path / "scores" / "digits_mem.npy")
