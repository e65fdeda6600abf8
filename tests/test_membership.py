"""The membership-inference audit's arithmetic (bench/membership.py), on scores whose answer is known."""

import json

import numpy as np
import pytest
from scipy.stats import beta

from bench.membership import (clopper_pearson_upper, defined_outputs, epsilon_lower_bound, lira_offline_scores, lira_signal,
                              loss_scores, roc, tpr_at_fpr)

RNG = np.random.default_rng(0)
DELTA = 1e-5


def labelled(members: np.ndarray, non_members: np.ndarray):
    return np.concatenate([members, non_members]), np.r_[np.ones(len(members), bool), np.zeros(len(non_members), bool)]


def test_perfectly_separable_scores_give_auc_1_and_tpr_1_at_every_fpr_and_a_large_epsilon_bound():
    scores, is_member = labelled(RNG.uniform(2, 3, 2000), RNG.uniform(0, 1, 2000))
    curve = roc(scores, is_member)
    assert curve["auc"] == 1.0
    assert all(tpr_at_fpr(curve, f) == 1.0 for f in (0.0, 0.001, 0.01, 0.1))
    # zero errors of 2,000 each: FNR+ = FPR+ = 1 - 0.05 ** (1/2000) ~ 0.0015, so eps >= ln(0.998 / 0.0015) ~ 6.5
    assert epsilon_lower_bound(scores, is_member, DELTA) == pytest.approx(np.log((1 - DELTA - 0.0015) / 0.0015), abs=0.01)


def test_identical_member_and_non_member_distributions_give_auc_half_and_no_epsilon():
    scores, is_member = labelled(RNG.normal(size=5000), RNG.normal(size=5000))
    curve = roc(scores, is_member)
    assert abs(curve["auc"] - 0.5) < 0.02 and tpr_at_fpr(curve, 0.01) < 0.03
    assert epsilon_lower_bound(scores, is_member, DELTA) < 0.1


def test_clopper_pearson_matches_the_closed_form_and_scipys_beta_quantile():
    assert clopper_pearson_upper(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10))  # 0.2589: no error in 10 trials
    assert clopper_pearson_upper(3, 10) == pytest.approx(beta.ppf(0.95, 4, 7)) == pytest.approx(0.6066, abs=1e-4)
    assert clopper_pearson_upper(10, 10) == 1.0


def test_a_bound_rests_on_its_counts_few_non_members_cap_it_near_ln_n_over_3():
    scores, is_member = labelled(RNG.uniform(2, 3, 30), RNG.uniform(0, 1, 30))
    assert 1.5 < epsilon_lower_bound(scores, is_member, DELTA) < np.log(30 / 3) + 0.5


def test_the_loss_and_lira_signals_from_logits():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = np.array([0, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert loss_scores(logits, labels) == pytest.approx(np.log(p[[0, 1], labels]))
    assert lira_signal(logits, labels) == pytest.approx(np.log(p[[0, 1], labels] / (1 - p[[0, 1], labels])))


def test_offline_lira_fits_each_example_on_the_shadows_that_left_it_out():
    # 8 shadows, 3 examples; example 0 sits far above its OUT mean, example 1 at it
    shadows = np.array([[0.0, 5.0, 1.0]] * 4 + [[2.0, 7.0, 1.0]] * 4)
    shadow_in = np.zeros_like(shadows, bool)
    shadow_in[:2, 0] = True   # two shadows trained on example 0: left out of its fit
    shadows[:2, 0] = 100.0
    scores = lira_offline_scores(np.array([9.0, 6.0, 1.0]), shadows, shadow_in)
    mu = np.array([(2 * 0.0 + 4 * 2.0) / 6, 6.0, 1.0])
    sigma = np.sqrt(np.mean(np.concatenate([(np.array([0, 0, 2, 2, 2, 2]) - mu[0]) ** 2, np.ones(8), np.zeros(8)])))
    assert scores == pytest.approx((np.array([9.0, 6.0, 1.0]) - mu) / sigma)
    with pytest.raises(ValueError, match="shapes"):
        lira_offline_scores(np.zeros(2), shadows, shadow_in)


def _audit_row(model: str) -> dict:
    figures = {"auc": 0.5, "tpr@1%": 0.01, "tpr@0.1%": None, "epsilon-lower-bound": 0.0}
    return {"model": model, "test-accuracy": 0.8, "members": 10, "non-members": 20, "targets": 2, "delta": 1e-3,
            "accountant-epsilon": None, "unit": None, "loss": figures, "lira": figures}


def test_an_audit_of_some_settings_keeps_the_rows_of_others_audited_under_the_same_protocol(tmp_path):
    from bench import privacy_audit

    protocol = {"dataset": "digits", "clients": 2, "rounds": 1}
    curve = {"global": (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.7, 1.0]))}
    privacy_audit.write(tmp_path, protocol, {"a": [_audit_row("global")]}, {"a": curve}, "first")
    second = {**_audit_row("global"), "invocation": {"settings": ["b"], "seconds": 61}}
    privacy_audit.write(tmp_path, protocol, {"b": [second]}, {"b": curve}, "second")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["settings"]) == ["a", "b"]
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("second") and "| a | 2 | global |" in table and "| b | 2 | global |" in table
    assert "Wall time: 'b': 61 s, one invocation." in table
    # the thinned curve keeps the step function's values: TPR 0.7 from FPR 0.5 on
    fpr, tpr = privacy_audit.ROC_GRID, np.array(saved["settings"]["a"]["curves"]["global"])
    assert tpr[fpr < 0.5].max() == 0.0 and tpr[(fpr >= 0.5) & (fpr < 1)].min() == 0.7
    # a setting audited again replaces its rows; another protocol's rows are dropped, not mixed in
    privacy_audit.write(tmp_path, {**protocol, "rounds": 3}, {"b": [_audit_row("student")]}, {"b": {}}, "third")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["settings"]) == ["b"] and saved["settings"]["b"]["rows"][0]["model"] == "student"


def test_a_diverged_models_outputs_are_read_as_uniform_and_counted():
    logits = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 1.0], [3.0, -1.0]])
    defined, bad = defined_outputs(logits)
    assert bad == 2 and np.isfinite(defined).all()
    np.testing.assert_array_equal(defined[[1, 2]], 0.0)
    np.testing.assert_array_equal(defined[[0, 3]], logits[[0, 3]])
    # the scores of its examples are then defined (and say nothing): the ROC can be drawn
    scores = loss_scores(defined, np.array([0, 1, 0, 0]))
    assert np.isfinite(scores).all() and scores[1] == scores[2] == -np.log(2)
