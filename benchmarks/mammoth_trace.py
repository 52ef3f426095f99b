"""Mammoth's main.py with the loss of every stream step recorded; run with Mammoth's interpreter.

    /work/mammoth-venv/bin/python benchmarks/mammoth_trace.py --mammoth /work/mammoth -- MAIN.PY FLAGS

Wraps the chosen model class's `observe` (the value it returns, the batch's loss before its step) and
runs Mammoth's own `main()` unchanged in this process; prints `TRACE {"losses": [...]}` at the end.
`benchmarks/mammoth_runs.py reference` uses it for the numbers tests/test_mammoth_runs.py pins, and
`benchmarks/mammoth_xder.py` to read CIFAR-shaped files it wrote (--trust_files).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mammoth", required=True, help="Mammoth's work tree")
    parser.add_argument("--trust_files", action="store_true",
                        help="skip torchvision's MD5 check of CIFAR's release files (for files a benchmark wrote)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then Mammoth's main.py flags")
    cli = parser.parse_args()
    if cli.trust_files:
        import torchvision.datasets.cifar as cifar

        cifar.check_integrity = lambda *args, **kwargs: True
        cifar.CIFAR10._check_integrity = lambda self: True
    argv = cli.rest[1:] if cli.rest[:1] == ["--"] else cli.rest
    os.chdir(cli.mammoth)
    sys.path.insert(0, cli.mammoth)
    name = argv[argv.index("--model") + 1]
    module = importlib.import_module(f"models.{name}")
    cls = next(v for v in vars(module).values() if isinstance(v, type) and getattr(v, "NAME", None) == name)
    losses = []
    observe = cls.observe

    @functools.wraps(observe)  # Mammoth passes each observe only the keyword arguments its signature names
    def recorded(self, *args, **kwargs):
        loss = observe(self, *args, **kwargs)
        losses.append(float(loss))
        return loss

    cls.observe = recorded
    import main as mammoth_main

    sys.argv = ["main.py", *argv]
    try:
        mammoth_main.main()
    finally:
        print("TRACE " + json.dumps({"losses": losses}), flush=True)


if __name__ == "__main__":
    main()
