"""scikit-learn adapters that let peer libraries (scikit-learn's calibration, MAPIE) score exactly the numbers
calibserve's functions see: used by the differential tests and by the benches that time those peers."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class IdentityClassifier(ClassifierMixin, BaseEstimator):
    """A 'classifier' whose decision function is its input (its one column, for a binary problem): lets
    scikit-learn calibrate frozen logits."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X):
        X = np.asarray(X)
        return X[:, 0] if X.shape[1] == 1 else X

    def predict(self, X):
        decision = self.decision_function(X)
        chosen = (decision > 0).astype(int) if decision.ndim == 1 else np.argmax(decision, axis=1)
        return self.classes_[chosen]


class RowLookup(ClassifierMixin, BaseEstimator):
    """A prefit classifier whose input is a row index into fixed probabilities: MAPIE then scores exactly the
    probabilities our functions see."""

    def __init__(self, probabilities=None):
        self.probabilities = probabilities

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return self.probabilities[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)
