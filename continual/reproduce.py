"""What makes a run reproducible from its record and continuable after a stop: the command line, the resolved
configuration in the form `--config` reads, the console output, and the command that continues a stopped run."""
from __future__ import annotations

import io
import shlex
import sys

import yaml

from utils.errors import current_command

# Flags that say where a run logs or continues from, not what it computes: left out of its configuration file.
NOT_CONFIGURATION = ("config", "resume", "tracking_uri", "run_name", "checkpoint_dir", "savecheck")


def configuration(params: dict, n_tasks: int) -> str:
    """The run's resolved flags as a YAML mapping that `main.py --config FILE` reads back: the seed drawn for
    a run without --seed, the thread count chosen, the task count the dataset resolved."""
    values = {}
    for key, value in sorted({**params, "n_tasks": n_tasks}.items()):
        if key in NOT_CONFIGURATION or value is None:
            continue
        values[key] = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(values, sort_keys=True)


def continue_command(checkpoint: str) -> str:
    """The command that continues this process's run from `checkpoint`: the same command line with --resume."""
    command = current_command()
    if command is None:
        return f"--resume {shlex.quote(checkpoint)}"
    words, kept, skip = shlex.split(command), [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word in ("--resume", "--loadcheck"):
            skip = True
            continue
        if not word.startswith(("--resume=", "--loadcheck=")):
            kept.append(word)
    return shlex.join([*kept, "--resume", checkpoint])


class _Tee(io.TextIOBase):
    """A stream that writes to the console and into the run's copy of it."""

    def __init__(self, stream, copy: io.StringIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


class Console:
    """Within `with Console() as console:`, what the run prints is also kept; `console.text` holds it, progress
    bars' carriage-return redraws reduced to their last state."""

    def __enter__(self) -> "Console":
        self._copy = io.StringIO()
        self._streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._copy), _Tee(sys.stderr, self._copy)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._streams

    @property
    def text(self) -> str:
        return "\n".join(line.rsplit("\r", 1)[-1] for line in self._copy.getvalue().split("\n"))

