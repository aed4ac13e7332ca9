"""Classifiers beside the class-vector family, with the same scikit-learn API: the baselines ``--analysis`` and
the benchmarks compare the article's class mean against.

None of them keeps additive statistics, so none can add or remove a class without refitting: that is what they
measure against. k nearest training images (retrieval as classification), several k-means centres per class (a
class of distinct looks), and a logistic-regression linear probe (a trained head, the fine-tuning write-up's linear
layer).

Each takes ``device``: where its torch work runs (None: the CPU; ``"cuda"``: a GPU), a run-time choice like the
decorrelated classifiers' (``prototypes.RUN_TIME_PARAMS``), so ``--analysis`` compares them all on the GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import validate_data

from simsearch.classifiers import prototypes

__all__ = ["BASELINES", "KMeansPrototypeClassifier", "LinearProbe", "NearestNeighbourClassifier", "linear_probe",
           "works_in_torch"]

FLOAT_TYPES = (np.float32, np.float64)  # float32 embeddings are kept as they are: half the traffic


class NearestNeighbourClassifier(ClassifierMixin, BaseEstimator):
    """k nearest training images by cosine similarity, majority vote.

    Classes are ranked by votes among the ``k`` nearest images, ties (and classes without votes, for the rest of
    the top-k list) by their single most similar training image, so top-k accuracy stays defined for ``k = 1``.
    With ``device=None`` the similarities are a NumPy product (faster than torch's on a CPU), on a device a torch
    one.
    """

    def __init__(self, *, k: int = 1, device: str | torch.device | None = None) -> None:
        self.k = k
        self.device = device

    def fit(self, X, y) -> NearestNeighbourClassifier:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}.")
        X, y = validate_data(self, X, y, dtype=FLOAT_TYPES)
        self.classes_, owners = np.unique(y, return_inverse=True)
        self.unit_train_ = torch.from_numpy(prototypes.unit_rows(X))
        self.owners_ = torch.from_numpy(owners)
        return self

    def decision_function(self, X) -> np.ndarray:
        """``votes + (1 + best cosine) / 3``: votes decide, the most similar image breaks ties."""
        X = validate_data(self, X, reset=False, dtype=FLOAT_TYPES)
        train = self.unit_train_.numpy()
        queries = prototypes.unit_rows(X).astype(train.dtype)
        device = prototypes.compute_device(self.device)
        if device is None:
            similarity = torch.from_numpy(queries @ train.T)
        else:
            similarity = torch.from_numpy(queries).to(device) @ self.unit_train_.to(device).T
        owners = self.owners_.to(similarity.device)
        best = _best_per_class(similarity, owners, len(self.classes_))
        voters = owners[similarity.topk(min(self.k, similarity.shape[1]), dim=1).indices]
        votes = torch.zeros_like(best).scatter_add_(1, voters, torch.ones_like(voters, dtype=best.dtype))
        return (votes + (1 + best) / 3).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        return prototypes.predict_topk(self, X, 1)[:, 0]


def _best_per_class(similarity: torch.Tensor, owners: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[Q, num_classes]``: each class's highest similarity among its vectors (every class has one)."""
    best = torch.full((similarity.shape[0], num_classes), -torch.inf, dtype=similarity.dtype, device=similarity.device)
    return best.scatter_reduce(1, owners.expand_as(similarity), similarity, reduce="amax")


class KMeansPrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Several vectors per class: k-means centres of its L2-normalised training embeddings.

    A class made of distinct looks (e.g. photos and drawings) has a mean that resembles neither; a class scores
    its best-matching centre. Classes with at most ``prototypes_per_class`` images keep every image instead.
    The clustering is Lloyd's algorithm with k-means++ seeding in torch: scikit-learn's ``KMeans`` costs about
    ten milliseconds of set-up per call, which a hundred classes times twenty partitions turn into minutes.
    The seeding draws on the CPU, so a device changes no centre beyond rounding.
    """

    def __init__(
        self, *, prototypes_per_class: int = 2, random_state: int = 0, max_iter: int = 100,
        device: str | torch.device | None = None,
    ) -> None:
        self.prototypes_per_class = prototypes_per_class
        self.random_state = random_state
        self.max_iter = max_iter
        self.device = device

    def fit(self, X, y) -> KMeansPrototypeClassifier:
        if self.prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be at least 1, got {self.prototypes_per_class}.")
        X, y = validate_data(self, X, y, dtype=FLOAT_TYPES)
        unit = torch.from_numpy(prototypes.unit_rows(X)).to(prototypes.torch_device(self.device))
        self.classes_, rows = np.unique(y, return_inverse=True)
        generator = torch.Generator().manual_seed(self.random_state)
        centres, owners = [], []
        for row in range(len(self.classes_)):
            members = unit[torch.from_numpy(rows == row).to(unit.device)]
            if len(members) > self.prototypes_per_class:
                members = _kmeans(members, k=self.prototypes_per_class, generator=generator, max_iter=self.max_iter)
            centres.append(members)
            owners += [row] * len(members)
        self.prototypes_ = F.normalize(torch.cat(centres), dim=1)
        self.owners_ = torch.tensor(owners, dtype=torch.long, device=unit.device)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Each class's best cosine similarity among its centres."""
        X = validate_data(self, X, reset=False, dtype=FLOAT_TYPES)
        queries = torch.from_numpy(prototypes.unit_rows(X)).to(self.prototypes_.device, self.prototypes_.dtype)
        return _best_per_class(queries @ self.prototypes_.T, self.owners_, len(self.classes_)).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        return prototypes.predict_topk(self, X, 1)[:, 0]


def _kmeans(points: torch.Tensor, *, k: int, generator: torch.Generator, max_iter: int) -> torch.Tensor:
    """``k`` centres of ``points`` (more than ``k`` rows): k-means++ seeding, then Lloyd steps until no point moves."""
    centres = points[torch.randint(len(points), (1,), generator=generator).to(points.device)]
    for _ in range(1, k):
        distance = torch.cdist(points, centres).min(dim=1).values ** 2
        weights = (distance if distance.sum() > 0 else torch.ones_like(distance)).cpu()
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator).to(points.device)]])
    assignment = None
    for _ in range(max_iter):
        nearest = torch.cdist(points, centres).argmin(dim=1)
        if assignment is not None and torch.equal(nearest, assignment):
            break
        assignment = nearest
        sums = torch.zeros_like(centres).index_add_(0, nearest, points)
        sizes = torch.bincount(nearest, minlength=k).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)  # an emptied centre stays put
    return centres


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on L2-normalised embeddings: the trained-head baseline.

    It tells how much accuracy a fitted linear head would add over training-free class vectors (the vector-search
    fine-tuning write-up's linear layer), at the cost of refitting whenever a class changes. The objective is
    scikit-learn's ``LogisticRegression(C=C)`` (cross-entropy plus ``||W||^2 / 2C``, bias not penalised), solved
    by L-BFGS in float32 torch, 1.6 to 2 times faster than scikit-learn's float64 solver on Caltech-101. Every
    fit starts from zero: starting from another partition's weights would carry its validation images over
    wherever the solver stops short of the optimum.
    """

    def __init__(
        self, *, C: float = 1.0, max_iter: int = 500, tol: float = 1e-5, device: str | torch.device | None = None
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(self, X, y) -> LinearProbe:
        X, y = validate_data(self, X, y, dtype=FLOAT_TYPES)
        self.classes_, codes = np.unique(y, return_inverse=True)
        device = prototypes.torch_device(self.device)
        features = torch.from_numpy(prototypes.unit_rows(X)).float().to(device)
        targets = torch.from_numpy(codes).to(device)
        weights = torch.zeros(len(self.classes_), X.shape[1], requires_grad=True, device=device)
        bias = torch.zeros(len(self.classes_), requires_grad=True, device=device)
        penalty = 1.0 / (2.0 * self.C * len(codes))  # the objective divided by n: gradients of order one
        optimizer = torch.optim.LBFGS(
            [weights, bias], max_iter=self.max_iter, tolerance_grad=self.tol, tolerance_change=1e-10,
            history_size=20, line_search_fn="strong_wolfe",
        )

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(features @ weights.T + bias, targets) + penalty * (weights * weights).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        self.coef_ = weights.detach().cpu().numpy()
        self.intercept_ = bias.detach().cpu().numpy()
        self.n_iter_ = int(optimizer.state[weights]["n_iter"])
        return self

    def decision_function(self, X) -> np.ndarray:
        X = validate_data(self, X, reset=False, dtype=FLOAT_TYPES)
        return prototypes.unit_rows(X).astype(np.float32) @ self.coef_.T + self.intercept_

    def predict(self, X) -> np.ndarray:
        return prototypes.predict_topk(self, X, 1)[:, 0]


def linear_probe(*, C: float = 1.0, max_iter: int = 500, device: str | torch.device | None = None) -> LinearProbe:
    """The linear-probe baseline of :func:`default_prototype_methods` (see :class:`LinearProbe`)."""
    return LinearProbe(C=C, max_iter=max_iter, device=device)


# Command-line names of the baselines, beside prototypes.CLASSIFIERS: (class, parameters), as there.
BASELINES: dict[str, tuple[type, dict[str, Any]]] = {
    "knn1": (NearestNeighbourClassifier, {"k": 1}),
    "knn5": (NearestNeighbourClassifier, {"k": 5}),
    "kmeans2": (KMeansPrototypeClassifier, {"prototypes_per_class": 2}),
    "kmeans3": (KMeansPrototypeClassifier, {"prototypes_per_class": 3}),
    "probe": (LinearProbe, {}),
}


def works_in_torch(estimator: Any) -> bool:
    """Whether an estimator's fit and scoring are torch's work alone (the probe, the k-means centres, anything set on a
    device), so NumPy's BLAS threads can wait (:func:`utils.torch_pool_only`)."""
    return estimator.get_params().get("device") is not None or isinstance(estimator, (LinearProbe,
                                                                                       KMeansPrototypeClassifier))
