"""The continuous-training loop: evaluate triggers, train a candidate, gate it, maybe promote.

Each pass (``hybridml-cloud controller --once``; ``--interval 60`` repeats it under systemd),
for every model with a policy (:mod:`hybridml.cloud.policy`):

1. take the model's lock (``<registry>/locks/controller-<name>.lock``, an ``flock``): a second
   controller running at the same time skips the model, and the OS drops the lock when a
   controller dies, so nothing needs cleaning after a crash;
2. gather the evidence (:mod:`hybridml.cloud.evidence`), evaluate the triggers and record
   the decision in the registry, fired or not, with its evidence;
3. when it fired: choose fine-tune or retrain (the policy's ``mode``), build the training
   rows (:mod:`hybridml.cloud.trainset`), train and gate the candidate
   (:mod:`hybridml.cloud.gate`; the report is in its manifest), register it, promote it
   through the audited :func:`hybridml.cloud.auth.promote` when blessed and ``auto_promote``
   is on, and record the outcome with the decision.

Every model with a running rollout (docs/rollouts.md), with a policy or not, is also analysed
under the same lock on each pass (:func:`hybridml.cloud.rollout_analysis.tick`): the analysis
is recorded on the rollout, and it advances, promotes or ends it. The rollout's decision is
taken before the model's triggers are evaluated, so a pass sees the ``stable`` it leaves.

Decisions and their times are in the registry's database, so the cooldown survives a
restart; a controller killed while training leaves a fired decision without an outcome (and
no half-registered version: a version appears in one transaction at the end). Decisions that
did not fire are kept for :data:`QUIET_KEPT_S` (30 days), fired ones for good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ConfigError, HybridMLError

from .evidence import Telemetry, epoch, gather, labelled_since, open_telemetry
from .finetune import ModeChoice, Parent, choose_mode, method
from .labelled import feature_kinds
from .lineage import display_label
from .policy import Policy, evaluate
from .private import private_dir
from .registry import Registry
from .rollout_facts import RolloutTelemetry
from .trainset import MIN_FINETUNE_ROWS, finetune_set, retrain_set

if TYPE_CHECKING:
    from .rollouts import Rollouts

log = logging.getLogger("hybridml.cloud.controller")
QUIET_KEPT_S = 30 * 86400.0  # decisions that did not fire are pruned after this long


@dataclass(frozen=True)
class Step:
    """What one pass did for one model."""

    name: str
    fired: bool = False
    decision: int | None = None  # the recorded decision's id
    outcome: dict[str, Any] | None = None
    skipped: str | None = None  # why the model was not evaluated at all
    rollout: dict[str, Any] | None = None  # the running rollout's analysis, when it has one

    def to_json(self) -> dict[str, Any]:
        """JSON form (``controller --once --json``)."""
        return {"name": self.name, "fired": self.fired, "decision": self.decision,
                "outcome": self.outcome, "skipped": self.skipped, "rollout": self.rollout}


@contextlib.contextmanager
def model_lock(registry: Registry, name: str) -> Iterator[bool]:
    """Hold the controller lock of ``name`` if it is free: yields True, or False when another
    controller holds it (this one then leaves the model alone). On PostgreSQL the lock is the
    database's, so controllers on different machines exclude each other too."""
    if registry.storage.on_postgres:
        with registry.database.exclusive(f"controller:{name}") as held:
            yield held
        return
    folder = registry.root / "locks"
    private_dir(folder)
    fd = os.open(folder / f"controller-{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the lock


class Controller:
    """Runs the loop over ``registry``; ``telemetry`` defaults to the registry's store and
    ``clock`` (POSIX seconds) to the system clock."""

    def __init__(self, registry: Registry, *, telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock
        self.telemetry = telemetry if telemetry is not None else open_telemetry(registry, clock)
        self._rollouts_store: Rollouts | None = None

    def run(self, interval_s: float, *, stop: threading.Event | None = None) -> None:
        """Pass after pass, ``interval_s`` apart, until ``stop`` is set."""
        stop = stop or threading.Event()
        while True:
            self.run_once()
            if stop.wait(interval_s):
                return

    def run_once(self) -> list[Step]:
        """One pass over every model with a policy or a running rollout."""
        steps = []
        policies = self.registry.policies()
        rolling = self._rolling()
        for name in sorted(set(policies) | set(rolling)):
            with model_lock(self.registry, name) as mine:
                if not mine:
                    log.info("%s: another controller holds it; skipped", name)
                    steps.append(Step(name, skipped="another controller holds its lock"))
                    continue
                analysis = self.rollout_tick(name) if name in rolling else None
                if name not in policies:
                    steps.append(Step(name, skipped="no policy", rollout=analysis))
                    continue
                try:
                    step = self.step(name, Policy.from_json(policies[name]))
                except HybridMLError as exc:  # one model's bad policy or missing version
                    log.warning("%s: cannot evaluate: %s", name, exc.message)
                    step = Step(name, skipped=f"cannot evaluate: {exc.message}")
                steps.append(dataclasses.replace(step, rollout=analysis))
        return steps

    def _rolling(self) -> set[str]:
        """Models with a running rollout."""
        try:
            rollouts = self._rollouts()
            return {m.name for m in self.registry.models() if rollouts.active(m.name)}
        except HybridMLError as exc:  # a registry without rollouts yet must still train
            log.warning("cannot list running rollouts: %s", exc.message)
            return set()

    def rollout_tick(self, name: str) -> dict[str, Any] | None:
        """Analyse and act on the running rollout of ``name`` (hold the lock); the
        analysis, or ``{"error": ...}`` when it failed (logged, never fatal)."""
        from .rollout_analysis import tick

        try:
            a = tick(self._rollouts(), self._rollout_telemetry(), name, self.clock())
        except HybridMLError as exc:
            log.warning("%s: rollout not analysed: %s", name, exc.message)
            return {"error": exc.to_json()["error"]}
        except Exception as exc:  # a bug in one model's analysis must not stop the loop
            log.exception("%s: rollout analysis failed", name)
            return {"error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        return None if a is None else a.to_json()

    def _rollouts(self) -> Rollouts:
        from .rollouts import Rollouts

        if self._rollouts_store is None:
            self._rollouts_store = Rollouts(self.registry, clock=self.clock)
        return self._rollouts_store

    def _rollout_telemetry(self) -> RolloutTelemetry:
        if not isinstance(self.telemetry, RolloutTelemetry):
            raise ConfigError("the controller's telemetry store cannot answer a rollout's "
                              "queries (summaries, events, feedback): use TelemetryStore",
                              field="telemetry")
        return self.telemetry

    def step(self, name: str, policy: Policy) -> Step:
        """Evaluate ``name``'s triggers, record the decision and act on it (hold the lock)."""
        now = self.clock()
        decision = evaluate(policy, gather(self.registry, self.telemetry, name, policy, now))
        did = self.registry.add_decision(name, decision.to_json())
        self.registry.prune_decisions(name, utc_iso(now - QUIET_KEPT_S))
        fired = [t.name for t in decision.triggers if t.fired]
        if not decision.fired:
            log.info("%s: %s", name, f"held by the cooldown ({', '.join(fired)})"
                     if decision.held else "no trigger fired")
            return Step(name, False, did)
        log.info("%s: fired (%s); training a candidate", name, ", ".join(fired))
        try:
            outcome = self.candidate(name, policy, now)
        except HybridMLError as exc:
            log.warning("%s: no candidate: %s", name, exc.message)
            outcome = {"candidate": None, "error": exc.to_json()["error"]}
        except Exception as exc:  # a bug or a foreign error in one model's training must
            log.exception("%s: training failed", name)  # not stop the loop for the others
            outcome = {"candidate": None,
                       "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        self.registry.finish_decision(did, outcome)
        return Step(name, True, did, outcome)

    def candidate(self, name: str, policy: Policy, now: float) -> dict[str, Any]:
        """Train, gate, register and perhaps promote a candidate; returns the outcome."""
        from .auth import promote
        from .fairness import retrain_options
        from .gate import gate_hook
        from .train import train

        reg = self.registry
        active = reg.resolve(name, "stable")
        parent = Parent.load(reg, f"{name}:{active}")
        created = next(v.created for v in reg.versions(name) if v.version == active)
        new = labelled_since(self.telemetry, name, epoch(created))
        choice = self._mode(policy, parent, len(new), new.labels)
        if choice is None:
            return {"candidate": None, "skipped": f"only {len(new)} new labelled rows since "
                    f"v{active}; fine-tuning needs {MIN_FINETUNE_ROWS}"}
        seed = int(parent.manifest.get("training", {}).get("split", {}).get("seed", 0))
        rows = finetune_set(reg, parent, new, seed) if choice.mode == "finetune" else \
            retrain_set(reg, parent, self.telemetry, policy, now, seed)
        if rows is None:
            return {"candidate": None, "skipped": f"nothing new since v{active}'s line was "
                    "trained: no labelled rows, and its training data is unchanged"}
        kinds = feature_kinds(parent.schema)
        result = train(reg, name, data=rows.write(reg, parent, choice.mode, now),
                       target=str(parent.manifest["training"]["target"]), task=parent.task,
                       seed=seed, finetune_from=f"{name}:{active}", mode=choice,
                       categorical=kinds["categorical"], numeric=kinds["numeric"],
                       quality=retrain_options(parent.quality, parent.schema.names),
                       gate=gate_hook(reg, name, against=active, recent=new))
        version = int(result.manifest["version"])
        gate = result.manifest["gate"]
        label = display_label(reg.versions(name), version)
        shipped: dict[str, Any] = {}
        if gate["blessed"] and policy.rollout is not None:
            shipped = self._roll_out(name, policy, version, label)
        promoted = bool(policy.auto_promote and gate["blessed"] and policy.rollout is None)
        if promoted:
            promote(reg, name, "stable", version, actor="controller")
        log.info("%s: registered %s (v%d, %s): %s%s", name, label, version, choice.mode,
                 "blessed" if gate["blessed"] else "not blessed",
                 ", promoted to stable" if promoted else
                 f", rollout {shipped['rollout']} started" if shipped.get("rollout") else "")
        return {"candidate": version, "label": label, "mode": choice.to_json(),
                "data": rows.report, "blessed": gate["blessed"], "gate": gate["reason"],
                "promoted": promoted, **shipped}

    def _roll_out(self, name: str, policy: Policy, version: int, label: str
                  ) -> dict[str, Any]:
        """Start the policy's rollout of the blessed candidate: ``{"rollout": id}``, or
        ``{"rollout": None, "rollout_error": ...}`` (e.g. one is already running)."""
        assert policy.rollout is not None
        config = {"auto_promote": True} if policy.auto_promote and \
            policy.rollout == "shadow" else {}
        try:
            r = self._rollouts().start(name, policy.rollout, candidate=version, config=config,
                                       actor="controller",
                                       reason=f"{label} blessed by the gate; the policy "
                                       f"ships candidates by {policy.rollout}")
        except HybridMLError as exc:
            log.warning("%s: %s not rolled out: %s", name, label, exc.message)
            return {"rollout": None, "rollout_error": exc.to_json()["error"]}
        return {"rollout": r.id, "strategy": r.strategy}

    @staticmethod
    def _mode(policy: Policy, parent: Parent, n_new: int, labels: tuple[Any, ...]
              ) -> ModeChoice | None:
        """The policy's mode for the rows at hand; None: fine-tune asked, too few rows."""
        if policy.mode != "retrain" and n_new < MIN_FINETUNE_ROWS and method(parent.family):
            if policy.mode == "finetune":
                return None
            return ModeChoice("retrain", policy.mode, f"only {n_new} new labelled rows since "
                              f"v{parent.version}; fine-tuning needs {MIN_FINETUNE_ROWS}")
        classes = sorted({str(y) for y in labels}) if parent.classes is not None else None
        return choose_mode(policy.mode, parent, task=parent.task, classes=classes,
                           features=[(f.name, f.kind) for f in parent.schema.features])


__all__ = ["Controller", "Step", "model_lock"]
