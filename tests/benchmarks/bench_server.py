"""The server side by side with torch 2.13's: ingest, reap latency, idle CPU, memory.

Each server runs in a subprocess of its own (``python serve.py ftimer|torch FIFO``) driven
over stdin/stdout, so CPU time and RSS are the server's alone. torch's
server runs with ``max_interval=0.1`` (what torchelastic uses) and is patched so it does
not SIGKILL itself after each reap (torch 2.13 does). While one server is measured the
other is paused (SIGSTOP), so neither steals the other's CPU on a small machine.

ftimer's server also binds its AF_UNIX datagram socket beside the FIFO (as the daemon
does by default), so the same process is measured over either transport: ingest from
ftimer's client over the socket, and reap latency of a timer armed over it, beside torch's
FIFO server and client in the same run. The socket's floor is measured in the same rounds:
the same writers against a reader that only receives each datagram with its credentials
and pidfd and closes that pidfd (``serve.py floor SOCKET``), what any server in Python pays
per datagram before it looks at one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

HERE = pathlib.Path(__file__).resolve()
KINDS = ("ftimer", "torch")
HOLDERS = 20  # processes the "other" timers are bound to (5k timers each at 100k)
FAR = 3600.0  # seconds: the other timers never expire during a run
#: The labels ftimer's client adds under torchrun (its job id, RANK and LOCAL_RANK).
TORCHRUN_LABELS = {"job": "llama-70b-pretrain-20261206", "rank": "3", "local_rank": "3"}

Row = Dict[str, Any]

# -- writer processes (ingest) ---------------------------------------------------------


def write(kind: str, path: str, n: int, how: str) -> None:
    """Send ``n`` arm/disarm messages for this process on each "go" line, then print
    "done"; exit at end of input.

    ``how``: "client": each library's ``FileTimerClient.acquire``/``release`` (torch's
    opens, writes and closes the FIFO per message; ftimer's keeps it open), with
    "+socket": ftimer's client over the server's datagram socket at ``path``, with
    "+fresh": a scope never used before for each pair (``f"step-{i}"``) instead of 8
    scopes used over and over, with "+labels": ftimer's client adds ``TORCHRUN_LABELS``
    to every arm; "open": pre-encoded lines, one write() each, the FIFO opened once per
    round; "per-message": pre-encoded lines, the FIFO opened and closed
    around each write (torch's way); "batch": pre-encoded lines joined into writes of up
    to PIPE_BUF bytes; "datagrams": pre-encoded lines, one datagram each on the socket at
    ``path``, with "+yes", "+text" or "+json": that kind of ``JUNK`` instead.
    """
    pid = os.getpid()
    scopes = [f"s{i % 8}" for i in range(n // 2)]
    method, *options = how.split("+")
    if method == "client":
        if kind == "ftimer":
            from ftimer_client import FileTimerClient

            transport = "socket" if "socket" in options else "fifo"
            # "+labels": the labels ftimer's client adds under torchrun, on every arm.
            labels = TORCHRUN_LABELS if "labels" in options else {}
            client = FileTimerClient(path, signal.SIGKILL, transport=transport, labels=labels)
        else:
            from torch.distributed.elastic.timer import FileTimerClient  # type: ignore

            client = FileTimerClient(path, signal.SIGKILL)
        far = time.time() + FAR
        fresh = itertools.count()  # never the same scope twice, across rounds too
        failures = 0  # torch's client raises BlockingIOError when the pipe is full

        def retry(call: Any, *args: Any) -> None:
            nonlocal failures
            while True:
                try:
                    return call(*args)  # type: ignore[no-any-return]
                except BlockingIOError:
                    failures += 1
                    time.sleep(0.001)

        print("ready", flush=True)
        for cmd in sys.stdin:
            k = _round(cmd, n)
            if k is None:
                break
            if "fresh" in options:
                for _ in range(k // 2):
                    scope = f"step-{next(fresh)}"
                    retry(client.acquire, scope, far)
                    retry(client.release, scope)
            else:
                for scope in scopes[: k // 2]:
                    retry(client.acquire, scope, far)
                    retry(client.release, scope)
            print(f"done {failures}", flush=True)
        return
    if kind == "ftimer":
        from ftimer_protocol import Arm, Disarm, encode

        start = _start_time(pid)
        far = time.monotonic() + FAR
        pairs = [
            (
                encode(Arm(pid=pid, scope_id=s, deadline=far, signal=9, start_time=start)),
                encode(Disarm(pid=pid, scope_id=s, start_time=start)),
            )
            for s in scopes
        ]
    else:
        far = time.time() + FAR

        def line(scope: str, expiration: float, sig: int) -> bytes:  # torch's to_json()
            body = {"version": 1, "pid": pid, "scope_id": scope, "expiration_time": expiration}
            return (json.dumps({**body, "signal": sig}) + "\n").encode()

        pairs = [(line(s, far, 9), line(s, -1, 0)) for s in scopes]
    lines = [x for pair in pairs for x in pair]
    batches = _batches(lines)
    if method == "datagrams":  # sent by the client's own writer, which waits for room
        from ftimer_client._socket import SocketWriter

        if options:  # "+yes", "+text", "+json": that kind of junk instead
            lines = [JUNK[options[0]][1](i) for i in range(n)]
        sender = SocketWriter(path)
    print("ready", flush=True)
    for cmd in sys.stdin:
        k = _round(cmd, n)
        if k is None:
            break
        if method == "datagrams":
            for x in lines[:k]:
                sender.write(x, 30.0)
        elif how == "per-message":
            for x in lines[:k]:
                fd = os.open(path, os.O_WRONLY)
                os.write(fd, x)
                os.close(fd)
        elif how == "batch":
            fd = os.open(path, os.O_WRONLY)
            for x in batches if k == len(lines) else _batches(lines[:k]):
                os.write(fd, x)
            os.close(fd)
        else:
            # Closed after each round: torch's server applies what it read only when a
            # line arrives or the last writer closes.
            fd = os.open(path, os.O_WRONLY)
            for x in lines[:k]:
                os.write(fd, x)
            os.close(fd)
        print("done 0", flush=True)


def _round(cmd: str, n: int) -> Optional[int]:
    """The messages a "go [K]" line asks for (all ``n`` without K); None: not a round."""
    words = cmd.split()
    if not words or words[0] != "go":
        return None
    return min(n, int(words[1])) if len(words) > 1 else n


class WriterProcess:
    """A writer process (``write``) driven over its stdin and stdout: ``go()`` starts a
    round, ``done()`` waits for its end; it exits when ``close()`` closes its input."""

    def __init__(self, kind: str, path: str, n: int, how: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "write", kind, path, str(n), how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout

    def ready(self) -> None:
        """Wait until it is ready for its first round (started apart, so that writers
        import in parallel)."""
        assert self._out.readline().strip() == "ready"

    def go(self, count: Optional[int] = None) -> None:
        """Start a round of all its messages, or of the first ``count``."""
        self._in.write("go\n" if count is None else f"go {count}\n")
        self._in.flush()

    def done(self) -> int:
        """Wait for the round's end; return its writes that were retried."""
        word, count = self._out.readline().split()
        assert word == "done"
        return int(count)

    def close(self) -> None:
        self._in.close()
        self.proc.wait(30)
        self._out.close()


def _batches(lines: List[bytes]) -> List[bytes]:
    """Whole lines joined into writes of at most PIPE_BUF bytes (so each is atomic)."""
    out: List[bytes] = []
    batch = b""
    for x in lines:
        if len(batch) + len(x) > select.PIPE_BUF:
            out.append(batch)
            batch = b""
        batch += x
    return [*out, batch] if batch else out


# -- the driver ------------------------------------------------------------------------


class Server:
    def __init__(self, kind: str, directory: str) -> None:
        self.kind = kind
        self.path = os.path.join(directory, f"{kind}.{'socket' if kind == 'floor' else 'fifo'}")
        #: ftimer's datagram socket (torch's server has none).
        self.socket_path: Optional[str] = None
        if kind == "ftimer":
            from ftimer_protocol import socket_path_for

            self.socket_path = socket_path_for(self.path)
        self._sock: Optional[socket.socket] = None
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE.with_name("serve.py")), kind, self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.applied = 0  # requests the server counted so far
        self.junk = 0  # bad lines (and datagrams) it counted so far
        self.paused = False
        assert self._read() == "ready"

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} server exited ({self.proc.wait()})")
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def wait_applied(self, n: int) -> Tuple[float, int]:
        """Wait until ``n`` more requests were applied: (monotonic time, how many were ok)."""
        when, count, ok = self.ask(f"wait {self.applied + n}").split()
        if int(count) < self.applied + n:
            raise RuntimeError(f"{self.kind}: only {int(count) - self.applied} of {n} arrived")
        ok_new = int(ok) - getattr(self, "_ok", 0)
        self._ok = int(ok)
        self.applied = int(count)
        return float(when), ok_new

    def wait_read(self, kind: str, n: int) -> float:
        """Wait until the ``n`` lines (or datagrams) of ``kind`` just sent were read:
        "valid" ones all applied, junk ones (a kind of ``JUNK``) all counted as bad;
        return when (monotonic)."""
        if kind == "valid":
            end, ok = self.wait_applied(n)
            if ok < n:
                raise RuntimeError(f"{self.kind}: {n - ok} of {n} valid messages not applied")
            return end
        self.junk += n
        end, count = map(float, self.ask(f"junk {self.junk}").split())
        if count != self.junk:
            raise RuntimeError(f"{self.kind}: {count:.0f} bad lines counted, not {self.junk}")
        return end

    def pause(self, paused: bool) -> None:
        if paused != self.paused:
            self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)
            self.paused = paused

    def cpu_seconds(self) -> float:
        data = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_bytes()
        fields = data[data.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def send(self, lines: List[bytes]) -> None:
        """Open, write the lines (one write each), close: torch's client does this, and
        torch's server only checks its timers while no writer holds the FIFO open."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for x in lines:
                os.write(fd, x)
        finally:
            os.close(fd)
        self.applied += len(lines)
        self._ok = getattr(self, "_ok", 0) + len(lines)

    def send_datagram(self, line: bytes, pidfd: int) -> None:
        """Send ``line`` over the server's socket with ``pidfd`` (SCM_RIGHTS): a timer of
        that process, a child of ours (``ftimer exec``'s way), blocking for room."""
        if self._sock is None:
            assert self.socket_path is not None
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.connect(self.socket_path)
        socket.send_fds(self._sock, [line], [pidfd])
        self.applied += 1
        self._ok = getattr(self, "_ok", 0) + 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self.pause(False)
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_time(pid: int) -> int:
    data = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2 :].split()[19])


