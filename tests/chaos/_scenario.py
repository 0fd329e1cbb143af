"""The chaos scenario: a daemon with a state file, its workers, rounds of faults, and
the table of what held.

Runs inside a private PID namespace (see run.py): every process the daemon could be
talked into signalling is one this harness started.

Every fault is framed the same way: hung workers are armed just before it, during it and
after it, and the harness waits (on their pidfds) until each is reaped or clearly will
not be. The time the daemon was down, stopped (and reading its backlog) or reading a
flood is an excused interval; a hung worker's lateness beyond those is the daemon's own.
"""

from __future__ import annotations

import glob
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from _daemon import Daemon
from _faults import (
    FifoWriter,
    damage_state,
    hostile_lines,
    junk_lines,
    mixed_junk,
    partial_lines,
    sync_lines,
)
from _fleet import Fleet
from _procs import DeathWatch, thread_ids
from _report import Flood, Interval, Tally, failures, render, rows

from ftimer_server.core._horizon import BLOCKED_WRITE, SETTLE

__all__ = ["FULL", "QUICK", "Chaos", "Plan"]

#: Deadlines of the hung workers armed before, during and after each fault.
BEFORE = (0.3, 1.5)
DURING = (0.1, 1.0)
AFTER = (0.5,)
#: A quiet worker's timer: long enough to outlive the restart that follows its disarm.
QUIET_AFTER = 3.0
#: Longer than a healthy block's timer (2 s): their deadlines pass while it is stopped.
STOP_SECONDS = 2.5
FULL_PIPE_HOLD = 0.4
#: A daemon down for longer than a healthy block's timer.
LONG_OUTAGE = 3.0
#: The daemon's default restore grace (seconds, FileTimerServer.restore_grace).
RESTORE_GRACE = 1.5

Inject = Callable[[Callable[[], None]], None]


@dataclass(frozen=True)
class Plan:
    """How much chaos: rounds of every fault, the junk floods of each round, and the
    time after which no further round starts."""

    rounds: int
    floods: Tuple[Tuple[str, int], ...]  # (kind, bytes): kind "yes" or "mixed"
    dying_writers: int
    time_limit: float


FULL = Plan(
    rounds=3,
    floods=(
        ("yes", 4 << 10),
        ("yes", 64 << 10),
        ("yes", 256 << 10),
        ("yes", 1 << 20),
        ("mixed", 1 << 20),
    ),
    dying_writers=40,
    time_limit=270.0,
)
QUICK = Plan(
    rounds=1, floods=(("yes", 1 << 20), ("mixed", 256 << 10)), dying_writers=15, time_limit=120.0
)


