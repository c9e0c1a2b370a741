"""The triplet dataset: the one on-disk format for removal training pairs.

Layout of a dataset folder::

    source/<id>.png    RGB, the photo with the object (what the eraser sees)
    mask/<id>.png      single channel, 255 = object to remove, 0 = keep
    target/<id>.png    RGB, the same photo without the object
    manifest.jsonl     one JSON record per finished sample (see ``TripletWriter.write``)
    manifest-shard-<i>-of-<N>.jsonl   the manifest of shard i when a run is split into N shards
    dataset.json       the settings of the runs that made the samples (see ``TripletWriter``)

Only samples named in a manifest exist. A writer renames its three finished files into place and only
then appends the manifest line (flushed and fsynced), so a process killed at any moment leaves at worst
invisible orphan files, never a visible half sample. Each shard of a split run writes its own manifest
into the same folder (no two processes ever append to the same file; a lock file enforces it) and the
reader merges every ``manifest*.jsonl`` it finds, ordered by sample id, so a sharded run reads exactly
like the same run done in one piece.

Nothing is lost silently. The only damage a kill can do is a torn last line (a partial append), which readers
skip and a resumed writer cuts off. Any other unreadable line, or a record whose files are gone, stops readers and
writers with the line number and the repair command (``erasekit-dataset repair``, dataset_check.py). No code
deletes sample files: orphans stay where they are (a resumed run overwrites them with the same sample) until
``repair`` moves them aside.

A run's settings are part of the dataset: ``dataset.json`` lists each distinct settings record (a job's
``settings()``) under its id, and every record names the id of the settings that made it. A writer given
settings that no earlier run of a non-empty folder used refuses to continue (the sentence lists the
differences) unless told to append, and then every record it writes also carries the full settings.
"""
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..erasers.layout import binarize
from ..jobs import Host, UsageError, fingerprint

SUBDIRS = ("source", "mask", "target")
MANIFEST = "manifest.jsonl"
DATASET_INFO = "dataset.json"
# where a sample came from; "recovered" marks a record erasekit-dataset repair rebuilt from the files alone
ORIGIN_KEYS = {"video": ("video", "frame", "background_frame"), "image": ("image", "instance"), "recovered": ()}
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TMP_PREFIX = ".tmp-"  # a writer's partial writes: never a sample, deleted by their own writer or by repair


class ManifestDamaged(UsageError):
    """A manifest line that is not a sample record, or a record whose files are gone: found before any work, so
    nothing is changed; the message names the line and the repair command."""


def repair_hint(root):
    return f"nothing was changed; check and mend the dataset with: erasekit-dataset repair {root}"


def shard_file_name(stem, shard, suffix):
    """``<stem><suffix>``, or ``<stem>-shard-<i>-of-<N><suffix>`` for the files of shard ``(i, N)`` (or ``"i/N"``)."""
    if shard is None:
        return f"{stem}{suffix}"
    index, count = parse_shard(shard)
    return f"{stem}-shard-{index}-of-{count}{suffix}"


def manifest_name(shard=None):
    """File name of the manifest a writer of ``shard`` = (index, count) appends to."""
    return shard_file_name("manifest", shard, ".jsonl")


def parse_shard(shard):
    """``"i/N"`` or ``(i, N)`` → ``(i, N)`` with 0 ≤ i < N, else ValueError."""
    if isinstance(shard, str):
        parts = shard.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"shard {shard!r} is not of the form i/N (for example 0/4)")
        shard = (int(parts[0]), int(parts[1]))
    index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is out of range: need 0 <= i < N and N >= 1")
    return index, count


def check_sample_id(sample_id):
    if not isinstance(sample_id, str) or not _ID_PATTERN.match(sample_id):
        raise ValueError(
            f"sample id {sample_id!r} is not usable as a file stem: use letters, digits, '_', '-', '.' "
            "and do not start with '.' or '-'"
        )
    return sample_id


