"""The help text of every script's flags."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once and short: none for a flag without one or whose help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        default = f"{action.default:.6g}" if isinstance(action.default, float) else "%(default)s"
        return f"{text} (default: {default})"
