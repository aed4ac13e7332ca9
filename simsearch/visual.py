"""Figures for checking results by eye: predictions on images, the cumulative accuracy function, confusion
matrices and 2-D embedding maps.

Every function returns its Figure. With ``filename`` the figure is written atomically (a crash never leaves a
truncated image behind) in the format named by the file suffix, then closed so long runs do not pile up open
figures. Without it the figure stays open and is shown only on an interactive backend, so the functions also run
headless (Agg) in tests and batch jobs.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backends import BackendFilter, backend_registry
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from simsearch import store, utils
from simsearch.classifiers import probabilities

__all__ = [
    "draw_analysis",
    "draw_confusion_matrix",
    "draw_cumulative_accuracy",
    "draw_embedding_map",
    "draw_score_histogram",
    "show_images",
]

PathLike = str | os.PathLike

GRID_ROWS, GRID_COLS = 2, 3
MAX_TICK_LABELS = 100
MAX_LEGEND_CLASSES = 20
MAX_ANNOTATED_CLASSES = 20


def _is_interactive_backend() -> bool:
    backend = matplotlib.get_backend().lower()
    return backend not in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)


def _finish(fig: Figure, filename: PathLike | None) -> Figure:
    """Save-and-close when a file is wanted, else show on an interactive backend; never block or warn headless."""
    if filename is None:
        if _is_interactive_backend():
            fig.show()
        return fig
    path = pathlib.Path(filename)
    file_format = path.suffix.lstrip(".").lower() or matplotlib.rcParams["savefig.format"]
    supported = fig.canvas.get_supported_filetypes()
    if file_format not in supported:
        plt.close(fig)
        raise ValueError(
            f"Cannot save a figure to {path}: unknown format {file_format!r}. "
            f"Use one of the suffixes {sorted(supported)}."
        )
    try:
        # The temporary file has its own suffix, so the format must be given explicitly.
        with store.atomic_path(path) as temporary:
            fig.savefig(temporary, format=file_format)
    finally:
        plt.close(fig)
    return fig


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def draw_image(
    *,
    ax: plt.Axes,
    image: torch.Tensor | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
    title_colour: str = "black",
) -> None:
    """Draw one normalised CHW RGB image on ``ax``, undoing the model's ``mean``/``std`` normalisation."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
    if not len(mean) == len(std) == 3:
        raise ValueError(f"mean and std need one value per RGB channel; got {len(mean)} and {len(std)}.")
    image = _to_numpy(image).astype(np.float64)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be an RGB CHW array (3, H, W); got shape {image.shape}.")
    ax.imshow(np.clip(image * std + mean, 0.0, 1.0).transpose(1, 2, 0))
    if title is not None:
        ax.set_title(_plain_text(title), color=title_colour)


def show_images(
    *,
    inputs: torch.Tensor,
    targets: Sequence[str],
    predictions: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    figsize: tuple[float, float] = (8, 8),
    filename: PathLike | None = None,
) -> Figure:
    """Show up to 6 normalised CHW images with target and predicted labels; wrong predictions titled in red.

    ``mean``/``std`` are the normalisation of the model's data config; they are undone so the images look natural.
    """
    images = _to_numpy(inputs).astype(np.float64)
    if images.ndim != 4 or len(images) == 0 or images.shape[1] != 3:
        raise ValueError(f"inputs must be a non-empty batch of RGB CHW images (N, 3, H, W); got shape {images.shape}.")
    if not len(images) == len(targets) == len(predictions):
        raise ValueError(
            f"Got {len(images)} images, {len(targets)} targets and {len(predictions)} predictions; they must match."
        )
    fig, axes = plt.subplots(nrows=GRID_ROWS, ncols=GRID_COLS, figsize=figsize, constrained_layout=True)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(images):
            continue
        draw_image(
            ax=ax, image=images[index], mean=mean, std=std,
            title=f"targ.: {targets[index]}\npred.: {predictions[index]}",
            title_colour="black" if targets[index] == predictions[index] else "red",
        )
    return _finish(fig, filename)


def _plain_text(text: str) -> str:
    """Text shown as written: a ``$`` would otherwise start matplotlib's math mode (and can fail to render), and a
    control character or an undecodable byte of a label is spelt as an escape (``utils.printable``), so no
    "Glyph missing" warning carries it raw to the terminal."""
    return "\n".join(utils.printable(line) for line in str(text).split("\n")).replace("$", r"\$")


