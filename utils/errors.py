"""Errors that end a run with one sentence naming the problem and the fix."""


class ConfigError(Exception):
    """Bad input from the user: an unknown name, an impossible value, a missing file."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


def run_command(run, parse_args, argv: list[str] | None = None) -> int:
    """A script's main: bad input and a diverged loss end with one sentence on stderr and a non-zero exit."""
    import sys

    try:
        run(parse_args(argv))
    except (ConfigError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 3
    return 0