def _arm_line(
    kind: str,
    pid: int,
    scope: str,
    delay: float,
    start: Optional[int],
    *,
    labels: Optional[Dict[str, str]] = None,
) -> bytes:
    """A line arming (pid, scope) with SIGKILL ``delay`` seconds from now."""
    if kind == "ftimer":
        from ftimer_protocol import Arm, encode

        return encode(
            Arm(
                pid=pid,
                scope_id=scope,
                deadline=time.monotonic() + delay,
                signal=9,
                start_time=start,
                labels=labels,
            )
        )
    body = {"version": 1, "pid": pid, "scope_id": scope, "expiration_time": time.time() + delay}
    return (json.dumps({**body, "signal": 9}) + "\n").encode()


class Mode(NamedTuple):
    """A way of writing, measured from 1, 4 and 16 writer processes of each library."""

    label: str  # what the rows call it
    ftimer: str  # how ftimer's writers write (see ``write``)
    torch: str  # how torch's do
    note: str
    #: ftimer's writers over the socket too, in the same rounds, as rows of their own
    #: beside the same torch figures: (how they write, label, note).
    socket: Optional[Tuple[str, str, str]] = None
    #: writer processes (each torch client process imports torch: seconds each).
    writers: Tuple[int, ...] = (1, 4, 16)
    quick_writers: Tuple[int, ...] = (1, 4, 16)


