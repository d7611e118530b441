"""Ranking with the served model, interleaving in a rollout, and click credit (§4 of
docs/rollouts.md).

:meth:`Ranker.rank` scores items (rows, through the same schema rules as ``predict``) with the
served model: the positive class's probability (binary: the manifest's positive class), the top
class's probability (multiclass), or the regression value. Items are ranked by score, highest
first, ties by input order. On a device in an ``interleave`` rollout the companion (the
candidate, team ``B``) ranks the same items and the shown list is a team-draft interleaving
(:func:`hybridml.shared.interleave.team_draft`) of the served ranking (stable, team ``A``) and
the candidate's; elsewhere every item's team is ``A``.

Each interleaved ranking is an impression kept in memory (the newest :data:`KEEP`):
:meth:`Ranker.click` credits the team that contributed the clicked item. At each flush
:meth:`Ranker.records` finalises the window's impressions into one ``interleave`` record per
(rollout, a, b) — impressions, clicks, credited clicks and wins per team, ties — and a click on
an impression already flushed counts as a ``late_click`` of the window it arrives in.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import InferenceError, InputError
from hybridml.shared.interleave import credit, team_draft
from hybridml.shared.schema import EncodedBatch

from .timebase import WindowClock
from .window import FORMAT

if TYPE_CHECKING:
    from .loaded import LoadedVersion
    from .roles import Rollout

KEEP = 10_000  # impressions kept for clicks
Records = list[tuple[str, dict[str, Any], str, int]]


@dataclass(frozen=True)
class Ranking:
    """A ranked list: ``items`` (the caller's, in shown order), ``indices`` (their positions
    in the input), ``teams`` (``"A"``: the served ranking contributed it, ``"B"``: the
    candidate's), ``scores`` (the served model's score of each shown item) and the ``id``
    that :meth:`Ranker.click` takes (``<store id>:<model>:r<counter>``)."""

    id: str
    items: tuple[Any, ...]
    indices: tuple[int, ...]
    teams: tuple[str, ...]
    scores: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON form (the items as given: rows of JSON values)."""
        return {"id": self.id, "items": [dict(i) if isinstance(i, Mapping) else list(i)
                                         for i in self.items],
                "indices": list(self.indices), "teams": list(self.teams),
                "scores": [None if s != s else s for s in self.scores]}


@dataclass
class _Impression:
    ranking: Ranking
    key: tuple[int, int, int] | None  # (rollout, a, b); None outside an interleave rollout
    clicked: set[int] = field(default_factory=set)
    flushed: bool = False


@dataclass
class _Counts:
    impressions: int = 0
    clicks: int = 0
    credited_a: int = 0
    credited_b: int = 0
    wins_a: int = 0
    wins_b: int = 0
    ties: int = 0
    late_clicks: int = 0


def scores(task: str, labels: np.ndarray | None, probabilities: np.ndarray | None,
           values: np.ndarray | None, classes: Sequence[Any] = (), positive: Any = None
           ) -> np.ndarray:
    """Each row's ranking score (float64; NaN where the model gave none): the probability
    of the class ``positive`` (by name, among ``classes``: callers pass the manifest's
    positive class of a binary model, :attr:`Manifest.positive`, unless asked for another);
    else binary the second class's, multiclass the top probability, regression the value."""
    if task == "regression":
        assert values is not None
        return np.asarray(values, dtype=np.float64)
    assert probabilities is not None
    p = np.asarray(probabilities, dtype=np.float64)
    if positive is not None:
        names = [str(c) for c in classes]
        if str(positive) not in names:
            raise InputError(f"positive={str(positive)[:40]!r} is not a class of the model; "
                             f"its classes are {names[:10]}", field="positive")
        return p[:, names.index(str(positive))]
    return p[:, 1] if task == "binary" else p.max(axis=1)


def order(score: np.ndarray) -> list[int]:
    """Positions by score, highest first; ties (and NaNs, last) by position."""
    key = np.where(np.isnan(score), -np.inf, score)
    return np.argsort(-key, kind="stable").tolist()  # type: ignore[no-any-return]


