"""Configuration files: YAML mappings of flag names (without --) to values, read as a command's defaults.

A file's values go through the command line's own parser (`as_argv` writes them as flags placed before
the command line's, so a flag given there still wins): the same types, choices, ranges and required
flags as typed ones, and the same one-sentence refusals.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from utils.errors import ConfigError


def load_config(path: str) -> dict:
    """A YAML mapping of flag names (without --) to values."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist; pass the path of a YAML file such as configs/vit_l3.yaml") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path} cannot be read as text ({type(error).__name__}); pass a YAML file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML ({str(error).splitlines()[0]}); fix the file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag: value, got {type(config).__name__}")
    return config


def as_argv(config: dict, parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The file's values as command-line flags of `parser`: `lr: 0.1` → --lr 0.1, `covariates: true` →
    --covariates, `last_k: [50, 10]` → --last_k 50,10; `null` keeps the default."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    tokens = []
    for name, value in config.items():
        action = actions.get(name)
        if action is None or value is None:
            continue  # unknown names are refused by the caller, which knows the components chosen
        option = action.option_strings[-1]
        if action.nargs == 0:  # an on/off flag
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path} sets {name}: {value!r}, but {option} is on or off; write true "
                                  f"or false")
            if value != action.default:
                tokens.append(option)
            continue
        if isinstance(value, bool) or isinstance(value, dict) or (
                isinstance(value, list) and any(isinstance(v, (bool, dict, list)) for v in value)):
            raise ConfigError(f"--config {path} sets {name}: {value!r}, which {option} does not take; write a "
                              f"value as on the command line ({option} VALUE)")
        if isinstance(value, list):
            tokens.extend([option, *map(str, value)] if action.nargs in ("+", "*") else
                          [option, ",".join(map(str, value))])
        else:
            tokens.append(f"{option}={value}")
    return tokens


def config_names(config: dict, parser: argparse.ArgumentParser, path: str) -> dict:
    """A --config file's flags as the parser's destinations: another name of a flag (loadcheck, base_path) is its
    destination (resume, data_path), and true/false for a flag whose value is optional (--savecheck [task|last],
    --non_verbose [0|1]) is the flag given bare / left at its default."""
    dests = {option.lstrip("-"): action.dest for action in parser._actions for option in action.option_strings}
    bare = {a.dest: "1" if a.const is True else a.const for a in parser._actions if a.option_strings and a.nargs == "?"}
    named: dict = {}
    for name, value in config.items():
        dest = dests.get(name, name)
        if dest in named:
            raise ConfigError(f"--config {path} sets {dest} twice (as {name} too); keep one of the two names")
        named[dest] = (bare[dest] if value is True else None if value is False else value) if dest in bare else value
    return named