def check_origin(origin):
    """The origin must say where a sample came from: a video frame or an image instance."""
    if not isinstance(origin, dict) or origin.get("kind") not in ORIGIN_KEYS:
        raise ValueError(
            f"record['origin'] must be a dict with kind 'video' or 'image', got {origin!r}"
        )
    missing = [k for k in ORIGIN_KEYS[origin["kind"]] if k not in origin]
    if missing:
        raise ValueError(f"record['origin'] of kind {origin['kind']!r} lacks {missing}: got {origin!r}")
    return origin


def _as_rgb(name, array):
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} must be a uint8 H×W×3 RGB array, got dtype {array.dtype} shape {array.shape}")
    return array


def _as_binary_mask(array, shape):
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"mask must be H×W (single channel), got shape {array.shape}")
    if array.shape != shape:
        raise ValueError(f"mask is {array.shape[1]}×{array.shape[0]} but source is {shape[1]}×{shape[0]}")
    if array.dtype == bool:
        return array
    if array.dtype != np.uint8:
        raise ValueError(f"mask must be bool or uint8, got {array.dtype}")
    values = np.unique(array)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        raise ValueError(f"uint8 mask must hold only {{0, 1}} or {{0, 255}}, found values {values[:8].tolist()}")
    return binarize(array)


def _encode_png(image):
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as PNG")
    return buffer.tobytes()


@dataclass(frozen=True)
class EncodedTriplet:
    """A validated sample as PNG bytes (picklable: worker processes encode, the writer process stores)."""

    source: bytes
    mask: bytes
    target: bytes
    width: int
    height: int


def encode_triplet(source, mask, target):
    """Validate one sample (sizes, dtypes, binary mask) and encode its three PNGs."""
    source = _as_rgb("source", source)
    target = _as_rgb("target", target)
    if target.shape != source.shape:
        raise ValueError(
            f"target is {target.shape[1]}×{target.shape[0]} but source is {source.shape[1]}×{source.shape[0]}"
        )
    mask = _as_binary_mask(mask, source.shape[:2])
    height, width = source.shape[:2]
    return EncodedTriplet(
        _encode_png(source), _encode_png(mask.astype(np.uint8) * 255), _encode_png(target), int(width), int(height)
    )


def _write_durable(path, data):
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path, data, tmp_name=None):
    """Write ``data`` (bytes) to the local file ``path`` whole: into a temporary file next to it (``tmp_name``, by
    default ``.tmp-<stem>-<pid><suffix>``), flushed and fsynced, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(tmp_name or f"{TMP_PREFIX}{path.stem}-{os.getpid()}{path.suffix}")
    _write_durable(tmp, data)
    os.replace(tmp, path)


def write_manifest(path, records, tmp_name=None):
    """Replace the manifest ``path`` with ``records``, one JSON line each, whole (``write_atomic``)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"), tmp_name)


def parse_manifest_line(text):
    """The record of one manifest line, or (None, why it is not one)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not _ID_PATTERN.match(record["id"]):
        return None, "not a sample record (a JSON object with a usable 'id')"
    missing = [key for key in SUBDIRS if record.get(key) != f"{key}/{record['id']}.png"]
    if missing:
        return None, f"its {', '.join(missing)} file names are not {'/'.join(missing)}/{record['id']}.png"
    return record, None


def manifest_lines(path):
    """``(line number, record or None, why not, text)`` for every non-blank line of a manifest, and whether it ends
    with a torn line (text after the last newline: a kill while appending; it may still parse)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().split("\n")
    torn = bool(lines[-1].strip())
    return [(number, *parse_manifest_line(line), line) for number, line in enumerate(lines, 1) if line.strip()], torn


