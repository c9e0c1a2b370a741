"""The job layer: each user-level operation is one core function, driven by a CLI host or a node host.

A job function takes a job description (a dataclass of settings, the same ones the CLI flags and the node inputs
set) and a ``Host``: how the job reports progress, learns that the user cancelled, writes a log line, and hands
out typed event records. The CLI supplies ``CliHost`` (a tqdm bar, stderr); the nodes supply a ComfyUI host
(``nodes/_host.py``: ComfyUI's ProgressBar and interruption). The job never knows which one it has, so a node and
its CLI behave the same.

Every ``erasekit-*`` command exits with one of the codes below (``cli_main`` maps errors onto them).
"""
from __future__ import annotations

import hashlib
import os
import stat
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
    """A command's host: a tqdm bar on stderr (a new one when the unit of work changes), log lines above it."""

    def __init__(self, desc: str = "", enabled: bool = True, unit: str = "items"):
        self.desc, self.enabled, self.unit = desc, enabled, unit
        self._bar = None
        self._bar_unit = None

    def progress(self, done, total, unit=None):
        if not self.enabled:
            return
        unit = unit or self.unit
        if self._bar is not None and unit != self._bar_unit:
            self.close()  # a new stage (instances scored, then samples made): its own bar
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=self.desc if unit == self.unit and self.desc else unit, unit=unit,
                             dynamic_ncols=True)
            self._bar_unit = unit
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
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILED


class MissingExtra(ImportError):
    """An optional feature's package is not installed; the message names the package and the pip line."""


def requirements_file(extra: str | None) -> str:
    """Path of the requirement file of ``extra`` (``requirements-{extra}.txt``; ``requirements.txt`` for None)."""
    name = "requirements.txt" if extra is None else f"requirements-{extra}.txt"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def _requirement(package: str, extra: str | None) -> str:
    """``package`` with the version its requirement file asks for (``transformers>=4.56``), else the bare name."""
    try:
        with open(requirements_file(extra), encoding="utf-8") as handle:
            for line in handle:
                line = line.split("#")[0].strip()
                name = line.split(";")[0]
                for mark in "<>=!~[ ":
                    name = name.split(mark)[0]
                if name.lower().replace("_", "-") == package.lower().replace("_", "-"):
                    return line
    except OSError:
        pass
    return package


def missing_extra(package: str, extra: str | None, feature: str, reason: str = "it is not installed"):
    """The ``MissingExtra`` saying that ``feature`` needs ``package`` and the exact ``pip install`` line."""
    requirement = _requirement(package, extra)
    group = requirements_file(extra)
    everything = (f"pip install -r {group}" if os.path.isfile(group) else
                  f"pip install 'erasekit[{extra}]'" if extra else "pip install erasekit")
    return MissingExtra(
        f"{feature} needs the Python package '{package}', but {reason}. Install it into ComfyUI's Python with: "
        f"pip install '{requirement}' (or everything EraseKit's {extra or 'runtime'} features need: {everything})")


def require(module: str, extra: str | None, feature: str, package: str | None = None, names: tuple = ()):
    """Import ``module`` for ``feature`` or raise ``MissingExtra`` naming the exact ``pip install`` line.

    ``extra`` is the pyproject optional-dependency group that provides it (``train``, ``dataset``; None for the
    runtime requirements.txt). ``package`` is the name pip knows it by when it differs from the module's; ``names``
    are attributes the feature needs, which an older version of the package may lack."""
    import importlib

    package = package or module.split(".")[0]
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(package, extra, feature, f"it cannot be imported ({error})") from error
    absent = [name for name in names if not hasattr(imported, name)]
    if absent:
        version = getattr(importlib.import_module(module.split(".")[0]), "__version__", "unknown")
        raise missing_extra(package, extra, feature,
                            f"the installed version ({version}) lacks {', '.join(absent)}: upgrade it")
    return imported


def _listing(path, recursive):
    """Lines naming what ``path`` holds: kind, size and modification time of each file (folders walked in name
    order when ``recursive``, else only the folder's own time, which changes when entries come, go or are
    renamed into it)."""
    try:
        info = os.stat(path)
    except OSError:
        yield f"missing {path}"
        return
    if not stat.S_ISDIR(info.st_mode):
        yield f"file {path} {info.st_size} {info.st_mtime_ns}"
        return
    yield f"folder {path} {info.st_mtime_ns}"
    if not recursive:
        return
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in sorted(files):
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue  # vanished while walking
            yield f"file {os.path.relpath(os.path.join(root, name), path)} {info.st_size} {info.st_mtime_ns}"


def fingerprint(*paths, recursive=True) -> str:
    """A short hash of what ``paths`` hold now (files: size and modification time; folders: their listing).

    It changes when a file is added, removed, rewritten or touched; jobs use it to tell whether their inputs
    changed (ComfyUI's cache, the synthesis instance table). Empty or None paths count as absent."""
    digest = hashlib.sha256()
    for path in paths:
        lines = ["none"] if not path else _listing(os.fspath(path), recursive)
        for line in lines:
            digest.update(line.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:32]