_SOCKET_CLIENT_NOTE = (
    "ftimer's client (v2) over the server's AF_UNIX datagram socket: one datagram per "
    "message, the sender's credentials and pidfd checked by the server for each, a queue "
    "of net.unix.max_dgram_qlen datagrams the writers wait on when it is full; torch's "
    "figure is its client on its FIFO server, measured in the same rounds"
)

_FLOOR_NOTE = (
    "not a server: the same writers against a reader that receives each datagram as "
    "ftimer's server does (one recvmsg() with SO_PASSCRED and SO_PASSPIDFD, the pidfd "
    "closed) and only counts it, the most any server in Python reads over the socket; "
    "torch's figure is its client on its FIFO server, measured in the same rounds"
)

MODES = {
    "clients": Mode(
        "each library's client",
        "client",
        "client",
        "FileTimerClient.acquire/release in a loop: ftimer's client (v2, FIFO kept open) "
        "against torch's (v1 json, open/write/close per message)",
        socket=("client+socket", "over the socket, ftimer's client", _SOCKET_CLIENT_NOTE),
        quick_writers=(4,),
    ),
    "labels": Mode(
        "each library's client, ftimer's with torchrun's labels",
        "client+labels",
        "client",
        "FileTimerClient.acquire/release in a loop, ftimer's client adding the labels it "
        "adds under torchrun (job, rank, local_rank) to every arm; torch's client has "
        "none",
        writers=(4,),
        quick_writers=(4,),
    ),
    "scopes": Mode(
        "each library's client, distinct scopes",
        "client+fresh",
        "client+fresh",
        "FileTimerClient.acquire/release in a loop, each pair with a scope never used "
        'before (scope=f"step-{i}", a common pattern): ftimer\'s client (v2, FIFO kept '
        "open) against torch's (v1 json, open/write/close per message); the writers "
        "share the 2 cores with the server",
        writers=(4,),
        quick_writers=(4,),
    ),
    "lines": Mode(
        "encoded lines, each client's way",
        "open",
        "per-message",
        "pre-encoded lines, one write() each: ftimer's v2 lines on a FIFO kept open, "
        "torch's json.dumps lines with an open/close around each write, as its client does",
    ),
    "same": Mode(
        "encoded lines, same writes",
        "open",
        "open",
        "pre-encoded lines, one write() each, both on a FIFO kept open: a comparison of "
        "the servers alone (the writers share the machine's cores)",
    ),
    "batched": Mode(
        "encoded lines, batched writes",
        "batch",
        "batch",
        "the same lines, whole lines joined into writes of up to PIPE_BUF bytes (each "
        "still atomic), so the writers need little CPU: the servers' own capacity",
    ),
}


