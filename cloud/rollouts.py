"""Rollouts in the registry: start, advance, finish, audit, and who is assigned what.

docs/rollouts.md §1–2 is the contract. Three tables of ``registry.db`` (schema 4) hold the
rollouts, their audit trail (``rollout_events``: every start, step change, promote, abort and
hold, with actor, reason and evidence) and the units seen (``rollout_units``). Every change of
what devices are told raises the model's release sequence in the same transaction, so devices
accept the new manifest and refuse a replay of the old one; promoting moves ``stable`` through
the audited :func:`hybridml.cloud.auth.promote`.

:meth:`Rollouts.assign` runs on every manifest request: the running rollout of a model is
remembered per thread until anything commits to the registry (:meth:`Registry.stamp`), and a
unit's row is written at most once a minute per (rollout, unit, arm) per process.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hybridml.shared.assign import bucket
from hybridml.shared.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    RegistryError,
)
from hybridml.shared.manifest import canonical_json

from .auth import promote as promote_alias
from .database import SqlConn, insert_id
from .registry import Ref, Registry, bump_sequence, lookup_name
from .rollout_config import Config
from .rollout_types import Assignment, Rollout, Unit, blessed, rollout_of

log = logging.getLogger("hybridml.cloud.rollouts")

RUNNING = "running"
FINAL = ("promoted", "aborted", "inconclusive-held")
ACTION_OF = {"promoted": "promote", "aborted": "abort", "inconclusive-held": "hold"}
TOUCH_S = 60.0  # a unit's row is rewritten at most this often per process
_TOUCH_MAX = 200_000  # memo entries kept before the memo starts over
_WITH_CANDIDATE = ("shadow", "canary", "interleave")
_COLUMNS = ("id, name, strategy, state, stable, candidate, arms, config, step, step_started, "
            "started, ended, forced, decision, memo")


class Rollouts:
    """The rollouts of every model in ``registry`` (see the module docstring).

    ``clock`` (POSIX seconds) stamps every row; tests pass their own.
    """

    def __init__(self, registry: Registry, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock
        self._local = threading.local()  # per thread: data_version is per connection
        self._touched: dict[tuple[int, str, str], float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ reading
    def get(self, rollout_id: int) -> Rollout:
        """The rollout ``rollout_id``; NotFoundError if there is none."""
        with self.registry.transaction(write=False) as c:
            return self._get(c, rollout_id)

    def active(self, name: str) -> Rollout | None:
        """The running rollout of ``name``, or None."""
        rows = self._select("WHERE name = ? AND state = ?", (lookup_name(name), RUNNING))
        return rows[0] if rows else None

    def latest(self, name: str) -> Rollout | None:
        """The running rollout of ``name``, else its newest one, else None."""
        rows = self._select("WHERE name = ? ORDER BY state = ? DESC, id DESC LIMIT 1",
                            (lookup_name(name), RUNNING))
        return rows[0] if rows else None

    def list(self, name: str) -> builtins.list[Rollout]:
        """Every rollout of ``name``, newest first."""
        return self._select("WHERE name = ? ORDER BY id DESC", (lookup_name(name),))

    def events(self, rollout_id: int) -> builtins.list[dict[str, Any]]:
        """The audit trail of a rollout, oldest first."""
        with self.registry.transaction(write=False) as c:
            rows = c.execute("SELECT id, time, actor, action, from_state, to_state, step, "
                             "reason, evidence FROM rollout_events WHERE rollout = ? "
                             "ORDER BY id", (rollout_id,)).fetchall()
        return [{"id": i, "rollout": rollout_id, "time": t, "actor": a, "action": act,
                 "from_state": f, "to_state": to, "step": s, "reason": reason,
                 "evidence": json.loads(ev) if ev else None}
                for i, t, a, act, f, to, s, reason, ev in rows]

    def units(self, rollout_id: int) -> builtins.list[Unit]:
        """Every unit assigned in a rollout, by first sight."""
        with self.registry.transaction(write=False) as c:
            rows = c.execute("SELECT unit, arm, bucket, first_seen, last_seen, candidate_since "
                             "FROM rollout_units WHERE rollout = ? ORDER BY first_seen, unit",
                             (rollout_id,)).fetchall()
        return [Unit(*row) for row in rows]

    def cohorts(self, rollout_id: int) -> dict[str, int]:
        """Units assigned per arm (``stable`` = outside every cohort)."""
        with self.registry.transaction(write=False) as c:
            rows = c.execute("SELECT arm, COUNT(*) FROM rollout_units WHERE rollout = ? "
                             "GROUP BY arm ORDER BY arm", (rollout_id,)).fetchall()
        return {arm: int(n) for arm, n in rows}

    # ------------------------------------------------------------------------ changing
    def start(self, name: str, strategy: str, candidate: Ref | None = None,
              arms: Sequence[Ref] | None = None, config: Mapping[str, Any] | None = None,
              force: bool = False, *, actor: str, reason: str | None = None) -> Rollout:
        """Start a rollout of ``name`` (docs/rollouts.md §1); returns it.

        ConfigError for a bad strategy, arms or config; NotFoundError for unknown versions;
        ConflictError when a rollout of ``name`` is running, when the candidate is the
        stable version, or when a candidate (or A/B arm) is not blessed and ``force`` is off.
        """
        from .rollout_config import ALL

        if strategy not in ALL:
            raise ConfigError(f"strategy {str(strategy)[:40]!r} is not one of {', '.join(ALL)}",
                              field="strategy")
        reg = self.registry
        stable = reg.resolve(name, "stable")
        if strategy == "ab":
            if candidate is not None:
                raise ConfigError("an A/B test takes 'arms' (control first), not 'candidate'",
                                  field="candidate")
            versions = self._arms(name, arms)
        else:
            if arms is not None:
                raise ConfigError(f"a {strategy} rollout takes 'candidate', not 'arms' (arms "
                                  "are for strategy ab)", field="arms")
            if candidate is None:
                raise ConfigError(f"a {strategy} rollout needs a candidate version, e.g. "
                                  "--candidate 5", field="candidate")
            cand = reg.resolve(name, _ref(candidate, "candidate"))
            if cand == stable:
                raise ConflictError(f"candidate v{cand} is already {name}'s stable version; "
                                    "roll out another version", field="candidate")
            versions = (stable, cand)
        unblessed = [v for v in versions if v != stable and not blessed(reg.manifest(name, v))]
        if unblessed and not force:
            field = "arms" if strategy == "ab" else "candidate"
            raise ConflictError(
                f"{', '.join(f'v{v}' for v in unblessed)} of {name!r} "
                f"{'is' if len(unblessed) == 1 else 'are'} not blessed by the gate "
                "(manifest gate.blessed is not true); start with --force (force=true) to roll "
                "out anyway, recorded as forced", field=field)
        cfg = Config.from_json(strategy, config, arms=len(versions),
                               stable=reg.manifest(name, stable))
        now = self.clock()
        with reg.transaction(write=True) as c:
            running = c.execute("SELECT id, strategy FROM rollouts WHERE name = ? AND state = ?",
                                (name, RUNNING)).fetchone()
            if running is not None:
                raise ConflictError(
                    f"rollout {running[0]} ({running[1]}) of {name!r} is still running; "
                    f"promote or abort it first ('hybridml-cloud rollout abort {name}')",
                    field="name", rollout=int(running[0]))
            rollout_id = insert_id(
                c, "INSERT INTO rollouts (name, strategy, state, stable, candidate, arms, config, "
                "step, step_started, started, forced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, strategy, RUNNING, stable, None if strategy == "ab" else versions[1],
                 _text(list(versions)), _text(cfg.to_json()),
                 0 if strategy == "canary" else None, now if strategy == "canary" else None,
                 now, int(bool(unblessed))))
            self._event(c, rollout_id, now, actor, "start", None, RUNNING,
                        0 if strategy == "canary" else None, reason,
                        {"forced": bool(unblessed), "unblessed": unblessed} if unblessed
                        else None)
            bump_sequence(c, name)
            started = self._get(c, rollout_id)
        log.info("rollout %d of %s started: %s of %s by %s%s", rollout_id, name, strategy,
                 list(versions), actor, " (forced)" if unblessed else "")
        return started

    def advance(self, rollout_id: int, step: int, *, actor: str, reason: str | None = None,
                evidence: Mapping[str, Any] | None = None) -> Rollout:
        """Move a running canary to step ``step`` (an index into ``config.steps``)."""
        now = self.clock()
        with self.registry.transaction(write=True) as c:
            r = self._get(c, rollout_id)
            if r.state != RUNNING or r.strategy != "canary":
                raise ConflictError(f"rollout {r.id} is a {r.state} {r.strategy} rollout; only "
                                    "a running canary has steps", field="step")
            steps = r.config.steps or ()
            if isinstance(step, bool) or not isinstance(step, int) \
                    or not 0 <= step < len(steps) or step == r.step:
                raise ConfigError(f"step {step!r} is not another step of rollout {r.id}: use "
                                  f"0-{len(steps) - 1} (now {r.step})", field="step")
            c.execute("UPDATE rollouts SET step = ?, step_started = ? WHERE id = ?",
                      (step, now, r.id))
            self._event(c, r.id, now, actor, "advance", RUNNING, RUNNING, step, reason,
                        evidence)
            bump_sequence(c, r.name)
            moved = self._get(c, r.id)
        log.info("rollout %d of %s: step %s -> %d (%g%%) by %s", r.id, r.name, r.step, step,
                 steps[step], actor)
        return moved

    def finish(self, rollout_id: int, state: str, *, actor: str, reason: str | None = None,
               evidence: Mapping[str, Any] | None = None, winner: Ref | None = None,
               force: bool = False) -> Rollout:
        """End a rollout as ``promoted``, ``aborted`` or ``inconclusive-held``.

        ``promoted`` first moves ``stable`` to ``winner`` (default: the candidate; an A/B test
        names its arm) through :func:`hybridml.cloud.auth.promote`. A held rollout may still
        be promoted (with ``force``: the data did not say so) or aborted; other ended
        rollouts never change (ConflictError).
        """
        if state not in FINAL:
            raise ConfigError(f"state {str(state)[:40]!r} is not one of {', '.join(FINAL)}",
                              field="state")
        r = self.get(rollout_id)
        self._check_finish(r, state, force)
        version = None
        if state == "promoted":
            version = self._winner(r, winner)
            promote_alias(self.registry, r.name, "stable", version, actor=actor)
        now = self.clock()
        with self.registry.transaction(write=True) as c:
            again = self._get(c, rollout_id)
            if again.state != r.state:
                raise ConflictError(f"rollout {r.id} became {again.state} meanwhile",
                                    field="state")
            c.execute("UPDATE rollouts SET state = ?, ended = ? WHERE id = ?",
                      (state, now, r.id))
            proof = dict(evidence or {})
            if version is not None:
                proof.setdefault("winner", version)
            if force:
                proof.setdefault("forced", True)
            self._event(c, r.id, now, actor, ACTION_OF[state], r.state, state, r.step, reason,
                        proof or None)
            bump_sequence(c, r.name)
            done = self._get(c, r.id)
        log.info("rollout %d of %s: %s -> %s by %s (%s)", r.id, r.name, r.state, state,
                 actor, reason or "no reason given")
        return done

    def record_decision(self, rollout_id: int, decision: Mapping[str, Any] | None,
                        memo: Mapping[str, Any] | None) -> None:
        """Store the last analysis of a rollout and the state it carries to the next look."""
        with self.registry.transaction(write=True) as c:
            done = c.execute("UPDATE rollouts SET decision = ?, memo = ? WHERE id = ?",
                             (None if decision is None else _text(decision),
                              None if memo is None else _text(memo), rollout_id))
            if done.rowcount == 0:
                raise NotFoundError(f"no rollout {rollout_id}", field="rollout")

    # --------------------------------------------------- human actions (API and CLI)
    def promote(self, name: str, *, actor: str, reason: str | None = None,
                force: bool = False, version: Ref | None = None) -> Rollout:
        """A person promotes the running (or held) rollout of ``name``.

        Without ``force`` only when the data says so: the last analysis recorded says
        ``promote`` or ``ready``. A held rollout always needs ``force``.
        """
        r = self._current(name)
        action = (r.decision or {}).get("action")
        if r.state == RUNNING and action not in ("promote", "ready") and not force:
            raise ConflictError(
                f"the last analysis of rollout {r.id} says {action or 'nothing yet'!s}, not "
                "promote: promote with --force (force=true) to overrule it", field="force")
        winner = None if version is None else self.registry.resolve(name, _ref(version,
                                                                             "version"))
        if winner is None and r.strategy == "ab":
            best = (r.decision or {}).get("winner")
            winner = best if isinstance(best, int) else None
        return self.finish(r.id, "promoted", actor=actor, reason=reason, winner=winner,
                           force=force,
                           evidence=r.decision and {"analysis": r.decision})

    def abort(self, name: str, *, actor: str, reason: str | None = None) -> Rollout:
        """A person aborts the running (or held) rollout of ``name``: every device goes
        back to stable at its next sync."""
        r = self._current(name)
        return self.finish(r.id, "aborted", actor=actor, reason=reason,
                           evidence=r.decision and {"analysis": r.decision})

    # ------------------------------------------------------------------------ serving
    def running(self, name: str) -> Rollout | None:
        """:meth:`active`, remembered per thread until anything commits to the registry."""
        stamp = self.registry.stamp()
        local = self._local
        cache: dict[str, Rollout | None] | None = getattr(local, "cache", None)
        if stamp is None or cache is None or local.stamp != stamp:
            cache = local.cache = {}
            local.stamp = stamp
        if name in cache:
            return cache[name]
        found = cache[name] = self.active(name)
        return found

    def assign(self, name: str, unit: str) -> Assignment | None:
        """The unit's assignment in the running rollout of ``name`` (None without one); the
        unit's row in ``rollout_units`` is written at most once a minute per arm."""
        r = self.running(name)
        if r is None:
            return None
        b = bucket(r.id, unit)
        role = r.role(b)
        if role.index is not None:  # A/B: the arm's own version, nothing beside it
            serve, companion, sample = r.arms[role.index], None, None
        elif role.role in ("shadow", "interleave"):
            serve, companion, sample = r.stable, r.candidate, r.config.sample
        elif role.role == "canary":
            serve, companion, sample = r.candidate or r.stable, r.stable, r.config.sample
        else:
            serve, companion, sample = r.stable, None, None
        self._touch(r, unit, role.arm, b)
        return Assignment(r, role.arm, role.role, b, serve, companion, sample)

    # ------------------------------------------------------------------------ internals
    def _touch(self, r: Rollout, unit: str, arm: str, b: int) -> None:
        now = self.clock()
        key = (r.id, unit, arm)
        with self._lock:
            last = self._touched.get(key)
            if last is not None and 0 <= now - last < TOUCH_S:
                return
            if len(self._touched) >= _TOUCH_MAX:
                self._touched.clear()
            self._touched[key] = now
        treated = arm not in ("stable", "A")
        try:
            # Bookkeeping: no answer changes, so the resolve memos stay.
            with self.registry.transaction(write=True, invalidates=False) as c:
                c.execute(
                    "INSERT INTO rollout_units (rollout, unit, arm, bucket, first_seen, "
                    "last_seen, candidate_since) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (rollout, unit) DO UPDATE SET arm = excluded.arm, "
                    "bucket = excluded.bucket, last_seen = excluded.last_seen, "
                    "candidate_since = COALESCE(rollout_units.candidate_since, "
                    "excluded.candidate_since)",
                    (r.id, unit, arm, b, now, now, now if treated else None))
        except RegistryError as exc:  # a busy database must not fail the manifest request
            log.warning("rollout %d: unit not recorded: %s", r.id, exc.message)
            with self._lock:
                self._touched.pop(key, None)

    def _current(self, name: str) -> Rollout:
        r = self.latest(name)
        if r is None or r.state not in (RUNNING, "inconclusive-held"):
            self.registry.resolve(name, "latest")  # NotFoundError for an unknown model
            raise NotFoundError(f"{name!r} has no running or held rollout"
                                + (f" (rollout {r.id} is {r.state})" if r else "")
                                + f"; start one with 'hybridml-cloud rollout start {name}'",
                                field="name")
        return r

    @staticmethod
    def _check_finish(r: Rollout, state: str, force: bool) -> None:
        if r.state == RUNNING:
            return
        if r.state == "inconclusive-held" and state in ("promoted", "aborted"):
            if state == "promoted" and not force:
                raise ConflictError(f"rollout {r.id} ended inconclusive: the data did not pick "
                                    "a winner; promote with --force (force=true)",
                                    field="force")
            return
        raise ConflictError(f"rollout {r.id} of {r.name!r} is already {r.state}; it cannot "
                            f"become {state}", field="state")

    def _winner(self, r: Rollout, winner: Ref | None) -> int:
        if winner is None:
            if r.candidate is None:
                raise ConfigError(f"A/B rollout {r.id}: name the winning arm's version "
                                  f"(one of {list(r.arms)})", field="version")
            return r.candidate
        version = self.registry.resolve(r.name, _ref(winner, "version"))
        if version not in r.arms:
            raise ConfigError(f"v{version} is not in rollout {r.id} (versions "
                              f"{list(r.arms)}); promote one of those", field="version")
        return version

    def _arms(self, name: str, arms: Sequence[Ref] | None) -> tuple[int, ...]:
        if isinstance(arms, (str, bytes)) or not isinstance(arms, Sequence) \
                or not 2 <= len(arms) <= 26:
            raise ConfigError("an A/B test needs 'arms': 2 to 26 versions, the control first, "
                              "e.g. --arms 4,5", field="arms")
        versions = tuple(self.registry.resolve(name, _ref(a, "arms")) for a in arms)
        if len(set(versions)) != len(versions):
            raise ConfigError(f"arms {list(versions)} name a version twice; give distinct "
                              "versions", field="arms")
        return versions

    def _select(self, where: str, params: tuple[Any, ...]) -> builtins.list[Rollout]:
        with self.registry.transaction(write=False) as c:
            rows = c.execute(f"SELECT {_COLUMNS} FROM rollouts {where}", params).fetchall()
        return [rollout_of(row) for row in rows]

    @staticmethod
    def _get(c: SqlConn, rollout_id: int) -> Rollout:
        row = c.execute(f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?",
                        (rollout_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no rollout {rollout_id}", field="rollout")
        return rollout_of(row)

    @staticmethod
    def _event(c: SqlConn, rollout_id: int, now: float, actor: str, action: str,
               before: str | None, after: str | None, step: int | None, reason: str | None,
               evidence: Mapping[str, Any] | None) -> None:
        c.execute("INSERT INTO rollout_events (rollout, time, actor, action, from_state, "
                  "to_state, step, reason, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (rollout_id, now, actor, action, before, after, step, reason,
                   None if evidence is None else _text(evidence)))


def _ref(value: Any, field: str) -> Ref:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ConfigError(f"{field} {str(value)[:40]!r} is not a version number or alias",
                          field=field)
    return value


def _text(value: Any) -> str:
    try:
        return canonical_json(value).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"not JSON: {exc}", field="evidence") from exc


__all__ = ["FINAL", "RUNNING", "Assignment", "Config", "Rollout", "Rollouts", "Unit"]
