"""The layering rules of CONTRIBUTING.md, read from the source: the core never imports ComfyUI, and the pack imports
itself relatively (ComfyUI loads it from custom_nodes under its folder's name, where ``erasekit`` does not exist)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("erasers", "dataset_tools", "train", "segment", "evaluation", "jobs.py")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                 "execution", "node_helpers", "latent_preview"}
PACK_FOLDERS = ("erasers", "dataset_tools", "train", "segment", "evaluation", "headless", "nodes")


def python_files(*names):
    for name in names:
        path = ROOT / name
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def absolute_imports(path):
    """Top-level package names of ``path``'s absolute imports (inside functions too: lazy imports count)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", list(python_files(*CORE)), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_never_imports_comfyui(path):
    assert not set(absolute_imports(path)) & COMFY_MODULES


@pytest.mark.parametrize("path", list(python_files(*PACK_FOLDERS, "jobs.py", "__init__.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_pack_imports_itself_relatively(path):
    assert "erasekit" not in set(absolute_imports(path))


def test_the_rules_see_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import folder_paths\n    from erasekit.erasers import layout\n")
    assert {"folder_paths", "erasekit"} <= set(absolute_imports(bad))
