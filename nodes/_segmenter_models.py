"""GroundingDINO and SAM / SAM 2 model folders (Text to Mask's and the dataset nodes') and the dataset nodes' choices.

GroundingDINO comes as a transformers folder (config.json + weights) in models/grounding-dino; SAM and SAM 2 as
transformers folders in models/sams or models/sam2, or as the original checkpoint files ComfyUI users keep there.
"""
import os

import folder_paths

from ._paths import register_folder, transformers_folders

NONE = "none"
DINO_FOLDER = register_folder("grounding-dino")
SAM_FOLDER = register_folder("sams")
SAM2_FOLDER = register_folder("sam2")
SAM_FOLDERS = (SAM_FOLDER, SAM2_FOLDER)
DINO_URL = "https://huggingface.co/IDEA-Research/grounding-dino-tiny"
SAM_URL = ("https://huggingface.co/facebook/sam2.1-hiera-large (transformers folder, or its sam2.1_hiera_large.pt "
           "checkpoint in models/sam2) or https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth "
           "(segment-anything checkpoint in models/sams)")


def dino_choices():
    return [NONE] + transformers_folders(DINO_FOLDER)


def sam_choices():
    """none, transformers SAM / SAM 2 folders, and checkpoints in models/sams and models/sam2."""
    files = {f for name in SAM_FOLDERS for f in folder_paths.get_filename_list(name)}
    return [NONE] + sorted(set(transformers_folders(*SAM_FOLDERS)) | files)


def _resolve(names, choice, url, files_allowed):
    for name in names:
        for base in folder_paths.get_folder_paths(name):
            path = os.path.join(base, choice)
            if os.path.isfile(os.path.join(path, "config.json")) or (files_allowed and os.path.isfile(path)):
                return path
    where = ", ".join(p for n in names for p in folder_paths.get_folder_paths(n))
    raise FileNotFoundError(f"model {choice!r} was not found in {where}. Public weights: {url}.")


def dino_path(choice):
    """Full path of a GroundingDINO choice, None for none."""
    return None if choice in (None, NONE) else _resolve([DINO_FOLDER], choice, DINO_URL, files_allowed=False)


def sam_path(choice):
    """Full path of a SAM / SAM 2 choice, None for none."""
    return None if choice in (None, NONE) else _resolve(SAM_FOLDERS, choice, SAM_URL, files_allowed=True)
