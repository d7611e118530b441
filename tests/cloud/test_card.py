"""The model card: numbers computed on the holdout, every section, the HTML page, rollouts."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud import metrics
from hybridml.cloud.card import NOT_RECORDED, assemble, build, text
from hybridml.cloud.card_html import render, write_html
from hybridml.cloud.card_stats import Scorer, bootstrap
from hybridml.cloud.cli import main
from hybridml.cloud.registry import Registry
from hybridml.cloud.rollouts import Rollouts
from hybridml.cloud.train import train
from hybridml.edge.session import Outputs
from tests.cloud.rolloutkit import Clock

IRIS_COLUMNS = ("sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm")
HOSTILE = "<script>alert('x')</script>&\"col\""


class _Links(HTMLParser):
    """Every src/href of a page, and whether it parsed."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]


def _card_json(reg: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["card", *argv, "--registry", str(reg), "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _with_quality_keys(manifest: dict[str, Any]) -> dict[str, Any]:
    """A binary version's manifest carrying what the quality helpers record
    (docs/quality.md §1, §2, §4)."""
    return {**manifest, "output": {**manifest["output"], "task": "binary",
                                   "classes": ["legit", "fraud"]},
            "training": {**manifest["training"], "imbalance": {
                "counts": {"legit": 9640, "fraud": 360}, "minority_share": 0.036,
                "imbalanced": True, "class_weight": "balanced", "requested": "auto",
                "how": "sample_weight"}},
            "decision": {"threshold": 0.23, "positive": "fraud", "source": "auto",
                         "tuned_for": "balanced_accuracy"},
            "calibration": {"method": "sigmoid", "requested": "auto", "reason": "few rows",
                            "brier": 0.071, "brier_uncalibrated": 0.093,
                            "curve": {"mean_predicted": [0.05, 0.5, 0.9],
                                      "fraction_positive": [0.04, 0.45, 0.95],
                                      "count": [300, 40, 60]}},
            "metrics": {**manifest["metrics"], "edge_test": {
                **manifest["metrics"]["edge_test"], "roc_auc": 0.91, "pr_auc": 0.62,
                "confusion": {"labels": ["legit", "fraud"], "matrix": [[90, 7], [2, 11]]}}},
            "fairness": {"columns": ["sex"], "excluded": ["sex"], "max_parity_gap": 0.1,
                         "passed": True, "by_column": {"sex": {
                             "groups": {"F": {"n": 41, "selection_rate": 0.12, "tpr": 0.8,
                                              "fpr": 0.05, "balanced_accuracy": 0.87},
                                        "M": {"n": 69, "selection_rate": 0.15, "tpr": 0.7,
                                              "fpr": 0.06, "balanced_accuracy": 0.82}},
                             "demographic_parity_difference": 0.03,
                             "equalized_odds_difference": 0.1}}}}


def test_card_of_an_iris_version_has_intervals_around_the_holdout_value_and_raw_features(
        iris_registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["card", "iris", "--version", "1", "--registry", str(iris_registry)]) == 0
    page = capsys.readouterr().out
    assert "iris v1 = version 1 (stable)" in page
    assert "sha256 " in page and "1000 bootstrap resamples" in page
    card = _card_json(iris_registry, "iris", "--version", "1", capsys=capsys)
    held = card["metrics"]["holdout"]
    assert held["rows"] == 30 and held["primary"] == "accuracy"
    assert {"accuracy", "balanced_accuracy", "f1_macro", "f1"} <= set(held["metrics"])
    for name, m in held["metrics"].items():
        if m["low"] is None:  # of the probabilities: a value without an interval
            assert name in ("roc_auc", "brier"), name
            continue
        assert m["low"] <= m["value"] <= m["high"], name
        assert m["high"] - m["low"] > 0, name  # 30 rows cannot pin a metric down
        # v1's holdout is its test split: the same rows its recorded edge metrics came from
        assert m["value"] == pytest.approx(card["metrics"]["recorded"][name], abs=1e-6)
    top = [f["name"] for f in card["features"]["features"]]
    assert sorted(top) == sorted(IRIS_COLUMNS)
    assert top[0].startswith("petal")  # iris is told apart by its petals
    assert top[0] in page


def test_bootstrap_intervals_are_deterministic_for_a_seed(iris_registry: Path) -> None:
    reg = Registry(iris_registry, create=False)
    first, again = build(reg, "iris", 1, seed=3), build(reg, "iris", 1, seed=3)
    other = build(reg, "iris", 1, seed=4)
    assert first == again
    assert first["metrics"]["holdout"]["seed"] == 3
    intervals = [(m["low"], m["high"]) for m in first["metrics"]["holdout"]["metrics"].values()]
    assert intervals != [(m["low"], m["high"])
                         for m in other["metrics"]["holdout"]["metrics"].values()]


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_the_vectorised_point_estimates_are_the_metrics_module_s(task: str) -> None:
    rng = np.random.default_rng(0)
    k = 2 if task == "binary" else 4
    y = rng.integers(0, k, 200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, k - 1, 200))  # wrong: never the last
    classes = [f"c{i}" for i in range(k)]
    manifest = {"output": {"task": task, "classes": classes}, "metrics": {}}
    scorer = Scorer.of(manifest, [classes[i] for i in y])
    got = bootstrap(scorer, Outputs(pred, None, None), resamples=200)
    for name, value in metrics.scores(task, y, pred).items():
        if name == "confusion":
            continue
        assert got[name]["value"] == pytest.approx(value, abs=1e-6)
        assert got[name]["low"] <= got[name]["value"] <= got[name]["high"]
    if task == "binary":
        tp = np.sum((y == 1) & (pred == 1))
        f1 = 2 * tp / (np.sum(y == 1) + np.sum(pred == 1))
        assert got["f1"]["value"] == pytest.approx(f1, abs=1e-6)


def test_a_binary_card_scores_f1_of_the_recorded_positive_class() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random(300) < 0.8).astype(np.int64)  # class 0, "fraud", is the minority
    pred = np.where(rng.random(300) < 0.8, y, 1 - y)
    classes = ["fraud", "legit"]
    manifest = {"output": {"task": "binary", "classes": classes},
                "metrics": {"positive": "fraud", "primary": "f1"}}
    scorer = Scorer.of(manifest, [classes[i] for i in y])
    assert scorer.positive == 0
    got = bootstrap(scorer, Outputs(pred, None, None), resamples=100)
    assert got["f1"]["value"] == pytest.approx(metrics.f1("binary", y, pred, 0), abs=1e-6)
    assert got["f1"]["value"] != pytest.approx(metrics.f1("binary", y, pred, 1), abs=1e-3)
    old = {**manifest, "metrics": {"primary": "f1"}}  # from before: classes[1]
    assert Scorer.of(old, [classes[i] for i in y]).positive == 1


