"""Errors that end a run with one sentence naming the problem and the fix."""


class ConfigError(Exception):
    """Bad input from the user: an unknown name, an impossible value, a missing file."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""
