"""Run EraseKit workflows without ComfyUI's server or browser: ``erasekit-run`` over folders of images.

ComfyUI-facing like ``nodes/`` (it imports ComfyUI, in-process, only when a run starts), not core:
- ``runtime``: start a real ComfyUI in this process (arguments, model folders, this pack as a custom node)
  and run prompts through its own validator and executor;
- ``workflow``: the UI-format → API-prompt converter (the frontend's graphToPrompt) and input overrides;
- ``binding``: which nodes load the image and the mask and which save results, rebound per item;
- ``run``: the folder loop (resume, atomic outputs, per-item errors); ``cli``: the ``erasekit-run`` command.
"""