def test_regression_intervals_come_from_resampled_rows() -> None:
    rng = np.random.default_rng(1)
    y = 1000 + 10 * rng.normal(size=500)  # far from 0: sums of squares must stay precise
    pred = (y + 3 * rng.normal(size=500)).astype(np.float32)
    scorer = Scorer("regression", y, "rmse", None, 0)
    got = bootstrap(scorer, Outputs(None, None, pred), resamples=400)
    for name, value in metrics.scores("regression", y, pred).items():
        assert got[name]["value"] == pytest.approx(value, abs=1e-6)
        assert got[name]["low"] < value < got[name]["high"]
    assert got["rmse"]["low"] > 2.5 and got["rmse"]["high"] < 3.5  # noise sd 3, 500 rows
    assert 0.85 < got["r2"]["low"] < got["r2"]["high"] < 0.95


def test_a_regression_card_marks_errors_lower_is_better(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    train(reg, "dia", dataset="diabetes", model="logreg")
    card = build(reg, "dia")
    held = card["metrics"]["holdout"]["metrics"]
    assert set(held) == {"rmse", "mae", "r2"}
    assert all(m["low"] <= m["value"] <= m["high"] for m in held.values())
    assert card["features"]["metric"] == "rmse"
    assert "rmse (lower is better)" in text(card)
    assert "data:image/png;base64," in render(card)


def test_the_html_card_is_self_contained(iris_registry: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "card.html"
    assert main(["card", "iris", "--registry", str(iris_registry), "--html", str(out)]) == 0
    assert f"written: {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    parser.close()
    assert {"html", "table", "img"} <= set(parser.tags)
    assert parser.links and all(link.startswith("data:image/png;base64,")
                                for link in parser.links)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page


def test_strings_from_manifests_and_rollouts_are_escaped(iris_registry: Path) -> None:
    reg = Registry(iris_registry, create=False)
    card = build(reg, "iris", 1)
    card["name"] = HOSTILE
    card["features"]["features"][0]["name"] = HOSTILE + "$\\alpha$"  # not maths in a plot
    card["rollouts"] = [{"id": 1, "strategy": "canary", "role": "candidate",
                         "state": "aborted", "started": "2026-01-01T00:00:00Z",
                         "ended": "2026-01-02T00:00:00Z", "forced": False,
                         "outcome": f"aborted: {HOSTILE}"}]
    page = render(card)
    assert "<script>" not in page and HOSTILE not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;col&quot;" in page


def test_quality_sections_render_when_recorded_and_say_so_when_absent(
        iris_registry: Path, tmp_path: Path) -> None:
    reg = Registry(iris_registry, create=False)
    manifest, metadata = reg.manifest("iris", 1), reg.metadata("iris", 1)
    # A version from before issue 14 recorded none of them.
    old = {k: v for k, v in manifest.items() if k not in ("decision", "calibration",
                                                           "fairness", "gate")}
    old["metrics"] = {**manifest["metrics"], "edge_test": {
        k: v for k, v in manifest["metrics"]["edge_test"].items() if k != "confusion"}}
    bare = assemble(old, metadata, None, [])
    bare_text, bare_page = text(bare), render(bare)
    for section in ("decision", "calibration", "confusion", "fairness", "gate"):
        assert any(line.startswith(section) and NOT_RECORDED in line
                   for line in bare_text.splitlines()), section
    assert bare_page.count(NOT_RECORDED) >= 5
    assert "holdout: not recorded" in bare_text  # no stats given: the recorded metrics only

    full = assemble(_with_quality_keys(manifest), metadata, None, [])
    page_text = text(full)
    assert bare["metrics"]["positive"] is None  # iris: not binary
    assert full["metrics"]["positive"] == "fraud"  # no metrics.positive: classes[1]
    assert "(F1, PR-AUC: of the positive class fraud)" in page_text
    assert "training classes legit 9,640, fraud 360; smallest share 3.6% (imbalanced); " \
        "class weight balanced (sample_weight)" in page_text
    assert "label fraud when P(fraud) >= 0.23 (auto, tuned for balanced_accuracy)" in page_text
    assert "sigmoid; Brier 0.0710 (uncalibrated 0.0930)" in page_text
    assert "0.50->0.45" in page_text  # the reliability curve's points
    assert "pred fraud" in page_text and "true legit" in page_text
    assert "demographic parity difference 0.0300" in page_text
    assert "not model inputs: sex" in page_text
    assert "roc_auc" in page_text and "pr_auc" in page_text
    out = write_html(full, tmp_path / "full.html")
    page = out.read_text(encoding="utf-8")
    assert "alt='reliability curve'" in page and "data:image/png;base64," in page
    for word in ("0.23", "fraud", "sigmoid", "0.0710", "equalized odds difference"):
        assert word in page
    sections = page.split("<h2>Decision threshold</h2>")[1].split("<h2>Top features</h2>")[0]
    assert NOT_RECORDED not in sections and "Fairness" in page
    assert NOT_RECORDED not in page.split("<h2>Fairness</h2>")[1].split("<h2>Lineage")[0]


def test_a_version_shows_the_rollouts_it_went_through(
        iris_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry(iris_copy)
    rollouts = Rollouts(reg, clock=Clock())
    r = rollouts.start("iris", "canary", candidate=2, force=True, actor="alice",
                       reason="try v2")
    rollouts.finish(r.id, "aborted", actor="alice", reason="p99 latency up")
    cand = _card_json(iris_copy, "iris", "--version", "2", capsys=capsys)
    assert [(x["id"], x["strategy"], x["role"], x["state"]) for x in cand["rollouts"]] == \
        [(r.id, "canary", "candidate", "aborted")]
    assert cand["rollouts"][0]["outcome"] == "aborted: p99 latency up"
    assert cand["rollouts"][0]["forced"] is True
    assert main(["card", "iris", "--version", "2", "--registry", str(iris_copy)]) == 0
    page = capsys.readouterr().out
    assert f"#{r.id} canary as candidate: 2027-01-15T08:00:00Z .. 2027-01-15T08:00:00Z: " \
        "aborted: p99 latency up (forced)" in page
    stable = _card_json(iris_copy, "iris", "--version", "1", capsys=capsys)
    assert [x["role"] for x in stable["rollouts"]] == ["stable"]


def test_card_of_a_ghost_model_is_not_found_in_one_line(
        iris_registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["card", "ghost", "--registry", str(iris_registry)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "'ghost'" in err
    assert main(["card", "iris", "--version", "9", "--registry", str(iris_registry),
                 "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "not_found"
