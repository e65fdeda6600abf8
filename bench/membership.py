"""Membership inference: attack scores, their ROC, and the ε lower bound an attack's error rates imply.

Written here in numpy/scipy (with scikit-learn's ROC): no maintained library fits this stack (ML
Privacy Meter 2 is a script with ~150 pinned requirements; TensorFlow Privacy's attacks moved to a
package needing TensorFlow <= 2.15; the Adversarial Robustness Toolbox has no LiRA), and each attack
is a few lines of the papers' formulas. Scores are "higher = more likely a member".

- Loss threshold (Yeom et al. 2018, "Privacy Risk in Machine Learning", CSF): score = −loss(x, y).
- Offline LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles", S&P,
  Sec. IV-C): signal φ(x, y) = log(p_y / (1 − p_y)), computed from logits as z_y − logsumexp_{j≠y} z_j;
  fit a Gaussian N(μ_out(x), σ²) to φ over the shadow models that did not train on x, score =
  (φ_target − μ_out(x)) / σ (one-sided: members have higher confidence). σ is one global value
  (the pooled spread of φ around each example's μ_out) when shadows are few, as the paper advises.
- ε lower bound (Jagielski et al. 2020, "Auditing Differentially Private Machine Learning", NeurIPS;
  TensorFlow Privacy's ``epsilon_lower_bound``): (ε, δ)-DP forces, at every threshold,
  FPR + e^ε·FNR >= 1 − δ and FNR + e^ε·FPR >= 1 − δ, so
  ε̂ = max over thresholds of max(ln((1 − δ − FPR⁺)/FNR⁺), ln((1 − δ − FNR⁺)/FPR⁺)), with FPR⁺, FNR⁺
  one-sided Clopper–Pearson upper bounds: the bound holds with that confidence. It cannot exceed about
  ln(n / 3) with n examples per class, and it is a lower bound: an ε̂ above an accountant's ε is a bug.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve


def defined_outputs(logits: np.ndarray) -> tuple[np.ndarray, int]:
    """Logits (N, C) with every row holding a NaN or an infinity (a model that diverged: its weights overflowed)
    read as all zeros, the uniform prediction, which says nothing about membership; and how many rows were so.
    Without it one diverged shadow would make every score of its examples NaN."""
    bad = ~np.isfinite(logits).all(axis=1)
    return np.where(bad[:, None], 0.0, logits), int(bad.sum())


def loss_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Yeom et al.'s score, −cross-entropy, per example. logits (N, C), labels (N,) -> (N,)."""
    return -(logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels])


def lira_signal(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = log(p_y / (1 − p_y)) per example, stable from logits (N, C) -> (N,)."""
    true = logits[np.arange(len(labels)), labels]
    others = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    return true - logsumexp(others, axis=1)


def lira_offline_scores(target: np.ndarray, shadows: np.ndarray, shadow_in: np.ndarray,
                        global_variance: bool = True) -> np.ndarray:
    """Offline LiRA scores (φ_target − μ_out) / σ.

    target: (N,) φ of the attacked model; shadows: (K, N) φ of K shadow models; shadow_in: (K, N) bool,
    True where that shadow trained on that example (left out of the fit). An example no shadow left
    out gets μ_out = the mean over all OUT signals. Raises ValueError on mismatched shapes.
    """
    if shadows.shape != shadow_in.shape or shadows.shape[1:] != target.shape:
        raise ValueError(f"shapes: target {target.shape}, shadows {shadows.shape}, shadow_in {shadow_in.shape}")
    out = np.where(shadow_in, np.nan, shadows)
    counts = (~shadow_in).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = out.sum(axis=0, where=~shadow_in) / counts
    mu = np.where(counts > 0, mu, np.nanmean(out))
    if global_variance or counts.min() < 2:
        sigma = np.sqrt(np.nanmean((out - mu) ** 2))
    else:
        sigma = np.nanstd(out, axis=0)
    return (target - mu) / np.maximum(sigma, 1e-12)


def roc(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """ROC of a score: ``fpr``, ``tpr`` (arrays, scikit-learn's ``roc_curve``), ``auc``, and the counts."""
    fpr, tpr, _ = roc_curve(is_member, scores)
    return {"fpr": fpr, "tpr": tpr, "auc": float(roc_auc_score(is_member, scores)),
            "members": int(is_member.sum()), "non-members": int((~is_member).sum())}


def tpr_at_fpr(curve: dict, target_fpr: float) -> float:
    """The highest TPR at FPR <= ``target_fpr`` on ``curve`` (from :func:`roc`)."""
    return float(curve["tpr"][curve["fpr"] <= target_fpr].max(initial=0.0))


def clopper_pearson_upper(errors: np.ndarray | int, trials: int, confidence: float = 0.95) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound on a rate from ``errors`` of ``trials``: Beta(k+1, n−k)'s
    ``confidence`` quantile (1 when k = n). Clopper & Pearson 1934."""
    k = np.asarray(errors, dtype=float)
    upper = beta.ppf(confidence, k + 1, np.maximum(trials - k, 1e-12))
    return np.where(k >= trials, 1.0, upper)


def epsilon_lower_bound(scores: np.ndarray, is_member: np.ndarray, delta: float, confidence: float = 0.95) -> float:
    """ε̂ >= 0 that any threshold on ``scores`` proves with ``confidence`` (Jagielski et al. 2020), at ``delta``."""
    members, non_members = np.sort(scores[is_member]), np.sort(scores[~is_member])
    thresholds = np.unique(np.concatenate([scores, [np.inf]]))  # predict "member" when score >= threshold
    false_negatives = np.searchsorted(members, thresholds, side="left")  # members below the threshold
    false_positives = len(non_members) - np.searchsorted(non_members, thresholds, side="left")
    fpr = clopper_pearson_upper(false_positives, len(non_members), confidence)
    fnr = clopper_pearson_upper(false_negatives, len(members), confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.concatenate([np.log((1 - delta - fpr) / fnr), np.log((1 - delta - fnr) / fpr)])
    bounds = bounds[np.isfinite(bounds)]
    return float(max(bounds.max(initial=0.0), 0.0))
