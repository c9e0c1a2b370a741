"""Import this checkout as the ``erasekit`` package, whatever its folder is called and whatever else is installed
(a ComfyUI custom_nodes clone, the GPU staging folder, a developer's worktree beside an editable install)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_checkout(root=ROOT, name="erasekit"):
    """The pack at ``root`` (default: this checkout) imported as the package ``name`` (``sys.modules[name]`` is
    replaced by it); another ``name`` keeps a second checkout apart from the first."""
    root = Path(root).resolve()
    package = sys.modules.get(name)
    if package is not None and Path(package.__file__).resolve().parent == root:
        return package
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package