def _read_manifest_lines(path, root=None):
    """``[(line number, record)]`` of one manifest. A torn last line (a kill while appending) is left out; any other
    line that is not a sample record, or one repeating an id, raises ManifestDamaged naming the line."""
    found, torn = manifest_lines(path)
    records, seen = [], {}
    for index, (number, record, why, _) in enumerate(found):
        if record is None:
            if torn and index == len(found) - 1:
                continue
            raise ManifestDamaged(f"{path} line {number} is {why}; {repair_hint(root or Path(path).parent)}")
        if record["id"] in seen:
            raise ManifestDamaged(f"{path} line {number} repeats sample {record['id']!r} of line {seen[record['id']]}; "
                                  f"{repair_hint(root or Path(path).parent)}")
        seen[record["id"]] = number
        records.append((number, record))
    return records


def manifest_paths(root):
    return sorted(Path(root).glob("manifest*.jsonl"))


# --- the settings of a dataset ---------------------------------------------------------------------------------------

def settings_id(settings):
    """Short id of a settings record: a hash of its canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def _flatten(settings, prefix=""):
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_differences(old, new):
    """``["seed: 0 -> 5", ...]`` for every setting that differs (nested settings by dotted name)."""
    old, new = _flatten(old or {}), _flatten(new or {})

    def shown(flat, key):
        return json.dumps(flat[key]) if key in flat else "unset"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}"
            for key in sorted(set(old) | set(new)) if shown(old, key) != shown(new, key)]


def parse_dataset_info(read, path, root):
    """The parsed ``dataset.json`` that ``read()`` returns (its parsed JSON, or None when absent) at ``path``; a file
    that is not JSON (``read`` raising OSError or ValueError) or lists no runs raises ManifestDamaged."""
    try:
        info = read()
    except (OSError, ValueError) as error:
        raise ManifestDamaged(f"{path} is not readable JSON ({error}); {repair_hint(root)}") from None
    if info is not None and (not isinstance(info, dict) or not isinstance(info.get("runs"), list)):
        raise ManifestDamaged(f"{path} does not list the runs' settings; {repair_hint(root)}")
    return info


def read_dataset_info(root):
    """The parsed ``dataset.json`` of ``root`` ({"version", "runs": [{"settings_id", "settings", ...}]}), or None."""
    path = Path(root) / DATASET_INFO
    return parse_dataset_info(lambda: json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None,
                              path, root)


def dataset_info_bytes(runs):
    """The bytes of a ``dataset.json`` listing ``runs`` (the same in both formats)."""
    return (json.dumps({"version": 1, "runs": runs}, indent=1) + "\n").encode("utf-8")


def write_dataset_info(root, runs):
    path = Path(root) / DATASET_INFO
    write_atomic(path, dataset_info_bytes(runs), f"{TMP_PREFIX}{os.getpid()}-{DATASET_INFO}")


def adopt_settings(root, runs, settings, samples, append):
    """What a writer of a dataset holding ``samples`` samples made under ``runs`` (dataset.json) does with
    ``settings``: ``(runs to record, or None when nothing changes; settings id; settings every new record carries,
    or None)``. Settings an earlier run used are accepted; a dataset without samples records them afresh; other
    settings are refused (UsageError listing the differences) unless ``append``. One rule for both formats."""
    sid = settings_id(settings)
    same = next((run for run in runs if run.get("settings_id") == sid), None)
    if same is not None:
        return None, sid, settings if same.get("appended") else None
    if not samples:  # nothing made yet: earlier settings (of a run that made nothing) are not kept
        return [{"settings_id": sid, "settings": settings}], sid, None
    if not append:
        raise UsageError(settings_refusal(root, runs, settings, samples))
    return runs + [{"settings_id": sid, "settings": settings, "appended": True}], sid, settings


def add_resume_arguments(parser, same="the same settings", other="other settings"):
    """``--resume`` / ``--append``, the two ways of writing into a folder that holds samples (``adopt_settings``),
    for the commands that write triplet datasets."""
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help=f"continue a folder that holds samples made with {same}")
    existing.add_argument("--append", action="store_true",
                          help=f"add samples made with {other} to a folder that holds samples (each new sample "
                               "records what made it)")


def settings_refusal(root, runs, settings, samples):
    """The sentence refusing to mix: what differs, and the three ways on."""
    ways = ("run with the same settings to resume it, pass --append (a node: append) to add samples made with "
            "these settings (each new sample then records them), or choose another folder")
    if not runs:
        return (f"{root} holds {samples} samples made before EraseKit recorded a dataset's settings "
                f"(no {DATASET_INFO}), so resuming could mix two recipes: {ways}")
    closest = min(runs, key=lambda run: len(settings_differences(run.get("settings"), settings)))
    differences = settings_differences(closest.get("settings"), settings)
    return f"{root} holds {samples} samples made with other settings ({'; '.join(differences)}): {ways}"


def manifest_record(sample_id, encoded, record, settings_id=None, settings=None):
    """The manifest record of one sample (a line of ``manifest.jsonl``, and a shard's ``.json`` member): the id,
    file names, size, ``origin`` and the caller's other keys, ``settings_id`` and, for appended runs, ``settings``.
    Checks the id, the origin and that ``encoded`` is an ``EncodedTriplet``."""
    check_sample_id(sample_id)
    if not isinstance(encoded, EncodedTriplet):
        raise ValueError(f"a sample needs an EncodedTriplet from encode_triplet, got {type(encoded).__name__}")
    if not isinstance(record, dict):
        raise ValueError(f"record must be a dict, got {type(record).__name__}")
    check_origin(record.get("origin"))
    full = {
        "id": sample_id,
        "source": f"source/{sample_id}.png",
        "mask": f"mask/{sample_id}.png",
        "target": f"target/{sample_id}.png",
        "width": encoded.width,
        "height": encoded.height,
        **{k: v for k, v in record.items() if k not in ("id", "source", "mask", "target", "width", "height")},
    }
    if settings_id is not None:
        full["settings_id"] = settings_id
        if settings is not None:
            full["settings"] = settings
    return full


class TripletWriter:
    """Atomic, resumable writer of a triplet dataset folder.

    ``shard`` = ``"i/N"`` makes this writer append to its own ``manifest-shard-i-of-N.jsonl`` so N
    processes can fill one folder. ``has(id)`` sees samples of every manifest present when the writer
    opened (a resumed run with another shard count skips what is done). With ``resume=False`` a folder
    that already holds samples (for a shard: samples in its own manifest) is an error, not silently mixed.

    On opening, this writer's stale temp files (partial writes, never samples) are deleted and a torn last line
    of its manifest is cut off; a damaged line or a record whose files are gone raises ManifestDamaged and
    changes nothing. Orphan files (renamed into place by a run killed before its manifest line) are left where
    they are: writing the sample again replaces them, ``erasekit-dataset repair`` moves the others aside.

    ``settings`` (a JSON-able dict: what decides the samples) is checked against ``dataset.json``: a fresh folder
    records it; a folder holding samples accepts it when an earlier run used the same settings, else raises
    UsageError listing the differences, unless ``append`` (then it is recorded as an appended run and every
    record this writer writes carries it in full). Every record gets ``settings_id``.
    """

    def __init__(self, root, resume=True, shard=None, settings=None, append=False):
        self.root = Path(root)
        self.shard = None if shard is None else parse_shard(shard)
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (self.root / sub).mkdir(exist_ok=True)
        self.manifest_path = self.root / manifest_name(self.shard)
        self._lock_handle = open(self.root / f".{self.manifest_path.name}.lock", "w")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_handle.close()
            raise UsageError(
                f"another process is writing {self.manifest_path}; give each concurrent run its own --shard i/N"
            ) from None
        self._tmp_tag = f"{TMP_PREFIX}{self.manifest_path.stem}-"
        self._done = {}
        self.settings_id, self._settings_in_records = None, None
        try:
            self._recover(resume or append)
            if settings is not None:
                self._adopt_settings(settings, append)
        except BaseException:
            self.close()
            raise
        self._manifest = open(self.manifest_path, "a", encoding="utf-8")

    # ---- opening -------------------------------------------------------------------------------
    def _files_of(self, sample_id):
        return [self.root / sub / f"{sample_id}.png" for sub in SUBDIRS]

    def _recover(self, resume):
        for sub in SUBDIRS:
            for stale in (self.root / sub).glob(f"{self._tmp_tag}*"):
                stale.unlink(missing_ok=True)  # a partial write of this writer's own: never a sample
        all_ids = set()
        for path in manifest_paths(self.root):
            records = _read_manifest_lines(path, self.root)
            for number, record in records:
                for sub, file in zip(SUBDIRS, self._files_of(record["id"])):
                    if not file.is_file():
                        raise ManifestDamaged(f"{path} line {number} names {sub}/{file.name}, which is missing; "
                                              f"{repair_hint(self.root)}")
                all_ids.add(record["id"])
                if path == self.manifest_path:
                    self._done[record["id"]] = record
            if path == self.manifest_path and not _ends_with_newline(path):
                self._rewrite_manifest([record for _, record in records])  # cut the torn last line
        # a shard only refuses its own earlier samples: the other shards of the run fill the same folder
        clashing = all_ids if self.shard is None else set(self._done)
        if clashing and not resume:
            raise UsageError(
                (f"{self.manifest_path} already lists {len(clashing)} samples" if self.shard is not None else
                 f"{self.root} already holds {len(clashing)} samples")
                + "; pass --resume (a node: resume) to continue it with the same settings, --append (append) to add "
                "samples made with other settings, or choose an empty folder"
            )
        self._known = all_ids

    def _adopt_settings(self, settings, append):
        """Check ``settings`` against dataset.json (under a lock: shards open at once) and record them."""
        with open(self.root / f".{DATASET_INFO}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            info = read_dataset_info(self.root)
            runs, self.settings_id, self._settings_in_records = adopt_settings(
                self.root, info["runs"] if info else [], settings, len(self._known), append)
            if runs is not None:
                write_dataset_info(self.root, runs)

    def _rewrite_manifest(self, records):
        write_manifest(self.manifest_path, records, f"{self._tmp_tag}{self.manifest_path.name}")

    # ---- writing -------------------------------------------------------------------------------
    def has(self, sample_id):
        return sample_id in self._known

    def __len__(self):
        return len(self._done)

    def write(self, sample_id, source, mask, target, record):
        """Store one sample; returns the manifest record.

        ``source``/``target``: uint8 H×W×3 RGB; ``mask``: bool or uint8 ({0,1} or {0,255}) H×W.
        ``record`` must hold ``origin`` ({"kind": "video", "video", "frame", "background_frame"} or
        {"kind": "image", "image", "instance"}); its other keys (e.g. ``params``) are kept as given.
        Writing an id that already exists is an error (use ``has`` first).
        """
        return self.write_encoded(sample_id, encode_triplet(source, mask, target), record)

    def write_encoded(self, sample_id, encoded, record):
        """``write`` for an ``EncodedTriplet`` (validated and PNG-encoded elsewhere, e.g. in a worker process)."""
        if sample_id in self._known:
            raise ValueError(f"sample {sample_id!r} already exists in {self.root}")
        full = manifest_record(sample_id, encoded, record, self.settings_id, self._settings_in_records)
        line = json.dumps(full) + "\n"  # serialise first: a record that is not JSON must not leave files
        finals = self._files_of(sample_id)
        temps = [p.with_name(f"{self._tmp_tag}{p.name}") for p in finals]
        for tmp, data in zip(temps, (encoded.source, encoded.mask, encoded.target)):
            _write_durable(tmp, data)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
        self._manifest.write(line)
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        self._known.add(sample_id)
        self._done[sample_id] = full
        return full

    def close(self):
        manifest = getattr(self, "_manifest", None)
        if manifest is not None and not manifest.closed:
            manifest.close()
        if not self._lock_handle.closed:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def remove_unused_output(root):
    """Undo a dataset folder a run created and then stopped in without writing a sample (an error exit leaves no
    empty output behind): its bookkeeping files (locks, dataset.json, summaries, the instance table, empty
    manifests) and empty folders go. Anything else (a sample, a non-empty manifest, a user's file) stays, and so
    does the folder holding it."""
    root = Path(root)
    if not root.is_dir() or any(p.stat().st_size for p in manifest_paths(root)):
        return
    for path in root.iterdir():
        bookkeeping = (path.name.startswith(".") and path.name.endswith(".lock")) or path.name in (
            DATASET_INFO, "instances.json") or (path.suffix == ".json" and "summary" in path.name) or (
            path.name.startswith("manifest") and path.suffix == ".jsonl")
        if bookkeeping and path.is_file():
            path.unlink()
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
        try:
            folder.rmdir()  # only empty folders: a sample or a user's file keeps its folder
        except OSError:
            pass


def _ends_with_newline(path):
    size = path.stat().st_size
    if size == 0:
        return True
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


def _decode(data, where):
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise ValueError(f"{where} is missing or not a readable image")
    return image


def decode_rgb(data, where):
    """RGB uint8 H×W×3 of a sample's PNG bytes, or ValueError naming ``where`` (the file or shard member)."""
    image = _decode(data, where)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where} must be an 8-bit RGB image, found dtype {image.dtype} shape {image.shape}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_mask(data, where):
    """Bool H×W mask of a sample's PNG bytes (0 or 255 only), or ValueError naming ``where``."""
    image = _decode(data, where)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"{where} must be an 8-bit single-channel mask, found dtype {image.dtype} shape {image.shape}")
    if not set(np.unique(image).tolist()) <= {0, 255}:
        raise ValueError(f"{where} is not binary: it holds values other than 0 and 255")
    return image > 0


