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
