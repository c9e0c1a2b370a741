"""dataset_tools — EraseKit core (plain Python + torch; never imports ComfyUI)."""
