"""The package's shape: one installed package, the original's names at the root as the same module objects, the
commands from an installed copy without a checkout, and no torch behind ``--help``."""

from __future__ import annotations

import importlib
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
from conftest import REPO_ROOT

from simsearch import cli, originals


@pytest.mark.parametrize("name", sorted(originals.ORIGINAL_NAMES))
def test_each_original_name_is_the_package_module_itself(name):
    original = importlib.import_module(name)
    assert original is importlib.import_module(originals.ORIGINAL_NAMES[name])
    assert pathlib.Path(original.__file__).parent.parent == REPO_ROOT  # simsearch/<module>.py


def test_a_foreign_utils_module_does_not_change_what_counts_as_a_user_error(monkeypatch):
    from simsearch.datasets import DatasetError

    monkeypatch.setitem(sys.modules, "utils", type(sys)("utils"))  # a researcher's own utils.py, loaded first
    assert cli.is_user_error(DatasetError("bad folder"))
    assert not cli.is_user_error(KeyError("a bug"))


def test_installed_names_serve_the_originals_ahead_of_a_same_named_file(tmp_path):
    (tmp_path / "utils.py").write_text("raise SystemExit('the folder utils.py was imported')\n")
    probe = tmp_path / "probe.py"  # a script's own folder comes first on its path, with that utils.py in it
    probe.write_text("import sys\nfrom simsearch import originals\noriginals.install_names()\n"
                     "import utils, banerjee, simsearch.utils, simsearch.datasets\n"
                     "print(utils is simsearch.utils, banerjee is simsearch.datasets, 'torch' in sys.modules)\n")
    completed = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["True", "True", "True"]


PACKAGE_SOURCES = ("simsearch", "p1_similarity_search_rsch.py", "setup.py", "pyproject.toml", "README.md", "LICENSE",
                   "requirements.txt", "requirements-distributed.txt")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """``pip install .`` of this checkout (no dependencies: they are installed already) into a folder of its own."""
    source, target = tmp_path_factory.mktemp("clone"), tmp_path_factory.mktemp("site")
    for name in PACKAGE_SOURCES:  # a copy, so the build leaves nothing in the checkout
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copyfile
        copy(REPO_ROOT / name, source / name)
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)], capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return target


def run_installed(installed: pathlib.Path, where: pathlib.Path, *command: str) -> subprocess.CompletedProcess:
    """A command of the installed copy, run in a folder without a checkout; the environment's packages stay."""
    path = f"{installed}:{sysconfig.get_paths()['purelib']}"
    return subprocess.run(list(command), capture_output=True, text=True, timeout=300, cwd=where,
                          env={"PYTHONPATH": path, "PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": str(where)})


def test_the_install_holds_one_package_with_the_research_script(installed):
    top_level = sorted(path.name for path in installed.iterdir() if not path.name.endswith(".dist-info"))
    assert top_level == ["bin", "simsearch"]
    assert (installed / "simsearch" / "research_script.py").read_text() == \
        (REPO_ROOT / "p1_similarity_search_rsch.py").read_text()
    assert {path.name for path in (installed / "simsearch").iterdir() if path.is_dir()} >= {"classifiers", "classdb"}


@pytest.mark.parametrize(("command", "usage"), [
    ("similarity-search", "--classifier {mean,decorrelated,balanced,lda,auto}"),
    ("similarity-classdb", "{build,add-class,update-class,remove-class,rename-class,classify,calibrate,info,import}"),
    ("similarity-grid", "--datasets DATASETS"),
    ("similarity-distributed", "--rows-per-shard"),
])
def test_the_console_scripts_answer_help_without_a_checkout(installed, tmp_path, command, usage):
    completed = run_installed(installed, tmp_path, str(installed / "bin" / command), "--help")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith(f"usage: {command} ")  # named as typed, not as python -m ...
    assert usage in " ".join(completed.stdout.split())


def test_the_installed_package_imports_its_command_line_without_torch(installed, tmp_path):
    code = ("import sys, simsearch, simsearch.cli\n"
            "print(simsearch.__file__.startswith(sys.argv[1]), 'torch' in sys.modules)")
    completed = run_installed(installed, tmp_path, sys.executable, "-c", code, str(installed))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["True", "False"]


def test_python_m_simsearch_run_is_the_research_script_under_its_own_name():
    completed = subprocess.run([sys.executable, "-m", "simsearch", "run", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith("usage: python -m simsearch run [-h] [--dataset DATASET]")


def test_python_m_simsearch_names_its_command_families():
    completed = subprocess.run([sys.executable, "-m", "simsearch"], capture_output=True, text=True, timeout=60,
                               cwd=REPO_ROOT)
    assert completed.returncode == 2
    assert completed.stderr.startswith("usage: python -m simsearch {run,store,grid,distributed}")


@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO_ROOT / "benchmarks").glob("[a-z]*.py")))
def test_every_benchmark_imports_as_a_module_of_the_benchmarks_package(name):
    """Benchmarks run as ``python -m benchmarks.NAME`` from the repository root, importing each other by package."""
    module = importlib.import_module(f"benchmarks.{name}")
    assert module.__name__ == f"benchmarks.{name}"
