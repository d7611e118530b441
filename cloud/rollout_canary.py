"""Canary and shadow rollouts: is the candidate safe to serve? (docs/rollouts.md §5)

**Canary**, per step, on the data since the step started. The cohort is the units whose arm
is ``candidate`` (:meth:`Rollouts.units`); stable is every other device reporting the stable
version. Abort when any check fails:

* ``failures`` — devices with a ``load_failed`` health record for the candidate, or whose
  candidate summaries show local inference failures (:mod:`hybridml.cloud.rollout_facts`):
  ≥ 2 devices, or more than 2 % of the cohort;
* ``error_rate`` — degraded rows per row above stable's + ``error_margin``;
* ``latency_p99`` — the candidate's p99 above ``latency_ratio`` × stable's, and more than
  ``latency_floor_ms`` above it (:func:`latency_bound`; both interpolated in the histogram
  bin holding the 99th percentile of calls, :func:`~hybridml.cloud.rollout_facts.p99`);
* ``agreement`` — the rollout's shadow records (canary devices shadow stable; the cloud's
  ``/predict`` shadows the candidate: agreement is symmetric) confidently below
  ``agreement``: the 95 % Wilson interval's upper end under it (:func:`judge_agreement`;
  a share under the bound whose interval still reaches it holds the step for more rows);
* ``metric`` — the realised metric from feedback below stable's by ``metric_margin``
  (points for classifiers; RMSE: relative) *and* confidently so: the always-valid (mSPRT)
  confidence sequence of the difference — rows predicted right, or squared errors — lies
  past the margin, judged when both have ≥ 50 labels. Stable with
  labels and the canary with fewer: unjudged (the step holds). No stable labels at all: the
  metric cannot be compared and is not judged (passed, said in ``detail``), so a model
  without a labelling pipeline can still be canaried on the other checks.

Stable is the devices outside the cohort in the step; at a step with none (100 %), it is
every report of the stable version since the rollout started (the cohort's own, before
its devices moved, included). A p99 needs :data:`MIN_CALLS` calls on each side (with
fewer, the tail is one or two calls: not judged). Advance when the dwell has passed,
≥ ``min_devices`` cohort devices reported, no cohort unit is silent (assigned the
candidate ≥ ``report_timeout_s`` ago, nothing from it for the candidate since) and every
check passed; the last step promotes. Anything unjudged holds.

**Shadow**, on everything since the rollout started: ``ready`` when ≥ ``min_predictions``
compared rows from ≥ ``min_devices`` devices agree (``agreement``), the candidate's p99 (its
shadow latency) is within ``latency_ratio`` × the served model's p99 on the same devices, and
it failed on at most ``error_margin`` of the rows it ran on; abort when that evidence breaks a
bound; ``inconclusive`` when ``max_duration_s`` passes without enough evidence.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from hybridml.shared.clock import format_duration

from .facts import ModelFacts
from .rollout_facts import (
    Histogram,
    Labels,
    RolloutTelemetry,
    labels,
    p99,
    shadow,
    traffic,
    wilson,
)
from .stats import SequentialResult, msprt_mean, msprt_proportion
from .verdict import Verdict, conf, rate

if TYPE_CHECKING:
    from .rollouts import Rollout, Rollouts

MIN_LABELS = 50
MIN_CALLS = 200
# The mSPRT's mixing scale for the canary's harm check, in standard deviations of a label's
# outcome: a canary looks for losses big enough to matter on the small cohort of its first
# steps (a model that learned nothing: 0.96 -> 0.5 on 62 labels is caught), where the A/B
# default (0.1 sd, for fine effects at large samples) would need hundreds of labels.
HARM_TAU_SD = 0.5  # a p99 from fewer calls is the slowest one or two
FAILED_DEVICES = 2
FAILED_SHARE = 0.02


def canary(r: Rollout, rollouts: Rollouts, telemetry: RolloutTelemetry, facts: ModelFacts,
           now: float, v: Verdict) -> str:
    """The action for canary ``r`` at ``now`` (filling ``v``)."""
    assert r.candidate is not None
    since = r.step_started if r.step_started is not None else r.started
    units = rollouts.units(r.id)
    cohort = {u.unit for u in units if u.arm == "candidate"}
    cand = traffic(telemetry.summaries(r.name, r.candidate, since, now))
    stable = traffic(telemetry.summaries(r.name, r.stable, since, now), exclude=cohort)
    if not stable.rows:  # the 100 % step has no stable cohort: compare with the rollout's
        stable = traffic(telemetry.summaries(r.name, r.stable, r.started, now))
    if not stable.rows:
        v.say(f"no device has reported stable v{r.stable} during this rollout: the checks "
              "that compare with it cannot be judged (a canary whose first step is 100 % has "
              "no stable devices; start it with a smaller step)")
    ever = traffic(telemetry.summaries(r.name, r.candidate, r.started, now))
    health = [e for e in telemetry.events(r.name, "health", since=r.started, until=now)
              if e.get("event") == "load_failed" and e.get("version") == r.candidate
              and e.get("rollout") == r.id]
    health_now = {str(e["device"]) for e in health if float(e["received"]) > since}
    reported = set(cand.devices) | health_now
    steps = r.config.steps or (100.0,)
    step = r.step or 0

    failing = set(cand.failures) | health_now
    share = len(failing) / max(len(cohort), len(reported), 1)
    broke = len(failing) >= FAILED_DEVICES or share > FAILED_SHARE
    v.check("failures", False if failing and broke else None if not reported else True,
            len(failing), f"< {FAILED_DEVICES} devices and <= {100 * FAILED_SHARE:g} % of the "
            "cohort", f"{len(failing)} of {max(len(cohort), len(reported))} cohort devices "
            f"failed to load or run v{r.candidate}: {sorted(failing)[:10]}")

    margin = float(conf(r, "error_margin", 0.01))
    c_rate, s_rate = cand.error_rate(), stable.error_rate()
    bound = None if s_rate is None else s_rate + margin
    v.check("error_rate", None if c_rate is None or bound is None else c_rate <= bound,
            c_rate, bound, f"degraded rows per row: candidate {rate(c_rate)} of {cand.rows}, "
            f"stable {rate(s_rate)} of {stable.rows} (+ {rate(margin)} allowed)")

    ratio = float(conf(r, "latency_ratio", 1.5))
    c_p99, c_how = p99(cand.latency)
    s_p99, s_how = p99(stable.latency)
    lat_bound = latency_bound(s_p99, ratio, float(conf(r, "latency_floor_ms", 0.5)))
    few = min(_calls(cand.latency), _calls(stable.latency)) < MIN_CALLS
    v.check("latency_p99", None if c_p99 is None or lat_bound is None or few
            else c_p99 <= lat_bound, c_p99, lat_bound,
            f"candidate p99 {c_p99} ms ({c_how}); stable p99 {s_p99} ms ({s_how}); bound "
            f"{ratio:g} x stable" + (f"; {MIN_CALLS} calls a side needed" if few else ""))

    sh = shadow(telemetry.events(r.name, "shadow", since=since, until=now), r.id)
    agree, want = sh.agreement(), float(conf(r, "agreement", 0.9))
    v.check("agreement", judge_agreement(sh.agree, sh.rows, want), agree, want,
            f"{sh.agree} of {sh.rows} shadowed rows agree between v{r.stable} and "
            f"v{r.candidate}{_interval(sh.agree, sh.rows)}")

    _metric_check(r, telemetry, facts, since, now, cohort, v)

    silent = []
    timeout = float(conf(r, "report_timeout_s", 21600.0))
    for u in units:
        if u.arm != "candidate" or u.candidate_since is None \
                or now - u.candidate_since < timeout:
            continue
        heard = ever.last.get(u.unit, 0.0) > u.candidate_since or any(
            e["device"] == u.unit and float(e["received"]) > u.candidate_since
            for e in health)
        if not heard:
            silent.append(u.unit)

    ever_assigned = sum(1 for u in units if u.arm == "candidate" or u.candidate_since)
    v.arms["candidate"] = {
        "version": r.candidate, "units": len(cohort), "devices": len(reported),
        "rows": cand.rows, "error_rate": c_rate, "p99_ms": c_p99, "failing": len(failing),
        "silent": silent[:20], "ever_served": len(ever.devices),
        "ever_assigned": ever_assigned}
    v.arms["stable"] = {"version": r.stable, "units": len(units) - len(cohort),
                        "devices": len(stable.devices), "rows": stable.rows,
                        "error_rate": s_rate, "p99_ms": s_p99}
    v.arms["agreement"] = {"rows": sh.rows, "agree": sh.agree, "value": agree}

    failed = v.failed()
    if failed:
        for c in failed:
            v.say(f"abort: {c.name} broke its bound ({c.detail})")
        return "abort"
    min_devices = int(conf(r, "min_devices", 2))
    dwell = float(conf(r, "dwell_s", 86400.0))
    held = False
    if now - since < dwell:
        v.say(f"step {step + 1} of {len(steps)} ({steps[step]:g} %) has dwelt "
              f"{format_duration(now - since)} of {format_duration(dwell)}")
        held = True
    if len(reported) < min_devices:
        v.say(f"too few reports: {len(reported)} cohort devices reported v{r.candidate} "
              f"since the step started; {min_devices} needed")
        held = True
    if silent:
        v.say(f"{len(silent)} cohort devices silent for over {format_duration(timeout)} "
              f"since they were assigned: {silent[:5]}")
        held = True
    for c in v.unjudged():
        v.say(f"not enough data for {c.name}: {c.detail}")
        held = True
    if held:
        return "hold"
    if step + 1 >= len(steps):
        v.say(f"every check passed at the last step ({steps[step]:g} %): promote "
              f"v{r.candidate}")
        return "promote"
    v.say(f"every check passed over the {format_duration(dwell)} dwell: advance to step "
          f"{step + 2} of {len(steps)} ({steps[step + 1]:g} %)")
    return "advance"


def _metric_check(r: Rollout, telemetry: RolloutTelemetry, facts: ModelFacts, since: float,
                  now: float, cohort: set[str], v: Verdict) -> None:
    assert r.candidate is not None
    rows = telemetry.feedback_at(r.name, since=since, until=now)
    c = labels(rows, facts.task, r.candidate)
    s = labels(rows, facts.task, r.stable, accept=lambda d: d not in cohort)
    if s.n == 0:  # the 100 % step: stable's labels over the whole rollout are the baseline
        s = labels(telemetry.feedback_at(r.name, since=r.started, until=now), facts.task,
                   r.stable)
    regression = facts.task == "regression"
    margin = float(conf(r, "metric_margin", 0.01 if regression else 0.005))
    v.arms["metric"] = {"candidate": c.to_json(), "stable": s.to_json()}
    if s.n == 0:
        v.check("metric", True, c.value, None, f"no labels for stable v{r.stable}: the "
                "realised metric cannot be compared, and is not judged")
        return
    if c.n < MIN_LABELS or s.n < MIN_LABELS or c.value is None or s.value is None:
        v.check("metric", None, c.value, MIN_LABELS, f"{c.n} candidate and {s.n} stable "
                f"labels; {MIN_LABELS} each needed to compare {c.metric}")
        return
    bound = s.value * (1 + margin) if regression else s.value - margin
    detail = (f"{c.metric} candidate {c.value:.4f} on {c.n} labels, stable {s.value:.4f} on "
              f"{s.n} (margin {margin:g})")
    ok = c.value <= bound if regression else c.value >= bound
    if not ok:
        alpha = float(conf(r, "alpha", 0.05))
        ok, seq = judge_metric(s, c, regression, margin, alpha)
        v.tests["metric"] = seq.to_json()
        detail += (f"; {'confidently' if not ok else 'not confidently'} worse by more than "
                   f"the margin ({100 * (1 - alpha):g} % always-valid interval of the "
                   f"difference {seq.ci_low:.4g} to {seq.ci_high:.4g})")
    v.check("metric", ok, c.value, bound, detail)


def shadow_rollout(r: Rollout, rollouts: Rollouts, telemetry: RolloutTelemetry,
                   facts: ModelFacts, now: float, v: Verdict) -> str:
    """The action for shadow rollout ``r`` at ``now`` (filling ``v``)."""
    sh = shadow(telemetry.events(r.name, "shadow", since=r.started, until=now), r.id)
    served = traffic([s for s in telemetry.summaries(r.name, r.stable, r.started, now)
                      if s["device"] in sh.devices])
    need_rows = int(conf(r, "min_predictions", 1000))
    need_devices = int(conf(r, "min_devices", 2))
    enough = sh.rows >= need_rows and len(sh.devices) >= need_devices
    v.check("rows", True if sh.rows >= need_rows else None, sh.rows, need_rows,
            f"{sh.rows} compared rows")
    v.check("devices", True if len(sh.devices) >= need_devices else None, len(sh.devices),
            need_devices, f"devices that compared rows: {sorted(sh.devices)[:10]}")
    agree, want = sh.agreement(), float(conf(r, "agreement", 0.9))
    v.check("agreement", judge_agreement(sh.agree, sh.rows, want), agree, want,
            f"{sh.agree} of {sh.rows} rows agree between v{r.stable} and v{r.candidate}"
            f"{_interval(sh.agree, sh.rows)}")
    ratio = float(conf(r, "latency_ratio", 1.5))
    c_p99, c_how = p99(sh.latency)
    s_p99, s_how = p99(served.latency)
    bound = latency_bound(s_p99, ratio, float(conf(r, "latency_floor_ms", 0.5)))
    v.check("latency_p99", None if c_p99 is None or bound is None else c_p99 <= bound, c_p99,
            bound, f"candidate p99 {c_p99} ms beside the served model ({c_how}); served p99 "
            f"{s_p99} ms on the same devices ({s_how}); bound {ratio:g} x served")
    err, max_err = sh.error_rate(), float(conf(r, "error_margin", 0.01))
    v.check("errors", None if err is None else err <= max_err, err, max_err,
            f"the candidate failed on {sh.errors} of {sh.rows + sh.errors} rows it ran on")
    v.arms["candidate"] = {"version": r.candidate, "devices": len(sh.devices),
                           "rows": sh.rows, "agree": sh.agree, "agreement": agree,
                           "errors": sh.errors, "p99_ms": c_p99}
    v.arms["stable"] = {"version": r.stable, "devices": len(served.devices),
                        "rows": served.rows, "p99_ms": s_p99}
    if not enough:
        v.say(f"not enough evidence yet: {sh.rows} of {need_rows} rows from "
              f"{len(sh.devices)} of {need_devices} devices")
        return timeout(r, now, v) or "hold"
    failed = v.failed()
    if failed:
        for c in failed:
            v.say(f"abort: {c.name} broke its bound ({c.detail})")
        return "abort"
    missing = v.unjudged()
    if missing:
        for c in missing:
            v.say(f"not enough data for {c.name}: {c.detail}")
        return timeout(r, now, v) or "hold"
    v.say(f"ready: v{r.candidate} agrees on {rate(agree)} of {sh.rows} rows within the "
          "latency and error bounds" + (" (auto_promote: promote)"
                                        if conf(r, "auto_promote", False) else
                                        "; a person promotes it"))
    return "ready"


def judge_metric(stable: Labels, candidate: Labels, regression: bool, margin: float,
                 alpha: float = 0.05) -> tuple[bool, SequentialResult]:
    """Whether a candidate whose realised metric is below stable's passes: it fails only when
    it is confidently worse by more than ``margin`` — the always-valid (mSPRT) confidence
    sequence of the difference (rows predicted right; squared errors, with the RMSE margin
    as one on their mean) lies past it. Always-valid because each tick looks again at a
    step's growing labels; past the margin, so a candidate a hair worse, within what the gate
    allows, is not aborted on noise. A real loss is found by a later, larger cohort if not
    here."""
    s, c = stable, candidate
    if regression:
        sd = math.sqrt(((s.n - 1) * s.var_sq + (c.n - 1) * c.var_sq) / max(s.n + c.n - 2, 1))
        seq = msprt_mean(s.mean_sq, s.var_sq, s.n, c.mean_sq, c.var_sq, c.n,
                         tau=HARM_TAU_SD * sd or None, alpha=alpha)
        return not seq.ci_low > s.mean_sq * ((1 + margin) ** 2 - 1), seq
    p = (s.correct + c.correct) / (s.n + c.n)
    seq = msprt_proportion(s.correct, s.n, c.correct, c.n,
                           tau=HARM_TAU_SD * math.sqrt(p * (1 - p)) or None, alpha=alpha)
    return not seq.ci_high < -margin, seq


def latency_bound(stable_p99: float | None, ratio: float, floor_ms: float) -> float | None:
    """The candidate's largest acceptable p99: ``ratio`` x stable's, but never less than
    stable's + ``floor_ms``. Below half a millisecond a p99 is Python's scheduling and the
    histogram's coarse bins (0.05, 0.1, 0.2, 0.5 ms), and no caller notices the difference."""
    if stable_p99 is None:
        return None
    return round(max(ratio * stable_p99, stable_p99 + floor_ms), 4)


def judge_agreement(agree: int, rows: int, want: float) -> bool | None:
    """The agreement check: failed when even the 95 % Wilson interval's upper end is below
    ``want`` (confidently below it), passed when the share reaches ``want``, else not
    judged yet — a share just under the bound on a few rows is noise, and more rows come."""
    if not rows:
        return None
    if wilson(agree, rows)[1] < want:
        return False
    return True if agree / rows >= want else None


def _interval(agree: int, rows: int) -> str:
    if not rows:
        return ""
    lo, hi = wilson(agree, rows)
    return f" (95 % interval {lo:.3f}-{hi:.3f})"


def _calls(hist: Histogram | None) -> int:
    return 0 if hist is None else sum(hist.counts)


def timeout(r: Rollout, now: float, v: Verdict) -> str | None:
    """``inconclusive`` (with a reason) once ``max_duration_s`` has passed, else None."""
    limit = conf(r, "max_duration_s")
    if limit is not None and now - r.started >= float(limit):
        v.say(f"inconclusive: {format_duration(now - r.started)} have passed, the longest "
              f"this rollout may run (max_duration_s {format_duration(float(limit))})")
        return "inconclusive"
    return None


__all__ = ["canary", "shadow_rollout", "timeout"]