class Series(NamedTuple):
    """One library's writers in a round: who, to where, how, how many messages."""

    name: str
    kind: str
    server: Server
    path: str
    how: str
    total: int  # messages of all its writers together


def _ingest(
    servers: Dict[str, Server],
    writers: int,
    total: Dict[str, int],
    reps: int,
    mode: str,
    *,
    floor: Server,
) -> List[Row]:
    """Messages per second from ``writers`` processes writing as ``MODES[mode]`` says:
    a row, and if the mode has it, one over the socket and one of the socket's
    ``floor`` (the same writers against a reader that only receives)."""
    spec = MODES[mode]
    series = [
        Series(kind, kind, servers[kind], servers[kind].path, getattr(spec, kind), total[kind])
        for kind in KINDS
    ]
    if spec.socket is not None:
        ftimer = servers["ftimer"]
        assert ftimer.socket_path is not None
        series += [
            Series("socket", "ftimer", ftimer, ftimer.socket_path, spec.socket[0], total["socket"]),
            Series("floor", "ftimer", floor, floor.path, spec.socket[0], total["socket"]),
        ]
    rates: Dict[str, List[float]] = {s.name: [] for s in series}
    failures = {s.name: 0 for s in series}
    duplicates = {s.name: 0 for s in series}
    procs = {
        s.name: [
            WriterProcess(s.kind, s.path, s.total // writers // 2 * 2, s.how)
            for _ in range(writers)
        ]
        for s in series
    }
    try:
        for ps in procs.values():
            for p in ps:
                p.ready()
        for _ in range(reps):
            for s in series:  # interleaved
                for other in (*servers.values(), floor):
                    other.pause(other is not s.server)
                per = s.total // writers // 2 * 2
                # A round costs a fixed time besides its messages (torch's server sleeps
                # max_interval before its first line and again after its last, before it
                # applies them): a round of one arm/disarm pair per writer (that fixed
                # time alone), then a full one, and the rate of the difference.
                took = []
                for count in (2, per):
                    n = writers * count
                    if s.server.kind == "torch":
                        # Its loop at a known phase (it just applied a line, and sleeps
                        # max_interval before it reads again): the same fixed cost in
                        # both rounds, which the difference then cancels.
                        s.server.send([_TORCH_PROBE])
                        s.server.wait_applied(0)
                    start = time.monotonic()
                    for p in procs[s.name]:
                        p.go(count)
                    # The writers stay alive until the server read everything: a
                    # datagram whose sender exited before it was read is refused.
                    end, ok = s.server.wait_applied(n)
                    if ok < n:  # every message received and applied
                        raise RuntimeError(f"{s.name}: {n - ok} of {n} messages not applied")
                    # torch's client can raise on close after its line went through:
                    # the retry sends it twice.
                    duplicates[s.name] += ok - n
                    for p in procs[s.name]:
                        failures[s.name] = max(failures[s.name], p.done())
                    took.append((n, end - start))
                (n0, t0), (n1, t1) = took
                rates[s.name].append((n1 - n0) / (t1 - t0))
    finally:
        for ps in procs.values():
            for p in ps:
                p.close()
    processes = f"{writers} writer process{'es' if writers > 1 else ''}"
    torch_rate = statistics.median(rates["torch"])
    rows = []
    for name, label, what in (
        ("ftimer", spec.label, spec.note),
        *(
            [
                ("socket", spec.socket[1], spec.socket[2]),
                ("floor", f"floor: {spec.socket[1]}, to a reader that only receives", _FLOOR_NOTE),
            ]
            if spec.socket
            else []
        ),
    ):
        note = what
        if failures[name] or failures["torch"]:
            note += (
                f"; writes that raised BlockingIOError (full pipe) and were retried after "
                f"1 ms, per writer at most: ftimer {failures[name]}, torch "
                f"{failures['torch']} (messages applied twice because of it: torch "
                f"{duplicates['torch']})"
            )
        per = next(s.total for s in series if s.name == name) // writers // 2
        rows.append(
            {
                "group": "server ingest",
                "metric": f"{processes}, {label}",
                "unit": "msg/s",
                "ftimer": statistics.median(rates[name]),
                "torch": torch_rate,
                "better": "higher",
                "transport": "fifo" if name == "ftimer" else "socket",
                "note": f"median of {reps}; each the rate of the difference between a "
                "round of one pair per writer and a full one (a round's fixed cost "
                f"cancelled); arm/disarm pairs, {per:,} arms per writer "
                f"(torch {total['torch'] // writers // 2:,}); {note}; every message checked "
                "applied",
            }
        )
    return rows


#: A line torch's server applies and forgets (a disarm of a timer nobody armed).
_TORCH_PROBE = (
    json.dumps(
        {"version": 1, "pid": os.getpid(), "scope_id": "probe", "expiration_time": -1, "signal": 0}
    )
    + "\n"
).encode()

# How long before its deadline a reap-latency timer is armed: long enough for each server
# to have applied it (torch's loop sleeps up to max_interval before reading).
ARM_AHEAD = {"ftimer": 0.05, "torch": 0.4}
#: A random extra delay (s) for torch's timers. torch checks expiry once per loop, and its
#: loop restarts when it is resumed (SIGCONT) and when it applies a line: a fixed delay
#: puts every deadline at the same phase of that loop, and the samples are one value
#: repeated (0.1 ms or 100 ms, by luck). Over two loop periods (with 100k timers a loop
#: takes longer than max_interval) the phase is random, as a real worker's deadline's.
PHASE_JITTER = {"ftimer": 0.0, "torch": 0.2}


def _reap_once(server: Server, delay: float, over_socket: bool = False) -> float:
    """Spawn a worker, arm a SIGKILL timer for it, return death time minus deadline (s).

    ``over_socket``: the arm goes over ftimer's datagram socket with the worker's pidfd
    (our child, so ours to name: ``ftimer exec``'s way), instead of the FIFO."""
    delay += random.uniform(0.0, PHASE_JITTER[server.kind])
    worker = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(worker.pid)
    try:
        start = _start_time(worker.pid)
        deadline = time.monotonic() + delay
        line = _arm_line(server.kind, worker.pid, "step", delay, start)
        if over_socket:
            server.send_datagram(line, pidfd)
        else:
            server.send([line])
        # Time the reap, not the ingest: the timer must be armed before its deadline
        # (torch's server applies a line only after its next loop sleep).
        server.wait_applied(0)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{server.kind}: timer applied after its deadline; arm earlier")
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(30_000):
            raise RuntimeError(f"{server.kind} did not reap its worker within 30 s")
        died = time.monotonic()
    finally:
        os.close(pidfd)
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    if worker.returncode != -signal.SIGKILL:
        raise RuntimeError(f"worker ended with {worker.returncode}")
    return died - deadline


#: Kinds of junk: (what the rows call it, the line for index i).
JUNK: Dict[str, Tuple[str, Callable[[int], bytes]]] = {
    "yes": ("a yes flood: one line repeated (b'y')", lambda i: b"y\n"),
    "text": ("distinct lines that are not JSON", lambda i: b"junk %d\n" % i),
    "json": (
        "distinct invalid messages (JSON, unknown op)",
        lambda i: b'{"version":2,"op":"bogus","pid":%d}\n' % i,
    ),
}
JUNK_BLOCK = 64 * 1024  # bytes per write(): many lines each, as `yes` writes


def _blocks(data: bytes) -> List[bytes]:
    """``data`` (whole lines) cut into writes of about JUNK_BLOCK bytes, at line ends."""
    out, start = [], 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + JUNK_BLOCK) + 1 or len(data)
        out.append(data[start:end])
        start = end
    return out


