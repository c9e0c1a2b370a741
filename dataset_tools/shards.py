"""WebDataset shards: the triplet dataset as tar shards that streaming loaders read (``--format webdataset``).

Layout of a shard dataset (a local folder or any fsspec URL)::

    <name>.tar       a WebDataset shard: for each sample <key>.source.png, <key>.mask.png, <key>.target.png and
                     <key>.json (the folder format's manifest record)
    <name>.parquet   its index: one row per sample (id, key, byte offset and size of each member, width, height and
                     the record as JSON), so a reader reaches any sample without scanning the tar
    dataset.json     the settings of the runs that made the samples, as in the folder format
    _stats.json      the last run: counts, skips by reason, throughput

The PNG bytes are those the folder format stores and the ``.json`` member is its manifest record, so the formats
convert into each other by copying (``convert``). A member's key is the sample id with '.' written ',' (WebDataset
splits a member name at its first dot; ids never hold ','). Members carry no time or owner, so the same samples
give the same bytes.

A shard is assembled in a temporary file and made visible whole (a rename; at a URL, one upload, which object
stores publish whole); its index follows. A shard is *finished* when its index exists: a run killed at any moment
leaves at worst a temporary file or a tar without its index, which the next run writes again, ``erasekit-dataset
check`` reports and ``repair`` moves aside. Readers see finished shards only.

Which samples a shard holds is fixed before any work, so another machine, a retried task or a resumed run writes
the same shard: synthesis sample ``i`` goes to ``shard-{i // N:06d}``; a video's pairs, in mining order, N at a
time to ``{video id}-{k:04d}``.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
from pathlib import Path

from ..jobs import Host, UsageError, require
from .sources import filesystem, is_url, join
from .triplets import (DATASET_INFO, SUBDIRS, TMP_PREFIX, EncodedTriplet, ManifestDamaged, TripletWriter,
                       adopt_settings, dataset_info_bytes, decode_encoded, manifest_record, parse_dataset_info,
                       remove_unused_output, repair_hint, shard_file_name, write_atomic)

FORMATS = ("folder", "webdataset")
SHARD_SIZE = 1000  # samples per shard: about 1 GB of 512 px triplets, the size streaming loaders like
STATS_STEM = "_stats"
STATS = f"{STATS_STEM}.json"
MEMBERS = SUBDIRS + ("json",)
_GLOB = re.compile(r"[*?\[]")


def pyarrow_parquet():
    return require("pyarrow.parquet", "scale", "WebDataset shards (--format webdataset)", package="pyarrow")


def tar_key(sample_id):
    """The WebDataset key of a sample: its id with '.' written ',' (a key ends at the member name's first dot)."""
    return sample_id.replace(".", ",")


def synth_shard_name(index):
    return f"shard-{index:06d}"


def video_shard_name(video_id, part):
    return f"{video_id}-{part:04d}"


def _member(name, size):
    """A tar header without time or owner: the same member gives the same bytes on every machine."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _index_schema():
    pa = require("pyarrow", "scale", "WebDataset shards (--format webdataset)")
    columns = [("id", pa.string()), ("key", pa.string())]
    for member in MEMBERS:
        columns += [(f"{member}_offset", pa.int64()), (f"{member}_size", pa.int64())]
    columns += [("width", pa.int32()), ("height", pa.int32()), ("record", pa.string())]
    return pa.schema(columns)


def index_bytes(rows):
    """The parquet index of a shard's rows."""
    pa = require("pyarrow", "scale", "WebDataset shards (--format webdataset)")
    buffer = io.BytesIO()
    pyarrow_parquet().write_table(pa.Table.from_pylist(rows, schema=_index_schema()), buffer)
    return buffer.getvalue()


class ShardFile:
    """One shard being written: samples go to a temporary tar (next to the shard when it is local), ``commit``
    makes it visible whole, then writes its index. ``abort`` removes the temporary file."""

    def __init__(self, root, name, settings_id=None, settings=None):
        self.root, self.name = os.fspath(root), name
        self.settings_id, self.settings = settings_id, settings
        self.fs, self.base = filesystem(self.root)
        self.local = not is_url(self.root)
        if self.local:  # partial writes of this shard by a killed attempt (a retried task writes it again)
            for stale in self.fs.glob(f"{self.base.rstrip('/')}/{TMP_PREFIX}{name}-*"):
                self.fs.rm_file(stale)
        handle, self.tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", suffix=".tar",
                                            dir=self.base if self.local else None)
        self._file = os.fdopen(handle, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.rows = []

    def __len__(self):
        return len(self.rows)

    def ids(self):
        return [row["id"] for row in self.rows]

    def add(self, sample_id, encoded, record):
        """Append one sample (an ``EncodedTriplet`` and its record, as ``TripletWriter.write_encoded``); returns the
        full record stored as its ``.json`` member."""
        full = manifest_record(sample_id, encoded, record, self.settings_id, self.settings)
        text = json.dumps(full)
        key = tar_key(sample_id)
        row = {"id": sample_id, "key": key, "width": encoded.width, "height": encoded.height, "record": text}
        for member, data, suffix in (("source", encoded.source, "png"), ("mask", encoded.mask, "png"),
                                     ("target", encoded.target, "png"), ("json", text.encode("utf-8"), None)):
            info = _member(f"{key}.{member}.{suffix}" if suffix else f"{key}.{member}", len(data))
            header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
            row[f"{member}_offset"], row[f"{member}_size"] = self._tar.offset + len(header), len(data)
            self._tar.addfile(info, io.BytesIO(data))
        self.rows.append(row)
        return full

    def commit(self):
        """Make the shard visible (tar first, index last); returns ``{"shard", "samples", "bytes"}``."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size = os.path.getsize(self.tmp)
        tar_path, index_path = shard_files(self.root, self.name)
        index = index_bytes(self.rows)
        if self.local:
            os.replace(self.tmp, tar_path)
            write_atomic(index_path, index)
        else:
            try:
                self.fs.put_file(self.tmp, filesystem(tar_path)[1])
            finally:
                os.unlink(self.tmp)
            self.fs.pipe_file(filesystem(index_path)[1], index)
        return {"shard": self.name, "samples": len(self.rows), "bytes": size}

    def abort(self):
        if not self._file.closed:
            self._file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def shard_files(root, name):
    """(tar path, index path) of shard ``name`` under ``root``."""
    return join(root, f"{name}.tar"), join(root, f"{name}.parquet")


def write_file(root, name, data):
    """Write the bytes ``data`` to ``root/name``, whole (``triplets.write_atomic`` locally, one upload at a URL); a
    local ``root`` is made when absent (not its parents)."""
    if is_url(os.fspath(root)):
        fs, path = filesystem(join(root, name))
        fs.pipe_file(path, data)
    else:
        Path(root).mkdir(exist_ok=True)
        write_atomic(join(os.fspath(root), name), data)


def write_json(root, name, data, end="\n"):
    """Write ``root/name`` as JSON (indented, then ``end``), whole (``write_file``)."""
    write_file(root, name, (json.dumps(data, indent=1) + end).encode("utf-8"))


def read_json(root, name):
    """The parsed ``root/name`` (a local folder or a URL), or None when it is absent."""
    if not is_url(os.fspath(root)):  # a local folder needs no fsspec
        path = Path(root) / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    fs, path = filesystem(join(root, name))
    if not fs.isfile(path):
        return None
    return json.loads(fs.cat_file(path).decode("utf-8"))


def check_output_format(job):
    """UsageError for an output format a job cannot write, or settings that do not go with it."""
    if job.format not in FORMATS:
        raise UsageError(f"format {job.format!r} is not one of {', '.join(FORMATS)}")
    if job.shard_size < 1:
        raise UsageError(f"shard_size must be >= 1, got {job.shard_size}")
    if job.format == "folder" and is_url(str(job.output)):
        raise UsageError(f"the folder format writes a local folder, not {job.output}: write shards to a URL with "
                         "--format webdataset")
    if job.ray is not None and job.shard is not None:
        raise UsageError("--ray runs the whole job on the cluster; --shard i/N is for runs started by hand on each "
                         "machine: give one of them")


def write_output_json(output, name, data):
    """A job's own file (summary, stats, instance table) ``output/name`` as JSON (``write_json``): at a URL with a
    final newline, in a local folder without one (the bytes these files have always had)."""
    write_json(output, name, data, "\n" if is_url(str(output)) else "")


class ShardStore:
    """The shards under ``root`` (a local folder or a URL): which are finished, their indices and records."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self.fs, self.base = filesystem(self.root)

    def exists(self):
        return self.fs.isdir(self.base)

    def names(self, suffix):
        if not self.exists():
            return []
        return sorted(os.path.basename(p)[: -len(suffix)] for p in self.fs.glob(f"{self.base.rstrip('/')}/*{suffix}")
                      if not os.path.basename(p).startswith(TMP_PREFIX))

    def finished(self):
        """Names of the finished shards (tar and index both present), sorted."""
        return sorted(set(self.names(".parquet")) & set(self.names(".tar")))

    def unfinished(self):
        """Names of tars without an index: a run stopped between writing a shard and its index."""
        return sorted(set(self.names(".tar")) - set(self.names(".parquet")))

    def temporary(self):
        """Partial writes (``.tmp-*``) left in the folder by a killed run."""
        if not self.exists():
            return []
        return sorted(p for p in self.fs.glob(f"{self.base.rstrip('/')}/{TMP_PREFIX}*"))

    def rows(self, name):
        """The index rows of shard ``name`` (ManifestDamaged naming the file when it cannot be read)."""
        path = filesystem(shard_files(self.root, name)[1])[1]
        try:
            with self.fs.open(path, "rb") as handle:
                return pyarrow_parquet().read_table(handle, use_threads=False).to_pylist()
        except Exception as error:  # pyarrow raises its own errors for a damaged file
            raise ManifestDamaged(f"{shard_files(self.root, name)[1]} is not a readable shard index ({error}); "
                                  f"{repair_hint(self.root)}") from None

    def is_finished(self, name):
        """Whether shard ``name`` is finished (its tar and its index both present): ``name in finished()`` without
        listing the store."""
        return all(self.fs.isfile(f"{self.base.rstrip('/')}/{name}{suffix}") for suffix in (".parquet", ".tar"))

    def read_info(self):
        """dataset.json of the store (its runs' settings), or None."""
        return parse_dataset_info(lambda: read_json(self.root, DATASET_INFO), join(self.root, DATASET_INFO),
                                  self.root)


class ShardWriter:
    """The job's side of a shard dataset: the opening rules of ``TripletWriter`` for ``--format webdataset``.

    On opening, the finished shards are listed (``is_finished``, ``samples``): a store that holds samples is
    refused unless ``resume`` or ``append``, and ``settings`` are checked against dataset.json with the folder
    format's rule (``triplets.adopt_settings``). ``target()`` is what a worker needs to write a shard; a shard's
    partial writes are deleted when it is written again, the others by ``remove_partial_writes`` once a whole run
    is over."""

    def __init__(self, root, resume=False, settings=None, append=False):
        self.root = os.fspath(root)
        self.store = ShardStore(self.root)
        self.store.fs.makedirs(self.store.base, exist_ok=True)
        finished = self.store.finished()
        self.counts = {name: len(self.store.rows(name)) for name in finished}
        samples = sum(self.counts.values())
        if samples and not (resume or append):
            raise UsageError(f"{self.root} already holds {samples} samples in {len(finished)} shards; pass --resume "
                             "(a node: resume) to continue it with the same settings, --append (append) to add samples "
                             "made with other settings, or choose an empty folder")
        self.settings_id, self.settings_in_records = None, None
        if settings is not None:
            info = self.store.read_info()
            runs, self.settings_id, self.settings_in_records = adopt_settings(
                self.root, info["runs"] if info else [], settings, samples, append)
            if runs is not None:
                write_file(self.root, DATASET_INFO, dataset_info_bytes(runs))

    def remove_partial_writes(self):
        """Delete the ``.tmp-*`` files a killed worker or run left (call when no writer of this store runs)."""
        for path in self.store.temporary():
            self.store.fs.rm_file(path)

    @property
    def samples(self):
        return sum(self.counts.values())

    def __len__(self):
        return self.samples

    def is_finished(self, name):
        return name in self.counts

    def target(self):
        """``(root, settings id, settings for records)``: picklable, for workers that write shards."""
        return self.root, self.settings_id, self.settings_in_records

    def finish(self, result):
        """Note a shard a worker finished (``ShardFile.commit``'s result)."""
        self.counts[result["shard"]] = result["samples"]


def open_shard(target, name):
    """A ``ShardFile`` for shard ``name`` of a ``ShardWriter.target()``."""
    root, settings_id, settings = target
    return ShardFile(root, name, settings_id, settings)


class VideoShards:
    """A video's pairs, in mining order, ``shard_size`` to a shard named ``{video id}-{k:04d}``.

    A pair whose id was already added (a retried try of a crashed video sends its pairs again) is dropped. A part
    that is already finished with the same samples (a video mined again after a kill) is not rewritten."""

    def __init__(self, target, video_id, shard_size):
        self.target, self.video_id, self.shard_size = target, video_id, shard_size
        self.store = ShardStore(target[0])
        self.part, self.current, self.seen = 0, None, set()
        self.results = []

    def add(self, sample_id, encoded, record):
        """Store one pair; False when its id was already added."""
        if sample_id in self.seen:
            return False
        self.seen.add(sample_id)
        if self.current is None:
            self.current = open_shard(self.target, video_shard_name(self.video_id, self.part))
        self.current.add(sample_id, encoded, record)
        if len(self.current) >= self.shard_size:
            self._commit()
        return True

    def _commit(self):
        shard, self.current = self.current, None
        self.part += 1
        if self.store.is_finished(shard.name) and [r["id"] for r in self.store.rows(shard.name)] == shard.ids():
            shard.abort()  # written by an earlier run, the same samples: kept as it is
            self.results.append({"shard": shard.name, "samples": len(shard), "bytes": 0, "existing": True})
            return
        self.results.append(shard.commit())

    def finish(self):
        """Commit the last part; returns the results of every part (``ShardFile.commit``'s)."""
        if self.current is not None:
            self._commit()
        return self.results

    def abort(self):
        if self.current is not None:
            self.current.abort()
            self.current = None


# --- reading ---------------------------------------------------------------------------------------------------------

def expand_braces(pattern):
    """WebDataset's shard patterns: ``shard-{000000..000009}.tar`` (zero-padded ranges) and ``{a,b}`` lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    inner = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    if span:
        width = len(span.group(1))
        options = [str(i).zfill(width) for i in range(int(span.group(1)), int(span.group(2)) + 1)]
    else:
        options = inner.split(",")
    return [path for option in options
            for path in expand_braces(pattern[:match.start()] + option + pattern[match.end():])]


def _is_pattern(text):
    return "{" in text or _GLOB.search(text.split("://", 1)[-1]) is not None


def is_shard_dataset(spec):
    """Whether ``spec`` names WebDataset shards: a ``.tar`` file, a brace or glob pattern, a list of them, or a
    folder (local or URL) holding shard indices and no ``manifest*.jsonl``."""
    if isinstance(spec, (list, tuple)):
        return any(is_shard_dataset(item) for item in spec)
    text = os.fspath(spec)
    if text.endswith(".tar") or _is_pattern(text):
        return True
    try:
        fs, path = filesystem(text)
        if not fs.isdir(path):
            return False
        if fs.glob(f"{path.rstrip('/')}/manifest*.jsonl"):
            return False
        return bool(fs.glob(f"{path.rstrip('/')}/*.parquet") or fs.glob(f"{path.rstrip('/')}/*.tar"))
    except (OSError, ValueError, ImportError):
        return False


def shard_paths(spec):
    """The tar files ``spec`` names (see ``is_shard_dataset``): finished shards only when it is a folder. Each is
    a local path or a URL string; FileNotFoundError names what matched nothing."""
    if isinstance(spec, (list, tuple)):
        return [path for item in spec for path in shard_paths(item)]
    text = os.fspath(spec)
    found = []
    for pattern in expand_braces(text):
        fs, path = filesystem(pattern)
        if _GLOB.search(pattern.split("://", 1)[-1]):
            matches = [p for p in sorted(fs.glob(path)) if p.endswith(".tar")]
            found += [fs.unstrip_protocol(p) if is_url(pattern) else p for p in matches]
        elif pattern.endswith(".tar"):
            if not fs.isfile(path):
                raise FileNotFoundError(f"shard {pattern} does not exist")
            found.append(pattern if is_url(pattern) else path)
        elif fs.isdir(path):
            store = ShardStore(pattern)
            found += [shard_files(pattern if is_url(pattern) else path, name)[0] for name in store.finished()]
        else:
            raise FileNotFoundError(f"{pattern} does not exist (expected a shard folder, a .tar shard or a pattern "
                                    "such as shards/shard-{000000..000009}.tar)")
    if not found:
        raise FileNotFoundError(f"{text} names no finished WebDataset shard (a .tar with its .parquet index)")
    return found


class ShardDataset:
    """Validating reader of WebDataset shards with the folder reader's interface (``TripletDataset``).

    ``spec``: a shard folder, a ``.tar``, a pattern (``shards/shard-{000000..000009}.tar``, ``shards/*.tar``) or a
    list of them, local or at fsspec URLs. Records are ordered by id, as the folder reader orders them, so sample
    ``i`` is the same sample in both formats. ``ds[i]`` → ``{"source", "mask", "target", "record"}`` read from the
    shard at the offsets of its index and checked like the folder reader's files. ``shard_of[i]`` is the position
    in ``shards`` of the shard that holds sample ``i`` (a training process reads only its own shards)."""

    def __init__(self, spec):
        self.root = spec if isinstance(spec, (list, tuple)) else os.fspath(spec)
        self.shards = shard_paths(spec)
        entries, seen = [], {}
        for position, tar in enumerate(self.shards):
            folder, name = tar.rsplit("/", 1) if is_url(tar) else os.path.split(tar)
            for number, row in enumerate(ShardStore(folder).rows(name[: -len(".tar")]), 1):
                if row["id"] in seen:
                    raise ValueError(f"sample {row['id']!r} is in both {self.shards[seen[row['id']]]} and {tar}; "
                                     f"{repair_hint(folder)}")
                seen[row["id"]] = position
                entries.append((row["id"], position, row))
        entries.sort(key=lambda entry: entry[0])
        self.shard_of = [position for _, position, _ in entries]
        self._rows = [row for _, _, row in entries]
        self.records = [json.loads(row["record"]) for row in self._rows]
        self._handles = {}

    def __len__(self):
        return len(self._rows)

    def iter_records(self):
        return iter(self.records)

    def _read(self, position, offset, size):
        tar = self.shards[position]
        if is_url(tar):
            fs, path = filesystem(tar)
            return fs.cat_file(path, start=offset, end=offset + size)
        handle = self._handles.get(position)
        if handle is None or handle[0] != os.getpid():  # a DataLoader worker opens its own
            handle = self._handles[position] = (os.getpid(), open(tar, "rb"))
        handle[1].seek(offset)
        return handle[1].read(size)

    def encoded(self, index):
        """Sample ``index`` as stored: an ``EncodedTriplet`` of its PNG bytes (a lossless copy for ``convert``)."""
        row, position = self._rows[index], self.shard_of[index]
        parts = [self._read(position, row[f"{m}_offset"], row[f"{m}_size"]) for m in SUBDIRS]
        return EncodedTriplet(*parts, int(row["width"]), int(row["height"]))

    def member_name(self, index, key):
        return f"{self.shards[self.shard_of[index]]}:{self._rows[index]['key']}.{key}.png"

    def __getitem__(self, index):
        return self.decode(index, self.encoded(index))

    def decode(self, index, encoded):
        """Sample ``index`` (``ds[index]``) from its ``encoded`` bytes."""
        return decode_encoded(encoded, self.records[index], lambda key: self.member_name(index, key))

    def validate(self):
        for index in range(len(self)):
            self[index]
        return len(self)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files stay with their process
        return state


def open_triplets(spec):
    """The reader of a dataset in either format: ``ShardDataset`` for shards, else ``TripletDataset``."""
    from .triplets import TripletDataset

    return ShardDataset(spec) if is_shard_dataset(spec) else TripletDataset(spec)


def dataset_fingerprint(spec):
    """Changes whenever a reader of the shards ``spec`` names could see something else: the tars' and indices'
    sizes and times (at URLs: their names)."""
    from ..jobs import fingerprint

    paths = shard_paths(spec)
    if any(is_url(p) for p in paths):
        return "|".join(paths)
    return fingerprint(*paths, *[p[: -len(".tar")] + ".parquet" for p in paths], recursive=False)


# --- converting between the formats ----------------------------------------------------------------------------------

def _check_empty_output(output, what):
    fs, path = filesystem(os.fspath(output))
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise UsageError(f"{what} {output} already exists and is not an empty folder: choose a new folder")


def folder_to_shards(source, output, shard_size=SHARD_SIZE, host=None):
    """Copy the triplet folder ``source`` into shards of ``shard_size`` samples (``shard-000000`` ..., samples in id
    order) under ``output`` (a new folder or URL); every sample is checked on the way. Returns the stats."""
    from .triplets import TripletDataset, read_dataset_info

    host = host or Host()
    if shard_size < 1:
        raise UsageError(f"shard_size must be >= 1, got {shard_size}")
    dataset = TripletDataset(source)
    _check_empty_output(output, "output")
    started, store = time.perf_counter(), ShardStore(output)
    store.fs.makedirs(store.base, exist_ok=True)
    info = read_dataset_info(source)
    if info is not None:
        write_json(output, DATASET_INFO, info)
    shards, written, size = [], 0, 0
    current = None
    for index, record in enumerate(dataset.iter_records()):
        host.check_interrupt()
        encoded = dataset.encoded(index)
        dataset.decode(index, encoded)  # decoded and checked: damage is not copied
        if current is None:
            current = ShardFile(output, synth_shard_name(len(shards)))
        current.add(record["id"], encoded, record)
        written += 1
        if len(current) >= shard_size or index == len(dataset) - 1:
            result = current.commit()
            shards.append(result["shard"])
            size += result["bytes"]
            current = None
        host.progress(written, len(dataset), "samples")
    stats = run_stats("convert", written, 0, {}, {}, len(shards), size, time.perf_counter() - started)
    write_json(output, STATS, stats)
    return stats


def shards_to_folder(source, output, host=None):
    """Copy the shards ``source`` names into the triplet folder ``output`` (new); every sample is checked on the
    way. Returns the stats."""
    from .triplets import TripletWriter, write_dataset_info

    host = host or Host()
    dataset = ShardDataset(source)
    _check_empty_output(output, "output")
    started = time.perf_counter()
    with TripletWriter(output, resume=False) as writer:
        folders = {tar.rsplit("/", 1)[0] if is_url(tar) else os.path.dirname(tar) for tar in dataset.shards}
        infos = [ShardStore(folder).read_info() for folder in sorted(folders)]
        runs = [run for info in infos if info for run in info["runs"]]
        if runs:
            write_dataset_info(output, list({run["settings_id"]: run for run in runs}.values()))
        for index, record in enumerate(dataset.iter_records()):
            host.check_interrupt()
            encoded = dataset.encoded(index)
            dataset.decode(index, encoded)  # decoded and checked: damage is not copied
            writer.write_encoded(record["id"], encoded, record)
            host.progress(index + 1, len(dataset), "samples")
    return run_stats("convert", len(dataset), 0, {}, {}, 0, 0, time.perf_counter() - started)


def convert(source, output, to=None, shard_size=SHARD_SIZE, host=None):
    """Convert a dataset into the other format (``to``: "webdataset" or "folder"; default: the one it is not)."""
    given = "webdataset" if is_shard_dataset(source) else "folder"
    if given == "folder" and not is_url(os.fspath(source)) and not os.path.isdir(source):
        raise UsageError(f"dataset {source} does not exist (give a triplet folder, a shard folder or a shard pattern)")
    to = to or ("folder" if given == "webdataset" else "webdataset")
    if to not in FORMATS:
        raise UsageError(f"format {to!r} is not one of {FORMATS}")
    if to == given:
        raise UsageError(f"{source} is already in the {given} format")
    try:
        if to == "folder":
            return shards_to_folder(source, output, host)
        return folder_to_shards(source, output, shard_size, host)
    except FileNotFoundError as error:  # a pattern that names no shard
        raise UsageError(str(error)) from None


def stats_name(shard=None):
    """``_stats.json``, or ``_stats-shard-i-of-N.json`` for a run started by hand as shard (i, N)."""
    return shard_file_name(STATS_STEM, shard, ".json")


def run_stats(backend, written, existing, skipped, failed, shards, size, seconds, workers=1):
    """The ``_stats.json`` record of a run: counts, skips and failures by reason, throughput."""
    return {"backend": backend, "workers": workers, "written": written, "existing": existing, "shards": shards,
            "skipped": skipped, "failed": failed, "bytes": size, "seconds": round(seconds, 3),
            "samples_per_s": round(written / seconds, 3) if seconds > 0 else None,
            "mb_per_s": round(size / seconds / 1e6, 3) if seconds > 0 else None}


# --- the writer of a job ---------------------------------------------------------------------------------------------

def open_writer(job, settings, shard):
    """``(writer, created)``: the writer of a job's output (``job.output``, ``format``, ``resume``, ``append``), a
    ``triplets.TripletWriter`` (folder) or a ``ShardWriter`` (webdataset), and whether this opening made the
    (local) output folder. The shards (i, N) of a run share the output, so a shard never refuses the others'
    samples. An output folder made by an opening that fails is removed (``remove_unused_output``)."""
    created = not is_url(str(job.output)) and not Path(job.output).exists()
    resume = job.resume or shard is not None
    try:
        if job.format == "webdataset":
            return ShardWriter(job.output, resume=resume, settings=settings, append=job.append), created
        return TripletWriter(job.output, resume=resume, shard=shard, settings=settings, append=job.append), created
    except BaseException:
        if created:
            remove_unused_output(job.output)
        raise


def write_shard_stats(job, writer, shard, written, existing, skipped, failed, shards, size, seconds, **more):
    """The end of a job's run into shards: ``_stats.json`` (``stats_name(shard)``: ``run_stats``, then the store's
    ``samples`` and ``shards_total``, then ``more``), and, for a whole run (``shard`` None: no writer of this
    store runs now; hand-started shards may), the partial writes removed."""
    stats = run_stats("ray" if job.ray is not None else "local", written, existing, skipped, failed, shards, size,
                      seconds, job.workers)
    stats.update(samples=writer.samples, shards_total=len(writer.counts), **more)
    write_output_json(job.output, stats_name(shard), stats)
    if shard is None:
        writer.remove_partial_writes()
