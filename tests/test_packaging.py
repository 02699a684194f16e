"""The package layout: omgseg.* imports work and the standard library is never shadowed."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_FOLDERS = {"platform": "omgseg.platform", "model": "omgseg.model", "datasets": "omgseg.datasets",
                "dashboards": "omgseg.dashboards", "core": "omgseg.core"}


def _run_in_root(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_stdlib_platform_not_shadowed_from_repo_root():
    out = _run_in_root("import platform; print(platform.system()); print(platform.__file__)")
    system, where = out.splitlines()
    assert system in {"Linux", "Darwin", "Windows"}
    assert Path(where).parent != ROOT / "platform", where
    assert "site-packages" not in where and where.endswith("platform.py"), where


def test_omgseg_packages_import_from_repo_root():
    out = _run_in_root(
        "from omgseg.platform import config; from omgseg.datasets import clip; "
        "import omgseg.model; print(config.__file__); print(clip.__file__)"
    )
    config_file, clip_file = out.splitlines()
    assert Path(config_file) == ROOT / "platform" / "config.py"
    assert Path(clip_file) == ROOT / "datasets" / "clip.py"


def test_code_folders_have_no_top_level_init():
    for folder in CODE_FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py shadows a module"


def test_every_code_folder_is_a_listed_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    package_dir = setuptools["package-dir"]
    for folder, package in CODE_FOLDERS.items():
        for path in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in path.parts or not any(path.glob("*.py")):
                continue
            rel = path.relative_to(ROOT / folder)
            name = ".".join([package, *rel.parts])
            assert name in packages, f"{path} holds code but {name} is not in [tool.setuptools] packages"
            assert Path(package_dir[name]) == path.relative_to(ROOT), f"package-dir of {name}"


def test_the_shipped_package_is_the_wheel_tree_without_top_level_platform(tmp_path):
    from omgseg.platform.cluster import build_wheel, shipped_package

    package = shipped_package(build_wheel(tmp_path / "wheel"), tmp_path / "package")
    assert package.name == "omgseg" and not (package.parent / "platform").exists()
    assert (package / "platform" / "study" / "driver.py").is_file() and (package / "model" / "configs" / "tiny_clip.json").is_file()
    assert not (package / "__init__.py").exists()  # a namespace package, as installed


def test_the_arrows_go_one_way():
    """The model needs no data package, and the dashboards no Ray (docs/architecture.md)."""
    out = _run_in_root(
        "import sys; import omgseg.model.omgseg, omgseg.model.inference; "
        "print(sorted(m for m in sys.modules if m.startswith('omgseg.datasets')))")
    assert out == "[]", out
    out = _run_in_root(
        "import sys; import omgseg.dashboards.report, omgseg.dashboards.query, omgseg.dashboards.ui; "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    assert out == "[]", out
