"""A/B and interleaving rollouts: which version is better? (docs/rollouts.md §5)

**A/B**, on the feedback since the rollout started. An arm's labels are the feedback whose
``version`` is the arm's version and whose device is one of the arm's units — or a device
that is no unit of this rollout at all (a caller of the cloud's ``/predict``, whose unit is
its ``Hybridml-Unit`` header, posts feedback under its own token: the version it was
answered with names the arm). The metric, per task:

* classifiers: the proportion of labels predicted right (accuracy, whatever the model's
  primary metric: balanced accuracy is no proportion of independent units) — the
  two-proportion z-test and :func:`~hybridml.cloud.stats.msprt_proportion`; higher wins;
* regression: the squared error of each label — Welch's t-test and
  :func:`~hybridml.cloud.stats.msprt_mean` on its mean (the MSE); lower wins.

Each arm is compared with the control (arm A). The mSPRT p-value of every look is folded
into the running minimum kept in ``memo["msprt_min"]``; with more than one comparison the
running minima are Holm-corrected. SRM (chi-square, p < 0.001) on the units assigned per arm
and on the units reporting labels per arm, against the split, blocks the readout (hold).
With ≥ ``min_samples`` labels and ≥ ``min_devices`` reporting units in every arm: promote
the arm with the largest improvement among those whose corrected sequential p < ``alpha``
and that beat the control; abort when the control beats every other arm so; otherwise hold,
and ``inconclusive`` after ``max_duration_s``.

**Interleave**: the exact sign test on the summed ``wins_a`` vs ``wins_b`` (ties left out)
once ≥ ``min_samples`` impressions had a winner: B (the candidate) wins significantly →
promote, A → abort; ``inconclusive`` after ``max_duration_s``. The sign test is a
fixed-horizon test looked at on every pass; ``min_samples`` is what keeps early looks few.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hybridml.shared.assign import arm_letter
from hybridml.shared.errors import InputError

from . import stats
from .facts import ModelFacts
from .rollout_canary import timeout
from .rollout_facts import Labels, RolloutTelemetry, interleave, labels
from .verdict import Verdict, conf

if TYPE_CHECKING:
    from .rollouts import Rollout, Rollouts

SRM_THRESHOLD = 0.001


def ab(r: Rollout, rollouts: Rollouts, telemetry: RolloutTelemetry, facts: ModelFacts,
       now: float, v: Verdict) -> str:
    """The action for A/B rollout ``r`` at ``now`` (filling ``v``; ``v.memo`` carries the
    running minimum of each arm's sequential p-value)."""
    letters = [arm_letter(i) for i in range(len(r.arms))]
    split = list(r.config.split or [100.0 / len(letters)] * len(letters))
    alpha = float(conf(r, "alpha", 0.05))
    regression = facts.task == "regression"
    units = rollouts.units(r.id)
    unit_arm = {u.unit: u.arm for u in units}
    rows = telemetry.feedback_at(r.name, since=r.started, until=now)
    arms: dict[str, Labels] = {}
    for letter, version in zip(letters, r.arms):
        arms[letter] = labels(rows, facts.task, version,
                              accept=lambda d, a=letter: unit_arm.get(str(d), a) == a)
    assigned = [sum(1 for u in units if u.arm == a) for a in letters]
    reporting = [arms[a].devices for a in letters]
    for a, version, n_units in zip(letters, r.arms, assigned):
        v.arms[a] = {"version": version, "units": n_units, **arms[a].to_json(),
                     "measure": "mean squared error" if regression else "proportion correct",
                     "estimate": _estimate(arms[a], regression)}

    srm_ok = True
    for what, observed in (("assigned", assigned), ("reporting", reporting)):
        if sum(observed) == 0:
            v.check(f"srm_{what}", None, observed, SRM_THRESHOLD, f"no {what} units yet")
            continue
        res = stats.srm(observed, split, SRM_THRESHOLD)
        v.tests[f"srm_{what}"] = res.to_json()
        v.check(f"srm_{what}", not res.mismatch, res.p_value, SRM_THRESHOLD,
                f"{what} units per arm {observed} against the split {split}")
        if res.mismatch:
            srm_ok = False
            v.say(f"sample ratio mismatch on {what} units: {observed} against the split "
                  f"{split} (p = {res.p_value:.2g} < {SRM_THRESHOLD}); the readout is "
                  "blocked until the cause is found")

    running = dict((r.memo or {}).get("msprt_min") or {})
    control = arms["A"]
    seq_p: dict[str, float] = {}
    better: dict[str, float] = {}  # improvement over the control (positive = better)
    for a in letters[1:]:
        arm = arms[a]
        try:
            fixed, seq = _tests(control, arm, regression, alpha)
        except InputError as exc:  # an arm without (enough) labels: nothing to test yet
            v.tests[a] = {"error": exc.message}
            continue
        running[a] = min(float(running.get(a, 1.0)), seq.p_value)
        seq_p[a] = running[a]
        better[a] = -fixed.effect if regression else fixed.effect
        v.tests[a] = {"fixed": fixed.to_json(), "msprt": seq.to_json(),
                      "msprt_running_min": running[a]}
    v.memo["msprt_min"] = running
    corrected = dict(zip(seq_p, stats.holm(list(seq_p.values()), alpha))) \
        if len(seq_p) > 1 else dict(seq_p)
    for a, p in corrected.items():
        v.tests[a]["p_corrected"] = p

    need = int(conf(r, "min_samples", 200))
    need_devices = int(conf(r, "min_devices", 2))
    short = [a for a in letters if arms[a].n < need or arms[a].devices < need_devices]
    v.check("samples", None if short else True, min(x.n for x in arms.values()), need,
            f"labels per arm {[arms[a].n for a in letters]}, reporting units "
            f"{reporting}; {need} labels and {need_devices} units needed in each")
    if not srm_ok:
        return "hold"
    if short:
        v.say(f"not enough data: arms {short} have fewer than {need} labels or "
              f"{need_devices} reporting units")
        return timeout(r, now, v) or "hold"
    winners = [a for a in corrected if corrected[a] < alpha and better[a] > 0]
    if winners:
        best = max(winners, key=lambda a: better[a])
        v.arms["winner"] = best
        v.say(f"arm {best} (v{r.arms[letters.index(best)]}) beats the control: "
              f"improvement {better[best]:.4g}, sequential p {corrected[best]:.3g} < {alpha}")
        return "promote"
    losers = [a for a in corrected if corrected[a] < alpha and better[a] < 0]
    if corrected and len(losers) == len(letters) - 1:
        v.say(f"the control (v{r.arms[0]}) beats every other arm significantly")
        return "abort"
    v.say("no arm differs significantly from the control yet")
    return timeout(r, now, v) or "hold"


def _tests(a: Labels, b: Labels, regression: bool, alpha: float
           ) -> tuple[stats.TestResult, stats.SequentialResult]:
    if regression:
        return (stats.welch(a.mean_sq, a.var_sq, a.n, b.mean_sq, b.var_sq, b.n, alpha),
                stats.msprt_mean(a.mean_sq, a.var_sq, a.n, b.mean_sq, b.var_sq, b.n,
                                 alpha=alpha))
    return (stats.two_proportion(a.correct, a.n, b.correct, b.n, alpha),
            stats.msprt_proportion(a.correct, a.n, b.correct, b.n, alpha=alpha))


def _estimate(arm: Labels, regression: bool) -> float | None:
    if not arm.n:
        return None
    return arm.mean_sq if regression else arm.correct / arm.n


def interleave_rollout(r: Rollout, rollouts: Rollouts, telemetry: RolloutTelemetry,
                       facts: ModelFacts, now: float, v: Verdict) -> str:
    """The action for interleaving rollout ``r`` at ``now`` (filling ``v``)."""
    sums: dict[str, Any] = interleave(
        telemetry.events(r.name, "interleave", since=r.started, until=now), r.id)
    v.arms["A"] = {"version": r.stable, "wins": sums["wins_a"],
                   "credited": sums["credited_a"]}
    v.arms["B"] = {"version": r.candidate, "wins": sums["wins_b"],
                   "credited": sums["credited_b"]}
    v.arms["impressions"] = {k: sums[k] for k in ("impressions", "clicks", "ties", "devices")}
    need = int(conf(r, "min_samples", 100))
    need_devices = int(conf(r, "min_devices", 2))
    decided = sums["wins_a"] + sums["wins_b"]
    enough = decided >= need and sums["devices"] >= need_devices
    v.check("samples", True if enough else None, decided, need,
            f"{decided} impressions with a winner from {sums['devices']} devices; {need} "
            f"and {need_devices} devices needed")
    if not enough:
        v.say(f"not enough data: {decided} of {need} decided impressions, "
              f"{sums['devices']} of {need_devices} devices")
        return timeout(r, now, v) or "hold"
    alpha = float(conf(r, "alpha", 0.05))
    res = stats.sign_test(sums["wins_a"], sums["wins_b"], alpha)
    v.tests["sign_test"] = res.to_json()
    if res.significant and res.effect > 0:
        v.arms["winner"] = "B"
        v.say(f"B (v{r.candidate}) wins {sums['wins_b']} of {decided} decided impressions "
              f"(p = {res.p_value:.3g} < {alpha})")
        return "promote"
    if res.significant and res.effect < 0:
        v.say(f"A (stable v{r.stable}) wins {sums['wins_a']} of {decided} decided "
              f"impressions (p = {res.p_value:.3g} < {alpha})")
        return "abort"
    v.say(f"no significant preference yet: {sums['wins_a']} vs {sums['wins_b']} wins "
          f"(p = {res.p_value:.3g})")
    return timeout(r, now, v) or "hold"


__all__ = ["ab", "interleave_rollout"]
