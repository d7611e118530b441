"""Team-draft interleaving and click credit (pure Python: it runs on edge devices).

Team-draft interleaving (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008) merges two rankings into one list shown to a user. Like two
captains picking players, each round the team with fewer picks so far picks next (a coin toss
when both have picked equally often) and takes its highest-ranked item that is not yet in the
list. Each shown item remembers the team that contributed it; a click credits that team, and
the team with more credited clicks wins the impression. Because both teams get the same number
of chances at the top positions in expectation, position bias cancels out and a click says
which ranker the user preferred. docs/rollouts.md §4 and §6 describe how the device uses it.

The cloud tests wins with :func:`hybridml.cloud.stats.sign_test`.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InputError

__all__ = ["TEAMS", "Credit", "Interleaved", "credit", "team_draft"]

T = TypeVar("T", bound=Hashable)

#: The two team labels: ``A`` is the first ranking (stable), ``B`` the second (candidate).
TEAMS: tuple[str, str] = ("A", "B")


@dataclass(frozen=True)
class Interleaved(Generic[T]):
    """An interleaved list: ``items[i]`` was contributed by team ``teams[i]`` (``"A"``/``"B"``)."""

    items: tuple[T, ...]
    teams: tuple[str, ...]


@dataclass(frozen=True)
class Credit:
    """Clicks credited to each team for one impression.

    ``winner`` is ``"A"`` or ``"B"`` when that team has more credited clicks, ``"tie"`` when
    both have the same non-zero count, and ``None`` when nothing was clicked.
    """

    clicks_a: int
    clicks_b: int
    winner: str | None


def _next_unused(ranking: Sequence[T], start: int, taken: set[T]) -> int:
    """Index of the first item of ``ranking`` at or after ``start`` not in ``taken``."""
    i = start
    while i < len(ranking) and ranking[i] in taken:
        i += 1
    return i


def team_draft(
    ranking_a: Sequence[T], ranking_b: Sequence[T], k: int, rng: random.Random
) -> Interleaved[T]:
    """Interleave two rankings by team draft (Radlinski, Kurup & Joachims 2008).

    Each round the team with fewer picks so far picks; when both have picked equally often a
    coin toss (``rng.random() < 0.5`` → A first) decides. The picking team takes its
    highest-ranked item not already in the list. When one team's ranking is exhausted the other
    keeps picking; the draft stops at ``k`` items or when both rankings are exhausted. Items are
    compared by equality and hash, so pass hashable keys (indices, ids). A ranking with repeated
    items contributes each item once.

    ``rng`` is the only source of randomness, so a seeded ``random.Random`` makes the draft
    reproducible. Raises :class:`InputError` (field ``k``) when ``k`` is negative.
    """
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}; pass how many items to show", field="k")
    items: list[T] = []
    teams: list[str] = []
    taken: set[T] = set()
    ia = ib = 0  # cursors: everything before them is already taken
    picks_a = picks_b = 0
    while len(items) < k:
        ia = _next_unused(ranking_a, ia, taken)
        ib = _next_unused(ranking_b, ib, taken)
        a_left, b_left = ia < len(ranking_a), ib < len(ranking_b)
        if not (a_left or b_left):
            break
        if a_left and b_left:
            a_turn = picks_a < picks_b or (picks_a == picks_b and rng.random() < 0.5)
        else:
            a_turn = a_left  # one list is exhausted: the other keeps picking
        if a_turn:
            item, picks_a = ranking_a[ia], picks_a + 1
            teams.append("A")
        else:
            item, picks_b = ranking_b[ib], picks_b + 1
            teams.append("B")
        items.append(item)
        taken.add(item)
    return Interleaved(items=tuple(items), teams=tuple(teams))


def credit(teams: Sequence[str], clicked_positions: Iterable[int]) -> Credit:
    """Credit the clicks of one impression to the teams that contributed the clicked items.

    ``teams`` is :attr:`Interleaved.teams`; ``clicked_positions`` are 0-based positions in the
    shown list. A position clicked more than once counts once. The team with more credited
    clicks wins; equal non-zero counts tie; no clicks gives ``winner=None`` (such impressions
    count only as impressions, docs/rollouts.md §4). Raises :class:`InputError` (field
    ``clicked_positions``) for a position outside ``0 .. len(teams) - 1`` and (field ``teams``)
    for a team label other than ``"A"``/``"B"``.
    """
    clicks = {"A": 0, "B": 0}
    for pos in set(clicked_positions):
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < len(teams):
            raise InputError(
                f"clicked position {pos!r} is outside the shown list of {len(teams)} items; "
                "pass 0-based positions of shown items",
                field="clicked_positions",
            )
        team = teams[pos]
        if team not in clicks:
            raise InputError(
                f"team {team!r} at position {pos} is neither 'A' nor 'B'", field="teams"
            )
        clicks[team] += 1
    a, b = clicks["A"], clicks["B"]
    winner = None if a == b == 0 else "A" if a > b else "B" if b > a else "tie"
    return Credit(clicks_a=a, clicks_b=b, winner=winner)