def _timed_write(server: Server, blocks: List[bytes]) -> float:
    """Write ``blocks`` into the server's FIFO (blocking while it is full); return the
    time the first write started."""
    fd = os.open(server.path, os.O_WRONLY)
    try:
        start = time.monotonic()
        for block in blocks:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return start


def _junk_rows(server: Server, holder: int, n: int, reps: int) -> List[Row]:
    """ftimer's server reading ``n`` lines of each kind of junk, beside ``n`` valid lines
    from the same writer (the target: junk costs at most twice a valid line)."""
    start_time = _start_time(holder)
    valid = b"".join(
        _arm_line("ftimer", holder, f"s{i % 8}", FAR, start_time)
        + b'{"version":2,"op":"disarm","pid":%d,"scope_id":"s%d","start_time":%d}\n'
        % (holder, i % 8, start_time)
        for i in range(n // 2)
    )
    rates: Dict[str, List[float]] = {"valid": [], **{k: [] for k in JUNK}}
    data = {k: _blocks(b"".join(line(i) for i in range(n))) for k, (_, line) in JUNK.items()}
    data["valid"] = _blocks(valid)
    for _ in range(reps):
        for kind, blocks in data.items():
            start = _timed_write(server, blocks)
            rates[kind].append(n / (server.wait_read(kind, n // 2 * 2) - start))
    return _junk_table(
        rates,
        "{label}, from one writer",
        "lines/s",
        f"median of {reps} runs of {n:,} lines in {JUNK_BLOCK // 1024} KiB writes; valid "
        "lines from the same writer in the same run: {valid:,.0f}/s (junk costs {cost:.2f}x "
        "a valid line); every bad line counted; torch has no counter of bad lines (one bad "
        "line drops what it read with it)",
    )


def _junk_table(
    rates: Dict[str, List[float]], metric: str, unit: str, note: str, **extra: str
) -> List[Row]:
    """A row per kind of ``JUNK`` from ``rates`` (and those of "valid"); ``metric`` and
    ``note`` are formatted with the kind's ``label``, the ``valid`` rate and the ``cost``
    of a bad one in valid ones."""
    valid = statistics.median(rates["valid"])
    rows: List[Row] = []
    for kind, (label, _) in JUNK.items():
        rate = statistics.median(rates[kind])
        rows.append(
            {
                "group": "server junk",
                "metric": metric.format(label=label),
                "unit": unit,
                "ftimer": rate,
                "torch": None,
                "valid": valid,
                "better": "higher",
                **extra,
                "note": note.format(valid=valid, cost=valid / rate),
            }
        )
    return rows


def _socket_junk_rows(server: Server, n: int, reps: int) -> List[Row]:
    """ftimer's server reading ``n`` datagrams of each kind of junk over its socket,
    beside ``n`` valid ones; each kind from a writer process of its own, which stays
    alive until its datagrams were read (a datagram whose sender is gone is refused)."""
    assert server.socket_path is not None
    hows = {"valid": "datagrams", **{kind: f"datagrams+{kind}" for kind in JUNK}}
    writers = {
        kind: WriterProcess("ftimer", server.socket_path, n, how) for kind, how in hows.items()
    }
    rates: Dict[str, List[float]] = {kind: [] for kind in hows}
    try:
        for w in writers.values():
            w.ready()
        for _ in range(reps):
            for kind, w in writers.items():
                start = time.monotonic()
                w.go()
                end = server.wait_read(kind, n)
                w.done()
                rates[kind].append(n / (end - start))
    finally:
        for w in writers.values():
            w.close()
    return _junk_table(
        rates,
        "over the socket, {label}, from one writer",
        "datagrams/s",
        f"median of {reps} runs of {n:,} datagrams, one line each, sent by the client's "
        "writer (waiting for room as the client does); valid datagrams (arm/disarm pairs) "
        "from a writer of the same kind in the same run: {valid:,.0f}/s (junk costs "
        "{cost:.2f}x a valid datagram); every bad datagram counted",
        transport="socket",
    )


FLOOD = b"y\n" * (512 * 1024)  # 1 MiB


def _flood_reap(server: Server, samples: int) -> Row:
    """Reap lateness of a worker whose deadline falls inside a 1 MiB yes flood, beside
    the time the server takes to read the flood: the rule is that a reap waits for what
    was written before its deadline, and no longer."""
    blocks = _blocks(FLOOD)
    lateness, reading = [], []
    for _ in range(samples):
        worker = subprocess.Popen(["sleep", "60"])
        pidfd = os.pidfd_open(worker.pid)
        try:
            deadline = time.monotonic() + 0.1
            server.send([_arm_line("ftimer", worker.pid, "step", 0.1, _start_time(worker.pid))])
            server.wait_applied(0)
            time.sleep(max(0.0, deadline - 0.02 - time.monotonic()))  # the experiment's clock
            start = _timed_write(server, blocks)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(30_000):
                raise RuntimeError("ftimer did not reap its worker during the flood")
            died = time.monotonic()
            end = server.wait_read("yes", len(FLOOD) // 2)
        finally:
            os.close(pidfd)
            if worker.poll() is None:
                worker.kill()
            worker.wait()
        lateness.append(1000 * (died - deadline))
        reading.append(1000 * (end - start))
    return {
        "group": "reap during a flood",
        "metric": "lateness of a reap due 20 ms into a 1 MiB yes flood",
        "unit": "ms",
        "ftimer": statistics.median(lateness),
        "torch": None,
        "flood": statistics.median(reading),
        "better": "lower",
        "note": (
            f"median of {samples}; the server read the flood (524,288 lines) in "
            f"{statistics.median(reading):.1f} ms (median), so a reap may wait up to that "
            f"minus 20 ms; worst lateness {max(lateness):.1f} ms"
        ),
    }


def _load(servers: Dict[str, Server], holders: List[int], n: int, base: int) -> None:
    """Arm ``n`` more far-away timers, spread over the holder processes."""
    starts = {pid: _start_time(pid) for pid in holders}
    for kind, server in servers.items():
        server.pause(False)
        lines = []
        for i in range(base, base + n):
            pid = holders[i % len(holders)]
            lines.append(_arm_line(kind, pid, f"other-{i}", FAR, starts[pid]))
        server.send(lines)
        server.wait_applied(0)
        armed = int(server.ask("armed"))
        if armed != base + n:
            raise RuntimeError(f"{kind}: {armed} timers armed, expected {base + n}")


def _labelled_memory_row(
    server: Server,
    holders: List[subprocess.Popen[bytes]],
    rss: Dict[str, float],
    rss_idle: Dict[str, float],
) -> Row:
    """The memory of a timer with the labels ftimer's client adds under torchrun (torch's
    timers have none): 50k more armed on ftimer's server, beside its 100k without."""
    n = 50_000
    pids = [h.pid for h in holders]
    starts = {pid: _start_time(pid) for pid in pids}
    lines = []
    for i in range(n):
        rank = i % len(pids)
        labels = {**TORCHRUN_LABELS, "rank": str(rank), "local_rank": str(rank % 8)}
        lines.append(
            _arm_line("ftimer", pids[rank], f"labelled-{i}", FAR, starts[pids[rank]], labels=labels)
        )
    before = server.rss_mb()
    server.send(lines)
    server.wait_applied(0)
    per_timer = (server.rss_mb() - before) * 1024 * 1024 / n
    unlabelled = (rss["ftimer"] - rss_idle["ftimer"]) * 1024 * 1024 / 100_000
    return {
        "group": "server memory",
        "metric": "bytes per timer with torchrun's three labels (job, rank, local_rank)",
        "unit": "B",
        "ftimer": per_timer,
        "torch": None,
        "better": "lower",
        "note": (
            f"RSS growth over {n:,} more timers armed from {len(pids)} processes beside the "
            f"100k without labels, which took {unlabelled:.0f} B each; torch's protocol "
            "carries no labels"
        ),
    }


def _percentile(samples: List[float], q: float) -> float:
    """The nearest-rank ``q`` quantile: the ceil(q * n)-th smallest. The same statistic
    whatever the number of samples (for q = 0.99, the max of fewer than 100), so that
    columns with different numbers of samples compare alike."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered), math.ceil(q * len(ordered))) - 1)]


def run(quick: bool) -> List[Row]:
    """Ingest, reap latency at 0..100k armed, idle CPU and RSS at 100k armed."""
    rows: List[Row] = []
    holders = [subprocess.Popen(["sleep", "3600"]) for _ in range(HOLDERS)]
    with tempfile.TemporaryDirectory(prefix="ftimer-bench-") as directory:
        servers = {kind: Server(kind, directory) for kind in KINDS}
        floor = Server("floor", directory)
        try:
            rss_idle = {k: s.rss_mb() for k, s in servers.items()}
            # torch's figure swings between repetitions (170k-230k msg/s when fed
            # pre-encoded lines): nine give a steadier median.
            reps = 2 if quick else 9
            # Messages per round, over all writers. ftimer's 400k from 4 writers are the
            # 50k arms each of the distinct-scope row; the socket carries fewer a second.
            total = (
                {"ftimer": 100_000, "torch": 20_000, "socket": 25_000}
                if quick
                else {"ftimer": 400_000, "torch": 80_000, "socket": 100_000}
            )
            for mode, spec in MODES.items():
                for writers in spec.quick_writers if quick else spec.writers:
                    rows += _ingest(servers, writers, total, reps, mode, floor=floor)

            for other in servers.values():
                other.pause(other.kind != "ftimer")
            rows += _junk_rows(
                servers["ftimer"], holders[0].pid, 100_000 if quick else 400_000, reps
            )
            rows += _socket_junk_rows(servers["ftimer"], 25_000 if quick else 100_000, reps)
            rows.append(_flood_reap(servers["ftimer"], 3 if quick else 9))

            # "socket": ftimer's timers armed over its datagram socket instead of the FIFO.
            samples = (
                {"ftimer": 12, "torch": 5, "socket": 12}
                if quick
                else {"ftimer": 60, "torch": 20, "socket": 60}
            )
            reapers = {"ftimer": "ftimer", "torch": "torch", "socket": "ftimer"}
            armed = 0
            for others in (0, 1_000, 10_000, 100_000):
                _load(servers, [h.pid for h in holders], others - armed, armed)
                armed = others
                latency: Dict[str, List[float]] = {k: [] for k in samples}
                if not others:  # warm-up: first-time costs are not steady state
                    for name, kind in reapers.items():
                        for other in servers.values():
                            other.pause(other is not servers[kind])
                        _reap_once(servers[kind], ARM_AHEAD[kind], name == "socket")
                for i in range(max(samples.values())):
                    for name, kind in reapers.items():
                        if i >= samples[name]:
                            continue
                        for other in servers.values():
                            other.pause(other is not servers[kind])
                        latency[name].append(
                            1000 * _reap_once(servers[kind], ARM_AHEAD[kind], name == "socket")
                        )
                label = f"{others // 1000}k" if others else "0"
                for name, stat in (
                    ("median", statistics.median),
                    ("p99", lambda s: _percentile(s, 0.99)),
                    ("max", max),
                ):
                    rows.append(
                        {
                            "group": "reap latency",
                            "metric": f"{name}, {label} other timers armed",
                            "unit": "ms",
                            "ftimer": stat(latency["ftimer"]),
                            "torch": stat(latency["torch"]),
                            "better": "lower",
                            "stat": name,
                            "armed": others,
                            "note": (
                                f"{samples['ftimer']} / {samples['torch']} reaps (ftimer / "
                                "torch); deadline to SIGKILL death seen by the worker's "
                                "parent via pidfd; torch at max_interval=0.1, patched not "
                                "to SIGKILL itself"
                            ),
                        }
                    )
                for name, stat in (
                    ("median", statistics.median),
                    ("p99", lambda s: _percentile(s, 0.99)),
                ):
                    rows.append(
                        {
                            "group": "reap latency",
                            "metric": f"{name} over the socket, {label} other timers armed",
                            "unit": "ms",
                            "ftimer": stat(latency["socket"]),
                            "torch": stat(latency["torch"]),
                            "better": "lower",
                            "transport": "socket",
                            "note": (
                                f"{samples['socket']} reaps of timers armed over ftimer's "
                                "datagram socket (a datagram carrying the worker's pidfd, "
                                f"sent by its parent) / {samples['torch']} of torch's (its "
                                "FIFO, the same reaps as the row without 'over the socket'); "
                                f"worst {max(latency['socket']):.2f} ms; deadline to SIGKILL "
                                "death seen by the worker's parent via pidfd"
                            ),
                        }
                    )

            # Idle: both servers hold 100k timers, their writers closed; count CPU time.
            for s in servers.values():
                s.pause(False)
            period = 3.0 if quick else 10.0
            before = {k: s.cpu_seconds() for k, s in servers.items()}
            time.sleep(period)
            cpu = {k: 100 * (s.cpu_seconds() - before[k]) / period for k, s in servers.items()}
            rows.append(
                {
                    "group": "server idle",
                    "metric": "CPU with 100k timers armed",
                    "unit": "% of a core",
                    "ftimer": cpu["ftimer"],
                    "torch": cpu["torch"],
                    "better": "lower",
                    "note": f"over {period:.0f} s with no traffic (clock tick resolution)",
                }
            )
            rss = {k: s.rss_mb() for k, s in servers.items()}
            rows.append(
                {
                    "group": "server memory",
                    "metric": "RSS with 100k timers armed",
                    "unit": "MB",
                    "ftimer": rss["ftimer"],
                    "torch": rss["torch"],
                    "better": "lower",
                    "note": (
                        f"whole server process; with none armed: ftimer "
                        f"{rss_idle['ftimer']:.0f} MB, torch {rss_idle['torch']:.0f} MB "
                        "(torch itself imported)"
                    ),
                }
            )
            rows.append(_labelled_memory_row(servers["ftimer"], holders, rss, rss_idle))
        finally:
            for s in (*servers.values(), floor):
                s.close()
            for h in holders:
                h.kill()
                h.wait()
    return rows


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        for row in run("--quick" in sys.argv):
            print(row)
