# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The knowledge-prior linear head: concept scores -> class logits, as a scikit-learn-style estimator.

Objective (on standardised concept scores ``s = (a - mu) / sigma``)::

    class-balanced cross-entropy(W s + b, y)
      + prior_strength * mean_{c,k} |tanh(W[c,k]) - P[c,k]|      # KnoBo's parameter prior
      + sparsity * mean |W|  +  l2 * ||W||^2

solved full-batch with L-BFGS in float64 (the |.| terms smoothed by sqrt(x^2 + eps)), which is exact
and deterministic where KnoBo's Adam loop (lr 1e-3, batch 64, 200 epochs) is stochastic and slow.
``prior_strength`` may be a grid: each value is fitted (warm-started) and the one with the best
validation balanced accuracy is kept; the validation split is never the test split.
The fitted ``coef_`` / ``intercept_`` act on raw (unstandardised) scores, so contributions
``coef_[c, k] * a_k`` plus ``intercept_[c]`` equal the logits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .metrics import balanced_accuracy

__all__ = ["KnowledgePriorHead", "prior_loss"]

_EPS = 1e-6


def _smooth_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + _EPS)


def prior_loss(weight: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """KnoBo's parameter prior, mean |tanh(W) - P| (smoothed so that L-BFGS can use it)."""
    return _smooth_abs(torch.tanh(weight) - prior).mean()


class KnowledgePriorHead:
    """Linear head whose weights follow a class-by-concept prior.

    Args:
        prior: ``(C, K)`` array in {-1, 0, +1}; ``None`` means no prior term.
        prior_strength: lambda, or a sequence of candidates selected on validation data.
        sparsity: weight of an L1 penalty on the (standardised) weights.
        l2: weight of an L2 penalty (keeps separable problems bounded).
        class_balanced: weight each class equally in the cross-entropy.
        max_iter: L-BFGS iterations per candidate.
        random_state: kept for API symmetry; the solver is deterministic (zero initialisation).

    Example::

        head = KnowledgePriorHead(prior=bank.prior, prior_strength=(0.0, 0.1, 1.0))
        head.fit(train_scores, train_y, val_scores, val_y)
        proba = head.predict_proba(test_scores)
    """

    def __init__(
        self,
        prior: np.ndarray | None = None,
        prior_strength: float | Sequence[float] = (0.0, 0.01, 0.1, 1.0),
        sparsity: float = 0.0,
        l2: float = 1e-4,
        class_balanced: bool = True,
        max_iter: int = 300,
        random_state: int = 0,
    ):
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float64)
        self.prior_strength = prior_strength
        self.sparsity = float(sparsity)
        self.l2 = float(l2)
        self.class_balanced = class_balanced
        self.max_iter = int(max_iter)
        self.random_state = random_state

    # ------------------------------------------------------------------ validation
    def _check_X(self, X: np.ndarray, name: str = "X") -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n_samples, n_concepts), got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"{name} contains NaN or infinite concept scores")
        if self.prior is not None and X.shape[1] != self.prior.shape[1]:
            raise ValueError(f"{name} has {X.shape[1]} concepts but the prior has {self.prior.shape[1]}")
        if hasattr(self, "coef_") and X.shape[1] != self.coef_.shape[1]:
            raise ValueError(f"{name} has {X.shape[1]} concepts but the head was fitted on {self.coef_.shape[1]}")
        return X

    def _check_y(self, y: np.ndarray, n: int, name: str = "y") -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n:
            raise ValueError(f"{name} must be 1-D with {n} entries, got shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= self.n_classes_:
            raise ValueError(f"{name} has class indices outside [0, {self.n_classes_ - 1}]")
        return y.astype(np.int64)

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        n_classes: int | None = None,
    ) -> "KnowledgePriorHead":
        """Fit on concept scores ``X`` ``(N, K)`` and class indices ``y``; select lambda on the validation split."""
        X = self._check_X(X)
        self.n_classes_ = int(n_classes or (self.prior.shape[0] if self.prior is not None else int(np.max(y)) + 1))
        y = self._check_y(y, len(X))
        missing = sorted(set(range(self.n_classes_)) - set(y.tolist()))
        if missing:
            raise ValueError(f"training data has no example of classes {missing}")
        strengths = [self.prior_strength] if np.isscalar(self.prior_strength) else list(self.prior_strength)
        if len(strengths) > 1 and (X_val is None or y_val is None):
            raise ValueError("several prior_strength values need X_val / y_val to choose among them")
        if X_val is not None:
            X_val = self._check_X(X_val, "X_val")
            y_val = self._check_y(y_val, len(X_val), "y_val")

        self.mean_ = X.mean(0)
        self.scale_ = X.std(0)
        self.scale_[self.scale_ < 1e-8] = 1.0
        Xs = torch.as_tensor((X - self.mean_) / self.scale_)
        yt = torch.as_tensor(y)
        counts = np.bincount(y, minlength=self.n_classes_).astype(np.float64)
        cw = (len(y) / (self.n_classes_ * counts)) if self.class_balanced else np.ones(self.n_classes_)
        cw_t = torch.as_tensor(cw)
        P = None if self.prior is None else torch.as_tensor(self.prior)

        W = torch.zeros(self.n_classes_, X.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(self.n_classes_, dtype=torch.float64, requires_grad=True)
        self.selection_: list[dict] = []
        best = None
        # Strong to weak prior: each fit starts from the previous optimum.
        for lam in sorted(strengths, reverse=True):
            self._solve(W, b, Xs, yt, cw_t, P, float(lam))
            W_s, b_s = W.detach().clone(), b.detach().clone()
            score = None
            if X_val is not None:
                pred = np.argmax(self._raw_logits(X_val, W_s, b_s), axis=1)
                score = balanced_accuracy(y_val, pred)
            self.selection_.append({"prior_strength": float(lam), "val_balanced_accuracy": score})
            # ties go to the stronger prior (visited first): more knowledge-consistent at equal accuracy
            if best is None or (score is not None and score > best[0] + 1e-12):
                best = (score, float(lam), W_s, b_s)
        _, self.prior_strength_, W_best, b_best = best
        self._set_raw_params(W_best, b_best)
        return self

    def _solve(self, W, b, Xs, y, cw, P, lam: float) -> None:
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, history_size=20,
                                tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logits = Xs @ W.T + b
            ce = torch.nn.functional.cross_entropy(logits, y, weight=cw, reduction="sum") / cw[y].sum()
            loss = ce + self.l2 * (W * W).sum()
            if P is not None and lam > 0:
                loss = loss + lam * prior_loss(W, P)
            if self.sparsity > 0:
                loss = loss + self.sparsity * _smooth_abs(W).mean()
            loss.backward()
            return loss

        opt.step(closure)

    def _raw_logits(self, X: np.ndarray, W_std: torch.Tensor, b_std: torch.Tensor) -> np.ndarray:
        Xs = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        return Xs @ W_std.numpy().T + b_std.numpy()

    def _set_raw_params(self, W_std: torch.Tensor, b_std: torch.Tensor) -> None:
        self.standardized_coef_ = W_std.numpy().copy()
        self.coef_ = self.standardized_coef_ / self.scale_[None, :]
        self.intercept_ = b_std.numpy() - self.coef_ @ self.mean_

    @classmethod
    def from_prior(
        cls, prior: np.ndarray, concept_center: np.ndarray | None = None, scale: float = 1.0
    ) -> "KnowledgePriorHead":
        """A zero-shot head from the prior alone (for a bundle that has no training data yet).

        ``W = scale * P`` and ``b = -W @ concept_center``: a class gains evidence for each concept it
        should show that is above its centre, and loses it for each it should not show.
        """
        prior = np.asarray(prior, dtype=np.float64)
        head = cls(prior=prior, prior_strength=0.0)
        head.n_classes_ = prior.shape[0]
        center = np.zeros(prior.shape[1]) if concept_center is None else np.asarray(concept_center, np.float64)
        head.mean_, head.scale_ = center, np.ones(prior.shape[1])
        head.prior_strength_ = float("inf")
        head.selection_ = []
        head._set_raw_params(torch.as_tensor(scale * prior), torch.zeros(prior.shape[0], dtype=torch.float64))
        return head

    # ------------------------------------------------------------------ prediction
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("this KnowledgePriorHead is not fitted yet; call fit() or from_prior() first")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class logits ``(N, C)``."""
        self._check_fitted()
        X = self._check_X(X)
        return X @ self.coef_.T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.decision_function(X)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.argmax(self.decision_function(X), axis=1)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Balanced accuracy."""
        return balanced_accuracy(np.asarray(y), self.predict(X))

    def prior_agreement(self) -> float:
        """Fraction of non-zero prior entries whose sign the fitted weights follow."""
        self._check_fitted()
        if self.prior is None or not np.any(self.prior):
            return float("nan")
        nz = self.prior != 0
        return float((np.sign(self.coef_[nz]) == self.prior[nz]).mean())
