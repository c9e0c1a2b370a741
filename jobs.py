"""The job layer: each user-level operation is one core function, driven by a CLI host or a node host.

A job function takes a job description (a dataclass of settings, the same ones the CLI flags and the node inputs
set) and a ``Host``: how the job reports progress, learns that the user cancelled, writes a log line, and hands
out typed event records. The CLI supplies ``CliHost`` (a tqdm bar, stderr); the nodes supply a ComfyUI host
(``nodes/_host.py``: ComfyUI's ProgressBar and interruption). The job never knows which one it has, so a node and
its CLI behave the same.

Every ``erasekit-*`` command exits with one of the codes below (``cli_main`` maps errors onto them).
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_OK = 0  # everything asked for was done
EXIT_FAILED = 1  # some items failed, nothing was produced, or an error stopped the run
EXIT_USAGE = 2  # bad arguments or inputs (argparse also exits with 2)
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT; finished work is kept


class Interrupted(Exception):
    """The user cancelled the job (Ctrl-C, ComfyUI's Cancel). Work finished before it is kept."""


class UsageError(ValueError):
    """Bad settings or inputs, found before any work starts: the message says what was found and what is needed."""


class Host:
    """What a job may ask of whoever runs it. The base class is silent and never interrupts (tests, library use)."""

    def progress(self, done: int, total: int | None, unit: str = "items") -> None:
        """``done`` of ``total`` units finished (``total`` None when unknown)."""

    def check_interrupt(self) -> None:
        """Raise (``Interrupted``, or the host's own exception) if the user cancelled. Jobs call it often."""

    def log(self, message: str) -> None:
        """One line for the user (a finished video, a skipped file)."""

    def event(self, record) -> None:
        """A typed event record (a dataclass) for hosts that collect them; ignored by default."""


class CliHost(Host):
    """A command's host: a tqdm bar on stderr, log lines written above it."""

    def __init__(self, desc: str = "", enabled: bool = True, unit: str = "items"):
        self.desc, self.enabled, self.unit = desc, enabled, unit
        self._bar = None

    def progress(self, done, total, unit=None):
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=self.desc, unit=unit or self.unit, dynamic_ncols=True)
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def log(self, message):
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def cli_main(prog: str, run: Callable[[], int]) -> int:
    """Run a command body and map what escapes it onto the shared exit codes, with one line on stderr."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted:
        print(f"{prog}: interrupted; finished work is kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError, MissingExtra) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILED


class MissingExtra(ImportError):
    """An optional feature's package is not installed; the message names the package and the pip line."""


def require(module: str, extra: str, feature: str):
    """Import ``module`` for ``feature`` or raise ``MissingExtra`` naming the exact ``pip install`` line.

    ``extra`` is the pyproject optional-dependency group that provides it (``train``, ``dataset``, ...)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise MissingExtra(
            f"{feature} needs the Python package '{package}', which is not installed ({error}). Install it into "
            f"ComfyUI's Python with: pip install {package} (or all of EraseKit's {extra} extras: "
            f"pip install -r requirements-{extra}.txt)") from error
