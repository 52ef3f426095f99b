"""Configuration files: YAML mappings of flag names (without --) to values, read as a command's defaults."""
from __future__ import annotations

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
