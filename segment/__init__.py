"""Core (no ComfyUI): object masks from words, on the GroundingDINO / SAM / SAM 2 adapters of dataset_tools."""