def _file_bytes(path):
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _read_rgb(path):
    return decode_rgb(_file_bytes(path), path)


def _read_mask(path):
    return decode_mask(_file_bytes(path), path)


def check_sample_sizes(sample, record, where):
    """``sample`` if its source, target and mask are the size ``record`` says, else ValueError naming the file
    (``where(key)``)."""
    expected = (record.get("height"), record.get("width"))
    for key in SUBDIRS:
        if sample[key].shape[:2] != expected:
            raise ValueError(f"{where(key)} is {sample[key].shape[1]}×{sample[key].shape[0]} but the manifest says "
                             f"{expected[1]}×{expected[0]} for sample {record['id']!r}")
    return sample


def decode_encoded(encoded, record, where):
    """The sample ``{"source", "mask", "target", "record"}`` of an ``EncodedTriplet``, decoded and checked (masks
    binary, sizes against ``record`` and each other); ValueError naming the file (``where(key)``)."""
    sample = {"source": decode_rgb(encoded.source, where("source")), "mask": decode_mask(encoded.mask, where("mask")),
              "target": decode_rgb(encoded.target, where("target")), "record": record}
    return check_sample_sizes(sample, record, where)


class TripletDataset:
    """Validating reader of a triplet dataset folder (every ``manifest*.jsonl``, ordered by id).

    ``ds[i]`` → ``{"source": uint8 H×W×3, "mask": bool H×W (True = remove), "target": uint8 H×W×3,
    "record": dict}``; files are checked on access (sizes against the record and each other, masks
    binary) and problems raise ValueError naming the file. ``validate()`` checks every sample.
    """

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"triplet dataset folder {self.root} does not exist")
        paths = manifest_paths(self.root)
        if not paths:
            raise FileNotFoundError(f"{self.root} has no manifest.jsonl (nor manifest-shard-*.jsonl): not a triplet dataset")
        seen = {}
        records = []
        for path in paths:
            for number, record in _read_manifest_lines(path, self.root):
                if record["id"] in seen:
                    raise ValueError(f"sample {record['id']!r} appears in both {seen[record['id']]} and {path} "
                                     f"(line {number}); {repair_hint(self.root)}")
                seen[record["id"]] = path
                for key in SUBDIRS:
                    if not (self.root / record[key]).is_file():
                        raise FileNotFoundError(
                            f"{path} line {number} names {key} file {record[key]!r} for sample {record['id']!r}, "
                            f"but it does not exist in {self.root}; {repair_hint(self.root)}"
                        )
                records.append(record)
        self.records = sorted(records, key=lambda r: r["id"])

    def __len__(self):
        return len(self.records)

    def iter_records(self):
        return iter(self.records)

    def encoded(self, index):
        """Sample ``index`` as stored: an ``EncodedTriplet`` of its PNG bytes (a missing file reads as no bytes,
        which decoding reports)."""
        record = self.records[index]
        return EncodedTriplet(*(_file_bytes(self.root / record[key]) for key in SUBDIRS), record.get("width"),
                              record.get("height"))

    def __getitem__(self, index):
        return self.decode(index, self.encoded(index))

    def decode(self, index, encoded):
        """Sample ``index`` (``ds[index]``) from its ``encoded`` bytes."""
        record = self.records[index]
        return decode_encoded(encoded, record, lambda key: self.root / record[key])

    def validate(self):
        """Read every sample once; raises on the first bad file."""
        for index in range(len(self)):
            self[index]
        return len(self)


