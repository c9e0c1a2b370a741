"""Install metadata agrees with itself: pyproject's dependencies are requirements.txt, its extras are the
requirements-<extra>.txt files that jobs.require names, and the build backend reads the PEP 639 licence string."""
import re
import tomllib
from pathlib import Path

import pytest

from erasekit import jobs

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(path):
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return sorted(line for line in lines if line)


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dependencies_are_the_requirement_files(pyproject):
    project = pyproject["project"]
    assert sorted(project["dependencies"]) == requirement_lines(ROOT / "requirements.txt")
    for extra, packages in project["optional-dependencies"].items():
        assert sorted(packages) == requirement_lines(ROOT / f"requirements-{extra}.txt"), extra
    assert not any(re.match(r"torch\b", line) for line in requirement_lines(ROOT / "requirements.txt")), \
        "torch (and torchvision, which pins it) belong to ComfyUI"


def test_setuptools_reads_the_licence_string(pyproject):
    assert isinstance(pyproject["project"]["license"], str)
    pins = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert pins and int(re.search(r">=\s*(\d+)", pins[0]).group(1)) >= 77  # PEP 639 support


def test_missing_extra_names_the_package_its_version_and_the_file():
    error = jobs.missing_extra("transformers", "dataset", "SAM 2 checkpoints")
    assert "pip install 'transformers>=4.56'" in str(error)
    named = jobs.requirements_file("dataset")
    assert Path(named).samefile(ROOT / "requirements-dataset.txt") and f"pip install -r {named}" in str(error)
    with pytest.raises(jobs.MissingExtra, match=r"pip install 'pycocotools'"):
        jobs.require("pycocotools_that_is_not_there", "dataset", "COCO", package="pycocotools")
    with pytest.raises(jobs.MissingExtra, match=r"lacks NoSuchModel: upgrade it"):
        jobs.require("json", "dataset", "a feature", package="transformers", names=("NoSuchModel",))
    assert jobs.require("json", None, "JSON").dumps([]) == "[]"
