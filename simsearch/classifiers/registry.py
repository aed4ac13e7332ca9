"""Classifiers by name: the one place where a command-line name or an estimator becomes the unfitted estimator that a
run fits, on the device where it computes. The script, the protocols, the grid, the analyses and the class store all
call :func:`make_estimator`; :func:`fit_device` is the one rule for where a run's fits compute."""

from __future__ import annotations

from typing import Any

import sklearn.base
import torch

from simsearch.classifiers import baselines, prototypes

ESTIMATOR_NAMES = (*prototypes.CLASSIFIERS, *baselines.BASELINES)


def fit_device(device: str | torch.device | None) -> str | None:
    """Where the classifiers of a run on ``device`` compute: that device for CUDA, else None, the CPU (NumPy for
    the covariance work). An Apple GPU (MPS) has no float64, so fits stay on the CPU there."""
    if device is None:
        return None
    device = torch.device(device)
    return str(device) if device.type == "cuda" else None


def make_estimator(
    classifier: str | sklearn.base.BaseEstimator,
    *,
    device: str | torch.device | None = None,
    class_vectors: bool = False,
    **params: Any,
) -> sklearn.base.BaseEstimator:
    """An unfitted estimator: a fresh one by name (``ESTIMATOR_NAMES``, with ``params`` winning over its preset), or
    an unfitted copy of an estimator. ``device`` (None: keep the estimator's own) applies where it has a ``device``
    parameter; the article's class mean costs a few products per partition and stays in NumPy. ``class_vectors``
    admits only the class-vector family (``prototypes.CLASSIFIERS``), whose statistics a class store keeps."""
    names = tuple(prototypes.CLASSIFIERS) if class_vectors else ESTIMATOR_NAMES
    if not isinstance(classifier, str):
        if params:
            raise TypeError(f"Parameters {sorted(params)} apply to a classifier given by name, not to an estimator.")
        estimator = sklearn.base.clone(classifier)
    elif classifier in prototypes.CLASSIFIERS:
        estimator = prototypes.make_classifier(classifier, **params)
    elif classifier in names:
        kind, preset = baselines.BASELINES[classifier]
        estimator = kind(**{**preset, **params})
    else:
        raise ValueError(f"Unknown classifier '{classifier}'; use one of {', '.join(names)}.")
    if device is not None and "device" in estimator.get_params():
        estimator.set_params(device=str(torch.device(device)))
    return estimator
