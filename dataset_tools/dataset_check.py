"""Check and repair a triplet dataset folder (``erasekit-dataset check DIR`` / ``repair DIR``).

``analyse`` reads every manifest line and every sample file and sorts what it finds:

- *good* records: a sample record on an undamaged line, its id seen once, its three PNGs readable, of the size
  the record says, the mask binary;
- *rejected lines*: a line that is not a sample record, or repeats an id (a torn last line, a run killed while
  appending, is noted but harmless);
- *rejected records*: a record whose files are missing or damaged;
- files no good record names: a complete, valid triplet whose record was lost is *rebuildable*; anything else
  (a lone file, a damaged one, a partial write) is an *orphan*.

``repair`` changes the folder so that it reads clean, and deletes nothing: every manifest is copied aside before it
is rewritten, rejected lines are kept with their line numbers, rejected records' files and orphans are moved to
``recovered/<time>/`` inside the dataset (readers never look there), and rebuildable triplets get a record again in
``manifest.jsonl`` (origin ``{"kind": "recovered"}``: where they came from is lost with their line).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..jobs import Host, UsageError, check_input
from .triplets import (DATASET_INFO, MANIFEST, SUBDIRS, TMP_PREFIX, _read_mask, _read_rgb, check_origin,
                       manifest_lines, manifest_paths, write_manifest)

RECOVERED = "recovered"


@dataclass
class Finding:
    """One problem: where (a manifest line or a file, relative to the dataset) and what is wrong there."""

    where: str
    what: str

    def __str__(self):
        return f"{self.where}: {self.what}"


@dataclass
class Analysis:
    root: Path
    good: dict = field(default_factory=dict)  # manifest path -> [record]
    rejected_lines: dict = field(default_factory=dict)  # manifest path -> [(line number, text, why)]
    rejected_records: list = field(default_factory=list)  # [(manifest path, line number, record, why)]
    rebuildable: dict = field(default_factory=dict)  # id -> (width, height)
    orphans: list = field(default_factory=list)  # [(relative path, why)]
    torn: list = field(default_factory=list)  # manifests ending with a torn line
    settings: list = field(default_factory=list)  # findings about dataset.json

    @property
    def samples(self):
        return sum(len(records) for records in self.good.values())

    def findings(self):
        """Every problem, in reading order."""
        found = list(self.settings)
        for path, lines in self.rejected_lines.items():
            found += [Finding(f"{path.name} line {number}", why) for number, _, why in lines]
        for path, number, record, why in self.rejected_records:
            found.append(Finding(why[0], f"{why[1]} (named by {path.name} line {number})"))
        found += [Finding(f"{sid}.png in {', '.join(s + '/' for s in SUBDIRS)}", "no record names this complete triplet (its record "
                          "was lost, or a run was killed before writing it): repair lists it again")
                  for sid in sorted(self.rebuildable)]
        found += [Finding(path, why) for path, why in self.orphans]
        return found


def _check_triplet(root, sample_id, width=None, height=None):
    """None when ``sample_id``'s three files are readable, of one size (``width``×``height`` when given) and the
    mask binary; else (file, what is wrong with it). Returns also the size found."""
    arrays = {}
    for sub in SUBDIRS:
        path = root / sub / f"{sample_id}.png"
        if not path.is_file():
            return (f"{sub}/{sample_id}.png", "missing"), None
        try:
            arrays[sub] = _read_mask(path) if sub == "mask" else _read_rgb(path)
        except ValueError as error:
            return (f"{sub}/{sample_id}.png", str(error).replace(str(path), "").strip(" :") or "unreadable"), None
    size = arrays["source"].shape[1], arrays["source"].shape[0]
    for sub, array in arrays.items():
        found = array.shape[1], array.shape[0]
        expected = (width, height) if width is not None else size
        if found != expected:
            return (f"{sub}/{sample_id}.png", f"is {found[0]}×{found[1]}, the record says {expected[0]}×{expected[1]}"), None
    return None, size


def analyse(root, host=None):
    """Sort every line and file of the dataset at ``root`` (see the module doc); reads every sample once."""
    host = host or Host()
    root = check_input(root, "dataset folder")
    result = Analysis(root)
    try:
        from .triplets import read_dataset_info

        read_dataset_info(root)
    except UsageError as error:
        result.settings.append(Finding(DATASET_INFO, str(error).split(";")[0].replace(str(root / DATASET_INFO), "")
                                       .strip() or "damaged"))
    paths = manifest_paths(root)
    lines = {path: manifest_lines(path) for path in paths}
    total = sum(len(found) for found, _ in lines.values())
    seen, done = {}, 0
    for path in paths:
        found, torn = lines[path]
        if torn:
            result.torn.append(path)
        result.good[path], result.rejected_lines[path] = [], []
        for index, (number, record, why, text) in enumerate(found):
            host.check_interrupt()
            done += 1
            host.progress(done, total, "records")
            if record is None:
                if torn and index == len(found) - 1:
                    why = "a torn last line (a run was killed while appending it; harmless)"
                result.rejected_lines[path].append((number, text, why))
                continue
            if record["id"] in seen:
                result.rejected_lines[path].append((number, text, f"repeats sample {record['id']!r} of {seen[record['id']]}"))
                continue
            try:
                check_origin(record.get("origin"))
            except ValueError as error:
                result.rejected_lines[path].append((number, text, str(error)))
                continue
            seen[record["id"]] = f"{path.name} line {number}"
            problem, _ = _check_triplet(root, record["id"], record.get("width"), record.get("height"))
            if problem:
                result.rejected_records.append((path, number, record, problem))
            else:
                result.good[path].append(record)
        if not result.rejected_lines[path]:
            del result.rejected_lines[path]
    kept = {record["id"] for records in result.good.values() for record in records}
    kept |= {record["id"] for _, _, record, _ in result.rejected_records}  # their files go aside with them
    stems = {}
    for sub in SUBDIRS:
        folder = root / sub
        for file in sorted(folder.iterdir()) if folder.is_dir() else []:
            if file.name.startswith(TMP_PREFIX) or file.suffix != ".png":
                result.orphans.append((f"{sub}/{file.name}", "a partial write or a foreign file"))
            elif file.stem not in kept:
                stems.setdefault(file.stem, []).append(sub)
    for stem, subs in sorted(stems.items()):
        problem, size = _check_triplet(root, stem) if len(subs) == len(SUBDIRS) else (("", "incomplete"), None)
        if problem is None:
            result.rebuildable[stem] = size
        else:
            why = "no record names it" + (f" ({problem[1]})" if len(subs) == len(SUBDIRS) else
                                          f" and its {', '.join(s for s in SUBDIRS if s not in subs)} file is missing")
            result.orphans += [(f"{sub}/{stem}.png", why) for sub in subs]
    return result


def check(root, host=None):
    """(Analysis, findings) of a dataset in either format: nothing is changed."""
    from .shards import is_shard_dataset

    result = analyse_shards(root, host) if is_shard_dataset(root) else analyse(root, host)
    return result, result.findings()


def recovered_record(sample_id, size):
    """The record ``repair`` writes for a complete triplet whose own record was lost."""
    return {"id": sample_id, "source": f"source/{sample_id}.png", "mask": f"mask/{sample_id}.png",
            "target": f"target/{sample_id}.png", "width": size[0], "height": size[1],
            "origin": {"kind": "recovered", "by": "erasekit-dataset repair"}}


def _lock_manifests(root):
    """Hold every writer lock of the folder (a running writer holds its own): UsageError when one is taken."""
    handles = []
    for path in sorted({root / f".{p.name}.lock" for p in manifest_paths(root)} | {root / f".{MANIFEST}.lock"}):
        handle = open(path, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            for other in handles:
                other.close()
            raise UsageError(f"a run is writing {root} (it holds {path.name}); repair it after that run ends") from None
        handles.append(handle)
    return handles


def _move_aside(root, relative, aside):
    """Move ``root/relative`` into ``aside`` under the same relative path (never overwriting)."""
    source = root / relative
    target = aside / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    return target


def repair(root, host=None):
    """Mend the dataset at ``root`` (see the module doc); returns a report dict. Nothing is deleted."""
    from .shards import is_shard_dataset

    if is_shard_dataset(root):
        return repair_shards(root, host)
    root = Path(root)
    handles = _lock_manifests(check_input(root, "dataset folder"))
    try:
        result = analyse(root, host)
        aside = root / RECOVERED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        while aside.exists():
            aside = aside.with_name(aside.name + "+")
        moved = []
        for path, number, record, problem in result.rejected_records:
            for sub in SUBDIRS:
                if (root / sub / f"{record['id']}.png").is_file():
                    moved.append(_move_aside(root, f"{sub}/{record['id']}.png", aside))
        for relative, _ in result.orphans:
            if (root / relative).exists():
                moved.append(_move_aside(root, relative, aside))
        rewritten = []
        for path in manifest_paths(root):
            rejected = result.rejected_lines.get(path, [])
            dropped = [(n, r, w) for p, n, r, w in result.rejected_records if p == path]
            rebuilt = ([recovered_record(sid, size) for sid, size in sorted(result.rebuildable.items())]
                       if path.name == MANIFEST else [])
            if not rejected and not dropped and not rebuilt and path not in result.torn:
                continue
            aside.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, aside / path.name)  # the manifest as it was
            with open(aside / f"{path.name}.rejected-lines.jsonl", "w", encoding="utf-8") as handle:
                for number, text, why in rejected:
                    handle.write(json.dumps({"line": number, "why": why, "text": text}) + "\n")
                for number, record, (file, why) in dropped:
                    handle.write(json.dumps({"line": number, "why": f"{file}: {why}", "text": json.dumps(record)}) + "\n")
            records = result.good[path] + rebuilt
            write_manifest(path, records, f"{TMP_PREFIX}repair-{path.name}")
            rewritten.append(path.name)
        if result.rebuildable and not (root / MANIFEST).exists():
            records = [recovered_record(sid, size) for sid, size in sorted(result.rebuildable.items())]
            write_manifest(root / MANIFEST, records, f"{TMP_PREFIX}repair-{MANIFEST}")
            rewritten.append(MANIFEST)
        if result.settings and (root / DATASET_INFO).exists():
            moved.append(_move_aside(root, DATASET_INFO, aside))
        return {"samples": result.samples + len(result.rebuildable), "rebuilt": sorted(result.rebuildable),
                "rejected_lines": sum(len(v) for v in result.rejected_lines.values()),
                "rejected_records": [r["id"] for _, _, r, _ in result.rejected_records],
                "moved": [str(p.relative_to(root)) for p in moved], "manifests_rewritten": rewritten,
                "recovered": str(aside) if aside.exists() else None}
    finally:
        for handle in handles:
            handle.close()


# --- WebDataset shards ---------------------------------------------------------------------------------------------

@dataclass
class ShardAnalysis:
    """What ``analyse_shards`` found in a shard folder: per finished shard its good and bad index rows."""

    root: str
    good: dict = field(default_factory=dict)  # shard name -> [index row]
    bad: dict = field(default_factory=dict)  # shard name -> [(row or None, why)]
    unreadable: list = field(default_factory=list)  # shard names whose index or tar cannot be read
    unfinished: list = field(default_factory=list)  # tars without an index
    temporary: list = field(default_factory=list)  # partial writes
    settings: list = field(default_factory=list)

    @property
    def samples(self):
        return sum(len(rows) for rows in self.good.values())

    def findings(self):
        found = list(self.settings)
        found += [Finding(os.path.basename(p), "a partial write of a killed run (the next run or repair removes it)")
                  for p in self.temporary]
        found += [Finding(f"{name}.tar", "has no index: a run stopped before finishing this shard (--resume writes it "
                          "again; repair moves it aside)") for name in self.unfinished]
        found += [Finding(f"{name}.parquet", why) for name, why in self.unreadable]
        for name, problems in self.bad.items():
            found += [Finding(f"{name}.tar" + (f":{row['key']}" if row else ""), why) for row, why in problems]
        return found


def _shard_problem(dataset, index, row, members):
    """Why sample ``index`` of a ShardDataset (one shard's rows) is damaged, or None."""
    from .triplets import parse_manifest_line

    for member in ("source", "mask", "target", "json"):
        name = f"{row['key']}.{member}.png" if member != "json" else f"{row['key']}.json"
        if members.get(name) != (row[f"{member}_offset"], row[f"{member}_size"]):
            return f"its {member} member {name} is not where the index says"
    try:
        stored = dataset._read(0, row["json_offset"], row["json_size"]).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return f"its record cannot be read ({error})"
    if stored != row["record"]:
        return "its .json record differs from the index"
    record, why = parse_manifest_line(stored)
    if record is None or record["id"] != row["id"]:
        return why or "its record names another sample"
    try:
        check_origin(record.get("origin"))
        dataset[index]
    except ValueError as error:
        return str(error).replace(dataset.shards[0] + ":", "")
    return None


def analyse_shards(root, host=None):
    """Sort every shard of the shard folder ``root`` (local or a URL): finished shards' samples good or bad (each
    member where the index says, the record the same in both, PNGs readable, sizes right, masks binary; ids once),
    tars without an index, partial writes, dataset.json."""
    import tarfile

    from .shards import ShardDataset, ShardStore, shard_files

    host = host or Host()
    store = ShardStore(root)
    if not store.exists():
        raise UsageError(f"dataset folder {root} does not exist")
    result = ShardAnalysis(os.fspath(root), unfinished=store.unfinished(), temporary=store.temporary())
    try:
        store.read_info()
    except UsageError as error:
        result.settings.append(Finding(DATASET_INFO, str(error).split(";")[0]))
    names = store.finished()
    seen = {}
    for done, name in enumerate(names, 1):
        host.check_interrupt()
        tar_path = shard_files(store.root, name)[0]
        try:
            dataset = ShardDataset(tar_path)
            with store.fs.open(shard_files(store.base, name)[0], "rb") as handle:
                with tarfile.open(fileobj=handle, mode="r:") as tar:
                    members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        except (UsageError, ValueError, OSError, tarfile.TarError) as error:
            result.unreadable.append((name, str(error).split("; nothing was changed")[0]))
            continue
        good, bad = [], []
        rows = dataset._rows
        for index, row in enumerate(rows):
            if row["id"] in seen:
                bad.append((row, f"repeats sample {row['id']!r} of {seen[row['id']]}.tar"))
                continue
            problem = _shard_problem(dataset, index, row, members)
            if problem:
                bad.append((row, problem))
            else:
                seen[row["id"]] = name
                good.append(row)
        named = {f"{row['key']}.{m}.png" for row in rows for m in SUBDIRS} | {f"{row['key']}.json" for row in rows}
        bad += [(None, f"member {member} is named by no index row") for member in sorted(set(members) - named)]
        result.good[name] = good
        if bad:
            result.bad[name] = bad
        host.progress(done, len(names), "shards")
    return result


def repair_shards(root, host=None):
    """Mend a shard folder; nothing is deleted: partial writes, tars without an index and shards whose index cannot
    be read go to ``recovered/<time>/`` (a resumed run makes such shards again); a shard with damaged samples is
    written again with its good ones, the original moved aside first. Returns a report dict."""
    from .shards import ShardFile, ShardStore, shard_files

    result = analyse_shards(root, host)
    store = ShardStore(root)
    aside = "/".join([store.base.rstrip("/"), RECOVERED, time.strftime("%Y%m%d-%H%M%S", time.gmtime())])
    moved = []

    def move(path):
        store.fs.makedirs(aside, exist_ok=True)
        target = f"{aside}/{path.rsplit('/', 1)[-1]}"
        store.fs.mv(path, target)
        moved.append(target)

    for path in result.temporary:
        move(path)
    for name in result.unfinished:
        move(shard_files(store.base, name)[0])
    for name, _ in result.unreadable:
        for path in shard_files(store.base, name):
            if store.fs.exists(path):
                move(path)
    rewritten = []
    for name, problems in result.bad.items():
        from .shards import ShardDataset

        dataset = ShardDataset(shard_files(store.root, name)[0])
        keep = {row["id"] for row in result.good[name]}
        fresh = ShardFile(store.root, f"{name}.repaired")
        for index, record in enumerate(dataset.records):
            if record["id"] in keep:
                fresh.add(record["id"], dataset.encoded(index), record)
        fresh.commit()
        for path in shard_files(store.base, name):
            move(path)
        for old, new in zip(shard_files(store.base, f"{name}.repaired"), shard_files(store.base, name)):
            store.fs.mv(old, new)
        rewritten.append(name)
    return {"samples": result.samples, "rebuilt": [], "rejected_lines": 0,
            "rejected_records": [row["id"] for problems in result.bad.values() for row, _ in problems if row],
            "moved": moved, "manifests_rewritten": rewritten, "recovered": aside if moved else None}