def draw_cumulative_accuracy(
    *,
    shares: np.ndarray,
    cum_accs: np.ndarray,
    band: tuple[np.ndarray, np.ndarray] | None = None,
    figsize: tuple[float, float] = (8, 8),
    filename: PathLike | None = None,
    title: str = "Cumulative accuracy function",
) -> Figure:
    """Plot the cumulative accuracy function at its sample points; ``band = (low, high)`` shades its spread
    (e.g. a confidence band over repeated partitions)."""
    shares = _to_numpy(shares).ravel()
    cum_accs = _to_numpy(cum_accs).ravel()
    if shares.shape != cum_accs.shape:
        raise ValueError(f"shares and cum_accs must have the same length; got {len(shares)} and {len(cum_accs)}.")
    fig, ax = plt.subplots(figsize=figsize, constrained_layout=True)
    fig.suptitle(_plain_text(title), wrap=True)
    if band is not None:
        low, high = (_to_numpy(bound).ravel() for bound in band)
        if low.shape != shares.shape or high.shape != shares.shape:
            raise ValueError(
                f"band must be (low, high) with {len(shares)} values each; got {len(low)} and {len(high)}."
            )
        # A t interval can reach past the [0, 1] range that accuracy lives in; the shading stops at the bounds.
        ax.fill_between(shares, np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0), alpha=0.3, label="confidence band")
    ax.plot(shares, cum_accs, marker="o", label="cumulative accuracy")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("share of classes")
    ax.set_ylabel("accuracy")
    ax.grid(visible=True)
    if band is not None:
        ax.legend(loc="lower right")
    return _finish(fig, filename)


def draw_confusion_matrix(
    *,
    confusion: np.ndarray,
    labels: Sequence[str],
    filename: PathLike | None = None,
    title: str = "Confusion matrix",
    normalize: bool = False,
) -> Figure:
    """Draw a confusion matrix (rows: true labels, columns: predicted labels) that stays legible up to ~100
    classes: the figure grows with the class count, tick labels shrink, and beyond 100 only every k-th is named.

    ``normalize=True`` divides each row by its total, so cells are shares of the true class (classes of different
    sizes compare fairly); rows without samples stay 0."""
    confusion = _to_numpy(confusion)
    if normalize:
        totals = confusion.sum(axis=1, keepdims=True)
        confusion = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    num_classes = len(labels)
    if confusion.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion must be a square matrix with one row per label ({num_classes}); got {confusion.shape}."
        )
    side = min(max(6.0, 2.0 + 0.22 * num_classes), 28.0)
    fig, ax = plt.subplots(figsize=(side, side), constrained_layout=True)
    image = ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    step = math.ceil(num_classes / MAX_TICK_LABELS)
    ticks = np.arange(0, num_classes, step)
    font_size = float(np.clip(600.0 / max(num_classes, 1), 6.0, 10.0))
    ax.set_xticks(ticks, [_plain_text(labels[i]) for i in ticks], rotation=90, fontsize=font_size)
    ax.set_yticks(ticks, [_plain_text(labels[i]) for i in ticks], fontsize=font_size)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(_plain_text(title), wrap=True)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        threshold = confusion.max() / 2.0
        for (row, col), count in np.ndenumerate(confusion):
            colour = "white" if count > threshold else "black"
            text = f"{count:.2f}" if normalize else f"{count:g}"
            ax.text(col, row, text, ha="center", va="center", color=colour, fontsize=font_size)
    return _finish(fig, filename)


def _class_colours(num_classes: int) -> np.ndarray:
    if num_classes <= MAX_LEGEND_CLASSES:
        return matplotlib.colormaps["tab20"](np.arange(num_classes))
    return matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, num_classes))


def draw_embedding_map(
    *,
    coords: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    mean_coords: np.ndarray | None = None,
    filename: PathLike | None = None,
    title: str = "Embedding map",
) -> Figure:
    """Scatter 2-D embedding coordinates (e.g. t-SNE/PCA) coloured by class, to see which classes overlap.

    ``mean_coords`` (one row per label) marks class means with crosses; a legend is drawn for up to 20 classes.
    """
    coords = _to_numpy(coords)
    targets = _to_numpy(targets).astype(np.int64).ravel()
    num_classes = len(labels)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(targets):
        raise ValueError(
            f"coords must have shape (N, 2) with one target per row; got {coords.shape} and {len(targets)} targets."
        )
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets must be label indexes in [0, {num_classes}); got {targets.min()}..{targets.max()}.")
    colours = _class_colours(num_classes)
    fig, ax = plt.subplots(figsize=(9, 8), constrained_layout=True)
    ax.scatter(coords[:, 0], coords[:, 1], c=colours[targets], s=12, alpha=0.7, linewidths=0)
    if mean_coords is not None:
        mean_coords = _to_numpy(mean_coords)
        if mean_coords.shape != (num_classes, 2):
            raise ValueError(f"mean_coords must have shape ({num_classes}, 2); got {mean_coords.shape}.")
        ax.scatter(
            mean_coords[:, 0], mean_coords[:, 1], c=colours, marker="X", s=160, edgecolors="black", linewidths=1.0
        )
    if num_classes <= MAX_LEGEND_CLASSES:
        handles = [
            Line2D([], [], linestyle="", marker="o", color=colours[index], label=labels[index])
            for index in np.unique(targets)
        ]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    ax.set_title(_plain_text(title + (" (crosses: class means)" if mean_coords is not None else "")), wrap=True)
    return _finish(fig, filename)


