"""Build hook: the research script at the repository root ships inside the package as ``research_script.py``, so
the ``similarity-search`` console script runs where there is no checkout. Everything else is in pyproject.toml."""

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

SCRIPT = pathlib.Path(__file__).resolve().parent / "p1_similarity_search_rsch.py"


class BuildWithResearchScript(build_py):
    def run(self) -> None:
        super().run()
        target = pathlib.Path(self.build_lib) / "simsearch" / "research_script.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SCRIPT, target)


setup(cmdclass={"build_py": BuildWithResearchScript})
