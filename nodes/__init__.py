"""ComfyUI-facing layer: thin V3 nodes over the core (``erasers``, ``dataset_tools``, ``train``).

Every public module here (name not starting with ``_``) exposes ``NODES``, a list of ``io.ComfyNode``
classes; ``all_nodes`` collects them, so adding a node file needs no registration anywhere else.
"""
import importlib
import pkgutil


def all_nodes():
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(module.NODES)
    return found