class Chaos:
    """One chaos run in ``workdir`` (a private directory) following ``plan``."""

    def __init__(self, workdir: str, plan: Plan, seed: int = 11) -> None:
        self.plan = plan
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.tally = Tally(started=time.monotonic(), rounds=(0, plan.rounds))
        self.watch = DeathWatch()
        self.daemon = Daemon(workdir, self.watch)
        self._log = open(os.path.join(workdir, "workers.log"), "ab")  # noqa: SIM115
        self.fleet = Fleet(self.watch, self.daemon, self._log)
        self.canaries_alive = 0

    # -- the run ----------------------------------------------------------------------

    def run(self) -> bool:
        """Set up, run the rounds, finish; print the table; True if every promise held."""
        try:
            try:
                self.setup()
                self.rounds()
            except Exception as e:
                self.abort(e)
            try:
                self.finish()
            except Exception as e:
                self.abort(e)
        finally:
            self.close()
        elapsed = time.monotonic() - self.tally.started
        table = rows(self.fleet, self.tally, self.canaries_alive, elapsed, self.plan.time_limit)
        done, planned = self.tally.rounds
        title = f"ftimer chaos run: {done} of {planned} rounds, {elapsed:.0f} s"
        print(render(title, table), flush=True)
        return all(r.ok is not False for r in table)

    def setup(self) -> None:
        """Start the daemon, the canaries and the healthy workers."""
        ready = self.daemon.start()
        self.log(f"daemon ready (pid {self.daemon.pid}) in {ready - self.tally.started:.2f} s")
        self.fleet.start()
        self.log(f"{len(self.fleet.healthy)} healthy workers, {len(self.fleet.canaries)} canaries")

    def rounds(self) -> None:
        """The baseline, the rounds that fit in the time, then the long outage."""
        self.fault("baseline (no fault)", lambda during: during())
        for n in range(self.plan.rounds):
            if not self.time_for_a_round():
                self.log(f"round {n + 1} skipped: not enough time left")
                break
            self.round(n)
            self.tally.rounds = (n + 1, self.plan.rounds)
        # Last: it may take the healthy workers with it (see docs/reliability.md).
        self.fault(f"kill -9 + {LONG_OUTAGE:g} s outage", self.long_outage)

    def round(self, n: int) -> None:
        """Every fault once."""
        self.log(f"round {n + 1} of {self.plan.rounds}")
        self.fault("kill -9 + restart", self.kill_restart)
        self.fault("SIGSTOP / SIGCONT", self.stop_cont)
        self.fault("full pipe", self.full_pipe)
        self.fault("junk floods", self.junk_floods)
        self.fault("writers dying mid-line", self.dying_writers)
        self.fault("hostile requests", self.hostile)
        self.fault("SIGTERM + restart", self.term_restart)
        how = ("corrupt", "truncated", "bad-entry")[n % 3]
        # An unreadable file loses the timers it held: no hung worker armed before.
        self.fault(
            f"{how} state file + restart",
            lambda during: self.damaged_restart(how, during),
            before=how == "bad-entry",
        )

    def time_for_a_round(self) -> bool:
        """True if another round fits in the time limit (judged by the rounds so far)."""
        spent = time.monotonic() - self.tally.started
        done = self.tally.rounds[0]
        per_round = spent / done if done else 40.0
        return spent + per_round * 1.3 + 20 < self.plan.time_limit

    def abort(self, e: Exception) -> None:
        """The scenario could not go on: note why (a failed row), let the daemon run."""
        self.tally.aborted = self.tally.aborted or f"{type(e).__name__}: {e}"
        self.log(f"ABORTED: {traceback.format_exc()}")
        if self.daemon.child is not None and self.daemon.child.alive:
            self.daemon.resume()

    # -- fault framing ----------------------------------------------------------------

    def fault(self, name: str, inject: Inject, before: bool = True) -> None:
        """Run ``inject`` framed by hung workers armed before, during and after it.

        ``inject`` is given a function that arms the "during" workers, to call when the
        fault is in full swing (if it does not, they are armed when it returns).
        """
        self.tally.timeline.append((time.monotonic(), name))
        n_early = len(BEFORE) if before else 0
        hung = self.fleet.spawn_hung(name, n_early + len(DURING) + len(AFTER))
        early, during, late = hung[:n_early], hung[n_early : -len(AFTER)], hung[-len(AFTER) :]
        self.fleet.arm(early, BEFORE, "before")
        self.fleet.collect(early)
        armed: List[bool] = []

        def arm_during() -> None:
            if not armed:
                self.fleet.arm(during, DURING, "during")
                armed.append(True)

        inject(arm_during)
        arm_during()
        self.fleet.collect(during)
        self.check_daemon()
        self.fleet.arm(late, AFTER, "after")
        self.fleet.collect(late)
        self.fleet.await_reaps(hung)
        self.check_daemon()
        reaped = [h for h in hung if h.reaped]
        worst = dict.fromkeys(("before", "during", "after"), 0.0)
        for h in reaped:
            worst[h.phase] = max(worst[h.phase], self.tally.beyond(h))
        self.log(
            f"{name}: {len(reaped)} of {len(hung)} hung reaped; worst lateness beyond "
            "outages: " + ", ".join(f"{phase} {late:.3f} s" for phase, late in worst.items())
        )

    # -- the faults -------------------------------------------------------------------

    def kill_restart(self, during: Callable[[], None]) -> None:
        """kill -9 right after a quiet worker disarmed a saved timer; restart on the same
        state file."""
        self.quiet_step("kill -9")
        killed = self.daemon.kill()
        during()
        self.restart("kill -9", killed)

    def term_restart(self, during: Callable[[], None]) -> None:
        """SIGTERM (the daemon saves its state) right after a quiet worker disarmed a
        saved timer; restart."""
        self.quiet_step("SIGTERM")
        sent = self.daemon.terminate()
        during()
        self.restart("SIGTERM", sent)

    def long_outage(self, during: Callable[[], None]) -> None:
        """kill -9, and restart only once a healthy block's timer has run out: workers
        disarmed while no daemon could hear it, and resynchronise once it is back."""
        self.await_saved()
        killed = self.daemon.kill()
        during()
        time.sleep(max(0.0, killed + LONG_OUTAGE - time.monotonic()))  # the fault's length
        self.restart("kill -9, long outage", killed, deliberate=True)

    def damaged_restart(self, how: str, during: Callable[[], None]) -> None:
        """kill -9, damage the state file, restart: the daemon must start anyway and set
        an unreadable file aside."""
        if how == "bad-entry":
            self.await_saved()
        killed = self.daemon.kill()
        aside = set(glob.glob(self.daemon.state_file + ".corrupt-*"))
        self.log(f"state file {damage_state(self.daemon.state_file, how, self.rng)}")
        during()
        self.restart(f"{how} state", killed)
        if how != "bad-entry":
            new = set(glob.glob(self.daemon.state_file + ".corrupt-*")) - aside
            self.tally.damaged.append((how, bool(new)))

    def restart(self, kind: str, down: float, deliberate: bool = False) -> None:
        """Start the next daemon; the time it was down, and its restore grace after, are
        an excused interval (the time down is an outage figure; ``deliberate``: made long
        on purpose)."""
        ready = self.daemon.start()
        # A daemon that restored timers expires nothing for its restore grace: clients
        # re-send what they could not write while it was down (docs/server.md).
        self.tally.excused.append(Interval(kind, down, ready + RESTORE_GRACE))
        self.tally.restarts += 1
        (self.tally.long_outages if deliberate else self.tally.outages).append(ready - down)
        self.log(f"{kind}: daemon back (pid {self.daemon.pid}) after {ready - down:.3f} s")

    def stop_cont(self, during: Callable[[], None]) -> None:
        """SIGSTOP the daemon for longer than a healthy block's timer, then SIGCONT."""
        stopped = self.daemon.pause()
        during()
        time.sleep(max(0.0, stopped + STOP_SECONDS - time.monotonic()))  # the fault's length
        resumed = self.daemon.resume()
        # The backlog the stop left is read before anything expires: part of the fault;
        # and, found full, a blocked write's time more for the writers that gave up.
        caught_up = self.daemon.wait_healthy(30.0)
        self.tally.excused.append(Interval("SIGSTOP", stopped, caught_up + BLOCKED_WRITE))
        self.tally.stops.append(resumed - stopped)

    def full_pipe(self, during: Callable[[], None]) -> None:
        """Stop the daemon, fill its pipe to the last byte, hold, resume: writers block
        for room (never longer than their write timeout) and must lose nothing."""
        writer = FifoWriter(self.daemon.fifo)
        try:
            stopped = self.daemon.pause()
            size, _ = writer.fill(sync_lines(90))
            during()  # these arms now wait for room
            time.sleep(max(0.0, stopped + FULL_PIPE_HOLD - time.monotonic()))  # the fault
            resumed = self.daemon.resume()
        finally:
            writer.close()
        caught_up = self.daemon.wait_healthy(30.0)
        # Judgement waits for the writers the read woke (SETTLE), after the backlog.
        self.tally.excused.append(Interval("full pipe", stopped, caught_up + SETTLE))
        self.tally.full_pipes.append((size, resumed - stopped))

    def junk_floods(self, during: Callable[[], None]) -> None:
        """Floods of junk of several sizes and kinds, each written by its own process
        (``yes | head -c N > FIFO``, ``cat FILE > FIFO``); hung workers arm during the
        largest."""
        sizes = [size for _, size in self.plan.floods]
        largest = sizes.index(max(sizes))
        for i, (kind, size) in enumerate(self.plan.floods):
            self.flood(kind, size, during if i == largest else None)

    def flood(self, kind: str, size: int, during: Optional[Callable[[], None]]) -> None:
        """One flood: write it, wait until the daemon has read past it."""
        before = self.daemon.status()["stats"]
        if kind == "yes":
            lines = size // 2
            argv = ["sh", "-c", 'yes | head -c "$0" > "$1"', str(size), self.daemon.fifo]
        else:
            data = mixed_junk(size, self.rng)
            lines = junk_lines(data)
            path = os.path.join(self.workdir, "junk.bin")
            with open(path, "wb") as f:
                f.write(data)
            argv = ["sh", "-c", 'cat "$0" > "$1"', path, self.daemon.fifo]
        start = time.monotonic()
        writer = self.watch.spawn("flood", argv)
        if during is not None:
            during()
        if not self.watch.wait_dead([writer], 60.0) or writer.status != 0:
            raise RuntimeError(f"flood writer {argv} failed: status {writer.status}")
        caught_up = self.daemon.wait_healthy(60.0)
        counted = decode_errors(self.daemon.status()["stats"]) - decode_errors(before)
        # A flood fills the pipe: judgement waits for the writers it held (SETTLE).
        self.tally.excused.append(Interval("flood", start, caught_up + SETTLE))
        flood = Flood(kind, size, lines, caught_up - start)
        self.tally.floods.append(flood)
        self.tally.junk_sent += lines
        self.tally.junk_counted += counted
        self.log(
            f"flood {flood.label}: {lines:,} lines read in {flood.seconds:.3f} s "
            f"(daemon counted {counted:,})"
        )

    def dying_writers(self, during: Callable[[], None]) -> None:
        """Writers that write part of a line and die (SIGKILL) before the newline; some
        parts begin a request to reap a canary."""
        before = self.daemon.status()["stats"]
        victims = [c.pid for c in self.fleet.canaries]
        script = 'printf "%s" "$0" > "$1"; kill -KILL $$'
        writers = []
        for i, part in enumerate(partial_lines(victims, self.rng, self.plan.dying_writers)):
            argv = ["sh", "-c", script, part.decode(), self.daemon.fifo]
            writers.append(self.watch.spawn("writer", argv))
            if i == self.plan.dying_writers // 2:
                during()
        self.watch.wait_dead(writers, 30.0)
        died_mid_line = sum(w.status == -9 for w in writers)
        self.daemon.wait_healthy(30.0)
        counted = decode_errors(self.daemon.status()["stats"]) - decode_errors(before)
        self.tally.junk_sent += len(writers)
        self.tally.junk_counted += counted
        self.log(
            f"{died_mid_line} of {len(writers)} writers died mid-line "
            f"(daemon counted {counted} invalid lines)"
        )

    def hostile(self, during: Callable[[], None]) -> None:
        """Requests naming pids no watchdog may signal: process groups (<= 0), pid 1 and
        its threads, the daemon and its threads, a canary's threads, a healthy worker's
        threads, absurd pids; with real, zero and impossible signals."""
        targets = [-1, 0, 1, -(2**31), 2**31 - 1, 2**40, self.daemon.pid]
        targets += thread_ids(self.daemon.pid) + thread_ids(1)
        targets += thread_ids(self.fleet.canaries[0].pid) + thread_ids(self.fleet.threaded.pid)
        lines = hostile_lines(targets)
        before = self.daemon.status()["stats"]
        writer = FifoWriter(self.daemon.fifo)
        try:
            writer.write_lines(lines[: len(lines) // 2])
            during()
            writer.write_lines(lines[len(lines) // 2 :])
        finally:
            writer.close()
        after = self.daemon.status()["stats"]  # the status request syncs: all were read
        reasons = Counter(after["rejections"]) - Counter(before["rejections"])
        undecodable = decode_errors(after) - decode_errors(before)
        self.tally.hostile_sent += len(lines)
        self.tally.hostile_reasons += reasons
        self.tally.hostile_undecodable += undecodable
        self.tally.hostile_accepted += expires_ok(after) - expires_ok(before)
        self.log(
            f"{len(lines)} hostile requests to {len(targets)} targets: "
            f"{sum(reasons.values())} refused ({dict(reasons)}), {undecodable} undecodable"
        )

    # -- helpers ------------------------------------------------------------------------

    def quiet_step(self, fault: str) -> None:
        """A quiet worker disarms a timer the state file holds, and the daemon reads the
        disarm (a status request syncs); ``fault`` comes next, within milliseconds."""
        missing = self.fleet.quiet_step(fault, QUIET_AFTER)
        self.daemon.status()
        if missing:
            self.log(f"warning: pids {sorted(missing)} not in the state file in time")

    def await_saved(self) -> None:
        """Wait until the state file holds the timers of the hung workers armed so far."""
        missing = self.daemon.await_saved(self.fleet.armed_hung())
        if missing:
            self.log(f"warning: pids {sorted(missing)} not in the state file in time")

    def check_daemon(self) -> None:
        """If the daemon died on its own, count it and start another."""
        status = self.daemon.unplanned_exit()
        if status is None:
            return
        child = self.daemon.child
        assert child is not None
        assert child.died is not None
        self.tally.unplanned.append(status)
        self.log(f"the daemon died on its own (status {status}):\n{self.daemon.log_tail()}")
        self.restart("after an unplanned exit", child.died)

    def log(self, message: str) -> None:
        """A progress line, stamped with the time since the start."""
        print(f"[{time.monotonic() - self.tally.started:6.1f} s] {message}", flush=True)

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """Stop the workers the way a job ends, after every quiet deadline has passed."""
        self.tally.timeline.append((time.monotonic(), "the end of the run"))
        self.check_daemon()
        self.fleet.stop_healthy()
        # Let every quiet worker's last deadline pass, then make the daemon catch up: a
        # timer it wrongly kept has then been reaped.
        time.sleep(max(0.0, self.fleet.quiet_latest - time.monotonic()))  # the deadline
        self.daemon.wait_healthy(30.0)
        self.fleet.stop_quiet()
        self.fleet.read_summaries()
        self.watch.wait_dead([h.child for h in self.fleet.hung], 5.0)
        self.canaries_alive = sum(c.alive for c in self.fleet.canaries)
        for line in failures(self.fleet, self.tally):
            self.log(line)

    def close(self) -> None:
        """End every process still running (the daemon with SIGTERM) and clean up."""
        self.fleet.end_canaries()
        self.daemon.close()
        self.watch.close()
        self._log.close()


def decode_errors(stats: Dict[str, Any]) -> int:
    """Invalid lines a daemon has counted."""
    return sum(stats["decode_errors"].values())


def expires_ok(stats: Dict[str, Any]) -> int:
    """``expire`` requests a daemon has accepted."""
    return int(stats["requests"].get("expire", {}).get("ok", 0))
