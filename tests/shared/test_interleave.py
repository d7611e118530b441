"""Team-draft interleaving and click credit, worked by hand (hybridml.shared.interleave)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridml.shared.errors import InputError
from hybridml.shared.interleave import Credit, Interleaved, credit, team_draft


class Coins(random.Random):
    """A random source whose coin tosses are scripted: True means A picks first."""

    def __init__(self, a_first: Sequence[bool]) -> None:
        super().__init__(0)
        self.tosses = list(a_first)

    def random(self) -> float:
        return 0.0 if self.tosses.pop(0) else 0.99


def test_team_draft_follows_the_coin_on_each_tied_round() -> None:
    # Round 1: tie, B wins the toss and takes its top (2); A, behind, takes its top untaken (1).
    # Round 2: tie, A wins: A's next untaken is 3; B, behind, skips 1 and takes 4.
    out = team_draft([1, 2, 3, 4], [2, 1, 4, 3], 4, Coins([False, True]))
    assert out == Interleaved(items=(2, 1, 3, 4), teams=("B", "A", "A", "B"))


def test_team_draft_with_a_seeded_rng_is_reproducible() -> None:
    first = team_draft([1, 2, 3, 4], [2, 1, 4, 3], 4, random.Random(7))
    again = team_draft([1, 2, 3, 4], [2, 1, 4, 3], 4, random.Random(7))
    assert first == again
    assert sorted(first.items) == [1, 2, 3, 4]
    assert first.teams.count("A") == first.teams.count("B") == 2


def test_team_draft_of_identical_rankings_shows_that_ranking() -> None:
    out = team_draft([5, 6, 7], [5, 6, 7], 3, Coins([True, False]))
    assert out.items == (5, 6, 7)
    assert out.teams == ("A", "B", "B")


def test_team_draft_lets_the_other_team_keep_picking_when_one_list_is_exhausted() -> None:
    out = team_draft([1, 2], [3, 4, 5, 6], 10, Coins([True, True]))
    assert out.items == (1, 3, 2, 4, 5, 6)
    assert out.teams == ("A", "B", "A", "B", "B", "B")


def test_team_draft_stops_when_both_lists_are_exhausted() -> None:
    out = team_draft([1, 2], [2, 1], 5, random.Random(1))
    assert sorted(out.items) == [1, 2]
    assert team_draft([], [], 3, random.Random(1)) == Interleaved(items=(), teams=())


def test_team_draft_stops_at_k() -> None:
    out = team_draft(list(range(10)), list(range(9, -1, -1)), 3, random.Random(3))
    assert len(out.items) == len(out.teams) == 3
    assert team_draft([1], [2], 0, random.Random(3)).items == ()


def test_team_draft_refuses_negative_k() -> None:
    with pytest.raises(InputError) as err:
        team_draft([1], [2], -1, random.Random(0))
    assert err.value.field == "k"


def test_a_click_on_an_item_both_rank_first_credits_whoever_drafted_it() -> None:
    a_first = team_draft([1, 2, 3], [1, 3, 2], 3, Coins([True, False]))
    b_first = team_draft([1, 2, 3], [1, 3, 2], 3, Coins([False, True]))
    assert a_first.items[0] == b_first.items[0] == 1
    assert credit(a_first.teams, [0]) == Credit(clicks_a=1, clicks_b=0, winner="A")
    assert credit(b_first.teams, [0]) == Credit(clicks_a=0, clicks_b=1, winner="B")


def test_credit_counts_each_team_and_names_the_winner() -> None:
    teams = ("B", "A", "A", "B")
    assert credit(teams, [0, 3, 1]) == Credit(clicks_a=1, clicks_b=2, winner="B")
    assert credit(teams, [1, 0]) == Credit(clicks_a=1, clicks_b=1, winner="tie")
    assert credit(teams, []) == Credit(clicks_a=0, clicks_b=0, winner=None)


def test_credit_counts_a_position_clicked_twice_once() -> None:
    assert credit(("A", "B"), [1, 1, 1, 0]) == Credit(clicks_a=1, clicks_b=1, winner="tie")


@pytest.mark.parametrize("position", [-1, 2, 10])
def test_credit_refuses_a_position_outside_the_list(position: int) -> None:
    with pytest.raises(InputError) as err:
        credit(("A", "B"), [position])
    assert err.value.field == "clicked_positions"
    assert str(position) in err.value.message


def test_credit_refuses_an_unknown_team() -> None:
    with pytest.raises(InputError) as err:
        credit(("A", "C"), [1])
    assert err.value.field == "teams"


rankings = st.lists(st.integers(0, 12), max_size=10, unique=True)


@given(rankings, rankings, st.integers(0, 15), st.integers(0, 2**32 - 1))
def test_team_draft_keeps_each_teams_order_and_never_repeats(
    a: list[int], b: list[int], k: int, seed: int
) -> None:
    out = team_draft(a, b, k, random.Random(seed))
    assert len(out.items) == len(set(out.items)) == len(out.teams)
    assert len(out.items) == min(k, len(set(a) | set(b)))
    for team, ranking in (("A", a), ("B", b)):
        picks = [item for item, t in zip(out.items, out.teams) if t == team]
        assert picks == sorted(picks, key=ranking.index)  # in that team's order
        for item in picks:  # each pick was the team's best item not shown before it
            shown_before = set(out.items[: out.items.index(item)])
            assert item == next(x for x in ranking if x not in shown_before)


def test_team_draft_under_random_clicks_favours_neither_team() -> None:
    # A user who clicks one random shown position: with identical-length rankings each team
    # wins half the time in expectation, whatever the rankings (the unbiasedness property).
    rng, wins = random.Random(11), {"A": 0, "B": 0}
    for _ in range(4000):
        out = team_draft([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], 5, rng)
        winner = credit(out.teams, [rng.randrange(4)]).winner
        assert winner in wins
        wins[str(winner)] += 1
    assert abs(wins["A"] / 4000 - 0.5) < 0.03
