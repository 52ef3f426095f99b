"""Where to look at a run: the command that starts MLflow's UI on a store, and the direct link to a run's page.

MLflow 3.17's UI opens in its GenAI view, where clicking an experiment shows a traces overview; a
direct run link (`#/experiments/ID/runs/RUN_ID`) opens the run's page whatever that toggle says.
The command names the interpreter that ran the program, so it works outside an activated venv.
"""
from __future__ import annotations

import shlex
import socket
import sys

DEFAULT_PORT = 5000


def free_port(first: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from `first` on that nothing listens on at 127.0.0.1 (`first` when none is free)."""
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return first


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def ui_command(tracking_uri: str, port: int) -> str:
    """The shell command that serves `tracking_uri` on `port`, with this program's interpreter."""
    return shlex.join([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--port", str(port)])


def run_link(tracking_uri: str, experiment_id: str, run_id: str, port: int) -> str:
    """The address of the run's page: on the tracking server itself, or on the UI `ui_command` starts."""
    base = tracking_uri.rstrip("/") if is_server(tracking_uri) else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def where_to_look(tracking_uri: str, experiment_id: str, run_id: str, what: str = "results") -> str:
    """The lines a program prints when its run ends: the run, its link, and how to serve the store."""
    port = free_port()
    lines = [f"{what}: MLflow run {run_id} in {tracking_uri}",
             f"  open {run_link(tracking_uri, experiment_id, run_id, port)}"]
    if not is_server(tracking_uri):
        lines.append(f"  after starting the UI with\n  {ui_command(tracking_uri, port)}")
    return "\n".join(lines)
