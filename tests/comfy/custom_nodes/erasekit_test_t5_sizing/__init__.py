"""Test-only ComfyUI custom node: size T5 from its file (``install_t5_sizing`` in tests/comfy/tiny/flux.py).

A ComfyUI in a subprocess (``erasekit-run`` under test) needs the same shim the in-process harness installs to
load the tiny T5; ComfyUI's own custom-node loading brings it in (``--custom-nodes`` with this folder named in
``--whitelist-custom-nodes``). It registers no node.
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("erasekit_tiny_flux_for_subprocess",
                                               Path(__file__).resolve().parents[2] / "tiny" / "flux.py")
_flux = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flux)
_flux.install_t5_sizing()

NODE_CLASS_MAPPINGS = {}
