"""XGBoost's JSON model format evaluated in numpy: serving needs no xgboost import.

Reads what ``xgboost.Booster.save_model("booster.json")`` writes (a ``gbtree`` of numerical splits,
objective ``binary:logistic``, or ``survival:aft`` whose margin is ln of the predicted time) and predicts as XGBoost's CPU predictor does: features as float32, go
left when ``x < split_condition``, missing values follow ``default_left``, leaf values summed in
float32 onto the base margin, then the logistic link. ``tests/test_booster.py`` checks agreement with
``xgboost.Booster.predict`` to 1e-6.

Examples
--------
>>> trees = TreeEnsemble.from_json(Path("models/default/config_aware/booster.json").read_text())  # doctest: +SKIP
>>> trees.predict(X)                                          # doctest: +SKIP
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import PredictorError

OBJECTIVES = ("binary:logistic", "survival:aft")


def _parse_float(text) -> float:
    """XGBoost writes scalars as strings, in 3.x as a one-element vector: ``"[2.64375E-1]"``."""
    if isinstance(text, (int, float)):
        return float(text)
    return float(str(text).strip("[]").split(",")[0])


class TreeEnsemble:
    """A fitted gradient-boosted tree ensemble as flat numpy arrays.

    Parameters
    ----------
    model : dict
        The parsed JSON of an XGBoost model.

    Attributes
    ----------
    feature_names : list of str or None
    n_features : int
    n_trees : int
    base_margin : float32, the margin every prediction starts from
    """

    def __init__(self, model: dict):
        self.model = model
        try:
            learner = model["learner"]
            booster = learner["gradient_booster"]
            objective = learner["objective"]["name"]
            trees = booster["model"]["trees"]
            params = learner["learner_model_param"]
        except (KeyError, TypeError) as e:
            raise PredictorError(f"not an XGBoost JSON model (no {e})") from None
        if booster.get("name") != "gbtree":
            raise PredictorError(f"only gbtree boosters can be served, got {booster.get('name')!r}")
        if objective not in OBJECTIVES:
            raise PredictorError(f"only objective {', '.join(OBJECTIVES)} can be served, got {objective!r}")
        if int(params.get("num_class", "0")) > 1 or int(params.get("num_target", "1")) > 1:
            raise PredictorError("only single-output boosters can be served")
        self.feature_names = learner.get("feature_names") or None
        self.n_features = int(params["num_feature"])
        base_score = _parse_float(params["base_score"])
        self.objective = objective
        if objective == "survival:aft":  # margins are ln(time): the base score is a time
            self.base_margin = np.float32(np.log(base_score))
        else:                            # logit: binary:logistic
            self.base_margin = np.float32(np.log(base_score / (1.0 - base_score)))
        self.n_trees = len(trees)
        width = max((len(t["left_children"]) for t in trees), default=1)
        shape = (self.n_trees, width)
        self.left = np.full(shape, -1, dtype=np.int64)
        self.right = np.full(shape, -1, dtype=np.int64)
        self.feature = np.zeros(shape, dtype=np.int64)
        self.threshold = np.zeros(shape, dtype=np.float32)  # split condition, or the leaf value
        self.default_left = np.zeros(shape, dtype=bool)
        self.depth = 0
        for i, t in enumerate(trees):
            if any(t.get("split_type", [])) or t.get("categories_nodes"):
                raise PredictorError("categorical splits are not supported")
            n = len(t["left_children"])
            self.left[i, :n] = t["left_children"]
            self.right[i, :n] = t["right_children"]
            self.feature[i, :n] = t["split_indices"]
            self.threshold[i, :n] = np.asarray(t["split_conditions"], dtype=np.float32)
            self.default_left[i, :n] = np.asarray(t["default_left"], dtype=bool)
            self.depth = max(self.depth, _depth(t["left_children"], t["right_children"]))

    @classmethod
    def from_json(cls, text: str | bytes) -> "TreeEnsemble":
        try:
            return cls(json.loads(text))
        except json.JSONDecodeError as e:
            raise PredictorError(f"booster is not valid JSON ({e.msg})") from None

    @classmethod
    def load(cls, path: str | Path) -> "TreeEnsemble":
        return cls.from_json(Path(path).read_bytes())

    def to_json(self) -> str:
        return json.dumps(self.model, separators=(",", ":"))

    def predict_margin(self, X) -> np.ndarray:
        """Raw margins (log-odds) of shape (n_samples,), float32 arithmetic as in XGBoost."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise PredictorError(f"booster expects {self.n_features} features, got shape {X.shape}")
        n = X.shape[0]
        trees = np.arange(self.n_trees)[None, :]
        node = np.zeros((n, self.n_trees), dtype=np.int64)  # current node of every (row, tree)
        rows = np.arange(n)[:, None]
        for _ in range(self.depth):
            left = self.left[trees, node]
            inner = left >= 0
            x = X[rows, self.feature[trees, node]]
            go_left = np.where(np.isnan(x), self.default_left[trees, node], x < self.threshold[trees, node])
            node = np.where(inner, np.where(go_left, left, self.right[trees, node]), node)
        leaves = self.threshold[trees, node]  # (n, n_trees) float32
        start = np.full((n, 1), self.base_margin, dtype=np.float32)
        return np.cumsum(np.concatenate([start, leaves], axis=1), axis=1, dtype=np.float32)[:, -1]

    def predict(self, X) -> np.ndarray:
        """P(y = 1) of shape (n_samples,), as ``xgboost.Booster.predict`` gives for binary:logistic."""
        if self.objective != "binary:logistic":
            raise PredictorError(f"predict() is for binary:logistic; use predict_margin() for {self.objective}")
        m = self.predict_margin(X)
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-m))).astype(float)


def _depth(left: list[int], right: list[int]) -> int:
    """Number of splits on the longest root-to-leaf path."""
    best, stack = 0, [(0, 0)]
    while stack:
        i, d = stack.pop()
        if left[i] < 0:
            best = max(best, d)
        else:
            stack += [(left[i], d + 1), (right[i], d + 1)]
    return best