class Ranker:
    """Ranks for one runtime and keeps its impressions and click credit.

    ``store_id`` and ``model`` make ranking ids; ``rng`` draws the team-draft coin tosses
    (tests seed it); ``clock`` (POSIX seconds) dates windows."""

    def __init__(self, store_id: str, model: str, *, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, keep: int = KEEP) -> None:
        self.store_id = store_id
        self.model = model
        self.rng = rng or random.Random()
        self.clock = clock
        self.keep = keep
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._shown: OrderedDict[str, _Impression] = OrderedDict()
        self._late: dict[tuple[int, int, int], int] = {}
        self._evicted: dict[tuple[int, int, int], _Counts] = {}  # finalised before the flush
        self._windows = WindowClock(clock)

    def rank(self, v: LoadedVersion, rollout: Rollout | None, items: Sequence[Any],
             k: int = 10, positive: Any = None) -> Ranking:
        """Rank ``items`` with ``v`` (interleaved with the companion in an ``interleave``
        ``rollout``) by :func:`scores`; :class:`InputError` names a bad item's index, ``k``
        or ``positive``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"k must be a whole number >= 0, got {k!r}", field="k")
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
            raise InputError("items must be a list of rows (dicts by column name or lists in "
                             "schema order)", field="items")
        items = list(items)
        if not items:
            return self._keep([], [], [], [], None)
        try:
            batch = v.schema.encode(items)
        except InputError as exc:
            raise InputError(f"item {exc.row}: {exc.message}", field=exc.field,
                             row=exc.row) from None
        inf = v.infer(batch)
        if inf.local_failed:
            raise InferenceError(f"the model v{v.version} failed to score {len(items)} "
                                 "item(s); nothing to rank")
        served = scores(v.manifest.task, inf.labels, inf.probabilities, inf.values,
                        v.classes, v.manifest.positive if positive is None else positive)
        ranked_a = order(served)
        key = None
        ranked_b = None
        if rollout is not None and rollout.block.role == "interleave" \
                and rollout.companion is not None and rollout.served is v:
            ranked_b = self._candidate(rollout, batch, positive)
            key = (rollout.block.id, v.version, rollout.companion.version)
        if ranked_b is not None:
            with self._lock:  # the rng is shared between threads
                mixed = team_draft(ranked_a, ranked_b, k, self.rng)
            shown, teams = list(mixed.items), list(mixed.teams)
        else:
            key = None
            shown = ranked_a[:k]
            teams = ["A"] * len(shown)
        return self._keep([items[i] for i in shown], shown, teams,
                          [float(served[i]) for i in shown], key)

    def click(self, ranking_id: str, item: Any) -> None:
        """Credit a click on ``item`` (one of ``ranking.items``, or its position there) of
        the ranking ``ranking_id``; :class:`InputError` for an unknown (or evicted) id or an
        item that was not shown."""
        with self._lock:
            imp = self._shown.get(ranking_id) if isinstance(ranking_id, str) else None
            if imp is None:
                raise InputError(f"no ranking {str(ranking_id)[:80]!r} on this device (the "
                                 f"newest {self.keep:,} are kept); pass the id rank() returned",
                                 field="ranking_id")
            shown = imp.ranking.items
            if isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < len(shown):
                    raise InputError(f"position {item} is not in the ranking's "
                                     f"{len(shown)} item(s)", field="item")
                pos = item
            else:
                pos = next((i for i, x in enumerate(shown) if x == item), -1)
                if pos < 0:
                    raise InputError("the clicked item is not one of the ranking's items; "
                                     "pass one of ranking.items or its position",
                                     field="item")
            if imp.key is None:
                return
            if imp.flushed:
                self._late[imp.key] = self._late.get(imp.key, 0) + 1
            else:
                imp.clicked.add(pos)

    def records(self) -> Records:
        """End the window: one ``interleave`` record per (rollout, a, b) of the impressions
        shown in it (now final) and of the late clicks that arrived in it."""
        with self._lock:
            window, self._evicted = self._evicted, {}
            for imp in self._shown.values():
                self._finalise(imp, window)
            for key, late in self._late.items():
                window.setdefault(key, _Counts()).late_clicks += late
            self._late = {}
            start, end = self._windows.cut()
        out: Records = []
        for (rollout, a, b), c in sorted(window.items()):
            body = {"format": FORMAT, "model": self.model, "rollout": rollout, "a": a, "b": b,
                    "window": {"start": utc_iso(start), "end": utc_iso(end)},
                    **vars(c)}
            out.append(("interleave", body, self.model, a))
        return out

    # --------------------------------------------------------------------------- internals
    @staticmethod
    def _finalise(imp: _Impression, window: dict[tuple[int, int, int], _Counts]) -> None:
        """Count an impression's credit in ``window`` (once; later clicks are late)."""
        if imp.key is None or imp.flushed:
            return
        imp.flushed = True
        c = window.setdefault(imp.key, _Counts())
        c.impressions += 1
        got = credit(imp.ranking.teams, imp.clicked)
        c.clicks += got.clicks_a + got.clicks_b
        c.credited_a += got.clicks_a
        c.credited_b += got.clicks_b
        c.wins_a += got.winner == "A"
        c.wins_b += got.winner == "B"
        c.ties += got.winner == "tie"

    def _candidate(self, rollout: Rollout, batch: EncodedBatch, positive: Any
                   ) -> list[int] | None:
        """The companion's ranking of the items, or None when it cannot run them."""
        from .companion import same_columns

        companion = rollout.companion
        assert companion is not None
        if same_columns(rollout.served, companion) is not None:
            return None
        try:
            out = companion.session.run(batch)
        except InferenceError:
            return None  # the served ranking alone: no impression, nothing credited
        return order(scores(companion.manifest.task, out.labels, out.probabilities,
                            out.values, companion.classes,
                            companion.manifest.positive if positive is None else positive))

    def _keep(self, items: list[Any], indices: list[int], teams: list[str],
              score: list[float], key: tuple[int, int, int] | None) -> Ranking:
        ranking = Ranking(f"{self.store_id}:{self.model}:r{next(self._ids)}", tuple(items),
                          tuple(indices), tuple(teams), tuple(score))
        with self._lock:
            self._shown[ranking.id] = _Impression(ranking, key)
            while len(self._shown) > self.keep:  # an evicted impression still counts
                self._finalise(self._shown.popitem(last=False)[1], self._evicted)
        return ranking


__all__ = ["KEEP", "Ranker", "Ranking", "order", "scores"]
