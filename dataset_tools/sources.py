"""Where a dataset job's inputs and outputs live: local paths or any fsspec URL (``s3://``, ``gs://``, ``hf://``,
``https://``, ``file://``, ...), and the input lists people who build data at scale already have.

An input item is one of:

- a folder (searched recursively for files of the job's extensions), local or a URL;
- a file of that kind (a photo, a video), local or a URL;
- a list file ``*.txt`` / ``*.lst``: one path or URL per line (``#`` comments and blank lines ignored; relative
  paths are relative to the list file's folder);
- a parquet file of paths, the shape img2dataset and video2dataset read: the first of the columns ``url``,
  ``path``, ``file``, ``video``, ``image`` that it has names the files.

Local files stay ``pathlib.Path`` objects and URLs stay strings (``Path`` would fold their ``//``). Remote files are
read through fsspec (the package comes with torch); a video decoder needs a local file, so ``local_copy`` copies a
remote video to a temporary file for the time it is mined.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..jobs import UsageError, filesystem, is_url, open_file, require  # the URL helpers live in jobs.py

LIST_SUFFIXES = (".txt", ".lst")
PARQUET_SUFFIX = ".parquet"
PATH_COLUMNS = ("url", "path", "file", "video", "image")  # img2dataset calls its column "url"


def join(root, *names):
    """``root/name/...`` for a local path (a string) or a URL (kept a URL)."""
    root = os.fspath(root)
    return "/".join([root.rstrip("/"), *names]) if is_url(root) else os.path.join(root, *names)


def file_name(path) -> str:
    """The last component of a local path or a URL."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def read_bytes(path) -> bytes:
    """The whole file at a local path or a URL."""
    if not is_url(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


@contextlib.contextmanager
def local_copy(path):
    """A local path holding the file ``path`` names: the path itself, or a temporary copy of a URL's file (removed
    afterwards; it keeps the file's suffix, which some decoders read)."""
    if not is_url(path):
        yield path
        return
    fs, inner = filesystem(path)
    handle, local = tempfile.mkstemp(prefix=".erasekit-", suffix=Path(file_name(path)).suffix)
    os.close(handle)
    try:
        fs.get_file(inner, local)
        yield local
    finally:
        os.unlink(local)


def _matches(name, extensions):
    return name.lower().endswith(tuple(extensions))


def _list_entries(path, text):
    """Paths of a list file: one per line; relative ones are relative to the list's own folder."""
    base = path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entries.append(line if is_url(line) or os.path.isabs(line) else join(base, line))
    return entries


def _parquet_entries(path, what):
    """Paths of a parquet file: its ``url`` (or ``path``, ``file``, ``video``, ``image``) column."""
    parquet = require("pyarrow.parquet", "scale", f"{what} listed in a parquet file", package="pyarrow")
    with open_file(path) as handle:
        table = parquet.read_table(handle, use_threads=False)
    column = next((name for name in PATH_COLUMNS if name in table.column_names), None)
    if column is None:
        raise UsageError(f"{path} has no column of paths: it needs one of {', '.join(PATH_COLUMNS)} "
                         f"(found {', '.join(table.column_names) or 'no columns'})")
    base = path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
    values = [v for v in table.column(column).to_pylist() if v]
    return [v if is_url(v) or os.path.isabs(v) else join(base, v) for v in values]


def _is_list(path):
    return file_name(path).lower().endswith(LIST_SUFFIXES + (PARQUET_SUFFIX,))


def _entries_of_list(path, what):
    if file_name(path).lower().endswith(PARQUET_SUFFIX):
        return _parquet_entries(path, what)
    return _list_entries(path, read_bytes(path).decode("utf-8"))


def _expand_url(url, extensions, what):
    fs, inner = filesystem(url)
    if fs.isdir(inner):
        return [fs.unstrip_protocol(p) for p in sorted(fs.find(inner)) if _matches(p, extensions)]
    if not fs.exists(inner):
        raise UsageError(f"{what} {url} does not exist")
    return [url]


def check_source(item, what, files=False):
    """UsageError in one sentence unless ``item`` can be an input: a URL (its existence is checked when it is
    expanded), or a local folder, list or parquet file that exists, or (``files``) a single file."""
    if is_url(os.fspath(item)):
        return item
    path = Path(item)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if path.is_file() and not files and not _is_list(path.name):
        raise UsageError(f"{what} {path} is a file: give a folder, a list of paths (.txt, one per line) or a "
                         "parquet file with a url or path column")
    return path


def expand(items, extensions, what="input"):
    """The files that ``items`` name (see the module doc), in order, each once. Local files are ``Path`` objects,
    remote ones URL strings. UsageError for an item that does not exist."""
    found = []
    for item in items:
        item = os.fspath(item)
        if _is_list(item) and (is_url(item) or Path(item).is_file()):
            for entry in _entries_of_list(item, what):
                if not is_url(entry) and not Path(entry).is_file():
                    raise UsageError(f"{entry}, listed in {item}, does not exist")
                found.append(entry if is_url(entry) else Path(entry))
        elif is_url(item):
            found += _expand_url(item, extensions, what)
        elif Path(item).is_dir():
            found += sorted(p for p in Path(item).rglob("*") if p.is_file() and _matches(p.name, extensions))
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise UsageError(f"{what} {item} does not exist")
    unique, seen = [], set()
    for entry in found:
        key = entry if is_url(entry) else os.path.realpath(entry)
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    return unique
