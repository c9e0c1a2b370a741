"""Entry point of an isolated video-mining process: ``python _video_worker.py FD`` (see video_isolation.py).

The pack is imported from this file's own location under a private package name, so the child never depends
on how its parent imported the pack (``erasekit`` from pip, or ComfyUI's ``custom_nodes/<any name>``) and never
on an ``erasekit`` installed from another checkout.
"""
import importlib
import importlib.util
import signal
import sys
from pathlib import Path

PACKAGE = "_erasekit_video_worker"


def load_isolation_module():
    """``dataset_tools.video_isolation`` of the pack this file belongs to."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.dataset_tools.video_isolation")


if __name__ == "__main__":
    # Python put this folder first on sys.path; its modules (video_decode, imageio, ...) must not shadow libraries.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    # Ctrl-C reaches the whole process group; the parent decides, then closes the pipe or says stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_isolation_module().serve(int(sys.argv[1]))