def draw_score_histogram(
    *, known: np.ndarray, unknown: np.ndarray, threshold: float, filename: PathLike | None, title: str
) -> Figure:
    """Histograms of the unknown score for samples of known and of hidden classes, with the threshold: how much
    the two overlap is what the AUROC summarises."""
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    bins = np.histogram_bin_edges(np.r_[known, unknown], bins=50)
    ax.hist(known, bins=bins, alpha=0.6, density=True, label=f"known classes ({len(known)})")
    ax.hist(unknown, bins=bins, alpha=0.6, density=True, label=f"hidden classes ({len(unknown)})")
    ax.axvline(threshold, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("score_samples (higher = known)")
    ax.set_ylabel("density")
    ax.set_title(_plain_text(title), fontsize=9, wrap=True)
    ax.legend()
    return _finish(fig, filename)


def draw_reliability(binned: probabilities.Reliability, *, filename: PathLike | None, title: str) -> Figure:
    """Reliability diagram: each confidence bin's accuracy against its mean confidence (on the diagonal where the
    probabilities are calibrated), with the bins' sample counts below."""
    filled = binned.counts > 0
    width = np.diff(binned.edges)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, height_ratios=(3, 1),
                                      constrained_layout=True)
    top.bar(binned.edges[:-1][filled], binned.accuracy[filled], width=width[filled], align="edge",
            edgecolor="black", alpha=0.6, label="accuracy of the bin")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    top.plot(binned.confidence[filled], binned.accuracy[filled], "o", color="black", markersize=3,
             label="the bin's mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(_plain_text(f"{title}; calibration error {probabilities.binned_error(binned):.4f}"), fontsize=9,
                  wrap=True)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(binned.edges[:-1], binned.counts, width=width, align="edge", edgecolor="black")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("samples")
    bottom.set_xlim(0, 1)
    return _finish(fig, filename)


def draw_analysis(
    analysed: Any, *, labels: Sequence[str], out_dir: PathLike, title: str, confidence: float, sample_kind: str
) -> list[pathlib.Path]:
    """The figures of an ``analysis.RunAnalysis`` for the parts it holds (confusion matrices and CAF band; t-SNE
    map), written into ``out_dir``; returns their paths."""
    out_dir = pathlib.Path(out_dir)
    written = []
    if analysed.confusion is not None:
        for name, normalize in (("confusion.png", False), ("confusion_normalised.png", True)):
            draw_confusion_matrix(
                confusion=analysed.confusion, labels=labels, filename=out_dir / name, normalize=normalize,
                title=f"Confusions summed over partitions{' (share of the true class)' if normalize else ''}: {title}",
            )
            written.append(out_dir / name)
        draw_cumulative_accuracy(
            shares=analysed.band["share"], cum_accs=analysed.band["mean"],
            band=(analysed.band["low"], analysed.band["high"]), figsize=(5, 5), filename=out_dir / "cumacc_band.png",
            title=f"Mean CAF over partitions, {confidence:.0%} band: {title}",
        )
        written.append(out_dir / "cumacc_band.png")
    if analysed.openset_scores is not None:
        draw_score_histogram(
            known=analysed.openset_scores[0], unknown=analysed.openset_scores[1],
            threshold=float(analysed.openset.iloc[-1]["threshold"]), filename=out_dir / "openset_scores.png",
            title=f"Unknown score, last partition ({analysed.openset_summary['hidden_share']:.0%} of classes hidden): "
                  f"{title}",
        )
        written.append(out_dir / "openset_scores.png")
    if analysed.reliability is not None:
        draw_reliability(analysed.reliability, filename=out_dir / "reliability.png",
                         title=f"Probabilities of every partition's validation {sample_kind}s: {title}")
        written.append(out_dir / "reliability.png")
    if analysed.tsne_coords is not None:
        draw_embedding_map(
            coords=analysed.tsne_coords, targets=analysed.tsne_targets, labels=labels,
            mean_coords=analysed.tsne_means, filename=out_dir / "tsne.png",
            title=f"t-SNE of the last partition's validation {sample_kind}s: {title}",
        )
        written.append(out_dir / "tsne.png")
    return written
