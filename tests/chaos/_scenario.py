"""The chaos scenario: a daemon with a state file, healthy, quiet and hung workers and
canaries, and rounds of faults; then the table of what held.

Runs inside a private PID namespace (see run.py): every process the daemon could be
talked into signalling is one this harness started.

Every fault is framed the same way: hung workers are armed just before it, during it
and after it, and the harness waits (on their pidfds) until each is reaped or clearly
will not be. The time the daemon was down, stopped or reading a flood is recorded as an
excused interval; a hung worker's lateness beyond those intervals is the daemon's own.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
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
from _procs import Child, DeathWatch, thread_ids
from _report import Interval, Row, late_beyond, render

__all__ = ["Chaos", "Plan"]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers.py")

#: A hung worker reaped later than this beyond every excused interval breaks a promise.
#: The daemon itself reaps within milliseconds; the margin is for a loaded 2-core machine
#: and for a worker whose arm was re-sent by its client after an outage (the client
#: retries with a back-off of up to 1 s).
LATE_LIMIT = 1.5
#: Deadlines of hung workers armed before, during and after a fault.
BEFORE = (0.3, 1.5)
DURING = (0.1, 1.0)
AFTER = (0.5,)
#: A quiet worker's timer: long enough to outlive the restart that follows its block.
QUIET_AFTER = 3.0
STOP_SECONDS = 2.5
FULL_PIPE_HOLD = 0.4


@dataclass(frozen=True)
class Plan:
    """How much chaos: rounds of every fault, and the junk floods of each round."""

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


@dataclass
class Hung:
    """A worker that arms a timer and hangs: the daemon must reap it."""

    child: Child
    fault: str
    phase: str
    deadline: float = float("nan")  # the earliest its deadline can be
    warned: bool = False  # its arm could not be delivered at once (the daemon was down)


@dataclass(frozen=True)
class Flood:
    """A junk flood: ``lines`` invalid lines in ``size`` bytes, read in ``seconds``
    (from the writer's start until a status request written after it was answered)."""

    kind: str
    size: int
    lines: int
    seconds: float

    @property
    def label(self) -> str:
        """For people: ``1024 KiB of y``."""
        return f"{self.size >> 10} KiB {'of y' if self.kind == 'yes' else 'mixed'}"

    def rate(self) -> float:
        """Lines read per second."""
        return self.lines / self.seconds


class Chaos:
    """One chaos run in ``workdir`` (a private directory) following ``plan``."""

    def __init__(self, workdir: str, plan: Plan, seed: int = 11) -> None:
        self.plan = plan
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.started = time.monotonic()
        self.watch = DeathWatch()
        self.daemon = Daemon(workdir, self.watch)
        self._workers_log = open(os.path.join(workdir, "workers.log"), "ab")  # noqa: SIM115
        self.healthy: List[Child] = []
        self.quiet: List[Child] = []
        self.quiet_latest = 0.0
        self.canaries: List[Child] = []
        self.hung: List[Hung] = []
        self.excused: List[Interval] = []
        self.restarts: Counter[str] = Counter()
        self.outages: List[float] = []
        self.unplanned: List[Optional[int]] = []
        self.damaged: List[Tuple[str, bool]] = []  # (how, set aside)
        self.junk_sent = 0
        self.junk_counted = 0
        self.floods: List[Flood] = []
        self.hostile_sent = 0
        self.hostile_reasons: Counter[str] = Counter()
        self.hostile_undecodable = 0
        self.hostile_accepted = 0
        self.stops: List[float] = []
        self.full_pipes: List[int] = []
        self.summaries: List[Dict[str, Any]] = []
        self.rounds_done = 0
        self.canaries_alive = 0
        self.aborted = ""

    # -- the run ----------------------------------------------------------------------

    def run(self) -> bool:
        """Set up, run the rounds, finish; print the table; True if every promise held."""
        try:
            try:
                self.setup()
                self.fault("baseline (no fault)", lambda during: during())
                for n in range(self.plan.rounds):
                    if not self.time_for_a_round():
                        self.log(f"round {n + 1} skipped: not enough time left")
                        break
                    self.round(n)
                    self.rounds_done += 1
            except Exception as e:
                self.abort(e)
            try:
                self.finish()
            except Exception as e:
                self.abort(e)
        finally:
            self.close()
        rows = self.rows()
        elapsed = time.monotonic() - self.started
        title = (
            f"ftimer chaos run: {self.rounds_done} of {self.plan.rounds} rounds, "
            f"{elapsed:.0f} s, in a private PID namespace"
        )
        print(render(title, rows), flush=True)
        return all(r.ok is not False for r in rows)

    def abort(self, e: Exception) -> None:
        """The scenario could not go on: note why (a failed row), let the daemon run."""
        self.aborted = self.aborted or f"{type(e).__name__}: {e}"
        self.log(f"ABORTED: {traceback.format_exc()}")
        if self.daemon.child is not None and self.daemon.child.alive:
            self.daemon.resume()

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
        self.fault(
            f"{how} state file + restart",
            lambda during: self.damaged_restart(how, during),
            before=how == "bad-entry",  # a corrupt file loses what it held: see reliability.md
        )

    def time_for_a_round(self) -> bool:
        """True if another round fits in the time limit (judged by the rounds so far)."""
        spent = time.monotonic() - self.started
        per_round = spent / max(1, self.rounds_done) if self.rounds_done else 40.0
        return spent + per_round * 1.3 + 20 < self.plan.time_limit

    def setup(self) -> None:
        """Start the daemon, the canaries, the healthy and the quiet workers."""
        ready = self.daemon.start()
        self.log(f"daemon ready (pid {self.daemon.pid}) in {ready - self.started:.2f} s")
        self.canaries = [self.spawn("canary", "canary", "4"), self.spawn("canary", "canary", "0")]
        fifo = self.daemon.fifo
        variants: List[List[str]] = [["--protocol", "1"]] * 2 + [["--threads", "2"]] * 2
        variants += [["--labels", json.dumps({"version": "3"})]]
        variants += [[]] * (12 - len(variants))
        self.healthy = [self.spawn("healthy", "healthy", fifo, *v) for v in variants]
        self.quiet = [self.spawn("quiet", "quiet", fifo) for _ in range(2)]
        for child in self.canaries + self.healthy + self.quiet:
            self.expect_line(child, "ready", timeout=60.0)
        self.log(
            f"{len(self.healthy)} healthy and {len(self.quiet)} quiet workers, "
            f"{len(self.canaries)} canaries running"
        )

    # -- fault framing ----------------------------------------------------------------

    def fault(
        self, name: str, inject: Callable[[Callable[[], None]], None], before: bool = True
    ) -> None:
        """Run ``inject`` framed by hung workers armed before, during and after it.

        ``inject`` is given a function that arms the "during" workers; it calls it at
        the moment the fault is in full swing.
        """
        n_early = len(BEFORE) if before else 0
        hung = self.spawn_hung(name, n_early + len(DURING) + len(AFTER))
        early, during, late = hung[:n_early], hung[n_early : -len(AFTER)], hung[-len(AFTER) :]
        self.arm(early, BEFORE)
        self.collect(early)
        armed_during = False

        def arm_during() -> None:
            nonlocal armed_during
            self.arm(during, DURING)
            armed_during = True

        inject(arm_during)
        if not armed_during:
            arm_during()
        self.collect(during)
        self.check_daemon()
        self.arm(late, AFTER)
        self.collect(late)
        self.await_reaps(hung)
        self.check_daemon()
        reaped = [h for h in hung if self.reaped(h)]
        worst = {
            phase: max((self.beyond(h) for h in reaped if h.phase == phase), default=0.0)
            for phase in ("before", "during", "after")
        }
        self.log(
            f"{name}: {len(reaped)} of {len(hung)} hung reaped; lateness beyond outages "
            + ", ".join(f"{phase} {late:.3f} s" for phase, late in worst.items())
        )

    def spawn_hung(self, fault: str, n: int) -> List[Hung]:
        """Start ``n`` hung workers and wait until each is ready to arm."""
        hung = [Hung(self.spawn("hung", "hung", self.daemon.fifo), fault, "") for _ in range(n)]
        for h in hung:
            self.expect_line(h.child, "ready", timeout=60.0)
        self.hung += hung
        return hung

    def arm(self, hung: Sequence[Hung], afters: Sequence[float]) -> None:
        """Tell each of ``hung`` to arm for its ``after`` (without waiting for it)."""
        phase = {BEFORE: "before", DURING: "during", AFTER: "after"}[tuple(afters)]
        for h, after in zip(hung, afters):
            h.phase = phase
            h.child.tell(repr(after))

    def collect(self, hung: Sequence[Hung]) -> None:
        """Read each worker's ``armed`` line: its deadline, and whether the arm waited."""
        for h in hung:
            line = self.expect_line(h.child, "armed", timeout=30.0)
            _, earliest, warned = line.split()
            h.deadline = float(earliest)
            h.warned = warned != "0"

    def await_reaps(self, hung: Sequence[Hung]) -> None:
        """Wait on the pidfds until every one of ``hung`` is dead, or a few seconds past
        the last deadline (the end of the run reports the ones never reaped)."""
        last = max(h.deadline for h in hung)
        timeout = max(0.0, last - time.monotonic()) + 5.0
        self.watch.wait_dead([h.child for h in hung], timeout)

    @staticmethod
    def reaped(h: Hung) -> bool:
        """True if the hung worker was killed with SIGKILL, and not by the harness."""
        return h.child.status == -9 and not h.child.planned

    def beyond(self, h: Hung) -> float:
        """Lateness of a reaped hung worker beyond every excused interval."""
        assert h.child.died is not None
        return late_beyond(h.deadline, h.child.died, self.excused)

    # -- the faults -------------------------------------------------------------------

    def kill_restart(self, during: Callable[[], None]) -> None:
        """kill -9 right after a quiet worker's disarm; restart on the same state file."""
        self.await_saved()
        self.daemon.checkpoint()
        self.quiet_block(self.quiet[0])
        killed = self.daemon.kill()
        during()
        self.restart("kill -9", killed)

    def term_restart(self, during: Callable[[], None]) -> None:
        """SIGTERM (the daemon saves its state) right after a quiet worker's disarm."""
        self.daemon.checkpoint()
        self.quiet_block(self.quiet[1])
        sent = self.daemon.terminate()
        during()
        self.restart("SIGTERM", sent)

    def damaged_restart(self, how: str, during: Callable[[], None]) -> None:
        """kill -9, damage the state file, restart: the daemon must start anyway and set
        an unreadable file aside."""
        if how == "bad-entry":
            self.await_saved()
        self.daemon.checkpoint()
        killed = self.daemon.kill()
        aside = set(glob.glob(self.daemon.state_file + ".corrupt-*"))
        self.log(f"state file {damage_state(self.daemon.state_file, how, self.rng)}")
        during()
        self.restart(f"{how} state", killed)
        new = set(glob.glob(self.daemon.state_file + ".corrupt-*")) - aside
        if how != "bad-entry":
            self.damaged.append((how, bool(new)))

    def restart(self, kind: str, down: float) -> None:
        """Start the next daemon; the time it was down is an excused interval."""
        ready = self.daemon.start()
        self.excused.append(Interval(kind, down, ready))
        self.restarts[kind] += 1
        self.outages.append(ready - down)
        self.log(f"{kind}: daemon back (pid {self.daemon.pid}) after {ready - down:.3f} s")

    def stop_cont(self, during: Callable[[], None]) -> None:
        """SIGSTOP the daemon for longer than a healthy block's timer, then SIGCONT."""
        stopped = self.daemon.pause()
        during()
        time.sleep(max(0.0, stopped + STOP_SECONDS - time.monotonic()))  # the fault's length
        resumed = self.daemon.resume()
        # The backlog the stop left is read before anything expires: part of the fault.
        caught_up = self.daemon.wait_healthy(30.0)
        self.excused.append(Interval("SIGSTOP", stopped, caught_up))
        self.stops.append(resumed - stopped)

    def full_pipe(self, during: Callable[[], None]) -> None:
        """Stop the daemon, fill its pipe to the last byte, hold, resume: writers block
        for room (never longer than their write timeout) and must lose nothing."""
        writer = FifoWriter(self.daemon.fifo)
        try:
            stopped = self.daemon.pause()
            size, _ = writer.fill(sync_lines(90))
            during()  # these arms now wait for room
            time.sleep(max(0.0, stopped + FULL_PIPE_HOLD - time.monotonic()))  # the fault
            self.daemon.resume()
        finally:
            writer.close()
        caught_up = self.daemon.wait_healthy(30.0)
        self.excused.append(Interval("full pipe", stopped, caught_up))
        self.full_pipes.append(size)

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
        counted = self.decode_errors(self.daemon.status()["stats"]) - self.decode_errors(before)
        self.excused.append(Interval("flood", start, caught_up))
        flood = Flood(kind, size, lines, caught_up - start)
        self.floods.append(flood)
        self.junk_sent += lines
        self.junk_counted += counted
        self.log(
            f"flood {flood.label}: {lines:,} lines read in {flood.seconds:.3f} s "
            f"(daemon counted {counted:,})"
        )

    def dying_writers(self, during: Callable[[], None]) -> None:
        """Writers that write part of a line and die (SIGKILL) before the newline; some
        parts begin a request to reap a canary."""
        before = self.daemon.status()["stats"]
        victims = [c.pid for c in self.canaries]
        writers = []
        for i, part in enumerate(partial_lines(victims, self.rng, self.plan.dying_writers)):
            script = 'printf "%s" "$0" > "$1"; kill -KILL $$'
            writers.append(
                self.watch.spawn("writer", ["sh", "-c", script, part.decode(), self.daemon.fifo])
            )
            if i == self.plan.dying_writers // 2:
                during()
        self.watch.wait_dead(writers, 30.0)
        died_mid_line = sum(w.status == -9 for w in writers)
        self.daemon.wait_healthy(30.0)
        counted = self.decode_errors(self.daemon.status()["stats"]) - self.decode_errors(before)
        self.junk_sent += len(writers)
        self.junk_counted += counted
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
        targets += thread_ids(self.canaries[0].pid) + thread_ids(self.healthy[2].pid)
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
        undecodable = self.decode_errors(after) - self.decode_errors(before)
        accepted = after["requests"].get("expire", {}).get("ok", 0) - before["requests"].get(
            "expire", {}
        ).get("ok", 0)
        self.hostile_sent += len(lines)
        self.hostile_reasons += reasons
        self.hostile_undecodable += undecodable
        self.hostile_accepted += accepted
        self.log(
            f"{len(lines)} hostile requests to {len(targets)} targets: "
            f"{sum(reasons.values())} refused ({dict(reasons)}), {undecodable} undecodable"
        )

    # -- helpers ------------------------------------------------------------------------

    def quiet_block(self, quiet: Child) -> None:
        """One block of a quiet worker: armed and disarmed; then it writes nothing."""
        quiet.tell(repr(QUIET_AFTER))
        line = self.expect_line(quiet, "done", timeout=30.0)
        self.quiet_latest = max(self.quiet_latest, float(line.split()[1]))

    def await_saved(self, timeout: float = 10.0) -> None:
        """Wait until the state file holds the timers of the hung workers armed so far
        and still alive (the daemon saves within 100 ms of a change)."""
        want = {h.child.pid for h in self.hung if h.child.alive and h.phase}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(self.daemon.state_file, "rb") as f:
                    saved = {t["pid"] for t in json.loads(f.read())["timers"]}
            except (OSError, ValueError):
                saved = set()
            if want <= saved:
                return
            time.sleep(0.01)
        self.log(f"warning: hung workers not in the state file after {timeout} s")

    def check_daemon(self) -> None:
        """If the daemon died on its own, count it and start another."""
        status = self.daemon.unplanned_exit()
        if status is None:
            return
        child = self.daemon.child
        assert child is not None
        assert child.died is not None
        self.unplanned.append(status)
        self.log(f"the daemon died on its own (status {status}):\n{self.daemon.log_tail()}")
        self.restart("after an unplanned exit", child.died)

    def spawn(self, role: str, *args: str) -> Child:
        """Start a worker process of ``role``."""
        argv = [sys.executable, WORKERS, *args]
        return self.watch.spawn(role, argv, stdin=True, stdout=True, stderr=self._workers_log)

    @staticmethod
    def expect_line(child: Child, word: str, timeout: float) -> str:
        """The next line from ``child``, which must start with ``word``."""
        line = child.read_line(timeout)
        if line is None or not line.startswith(word):
            raise RuntimeError(f"{child.role} pid {child.pid}: expected {word!r}, got {line!r}")
        return line

    @staticmethod
    def decode_errors(stats: Dict[str, Any]) -> int:
        """Invalid lines a daemon has counted."""
        return sum(stats["decode_errors"].values())

    def log(self, message: str) -> None:
        """A progress line, stamped with the time since the start."""
        print(f"[{time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """Stop the workers the way a job ends, after every quiet deadline has passed."""
        self.check_daemon()
        for child in self.healthy:
            child.close_stdin()
        self.watch.wait_dead(self.healthy, 30.0)
        # Wait until every quiet worker's last deadline has passed, then make the daemon
        # catch up: a timer it wrongly kept would have been reaped by then.
        time.sleep(max(0.0, self.quiet_latest - time.monotonic()))  # the deadline itself
        self.daemon.wait_healthy(30.0)
        for child in self.quiet:
            child.close_stdin()
        self.watch.wait_dead(self.quiet, 30.0)
        for child in self.healthy + self.quiet:
            line = child.read_line(5.0) if child.status == 0 else None
            if line is not None:
                self.summaries.append(json.loads(line))
        self.watch.wait_dead([h.child for h in self.hung], 5.0)
        self.canaries_alive = sum(c.alive for c in self.canaries)
        self.report_failures()

    def report_failures(self) -> None:
        """Log what broke a promise, with what is needed to look into it."""
        for child in self.healthy + self.quiet:
            if child.status != 0:
                self.log(f"healthy worker {child.role} pid {child.pid} ended with {child.status}")
        for h in self.hung:
            if not self.reaped(h):
                self.log(f"hung worker pid {h.child.pid} ({h.fault}, {h.phase}) not reaped")
            elif self.beyond(h) > LATE_LIMIT:
                self.log(
                    f"hung worker pid {h.child.pid} ({h.fault}, {h.phase}, arm "
                    f"{'re-sent' if h.warned else 'delivered'}) reaped "
                    f"{self.beyond(h):.3f} s late beyond outages"
                )
        for summary in self.summaries:
            for error in summary["errors"][:3]:
                self.log(f"exception in a healthy step: {error}")

    def close(self) -> None:
        """End every process still running (the daemon with SIGTERM) and clean up."""
        for child in self.canaries:
            if child.alive:
                child.end()
        self.daemon.close()
        self.watch.close()
        self._workers_log.close()

    def rows(self) -> List[Row]:
        """The table."""
        workers = self.healthy + self.quiet
        killed = [c for c in workers if c.status != 0]
        blocks = sum(s["blocks"] for s in self.summaries)
        errors = sum(len(s["errors"]) for s in self.summaries)
        warned = sum(s["warnings"] for s in self.summaries)
        reaped = [h for h in self.hung if self.reaped(h)]
        beyond = max((self.beyond(h) for h in reaped), default=0.0)
        raw = max((h.child.died - h.deadline for h in reaped if h.child.died), default=0.0)
        canaries_alive = self.canaries_alive
        refused = sum(self.hostile_reasons.values()) + self.hostile_undecodable
        set_aside = sum(ok for _, ok in self.damaged)
        yes = [f for f in self.floods if f.kind == "yes"]
        biggest = max((f.size for f in yes), default=0)
        slowest = min((f for f in yes if f.size == biggest), key=Flood.rate, default=None)
        restarts = sum(self.restarts.values())
        elapsed = time.monotonic() - self.started
        return [
            Row("scenario completed", self.aborted or "yes", not self.aborted),
            Row(
                "healthy workers killed (must be 0)", f"{len(killed)} of {len(workers)}", not killed
            ),
            Row(
                "exceptions in healthy steps (must be 0)",
                f"{errors} in {blocks:,} blocks ({warned:,} outage warnings)",
                errors == 0 and len(self.summaries) == len(workers),
            ),
            Row(
                "hung workers reaped (must be all)",
                f"{len(reaped)} of {len(self.hung)}",
                len(reaped) == len(self.hung),
            ),
            Row(
                f"worst reap lateness beyond outages (<= {LATE_LIMIT} s)",
                f"{beyond:.3f} s (raw worst {raw:.2f} s)",
                beyond <= LATE_LIMIT,
            ),
            Row(
                "canaries alive at the end (must be all)",
                f"{canaries_alive} of {len(self.canaries)}",
                canaries_alive == len(self.canaries),
            ),
            Row(
                "daemon restarts (each ready again)",
                f"{restarts} ({', '.join(f'{k} {v}' for k, v in self.restarts.items())}); "
                f"worst outage {max(self.outages, default=0):.2f} s",
                restarts > 0,
            ),
            Row(
                "unplanned daemon exits (must be 0)",
                f"{len(self.unplanned)} {self.unplanned or ''}",
                not self.unplanned,
            ),
            Row(
                "unreadable state files set aside (must be all)",
                f"{set_aside} of {len(self.damaged)} ({', '.join(h for h, _ in self.damaged)})",
                set_aside == len(self.damaged),
            ),
            Row(
                "junk lines sent (counted by the daemon)",
                f"{self.junk_sent:,} ({self.junk_counted:,})",
                None,
            ),
            Row(
                "junk read rate (slowest of the largest y floods)",
                "none"
                if slowest is None
                else f"{slowest.rate():,.0f} lines/s ({slowest.label}, {slowest.seconds:.3f} s)",
                None,
            ),
            Row(
                "hostile requests refused (must be all)",
                f"{refused} of {self.hostile_sent} ({sum(self.hostile_reasons.values())} "
                f"by policy, {self.hostile_undecodable} undecodable; "
                f"{self.hostile_accepted} accepted)",
                refused == self.hostile_sent and self.hostile_accepted == 0,
            ),
            Row(
                "SIGSTOP / full pipe",
                f"{len(self.stops)} x {STOP_SECONDS} s stopped; {len(self.full_pipes)} x "
                f"{max(self.full_pipes, default=0) >> 10} KiB held {FULL_PIPE_HOLD} s",
                None,
            ),
            Row(
                f"run time (<= {self.plan.time_limit:.0f} s)",
                f"{elapsed:.0f} s",
                elapsed <= self.plan.time_limit,
            ),
        ]
