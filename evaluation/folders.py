"""Folders of removal samples, paired by file stem: a photo, its mask, and (for scoring) the clean target.

Three layouts are understood, by ``erasekit-run`` (inputs) and ``erasekit-eval`` (references) alike:
- a triplet dataset (``source/``, ``mask/``, ``target/``, ``manifest*.jsonl``; dataset_tools/triplets.py): the
  manifest names the samples;
- RemovalBench's layout (OmniEraser, arXiv 2501.07397): ``images/``, ``masks/`` and ``gt/`` side by side;
- plain folders given one by one (``--images DIR --masks DIR``), files paired by stem (``a.jpg`` + ``a.png``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..dataset_tools.imageio import IMAGE_EXTENSIONS
from ..dataset_tools.triplets import TripletDataset, manifest_paths

# Sub-folder names of each layout: (photos, masks, clean targets)
TRIPLET_LAYOUT = ("source", "mask", "target")
REMOVALBENCH_LAYOUT = ("images", "masks", "gt")


@dataclass(frozen=True)
class Sample:
    """One removal sample: its id (the file stem) and the files that exist for it (None where absent)."""

    id: str
    image: Path | None = None
    mask: Path | None = None
    target: Path | None = None


@dataclass(frozen=True)
class Layout:
    """Where a folder keeps its photos, masks and targets (None: this folder has none)."""

    kind: str  # "triplet", "removalbench" or "folder"
    root: Path
    images: Path | None
    masks: Path | None
    targets: Path | None


def images_by_stem(folder):
    """``{stem: path}`` of the image files directly in ``folder``; two files with one stem are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        if path.stem in found:
            raise ValueError(f"{folder} holds two images named {path.stem!r} ({found[path.stem].name} and "
                             f"{path.name}): samples are paired by file stem, so each stem must be unique")
        found[path.stem] = path
    return found


def detect_layout(folder):
    """The layout of ``folder``: a triplet dataset, RemovalBench's images/masks/gt, or a plain image folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    if manifest_paths(folder) and (folder / "source").is_dir():
        return Layout("triplet", folder, *(folder / sub if (folder / sub).is_dir() else None
                                           for sub in TRIPLET_LAYOUT))
    subs = [folder / sub if (folder / sub).is_dir() else None for sub in REMOVALBENCH_LAYOUT]
    if any(subs):
        return Layout("removalbench", folder, *subs)
    return Layout("folder", folder, folder, None, None)


def triplet_samples(root):
    """The samples a triplet dataset's manifests name (source, mask and target files), ordered by id."""
    dataset = TripletDataset(root)
    return [Sample(r["id"], dataset.root / r["source"], dataset.root / r["mask"], dataset.root / r["target"])
            for r in dataset.iter_records()]


def layout_samples(layout):
    """Every sample of a layout; for folders, the union of stems over its photos, masks and targets."""
    if layout.kind == "triplet":
        return triplet_samples(layout.root)
    return pair_by_stem(images=layout.images, masks=layout.masks, targets=layout.targets)


def pair_by_stem(images=None, masks=None, targets=None):
    """Samples for the union of stems found in the given folders (a file missing from one folder is None)."""
    tables = {key: images_by_stem(folder) if folder is not None else {}
              for key, folder in (("image", images), ("mask", masks), ("target", targets))}
    stems = sorted(set().union(*tables.values()))
    return [Sample(stem, tables["image"].get(stem), tables["mask"].get(stem), tables["target"].get(stem))
            for stem in stems]
