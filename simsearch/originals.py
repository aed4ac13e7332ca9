"""The original project's module names, each bound to the package module that replaces it.

A Spyder user in the repository folder imports ``banerjee`` or ``engine`` from the files of those names at the root,
which hand over the package's module object. Where there is no checkout (an installed package), the research
script still imports those names: :func:`install_names` serves them from the package, without importing anything
until the script asks.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import pathlib
import sys

ORIGINAL_NAMES = {
    "banerjee": "simsearch.datasets", "engine": "simsearch.encoders", "cumacc": "simsearch.cumacc",
    "store": "simsearch.store", "randomness": "simsearch.randomness", "utils": "simsearch.utils",
    "visual": "simsearch.visual",
}
RESEARCH_SCRIPT = "p1_similarity_search_rsch.py"


class _OriginalNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an original name first on the import path and loads it as the package module it stands for."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in ORIGINAL_NAMES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> object:
        return importlib.import_module(ORIGINAL_NAMES[spec.name])

    def exec_module(self, module: object) -> None:
        """Nothing to run: the package module has run already."""


def install_names() -> None:
    """Serve the original's names from the package in this process, ahead of any same-named module on the path
    (a researcher's own ``utils.py`` must not replace ours in the script)."""
    if not any(isinstance(finder, _OriginalNames) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OriginalNames())


def research_script() -> pathlib.Path:
    """The research script: the checkout's own file beside the package, else the copy built into the package."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package.parent / RESEARCH_SCRIPT, package / "research_script.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"The research script is neither at {package.parent / RESEARCH_SCRIPT} nor in the "
                            f"installed package {package}; reinstall the package (pip install .).")
