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
import re
import stat
import sys
import tempfile
from pathlib import Path
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


def describe_os_error(error: OSError) -> str:
    """An OSError as a sentence naming the file: "could not write /d/x.png: No space left on device"."""
    if error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return error.strerror or str(error)


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
    except OSError as error:  # a disk that filled up, a folder that vanished, a damaged file
        print(f"{prog}: error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, MissingExtra) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILED


# --- paths a job is given ------------------------------------------------------------------------------------------

def check_input(path, what: str, kind: str = "folder") -> Path:
    """``path`` as a Path, or UsageError in one sentence: "does not exist" only when nothing is there; a file where a
    folder is needed (``kind`` "folder"), or a folder where a file is (``kind`` "file"), is called what it is."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if kind == "folder" and not path.is_dir():
        raise UsageError(f"{what} {path} is a file: give a folder")
    if kind == "file" and path.is_dir():
        raise UsageError(f"{what} {path} is a folder: give a file")
    return path


def check_output_folder(path, what: str = "output") -> Path:
    """``path`` as a Path if a job can write its folder there, else UsageError in one sentence: a file in the way,
    a parent folder that does not exist (nothing is created above the output), or a place nobody lets us write.
    Checked before any work; writability is tried with a probe file that is removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file: give a folder")
    parent = path if path.is_dir() else path.parent
    if not path.is_dir():
        if not parent.exists():
            raise UsageError(f"{what} {path} cannot be made: its parent folder {parent} does not exist "
                             "(create it, or choose another place)")
        if not parent.is_dir():
            raise UsageError(f"{what} {path} cannot be made: {parent} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".erasekit-write-probe-", dir=parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{what} {path} is not writable: {parent} refuses new files "
                         f"({error.strerror or error}); choose another place") from None
    return path


# --- what a run left out -------------------------------------------------------------------------------------------

FIRST_NAMES = 5  # how many names a summary lists per reason


class Skips:
    """Items a run left out, by reason: how many and the first few names, each item counted once.

    ``as_dict()`` is the summary form ``{reason: {"count": n, "first": [names]}}``; ``lines()`` the console
    form ``"unreadable image (3): a.jpg, b.jpg, c.jpg"``."""

    def __init__(self, items=None):
        self._seen = {}
        for reason, entry in (items or {}).items():
            self._seen[reason] = {"count": int(entry["count"]), "first": list(entry["first"]), "names": set()}

    def add(self, reason: str, name: str, count: int = 1) -> None:
        """Count ``name`` under ``reason`` once, however often it is added."""
        entry = self._seen.setdefault(reason, {"count": 0, "first": [], "names": set()})
        if name in entry["names"] or name in entry["first"]:
            return
        entry["names"].add(name)
        entry["count"] += count
        if len(entry["first"]) < FIRST_NAMES:
            entry["first"].append(name)

    def update(self, other: "Skips") -> None:
        for reason, entry in other._seen.items():
            for name in entry["first"]:
                self.add(reason, name)
            extra = entry["count"] - len(entry["first"])
            if extra > 0:
                self._seen[reason]["count"] += extra

    def __bool__(self):
        return bool(self._seen)

    def as_dict(self) -> dict:
        return {reason: {"count": e["count"], "first": list(e["first"])} for reason, e in sorted(self._seen.items())}

    def lines(self) -> list:
        return [f"{reason} ({entry['count']}): {', '.join(entry['first'])}"
                + (", ..." if entry["count"] > len(entry["first"]) else "") for reason, entry in self.as_dict().items()]


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


def is_url(path) -> bool:
    """Whether ``path`` is an fsspec URL (``protocol://...``) rather than a local path."""
    return isinstance(path, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def filesystem(path):
    """``(fsspec filesystem, path inside it)`` of a local path or a URL."""
    fsspec = require("fsspec", "scale", "reading and writing datasets at fsspec URLs")
    if is_url(path):
        return fsspec.core.url_to_fs(path)
    return fsspec.filesystem("file"), os.path.abspath(os.fspath(path))


def open_file(path, mode="rb"):
    """An open binary file at a local path or a URL."""
    if not is_url(path):
        return open(path, mode)
    fs, inner = filesystem(path)
    return fs.open(inner, mode)


def _hash_parts(size, parts):
    digest = hashlib.sha256(f"{size}:".encode())
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def content_hash(path, chunk: int = 1 << 20) -> str:
    """What a file holds, as 16 hex digits: a hash of its size, its first and its last ``chunk`` bytes (the whole
    file when it is at most two chunks). Two different files of the same name and size get different hashes; a
    copy or a renamed file the same one. Reading two MiB keeps it cheap on long videos. ``path`` may be an fsspec
    URL."""
    with open_file(path) as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(0)
        if size <= 2 * chunk:
            return _hash_parts(size, [handle.read()])
        head = handle.read(chunk)
        handle.seek(size - chunk)
        return _hash_parts(size, [head, handle.read(chunk)])


def content_hash_bytes(data: bytes, chunk: int = 1 << 20) -> str:
    """``content_hash`` of a file whose whole content ``data`` is already read."""
    size = len(data)
    return _hash_parts(size, [data] if size <= 2 * chunk else [data[:chunk], data[size - chunk:]])


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
