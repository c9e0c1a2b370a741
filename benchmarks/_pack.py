"""Import this checkout as the ``erasekit`` package, whatever its folder is called and whatever else is installed
(a ComfyUI custom_nodes clone, the GPU staging folder, a developer's worktree beside an editable install)."""
import importlib.util
import os
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


def import_file(path, name):
    """The Python file at ``path`` (not part of a package: a test helper, another benchmark) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def link_checkout(folder, root=ROOT):
    """``import erasekit`` resolves to ``root`` here and in every process started from now on (pool workers, Ray's
    workers, subprocesses): a link named ``erasekit`` in ``folder`` goes first on ``sys.path`` and ``PYTHONPATH``,
    and modules imported from elsewhere are forgotten. Unlike ``import_checkout`` this reaches other processes."""
    folder, root = Path(folder), Path(root).resolve()
    link = folder / "erasekit"
    if not (link.is_symlink() and Path(os.readlink(link)) == root):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".erasekit-{os.getpid()}"  # made aside then renamed: concurrent callers never see half a link
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(root, target_is_directory=True)
        os.replace(tmp, link)
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    for name in [m for m in sys.modules if m == "erasekit" or m.startswith("erasekit.")]:
        del sys.modules[name]
