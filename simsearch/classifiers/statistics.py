"""The additive statistics of the class-vector estimators as one value.

Per class, the float64 sum of its feature vectors and its image count; for the Gram-matrix estimators also the raw
Gram matrix (``sum x x^T``), the feature sum and the image count of everything fitted. Every change of the training
images is arithmetic on this value (:meth:`Statistics.add`, :meth:`~Statistics.remove`, :func:`merge`,
:meth:`~Statistics.without`), so batches, shards, stores and sub-fits agree with one fit up to float64 rounding.
The estimators (``prototypes``) keep one as ``statistics_`` and derive their class vectors from it; the ridge
choice (``ridge_selection``), the discriminant and the unknown scores are functions of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from simsearch.classifiers import matrices

# The names the shared statistics are saved under (``n_samples`` as the fitted attribute names it).
SHARED_NAMES = ("gram", "feature_sum", "n_samples_seen")


class Gram:
    """A raw Gram matrix ``sum x x^T`` (``F x F``, float64), formed when first read: ``base`` plus ``sign`` times the
    Gram matrix of ``rows``. A fit with fewer images than features decomposes matrices of its images and never
    reads it, nor do the sub-fits of its choices; it costs ``n F^2`` (the largest step of such a fit), so it is
    paid only by what needs it (a later change, a save, a merge). Until then it keeps ``rows`` (the caller's array,
    not a copy: the estimators hand over arrays of their own); once formed, only the matrix. Its trace needs no
    matrix."""

    def __init__(
        self,
        matrix: np.ndarray | None = None,
        *,
        base: Gram | None = None,
        rows: np.ndarray | None = None,
        sign: int = 1,
        device: torch.device | None = None,
    ) -> None:
        self._matrix, self._base, self._rows, self._sign, self._device = matrix, base, rows, sign, device

    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = self._base.matrix() + self._sign * matrices.gram(self._rows, device=self._device)
            self._base = self._rows = None
        return self._matrix

    def trace(self) -> float:
        if self._matrix is not None:
            return float(np.trace(self._matrix))
        return self._base.trace() + self._sign * float(np.einsum("ij,ij->", self._rows, self._rows, dtype=np.float64))

    def changed(self, rows: np.ndarray, *, sign: int, device: torch.device | None) -> Gram:
        """This Gram matrix with ``sign`` times that of ``rows`` added, not formed yet."""
        return Gram(base=self, rows=rows, sign=sign, device=device)


class Samples(NamedTuple):
    """The images a :class:`Statistics` value sums, where a fit has them (when it starts, and in the sub-fits of
    its choices): features ``[n, F]`` and their class rows ``[n]``. With fewer images than features, a fit's
    matrices are decomposed in the images' own space (:meth:`Statistics.centred_spectrum`)."""

    features: np.ndarray
    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Classes sorted by label, their sums ``[C, F]`` and counts ``[C]``; the Gram matrix ``raw_gram`` (a
    :class:`Gram`, read as :attr:`gram` ``[F, F]``), ``feature_sum`` ``[F]`` and ``n_samples`` where the estimator
    keeps shared statistics (None, None, 0 for the class mean).
    ``n_samples`` may exceed the classes' images: a class removed without its images leaves them in ``gram``."""

    classes: np.ndarray
    class_sums: np.ndarray
    class_counts: np.ndarray
    raw_gram: Gram | None = None
    feature_sum: np.ndarray | None = None
    n_samples: int = 0

    @classmethod
    def empty(cls, n_features: int, *, shared: bool) -> Statistics:
        """No image yet, of ``n_features`` features; ``shared`` keeps the Gram statistics too."""
        return cls(classes=np.array([]), class_sums=np.zeros((0, n_features)), class_counts=np.zeros(0, np.int64),
                   raw_gram=Gram(np.zeros((n_features, n_features))) if shared else None,
                   feature_sum=np.zeros(n_features) if shared else None)

    @property
    def shared(self) -> bool:
        return self.raw_gram is not None

    @property
    def gram(self) -> np.ndarray | None:
        """The raw Gram matrix ``[F, F]`` (formed now if it was not yet, see :class:`Gram`)."""
        return None if self.raw_gram is None else self.raw_gram.matrix()

    @property
    def mean(self) -> np.ndarray:
        """The mean feature of every fitted image (shared statistics only)."""
        return self.feature_sum / max(self.n_samples, 1)

    def class_means(self) -> np.ndarray:
        return self.class_sums / self.class_counts[:, None]

    def centred_gram(self) -> np.ndarray:
        return self.gram - self.n_samples * np.outer(self.mean, self.mean)

    def mean_eigenvalue(self) -> float:
        """The centred Gram matrix's mean eigenvalue (its trace over the dimension; 1 for a matrix of zeros): what
        relative ridge strengths multiply."""
        return matrices.mean_eigenvalue(trace=self.raw_gram.trace() - self.n_samples * float(self.mean @ self.mean),
                                        dimension=len(self.feature_sum))

    def in_sample_space(self, samples: Samples | None) -> bool:
        """Whether ``samples`` are all the images of these shared statistics and fewer than the features: then an
        ``n x n`` matrix of the images holds what the ``F x F`` Gram matrix does."""
        return (samples is not None and self.shared and len(samples.features) == self.n_samples
                and self.n_samples < self.class_sums.shape[1])

    def centred_spectrum(self, samples: Samples | None, *, device: torch.device | None) -> matrices.Spectrum:
        """Eigenpairs of the centred Gram matrix: from the ``n x n`` matrix of the centred ``samples`` where
        :meth:`in_sample_space`, else from the ``F x F`` matrix. Equal to rounding; ``n^2 F`` against ``F^3``."""
        if self.in_sample_space(samples):
            return matrices.row_spectrum(samples.features - self.mean, device=device)
        return matrices.matrix_spectrum(self.centred_gram(), device=device)

    def within_class_rows(self, samples: Samples) -> np.ndarray:
        """Each sample minus its class mean: the rows whose Gram matrix is :meth:`within_class_scatter`."""
        return samples.features - self.class_means()[samples.rows]

    def within_class_scatter(self) -> np.ndarray:
        return matrices.within_class_scatter(gram=self.gram, class_sums=self.class_sums,
                                             class_counts=self.class_counts)

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """The class row of each label, refusing labels of no fitted class."""
        rows = np.searchsorted(self.classes, labels).clip(max=max(len(self.classes) - 1, 0))
        if not len(self.classes) or not np.array_equal(self.classes[rows], labels):
            raise ValueError(f"Labels {sorted(set(np.setdiff1d(labels, self.classes).tolist()))} were never fitted.")
        return rows

    def add(self, features: np.ndarray, labels: np.ndarray, *, device: torch.device | None) -> Statistics:
        """These images added, new classes among them (``features`` are kept until the Gram matrix is formed: do
        not change them in place)."""
        grown = self._with_classes(np.unique(labels))
        rows = np.searchsorted(grown.classes, labels)
        return grown._changed(features, rows, sign=1, device=device)

    def remove(self, features: np.ndarray, labels: np.ndarray, *, device: torch.device | None) -> Statistics:
        """These fitted images subtracted (the caller vouches they were fitted with these labels); classes left
        without an image are dropped."""
        rows = self.rows_of(labels)
        if (np.bincount(rows, minlength=len(self.classes)) > self.class_counts).any():
            raise ValueError("More images to remove than a class holds: these images were not all fitted.")
        return self.without(features, rows, device=device)

    def without(self, features: np.ndarray, rows: np.ndarray, *, device: torch.device | None) -> Statistics:
        """The statistics of a fit without these fitted images (class ``rows``), classes left empty dropped: one
        sub-fit by subtraction, in the features' precision for the Gram matrix."""
        removed = self._changed(features, rows, sign=-1, device=device)
        return removed.keep(removed.class_counts > 0)

    def without_samples(
        self, samples: Samples, held_out: np.ndarray, *, device: torch.device | None
    ) -> tuple[Statistics, Samples | None]:
        """The sub-fit without the ``samples`` of mask ``held_out`` (:meth:`without`), and the samples it keeps,
        their rows numbered among the classes it keeps (None for statistics without a Gram matrix, which never
        need them: no copy of the images)."""
        kept = self.without(samples.features[held_out], samples.rows[held_out], device=device)
        if not self.shared:
            return kept, None
        rows = np.searchsorted(kept.classes, self.classes[samples.rows[~held_out]])
        return kept, Samples(samples.features[~held_out], rows)

    def keep(self, classes: np.ndarray) -> Statistics:
        """Only the classes of this mask (or these row indexes); the shared statistics keep every image."""
        return dataclasses.replace(self, classes=self.classes[classes], class_sums=self.class_sums[classes],
                                   class_counts=self.class_counts[classes])

    def renamed(self, label: Hashable, new_label: Hashable) -> tuple[Statistics, np.ndarray]:
        """Class ``label`` named ``new_label``, and the new order of the old rows (labels stay sorted)."""
        names = self.classes.tolist()
        if new_label in names:
            raise ValueError(f"Class {new_label!r} already exists; remove it first or choose another name.")
        names[names.index(label)] = new_label
        try:
            order = np.array(sorted(range(len(names)), key=names.__getitem__))
        except TypeError as error:
            raise ValueError(f"New label {new_label!r} cannot be ordered with the other labels: {error}") from error
        renamed = dataclasses.replace(self.keep(order), classes=np.array([names[index] for index in order]))
        return renamed, order

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays under the names stores and merges use."""
        arrays = {"classes": self.classes, "class_sums": self.class_sums, "class_counts": self.class_counts}
        if self.shared:
            arrays.update(gram=self.gram, feature_sum=self.feature_sum, n_samples_seen=np.asarray(self.n_samples))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], *, shared: bool) -> Statistics:
        """The value of :meth:`to_arrays`, checked first: it may come from a damaged file."""
        names = ("classes", "class_sums", "class_counts", *(SHARED_NAMES if shared else ()))
        missing = [name for name in names if name not in arrays]
        if missing:
            raise ValueError(f"the statistics lack {', '.join(missing)}")
        classes, sums = np.asarray(arrays["classes"]), np.asarray(arrays["class_sums"])
        counts = np.asarray(arrays["class_counts"])
        if classes.ndim != 1 or len(set(classes.tolist())) != len(classes):
            raise ValueError(
                f"class labels must be distinct, got {len(classes)} labels, {len(set(classes.tolist()))} distinct"
            )
        if sums.ndim != 2 or sums.shape[0] != len(classes) or counts.shape != classes.shape:
            raise ValueError(f"{len(classes)} labels do not fit class sums of shape {list(sums.shape)} and counts "
                             f"of shape {list(counts.shape)}")
        if counts.dtype.kind not in "iu" or (len(counts) and counts.min() < 1):
            raise ValueError("every class needs an image count of at least 1 (a whole number)")
        order = np.argsort(classes, kind="stable")
        value = cls(classes=classes[order], class_sums=sums[order].astype(np.float64),
                    class_counts=counts[order].astype(np.int64))
        return value._with_shared(arrays) if shared else value

    def _with_shared(self, arrays: dict[str, Any]) -> Statistics:
        size = self.class_sums.shape[1]
        gram, feature_sum = np.asarray(arrays["gram"], np.float64), np.asarray(arrays["feature_sum"], np.float64)
        seen = np.asarray(arrays["n_samples_seen"])
        if gram.shape != (size, size) or feature_sum.shape != (size,):
            raise ValueError(
                f"Gram matrix {list(gram.shape)} or feature sum {list(feature_sum.shape)} do not fit {size} features"
            )
        if seen.shape != () or seen.dtype.kind not in "iu" or int(seen) < int(self.class_counts.sum()):
            raise ValueError("n_samples_seen must be a whole number no smaller than the images of all classes")
        return dataclasses.replace(self, raw_gram=Gram(gram), feature_sum=feature_sum, n_samples=int(seen))

    def _with_classes(self, labels: np.ndarray) -> Statistics:
        """Empty rows for the labels not yet among the classes."""
        merged = np.union1d(self.classes, labels) if len(self.classes) else labels
        if len(merged) == len(self.classes):
            return self
        positions = np.searchsorted(merged, self.classes)
        sums = np.zeros((len(merged), self.class_sums.shape[1]))
        counts = np.zeros(len(merged), dtype=np.int64)
        sums[positions], counts[positions] = self.class_sums, self.class_counts
        return dataclasses.replace(self, classes=merged, class_sums=sums, class_counts=counts)

    def _changed(self, features: np.ndarray, rows: np.ndarray, *, sign: int, device: torch.device | None) -> Statistics:
        """These images added (``sign=1``) to or subtracted (``-1``) from their class ``rows`` and the shared
        statistics; classes stay as they are."""
        sums = matrices.sums_by_row(features, rows=rows, num_rows=len(self.classes))
        changed = dataclasses.replace(
            self, class_sums=self.class_sums + sign * sums,
            class_counts=self.class_counts + sign * np.bincount(rows, minlength=len(self.classes)))
        if not self.shared:
            return changed
        return dataclasses.replace(
            changed, raw_gram=self.raw_gram.changed(features, sign=sign, device=device),
            feature_sum=self.feature_sum + sign * features.sum(axis=0), n_samples=self.n_samples + sign * len(features))


def merge(parts: Sequence[Statistics]) -> Statistics:
    """The statistics of one fit on the images of all ``parts`` (fitted on disjoint images, any classes each)."""
    classes = np.unique(np.concatenate([part.classes for part in parts]))
    sums = np.zeros((len(classes), parts[0].class_sums.shape[1]))
    counts = np.zeros(len(classes), dtype=np.int64)
    for part in parts:
        positions = np.searchsorted(classes, part.classes)
        sums[positions] += part.class_sums
        counts[positions] += part.class_counts
    merged = Statistics(classes=classes, class_sums=sums, class_counts=counts)
    if not parts[0].shared:
        return merged
    return dataclasses.replace(merged, raw_gram=Gram(sum(part.gram for part in parts)),
                               feature_sum=sum(part.feature_sum for part in parts),
                               n_samples=sum(part.n_samples for part in parts))
