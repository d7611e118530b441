"""Ranking with the served model, team-draft interleaving in a rollout, and click credit
(docs/rollouts.md §4, §6)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.edge.ranking import Ranker, order
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import InputError
from hybridml.shared.interleave import credit, team_draft
from hybridml.shared.manifest import Manifest
from tests.edge.test_shadow import make_store, registry, spooled, with_rollout

__all__ = ["registry"]  # the module fixture, shared with test_shadow

ITEMS = [{"restaurant": f"r00{i % 5}", "hour": 8 + i, "distance_km": 0.5 + (i * 7 % 17) / 2,
          "rain": ("yes", "no", "")[i % 3], "items": 1 + i % 6} for i in range(14)]


def _scores(store: Any, m: Manifest, items: list[Any]) -> np.ndarray:
    art = m.artifact("model")
    assert art is not None
    out = ModelSession(store.artifact_path(art.sha256), m.schema, m.task).run(
        m.schema.encode(items))
    assert out.probabilities is not None
    return out.probabilities[:, 1].astype(np.float64)  # binary: the second class


def test_rank_orders_items_by_the_positive_class_probability(registry: Path,
                                                            tmp_path: Path) -> None:
    store, (_, v2) = make_store(registry, "late", tmp_path / "s")
    rt = EdgeRuntime(store, "late", telemetry=False)
    ranking = rt.rank(ITEMS, k=5)
    want = _scores(store, v2, ITEMS)
    top = sorted(range(len(ITEMS)), key=lambda i: (-want[i], i))[:5]
    assert list(ranking.indices) == top
    assert list(ranking.items) == [ITEMS[i] for i in top]
    assert ranking.teams == ("A",) * 5
    assert ranking.scores == pytest.approx([want[i] for i in top], abs=1e-6)
    assert ranking.id.startswith(f"{rt.store_id}:late:r")
    body = ranking.to_json()
    assert set(body) == {"id", "items", "indices", "teams", "scores"}
    # outside an interleave rollout clicks are accepted and nothing is recorded
    rt.click(ranking.id, 0)
    rt.flush()
    assert spooled(rt, "interleave") == []


def test_rank_can_score_by_any_class_and_names_an_unknown_one(registry: Path,
                                                              tmp_path: Path) -> None:
    store, (_, v2) = make_store(registry, "late", tmp_path / "s")
    rt = EdgeRuntime(store, "late", telemetry=False)
    first = str(v2.classes[0])  # not the default (second) class: the order reverses
    want = 1.0 - _scores(store, v2, ITEMS)
    ranking = rt.rank(ITEMS, k=5, positive=first)
    assert list(ranking.indices) == sorted(range(len(ITEMS)), key=lambda i: (-want[i], i))[:5]
    with pytest.raises(InputError) as err:
        rt.rank(ITEMS, positive="no such class")
    assert err.value.details["field"] == "positive" and first in err.value.message


def test_ties_keep_input_order_and_k_caps_the_list() -> None:
    assert order(np.array([0.5, 0.9, 0.5, np.nan, 0.9])) == [1, 4, 0, 2, 3]


def test_rank_goes_through_the_rules_of_predict(registry: Path, tmp_path: Path) -> None:
    store, _ = make_store(registry, "late", tmp_path / "s")
    rt = EdgeRuntime(store, "late", telemetry=False)
    bad = [dict(ITEMS[0]), dict(ITEMS[1], hour="soon")]
    with pytest.raises(InputError) as got:
        rt.rank(bad)
    with pytest.raises(InputError) as want:
        rt.predict(bad)
    assert got.value.row == want.value.row == 1
    assert got.value.field == want.value.field == "hour"
    assert "item 1" in got.value.message
    with pytest.raises(InputError) as err:
        rt.rank(ITEMS, k=-1)
    assert err.value.field == "k"
    # lists in schema order are rows too, and rank as their dicts do
    as_lists = [[r[n] for n in store.active("late").schema.names] for r in ITEMS]  # type: ignore[union-attr]
    assert rt.rank(as_lists).indices == rt.rank(ITEMS).indices
    assert rt.rank([]).items == ()


def test_interleave_teams_come_from_team_draft(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "late", tmp_path / "s")
    with_rollout(store, v1, v2, "interleave", rid=9)  # serve stable v1, candidate v2
    rt = EdgeRuntime(store, "late", telemetry=False)
    rt.ranker.rng = random.Random(4)
    ranking = rt.rank(ITEMS, k=6)
    a, b = order(_scores(store, v1, ITEMS)), order(_scores(store, v2, ITEMS))
    assert a != b, "the two versions rank alike: the test proves nothing"
    mixed = team_draft(a, b, 6, random.Random(4))
    assert ranking.indices == mixed.items and ranking.teams == mixed.teams
    assert set(ranking.teams) == {"A", "B"}


def test_clicks_are_credited_into_the_interleave_record(registry: Path,
                                                        tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "late", tmp_path / "s")
    with_rollout(store, v1, v2, "interleave", rid=9)
    rt = EdgeRuntime(store, "late", telemetry=False)
    rt.ranker.rng = random.Random(1)
    rankings = [rt.rank(ITEMS[i:] + ITEMS[:i], k=6) for i in range(5)]
    clicks = {0: [0], 1: [0, 1, 2], 2: [], 3: [5], 4: [1, 1]}
    want = {"impressions": 5, "clicks": 0, "credited_a": 0, "credited_b": 0, "wins_a": 0,
            "wins_b": 0, "ties": 0, "late_clicks": 0}
    for i, positions in clicks.items():
        for pos in positions:
            # by position, or by the item itself
            rt.click(rankings[i].id, pos if pos % 2 else rankings[i].items[pos])
        c = credit(rankings[i].teams, positions)
        want["clicks"] += c.clicks_a + c.clicks_b
        want["credited_a"] += c.clicks_a
        want["credited_b"] += c.clicks_b
        want["wins_a"] += c.winner == "A"
        want["wins_b"] += c.winner == "B"
        want["ties"] += c.winner == "tie"
    rt.flush()
    rt.click(rankings[0].id, 1)  # after the flush: a late click of the next window
    rt.flush()
    bodies = spooled(rt, "interleave")
    assert len(bodies) == 2
    first, late = bodies
    assert {k: first[k] for k in want} == want
    assert (first["format"], first["model"], first["rollout"], first["a"], first["b"]) == \
        (1, "late", 9, 1, 2)
    assert set(first["window"]) == {"start", "end"}
    assert (late["impressions"], late["late_clicks"], late["clicks"]) == (0, 1, 0)


def test_an_unknown_or_evicted_ranking_id_is_an_input_error(registry: Path,
                                                            tmp_path: Path) -> None:
    store, _ = make_store(registry, "late", tmp_path / "s")
    rt = EdgeRuntime(store, "late", telemetry=False)
    with pytest.raises(InputError) as err:
        rt.click("nope:late:r1", 0)
    assert err.value.field == "ranking_id"
    ranking = rt.rank(ITEMS, k=3)
    with pytest.raises(InputError) as err:
        rt.click(ranking.id, 3)
    assert err.value.field == "item"
    with pytest.raises(InputError) as err:
        rt.click(ranking.id, {"not": "shown"})
    assert err.value.field == "item"
    small = Ranker("abc", "late", keep=2)
    v = rt.loaded
    assert v is not None
    ids = [small.rank(v, None, ITEMS, 2).id for _ in range(3)]
    with pytest.raises(InputError, match="newest 2"):
        small.click(ids[0], 0)
    small.click(ids[2], 0)
