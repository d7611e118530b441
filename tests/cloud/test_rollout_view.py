"""The text view of an analysis says the decision, the arms, every check in full and the
tests in words (``rollout status``)."""

from __future__ import annotations

from hybridml.cloud.rollout_view import analysis_text

AB = {"action": "abort", "time": "2026-12-03T21:23:18Z",
      "reasons": ["the control (v1) beats every other arm significantly"],
      "arms": {"A": {"version": 1, "units": 13, "devices": 13, "labels": 404,
                     "estimate": 0.972772, "mean_sq_error": 0.0},
               "B": {"version": 2, "units": 11, "devices": 11, "labels": 324,
                     "estimate": 0.654321, "mean_sq_error": 0.0}},
      "checks": [{"name": "srm_assigned", "passed": True, "value": 0.683, "bound": 0.001,
                  "detail": "assigned units per arm [13, 11] against the split [50, 50]"},
                 {"name": "samples", "passed": None, "value": 20, "bound": 200,
                  "detail": "labels per arm [404, 20]"}],
      "tests": {"B": {"fixed": {"test": "two_proportion_z", "effect": -0.318451,
                                "ci_low": -0.372614, "ci_high": -0.264289,
                                "p_value": 4.39201e-30, "significant": True},
                      "msprt": {"p_value": 3.5e-19}, "msprt_running_min": 3.5e-19,
                      "p_corrected": 3.5e-19},
                "srm_assigned": {"observed": [13, 11], "expected": [12.0, 12.0],
                                 "p_value": 0.683091, "mismatch": False}}}


def test_an_ab_readout_shows_arms_checks_and_the_tests_in_words() -> None:
    text = analysis_text(AB, "running", None)
    assert text.startswith("decision: abort\n  - the control (v1) beats")
    assert "97.28 %" in text and "65.43 %" in text and "mse" not in text  # all zero: dropped
    assert "no data samples: 20 (bound 200) - labels per arm [404, 20]" in text
    assert ("B vs A: two_proportion_z effect -0.3185 (95 % CI -0.3726 to -0.2643), p 4.39e-30"
            " significant; always-valid p (mSPRT) 3.5e-19, after Holm 3.5e-19") in text
    assert "srm assigned: observed [13, 11] against [12.0, 12.0], p 0.6831" in text


def test_an_ended_rollout_shows_its_last_decision_and_a_new_one_says_so() -> None:
    assert analysis_text(None, "aborted", AB).startswith(
        "last decision (2026-12-03T21:23:18Z): abort")
    assert analysis_text(None, "aborted", None) == "no analysis: the rollout is aborted"
    assert "rollout tick" in analysis_text(None, "running", None)
