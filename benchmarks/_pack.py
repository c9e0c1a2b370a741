"""Import this checkout as the ``erasekit`` package, whatever its folder is called and whatever else is installed
(a ComfyUI custom_nodes clone, the GPU staging folder, a developer's worktree beside an editable install)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_checkout():
    """The ``erasekit`` package of this checkout (``sys.modules["erasekit"]`` is replaced by it)."""
    package = sys.modules.get("erasekit")
    if package is not None and Path(package.__file__).resolve().parent == ROOT:
        return package
    spec = importlib.util.spec_from_file_location("erasekit", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["erasekit"] = package
    spec.loader.exec_module(package)
    return package
