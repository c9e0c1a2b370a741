"""Model folders and model-file look-ups shared by every node module.

EraseKit never downloads: a missing file is an error naming the file, the folder it is expected in and
where the public weights live.
"""
import os

import folder_paths


def register_folder(name, extensions=None):
    """Make ``models/<name>`` a ComfyUI model folder (idempotent); returns its name."""
    exts = set(extensions or folder_paths.supported_pt_extensions)
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], exts)
    return name


def model_file(folder, filename, url=None):
    """Full path of ``filename`` in ComfyUI's ``folder`` or a clear error."""
    path = folder_paths.get_full_path(folder, filename) if filename else None
    if path is None:
        where = folder_paths.get_folder_paths(folder) if folder in folder_paths.folder_names_and_paths else []
        hint = f" Public weights: {url}." if url else ""
        raise FileNotFoundError(
            f"Model file {filename!r} was not found in ComfyUI's '{folder}' folder ({', '.join(where) or 'not registered'})."
            f"{hint}"
        )
    return path


def user_path(value, bases, what, must_exist=True):
    """A path typed into a node: absolute, or relative to the first of ``bases`` (ComfyUI's input/output
    folders) where it exists. Empty or missing paths are errors that name ``what`` and where it was looked for."""
    bases = [bases] if isinstance(bases, str) else list(bases)
    value = (value or "").strip()
    if not value:
        raise ValueError(f"{what} is empty: give a path (absolute, or relative to {' or '.join(bases)})")
    candidates = [value] if os.path.isabs(value) else [os.path.join(base, value) for base in bases]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    if not must_exist:
        return candidates[0]
    raise FileNotFoundError(f"{what} {value!r} does not exist (not found in {', '.join(candidates)})")


def dataset_folder(value, what="dataset folder"):
    """A triplet dataset folder: absolute, or in ComfyUI's output folder (where the dataset nodes write) or
    its input folder."""
    return user_path(value, [folder_paths.get_output_directory(), folder_paths.get_input_directory()], what)


def transformers_folders(*folders):
    """Sub-folders holding a transformers model (config.json) in ComfyUI's model folders ``folders``."""
    found = set()
    for folder in folders:
        for base in folder_paths.get_folder_paths(folder):
            if os.path.isdir(base):
                found.update(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "config.json")))
    return sorted(found)


def model_choices(folder):
    """Model files and transformers model folders (sub-folders holding a config.json) in ComfyUI's ``folder``."""
    return sorted(set(folder_paths.get_filename_list(folder)) | set(transformers_folders(folder)))


def model_path(folder, name, url=None):
    """Full path of a model file or a transformers model folder ``name`` in ComfyUI's ``folder``, or a clear error."""
    for base in folder_paths.get_folder_paths(folder):
        if name and os.path.isfile(os.path.join(base, name, "config.json")):
            return os.path.join(base, name)
    return model_file(folder, name, url)


def dataset_source(value, what="dataset"):
    """A training dataset typed into a node: a triplet folder or a WebDataset shard folder (as ``dataset_folder``),
    a shard file or pattern (``shards/shard-{000000..000009}.tar``, ``shards/*.tar``) relative to ComfyUI's
    output (or input) folder or absolute, or an fsspec URL (``s3://...``, taken as it is)."""
    from ..dataset_tools.shards import shard_paths
    from ..dataset_tools.sources import is_url

    value = (value or "").strip()
    if is_url(value) or not (value.endswith(".tar") or any(c in value for c in "{*?[")):
        return value if is_url(value) else dataset_folder(value, what)
    bases = [folder_paths.get_output_directory(), folder_paths.get_input_directory()]
    candidates = [value] if os.path.isabs(value) else [os.path.join(base, value) for base in bases]
    for candidate in candidates:
        try:
            shard_paths(candidate)
            return candidate
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"{what} {value!r} names no WebDataset shard (looked in {', '.join(candidates)})")
