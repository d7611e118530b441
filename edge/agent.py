"""The unattended sync loop (``hybridml-edge agent``), e.g. under systemd.

Syncs every ``interval`` seconds with ±``jitter`` so a fleet does not hit the cloud in lockstep;
while the cloud is down it backs off exponentially (capped at ``max_backoff``). A failed sync
never touches the active model, so a process serving predictions from the same store keeps
serving throughout. Any single failed step — a typed error, or a bug or hostile input that
raises something else — is logged and retried with backoff; the loop itself never dies of it.

Every interval it also checks freshness (:mod:`hybridml.edge.freshness`): when no newer signed
manifest has arrived for ``stale_after_s`` it logs a warning each cycle, so a device frozen
by the network (304s forever, the same old manifest replayed) is noticed.

Given a spool, it then uploads the spooled telemetry and feedback (:func:`hybridml.edge.push.
push`) after each sync; a push the cloud cannot take (unreachable, 5xx) backs off like a failed
sync. Given ``flush`` (an in-process runtime's :meth:`~hybridml.edge.runtime.EdgeRuntime.
flush`), it flushes the counters before each push and once more when it stops (SIGTERM).

SIGTERM (systemd's stop) and SIGINT stop the loop at its next safe point: a wait between cycles
ends at once; a download in progress is abandoned between two blocks, its ``.part`` kept for the
next start to resume (:attr:`SyncOptions.cancel`), and nothing is activated; a sync past its
downloads finishes (activation is a few atomic renames); the push is skipped (the spool keeps
its records). ``hybridml-edge agent`` then exits 0.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from hybridml.shared.errors import ConfigError, HybridMLError

from .client import CloudClient
from .freshness import Seen, describe
from .push import PushResult, push
from .spool import Spool
from .store import LocalStore
from .sync import SyncOptions, SyncResult, sync

log = logging.getLogger("hybridml.edge.agent")


@dataclass(frozen=True)
class AgentSettings:
    """Timing of the loop, in seconds."""

    interval: float = 300.0
    jitter: float = 0.1
    min_backoff: float = 1.0
    max_backoff: float = 600.0

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ConfigError(f"--interval must be positive, got {self.interval}",
                              field="interval")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"jitter is a fraction in [0, 1), got {self.jitter}",
                              field="jitter")
        if self.min_backoff <= 0 or self.max_backoff < self.min_backoff:
            raise ConfigError("backoff needs 0 < min_backoff <= max_backoff", field="backoff")

    def next_delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after a sync; ``failures`` counts consecutive failed syncs."""
        if failures:
            base = min(self.max_backoff, self.min_backoff * 2 ** (failures - 1))
        else:
            base = self.interval
        return base * (1 + rng.uniform(-self.jitter, self.jitter))


class Agent:
    """Runs :func:`sync` (then, with a ``spool``, :func:`push`) in a loop until :meth:`stop`
    (or SIGTERM/SIGINT via :meth:`run`)."""

    def __init__(self, store: LocalStore, client: CloudClient, name: str,
                 settings: AgentSettings | None = None, *, seed: int | None = None,
                 on_result: Callable[[SyncResult | HybridMLError], None] | None = None,
                 options: SyncOptions | None = None, spool: Spool | None = None,
                 flush: Callable[[], object] | None = None) -> None:
        self.store, self.client, self.name = store, client, name
        self.settings = settings or AgentSettings()
        self.options = options or SyncOptions()
        self.rng = random.Random(seed)
        self.on_result = on_result
        self.spool = spool
        self.flush = flush
        self.failures = 0
        self.push_failures = 0
        self.last_push: PushResult | None = None
        self.cycles = 0
        self._stop = threading.Event()
        # SIGTERM abandons a download between two blocks (its .part stays for the resume)
        self.options = dataclasses.replace(self.options, cancel=self._stop)

    def stop(self) -> None:
        """Ask the loop to end after the current step."""
        self._stop.set()

    def step(self) -> float:
        """One sync; returns the delay before the next one."""
        self.cycles += 1
        try:
            result = sync(self.store, self.client, self.name, self.options)
        except HybridMLError as exc:
            if self._stop.is_set() and exc.details.get("stopped"):
                log.warning("stopping mid-sync of %s: %s", self.name, exc.message)
                return 0.0  # no push: the spool keeps its records for the next start
            self.failures += 1
            log.warning("sync of %s failed (%d in a row): %s", self.name, self.failures,
                        exc.message)
            if self.on_result:
                self.on_result(exc)
        except Exception as exc:  # a bug or hostile input: this step failed, the agent lives
            self.failures += 1
            log.exception("sync of %s failed (%d in a row) with an unexpected %s",
                          self.name, self.failures, type(exc).__name__)
            if self.on_result:
                self.on_result(HybridMLError(f"unexpected {type(exc).__name__}: {exc}"))
        else:
            self.failures = 0
            if result.changed:
                log.warning("activated %s v%s", self.name, result.version)
            if self.on_result:
                self.on_result(result)
        if self._stop.is_set():
            return 0.0  # stopping: the spool keeps its records for the next start
        self._push()
        self._check_freshness()
        return self.settings.next_delay(max(self.failures, self.push_failures), self.rng)

    def _push(self) -> None:
        """Flush the counters (if given) and upload the spool (if given); never raises."""
        self._flush()
        if self.spool is None:
            return
        try:
            result = push(self.spool, self.client, model=self.name)
        except Exception as exc:  # a bug or a broken spool: this push failed, the agent lives
            self.push_failures += 1
            log.warning("push of %s failed (%d in a row): %s", self.name, self.push_failures,
                        getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            return
        self.last_push = result
        self.push_failures = self.push_failures + 1 if result.unavailable else 0
        if result.accepted or result.quarantined:
            log.info("pushed %d record(s) of %s, quarantined %d, %d left", result.accepted,
                     self.name, result.quarantined, result.pending)

    def _flush(self) -> None:
        if self.flush is None:
            return
        try:
            self.flush()
        except Exception as exc:  # the counters stay in memory for the next flush
            log.warning("telemetry flush failed: %s", getattr(exc, "message", exc))

    def freshness(self) -> dict[str, object]:
        """The model's freshness now (:func:`hybridml.edge.freshness.describe`)."""
        store, name = self.store, self.name
        seen = Seen.load(store.sync_state(name), store.active(name), store.previous(name))
        return describe(seen, self.options.clock(), self.options.freshness)

    def _check_freshness(self) -> None:
        try:
            fresh = self.freshness()
        except Exception as exc:  # an unreadable store is reported by the next sync
            log.warning("cannot judge the freshness of %s: %s", self.name, exc)
            return
        if fresh["state"] == "stale":
            log.warning("%s is STALE: no newer signed manifest since %s (over %g s); the cloud "
                        "is unreachable, or the network withholds updates", self.name,
                        fresh["since"], fresh["stale_after_s"])

    def run(self, max_cycles: int | None = None, install_signals: bool = True) -> int:
        """Loop until stopped or ``max_cycles`` syncs; returns the number of cycles run."""
        if install_signals and threading.current_thread() is threading.main_thread():
            def _handler(signum: int, _frame: FrameType | None) -> None:
                log.warning("signal %d: stopping at the next safe point", signum)
                self.stop()

            signal.signal(signal.SIGTERM, _handler)
            signal.signal(signal.SIGINT, _handler)
        while not self._stop.is_set():
            delay = self.step()
            if max_cycles is not None and self.cycles >= max_cycles:
                break
            self._stop.wait(delay)
        self._flush()  # what was counted since the last push waits in the spool
        return self.cycles
