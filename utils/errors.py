"""Errors that end a run with one sentence naming the problem and the fix."""
import signal


class ConfigError(Exception):
    """Bad input from the user: an unknown name, an impossible value, a missing file.

    The message stays one line: a character from the input that would break it (a newline in a YAML key,
    say) is written as its escape."""

    def __init__(self, message: str = ""):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


class TrainingDiverged(Exception):
    """The loss became NaN or infinite."""


class RunFailed(Exception):
    """A run stopped by a failure that is not bad input (a full disk, memory, a bug): one sentence saying what
    happened, where its traceback was kept and how to continue."""


def failure_sentence(error: BaseException) -> str:
    """One line for an unexpected error: what kind, its message, and the usual fix for the common kinds."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return (f"{error.strerror or text}{where}; free space or fix the folder's permissions (or choose another "
                f"with --checkpoint_dir / --tracking_uri)")
    if isinstance(error, MemoryError) or "can't allocate" in text or "out of memory" in text:
        return f"out of memory ({text[:200]}); lower --buffer_size or --batch_size, or use a smaller network"
    return f"{type(error).__name__}: {text[:300]}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (how `kill` and SLURM's preemption stop a job): handled as Ctrl-C is, so the run is marked
    KILLED and what a resume needs stays on disk."""


_deferring = {"depth": 0, "pending": False}


def _terminate(signum, frame) -> None:
    if _deferring["depth"]:  # inside a write that must not be cut in two: stop right after it
        _deferring["pending"] = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


_command = {"line": None}


def current_command() -> str | None:
    """The command line this process runs (set by `run_command`), as a shell would take it again."""
    return _command["line"]


def _send_swallowed_terminations_again(previous):
    """A `sys.unraisablehook`: Python cannot raise an exception out of a finalizer (a `__del__` or weakref
    callback that the garbage collector ran when the signal came), so it prints Terminated and the program
    went on as if no signal had come (a sweep then finished with status 0). The signal is sent again once the
    finalizer has returned."""
    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            import os
            import signal
            import threading

            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return
        previous(unraisable)
    hook.sends_terminations_again = True
    return hook


class deferred_termination:
    """A block that SIGTERM and Ctrl-C do not interrupt: a signal arriving inside it stops the program when it ends.
    For writes to a store (an MLflow SQLite transaction cut by the signal leaves its lock held, and the
    KILLED status written next then fails with 'database is locked')."""

    def __enter__(self):
        _deferring["depth"] += 1

    def __exit__(self, *exc) -> None:
        _deferring["depth"] -= 1
        if not _deferring["depth"] and _deferring["pending"]:
            stop, _deferring["pending"] = _deferring["pending"], False
            if exc[0] is None:
                raise stop()


def run_command(run, parse_args, argv: list[str] | None = None) -> int:
    """A script's main: bad input (exit 2), a diverged loss (3) and a failed run (1) end with one sentence on
    stderr; Ctrl-C (exit 130) and SIGTERM (143) stop it with the MLflow run marked KILLED and one sentence
    saying how to continue (the same command, unless the run says otherwise: main.py names its checkpoint)."""
    import shlex
    import sys

    from_command_line = argv is None  # a process of its own, not a call from another program (a test)
    argv = sys.argv[1:] if argv is None else list(argv)
    _command["line"] = shlex.join([sys.executable, sys.argv[0], *argv])
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a caller chose its own
        signal.signal(signal.SIGINT, _terminate)
    if not getattr(sys.unraisablehook, "sends_terminations_again", False):
        sys.unraisablehook = _send_swallowed_terminations_again(sys.unraisablehook)
    try:
        run(parse_args(argv))
    except (ConfigError, TrainingDiverged, RunFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3 if isinstance(error, TrainingDiverged) else 1 if isinstance(error, RunFailed) else 2
    except OSError as error:  # a folder that cannot be written (read-only, full, a file in its place)
        print(f"error: {failure_sentence(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        how = getattr(stop, "continue_with", None) or f"continue with the same command:\n  {_command['line']}"
        print(f"stopped by {'SIGTERM' if terminated else 'Ctrl-C'}; the MLflow runs it had opened are marked KILLED; "
              f"{how}", file=sys.stderr)
        code = 143 if terminated else 130
        import os
        import threading

        if from_command_line and threading.active_count() > 1:  # a job thread inside torch would abort the exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    return 0