def dataset_fingerprint(root):
    """Changes whenever a reader of ``root`` could see something else: the manifests' sizes and times and the
    sample folders' times (a writer renames every file into place, which changes its folder's time). Cheap on
    datasets of millions of samples: no sample file is read or listed. The root folder's own time is left out:
    run summaries rewritten there change no sample. For WebDataset shards: the shards' and indices' sizes and
    times (``shards.dataset_fingerprint``)."""
    from .shards import dataset_fingerprint as shards_fingerprint, is_shard_dataset

    if is_shard_dataset(root):
        return shards_fingerprint(root)
    root = Path(root)
    return fingerprint(*(root / sub for sub in SUBDIRS), *manifest_paths(root), recursive=False)


@dataclass
class TripletPreview:
    """Which samples of a triplet dataset to read: the *Load Triplet Dataset Samples* node's settings."""

    dataset_folder: str
    start: int = 0  # index of the first sample (samples are ordered by id)
    count: int = 4  # how many samples
    skip_other_sizes: bool = False  # leave out samples of another size than the first, instead of an error


def preview_triplets(job, host=None):
    """Samples ``start``..``start+count`` of the dataset as ``TripletDataset`` items, each validated on reading.

    A batch needs one size: samples of another size than the first are an error (UsageError naming the sizes)
    or, with ``skip_other_sizes`` (a dataset mined from videos of several sizes), left out."""
    from .shards import open_triplets

    host = host or Host()
    dataset = open_triplets(job.dataset_folder)  # a triplet folder or WebDataset shards
    if len(dataset) == 0:
        raise UsageError(f"the triplet dataset {job.dataset_folder} has no samples to preview")
    if job.start >= len(dataset):
        raise UsageError(f"start {job.start} is past the last sample: {job.dataset_folder} holds {len(dataset)} samples")
    indices = range(job.start, min(len(dataset), job.start + max(1, job.count)))
    items = []
    for done, index in enumerate(indices, 1):
        host.check_interrupt()
        items.append(dataset[index])
        host.progress(done, len(indices), "samples")
    sizes = {item["source"].shape[:2] for item in items}
    if len(sizes) > 1:
        if not job.skip_other_sizes:
            raise UsageError(
                f"samples {job.start}..{job.start + len(items) - 1} of {job.dataset_folder} have different sizes "
                f"{sorted(sizes)}: preview them with count 1")
        items = [i for i in items if i["source"].shape == items[0]["source"].shape]
    return items
