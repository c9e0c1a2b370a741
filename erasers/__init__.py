"""erasers — EraseKit core (plain Python + torch; never imports ComfyUI)."""
