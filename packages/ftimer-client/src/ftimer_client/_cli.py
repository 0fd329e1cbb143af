"""The ``ftimer`` command: timers for shell scripts and other non-Python workers.

    ftimer arm    --scope S --after SECONDS [--pid PID] [--signal SIG]
    ftimer beat   --scope S --after SECONDS [--pid PID] [--signal SIG]
    ftimer disarm --scope S [--pid PID]
    ftimer expire --scope S [--pid PID] [--signal SIG]
    ftimer exec   --after SECONDS [--scope S] [--signal SIG] -- CMD ARGS...

Exit status: 0 done; 2 bad arguments; 3 no server took the message (see
``--on-unavailable``); ``exec`` exits with CMD's status (128+N when a signal N killed it,
127 when CMD is not found, 126 when it cannot be run).

The timer is never this command's own: it is for the calling shell (or ``--pid``), or
for CMD. Over the server's socket, where the kernel tells the server who sends, every
message therefore carries a pidfd of that process (the client does it for a client made
with ``pid``), which the server accepts for the sender's parent or a descendant of it:
so the command works from inside a container that does not share the host's pids.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, TextIO, Type, Union

from ftimer_protocol import (
    ENV_SOCKET,
    MAX_PID,
    MAX_TIME,
    MessageTooLarge,
    parse_signal,
    socket_path_for,
)

from ._client import POLICIES, FileTimerClient
from ._errors import ServerStalled, ServerUnavailable, ServerUnavailableWarning
from ._paths import TRANSPORTS
from ._proc import process_of_thread
from ._version import __version__
from ._writer import is_fifo

__all__ = ["EXIT_UNAVAILABLE", "EXIT_USAGE", "main"]

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126
# Sent to this process for CMD (by a supervisor): passed on. SIGINT and SIGQUIT from a
# terminal reach CMD directly (same process group); the wrapper then ignores them, as
# system(), and passes them on otherwise (a container's stop signal, a kill -INT).
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
IGNORED = (signal.SIGINT, signal.SIGQUIT)
# Why there is no --dump-signal: the hook is faulthandler inside the worker's own Python
# process, and the process a timer of this command is for is never ftimer's own.
NO_DUMP = (
    "Stack dumps for the server's incidents need a hook inside the worker's own Python "
    "process (FileTimerClient(dump_signal=...) or FTIMER_DUMP_SIGNAL); ftimer cannot "
    "install one in another process, so it has no --dump-signal."
)
# exec's: what it reaps, and why there is no --dump-signal.
EXEC_EPILOG = (
    "Only CMD's own process is reaped when its timer expires: children it started (sh -c "
    "'...', a wrapper script) keep running unless the server runs with --reap-tree "
    "(which acts after an incident's capture: not with --capture none). A shell CMD can "
    "exec its last command so that the command is CMD's process. "
    "Stack dumps: the hook would have to be inside CMD's own process, which a wrapper "
    "cannot install, so exec has no --dump-signal. A Python CMD can turn it on itself: it "
    "inherits FTIMER_DUMP_SIGNAL, and its own ftimer_client timers then announce the hook "
    "(this command's timer does not)."
)


#: Options by their whole names only: a prefix (``--sig`` for ``--signal``) that works
#: today would be ambiguous, or another option's, once options are added.
WHOLE: Dict[str, Any] = {"allow_abbrev": False}


def _ascii_int(text: str) -> Optional[int]:
    # str.isdigit() is true for "²", which int() refuses, and int() takes "٢" (Arabic-
    # Indic two): a number on the command line is ASCII digits, nothing else.
    return int(text) if text.isascii() and text.isdecimal() else None


def _seconds(text: str) -> float:
    try:
        # float() takes "٢" and "1_0" (10) too: refused, as the server's options do.
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"seconds must be finite and >= 0, not {text!r}")
    return value


def _path(text: str) -> str:
    if not text:  # else "no FIFO or socket (is the ftimer server running?): ''"
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def _after(text: str) -> float:
    value = _seconds(text)
    # The deadline is the monotonic clock plus this, and must stay within MAX_TIME.
    limit = MAX_TIME - time.monotonic()
    if value > limit:
        raise argparse.ArgumentTypeError(f"at most {limit:.0f} seconds, not {text!r}")
    return value


def _shown(text: str) -> str:
    """``text`` (from the command line) as it can be printed: bytes that are not UTF-8
    as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not UTF-8 text: '{_shown(text)}'") from None
    return text


def _scope(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty (an unset variable?)")
    return _utf8(text)


def _signal(text: str) -> int:
    if text.startswith("-") and _ascii_int(text[1:]) is not None:
        # kill(1)'s spelling of a signal; the Python client's "report only" (torch's)
        # would turn `--signal -9` into a timer that never kills.
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the signal without a dash ({text[1:]} or its name; 0: report only)"
        )
    try:
        return parse_signal(text, allow_zero=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pid(text: str) -> int:
    number = _ascii_int(text)
    if number is None or not 0 < number <= MAX_PID:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return number


def _protocol(text: str) -> int:
    number = _ascii_int(text)
    if number not in (1, 2):
        raise argparse.ArgumentTypeError(f"protocol is 1 (torch's) or 2, not {text!r}")
    return number


def _label(text: str) -> tuple[str, str]:
    key, eq, value = _utf8(text).partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, not {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``ftimer``."""
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument(
        "--fifo",
        metavar="PATH",
        type=_path,
        help="the server's FIFO, or its socket: what is there decides (default: as the "
        "Python client, preferring the server's socket)",
    )
    where.add_argument("--socket", metavar="PATH", type=_path, help="the server's socket")
    common.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=None,
        help="auto (default: what is at the path), fifo or socket",
    )
    common.add_argument(
        "--protocol",
        type=_protocol,
        default=None,
        metavar="1|2",
        help="2: ftimer's; 1: torch's, for torch's FileTimerServer (default: 1 at the FIFO "
        "torch's agent serves itself, TORCHELASTIC_ENABLE_FILE_TIMER=1, else 2)",
    )
    common.add_argument(
        "--on-unavailable",
        choices=POLICIES,
        default="raise",
        help="no server: fail with status 3 (raise), warn and succeed, or succeed",
    )
    common.add_argument(
        "--write-timeout",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how long to wait for room in the server's queue, and over the socket for "
        "the server to confirm it has applied the message (default: 1)",
    )
    common.add_argument("--label", type=_label, action="append", default=None, metavar="KEY=VALUE")
    scope = argparse.ArgumentParser(add_help=False)
    scope.add_argument("--scope", type=_scope, required=True)
    pid = argparse.ArgumentParser(add_help=False)
    pid.add_argument(
        "--pid",
        type=_pid,
        help="the process the timer is for. Default: the parent of ftimer, i.e. the shell "
        "or script that runs it; typed at an interactive terminal, that is your own "
        "shell, which an expired timer kills (SIGKILL unless --signal)",
    )
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--after", type=_after, required=True, metavar="SECONDS")
    sig = argparse.ArgumentParser(add_help=False)
    sig.add_argument("--signal", type=_signal, default=None, help="name or number (default: KILL)")

    parser = argparse.ArgumentParser(
        **WHOLE,
        prog="ftimer",
        description="Arm and disarm ftimer watchdog timers from a shell.",
        epilog="Exit status: 0 done, 2 bad arguments, 3 server unavailable, 130 "
        "interrupted; exec: the command's status (128+N if killed by signal N).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, parents, text in (
        ("arm", [common, scope, after, pid, sig], "arm (or re-arm) a timer"),
        ("beat", [common, scope, after, pid, sig], "heartbeat: re-arm a timer"),
        ("disarm", [common, scope, pid], "disarm a timer"),
        ("expire", [common, scope, pid, sig], "expire a timer now"),
    ):
        sub = commands.add_parser(
            name, parents=parents, help=text, description=text, epilog=NO_DUMP, **WHOLE
        )
        sub.set_defaults(subparser=sub)  # errors found later show this command's usage
    run = commands.add_parser(
        "exec",
        parents=[common, after, sig],
        help="run a command under a timer",
        description="run a command under a timer armed for the command's own process",
        usage="ftimer exec --after SECONDS [--scope S] [--signal SIG] -- CMD [ARGS...]",
        epilog=EXEC_EPILOG,
        **WHOLE,
    )
    run.add_argument("--scope", type=_scope, default=None)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    run.set_defaults(subparser=run)
    return parser


def _client(args: argparse.Namespace, pid: int, policy: Optional[str] = None) -> FileTimerClient:
    labels: Optional[Dict[str, str]] = None if args.label is None else dict(args.label)
    sig = signal.SIGKILL if args.signal is None else args.signal
    if args.socket is not None and args.transport not in (None, "socket"):
        raise ValueError(f"--socket names a socket: --transport {args.transport} contradicts it")
    transport = args.transport or ("socket" if args.socket is not None else "auto")
    path = args.socket if args.socket is not None else args.fifo
    if transport == "socket" and path is not None and is_fifo(path):
        path = socket_path_for(path)  # the server's FIFO names its socket beside it
    return FileTimerClient(
        path,
        sig,
        transport=transport,
        protocol=args.protocol,
        on_unavailable=policy or args.on_unavailable,
        write_timeout=args.write_timeout,
        labels=labels,
        pid=pid,
        dump_signal=0,  # the hook would be this command's, not the process's it arms for
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ftimer`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if sys.stderr is None:
        # Started with stderr closed: print(file=None) writes to stdout, which is CMD's
        # or the caller's output. Say nothing instead.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    else:
        sys.stderr = _Unbroken(sys.stderr)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    # This command's name, as its parent's command line may hold it (a caller of main()
    # is not started by a command line).
    args.program = sys.argv[0] if argv is None else "ftimer"
    args.as_command = argv is None  # this process is the command (main() may be called)
    with warnings.catch_warnings():
        # A warning (``--on-unavailable warn``) is one line for a person, not Python's
        # "file:line: Category: ..." with the source line of the console script.
        warnings.showwarning = _show_warning
        try:
            status = _run(args)
        except KeyboardInterrupt:  # Ctrl-C while it waits (for room, or a receipt)
            status, args.died_of = 128 + signal.SIGINT, signal.SIGINT
    died_of = getattr(args, "died_of", None)
    if args.as_command and died_of in IGNORED:
        # CMD died of Ctrl-C (or Ctrl-\\): die of it too, as the shell that runs this
        # command stops its script only for a child killed by the signal it got itself
        # (an exit(130) says the child handled it, and the script goes on).
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed, or None (no console)
                stream.flush()
        signal.signal(died_of, signal.SIG_DFL)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1])
            )
        os.kill(os.getpid(), died_of)
    return status


def _usage_error(e: ValueError) -> str:
    """What to say of ``e``: a message too large for one write names what made it so."""
    if isinstance(e, MessageTooLarge):
        return f"--scope and --label make the message too long: {e}"
    return str(e)


class _Unbroken:
    """stderr whose failed writes are dropped: a message nobody can read (a pipe whose
    reader is gone, EPIPE) must not turn the exit status the command promises (CMD's,
    127, 3) into Python's 1."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _show_warning(  # noqa: PLR0917 - warnings.showwarning's signature
    message: Union[Warning, str],
    category: Type[Warning],
    filename: str,
    lineno: int,
    file: Optional[TextIO] = None,
    line: Optional[str] = None,
) -> None:
    print(f"ftimer: warning: {message}", file=sys.stderr if file is None else file)


def _run(args: argparse.Namespace) -> int:
    command: argparse.ArgumentParser = args.subparser
    args.signal = getattr(args, "signal", None)
    try:
        if args.command == "exec":
            return _exec(command, args)
        pid = os.getppid() if args.pid is None else args.pid
        if pid == os.getpid() and args.command != "disarm" and args.as_command:
            # `exec ftimer arm --pid $$`, `$(ftimer arm --pid $BASHPID)`: the shell's
            # process became this command, and its timer would end with it at once.
            # (A disarm is kept: it still disarms the timers the shell armed.)
            command.error(
                f"--pid {pid} is this command's own process (the shell ran it with exec): "
                "its timer would end with this command; give the shell's pid from a "
                "shell that goes on, or run the step under `ftimer exec`"
            )
        if pid == 1 and os.getppid() != 1:
            command.error(
                "--pid 1 names the first process of this PID namespace, which is not the "
                "calling shell: not a process a timer may be for"
            )
        if args.pid is None and _adopted(pid):
            command.error(
                f"the shell that ran this command has exited: process {pid}, not that "
                "shell, is its parent now (`ftimer arm ... &` at the end of a script?); "
                "give --pid $$ in the shell"
            )
        wrapper = None if args.pid is not None else _wrapper(pid, args.program, args.command)
        if wrapper is not None:
            command.error(
                f"process {pid} (`{wrapper}`) runs this command and ends with it: the "
                f"{args.command} would be for that process; give --pid $$ in the shell, "
                "or run the step under `ftimer exec`"
            )
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            if args.command == "disarm":
                return 0  # its timers went with it
            command.error(f"no process {pid} (--pid)")
        except PermissionError:
            pass  # it exists; the server decides whether it may signal it
        owner = process_of_thread(pid)
        if owner is not None:  # kill(tid, 0) succeeds; the server refuses a thread's id
            command.error(f"{pid} is a thread of process {owner}, not a process (--pid)")
        if pid == 1:
            # The calling shell is the init of its PID namespace (a container's): the
            # server refuses pid 1 from the FIFO, and tells it from the host's over the
            # socket, by the pidfd this command sends.
            if args.transport == "fifo":
                command.error(
                    "the calling shell is pid 1 (a container's first process), which "
                    "the server refuses from the FIFO: use the socket (--socket PATH)"
                )
            args.transport = "socket"  # a FIFO named: its socket
        elif pid not in (os.getppid(), os.getpid()):
            # The server takes from a socket only the sender, its parent or descendants,
            # and this command has no descendants: another process goes over the FIFO.
            # $FTIMER_SOCKET says the server is reached there and nowhere else (a
            # container's worker, whose pids the server reads only over the socket).
            by_env = (
                args.fifo is None
                and args.transport != "fifo"
                and args.protocol != 1
                and bool(os.environ.get(ENV_SOCKET))
            )
            if args.socket is not None or args.transport == "socket" or by_env:
                command.error(
                    f"--pid {pid} is not this command's parent (the calling shell), which "
                    "is all the server accepts from it over the socket"
                    f"{f' (${ENV_SOCKET} names it)' if by_env else ''}: start that process "
                    "with `ftimer exec` instead, or use the FIFO (--fifo PATH), where the "
                    "server can read this PID namespace's pids"
                )
            args.transport = "fifo"  # auto would take the socket beside it
        # A disarm this command could not deliver is lost when it exits (no retries
        # live on): say so in its terms, whatever the policy lets it exit with.
        client = _client(args, pid, "raise" if args.command == "disarm" else None)
        if args.command in ("arm", "beat"):
            client.arm(args.scope, args.after)
        elif args.command == "disarm":
            try:
                client.release(args.scope)
            except ServerUnavailable as e:
                if args.on_unavailable == "raise":
                    raise
                if args.on_unavailable == "warn":
                    warnings.warn(
                        f"could not disarm: {e}: the timer stays armed in a server that "
                        "holds it (stalled, or restarted with its state file)",
                        ServerUnavailableWarning,
                        stacklevel=1,
                    )
                return 0
        else:
            client.expire(args.scope)
        if not client._wait_read():
            _stalled(args, _connected_path(client))
        # Exit without close(): an arm must outlive this command.
    except ServerUnavailable as e:
        print(f"ftimer: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ValueError as e:
        print(f"ftimer: {_usage_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    return 0


def _wrapper(parent: int, program: str, command: str) -> Optional[str]:
    """The name of ``parent`` if it runs this command as its own and ends with it:
    ``timeout 5 ftimer ...``, ``xargs [-I{}] ftimer ...``, ``find -exec ftimer ...``,
    ``flock F ftimer ...``, ``sudo``: its arguments hold this command's name
    (``program``'s, or ``ftimer``) followed by its subcommand (``command``), each a word
    of its own. None for a shell (which gives a command as one string), or if its
    command line cannot be read."""
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            theirs = [os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1]]
    except OSError:
        return None
    names = {"ftimer", "ftimer_client", os.path.basename(program)}
    for i in range(1, len(theirs) - 1):
        if os.path.basename(theirs[i]) in names and theirs[i + 1] == command:
            return _shown(os.path.basename(_program(theirs[:i])))
    return None


def _program(argv: List[str]) -> str:
    """What ``argv`` runs: its first word, or an interpreter's script or module."""
    if not os.path.basename(argv[0]).startswith(("python", "pypy")):
        return argv[0]
    words = iter(argv[1:])
    for word in words:
        if word in ("-m", "-X", "-W"):  # each takes a value: -m's is the program
            value = next(words, argv[0])
            if word == "-m":
                return value
        elif not word.startswith("-"):
            return word
    return argv[0]


def _adopted(parent: int) -> bool:
    """Whether ``parent`` cannot be the shell that ran this command: the commands a shell
    runs share its session, so a parent in another session adopted this command after
    that shell exited (an init or a subreaper, whose reap would hit what it serves).
    Unless this command leads a session of its own (started with ``setsid()``, as
    ``start_new_session=True`` does): its session then says nothing of its parent's."""
    try:
        session = os.getsid(0)
        return session != os.getpid() and os.getsid(parent) != session
    except OSError:  # gone too: the server will find no such process
        return False


def _connected_path(client: FileTimerClient) -> str:
    """The path of the server's end the client is connected to (its socket, found beside
    the FIFO by default), else its path."""
    writer = getattr(client._channel, "_writer", None)
    path = getattr(writer, "path", None)
    return path if isinstance(path, str) else client.file_path


def _stalled(
    args: argparse.Namespace,
    path: str,
    then: str = "it refuses it if it reads it once this command has exited, and takes it "
    "only if it read it just before",
) -> None:
    """The server has not confirmed that it judged this command's datagram: once the
    command has exited, it refuses it (it can no longer check the sender's kin), so say
    so now, and what happens ``then``.

    Raises:
        ServerStalled: with ``--on-unavailable raise``.
    """
    stalled = ServerStalled(
        errno.EAGAIN,
        f"the ftimer server has not confirmed the message in {args.write_timeout} s (is "
        f"it stopped?): {then}",
        path,
    )
    if args.on_unavailable == "raise":
        raise stalled
    if args.on_unavailable == "warn":
        warnings.warn(str(stalled), ServerUnavailableWarning, stacklevel=2)


def _restore(previous: Dict[int, Any], signums: Sequence[int]) -> None:
    for signum in signums:
        # None: a handler set outside Python, which cannot be put back from it.
        signal.signal(signum, signal.SIG_DFL if previous[signum] is None else previous[signum])


def _exec(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # An ignored SIGCHLD is inherited across exec (a parent's SIG_IGN against zombies):
    # the kernel would reap CMD at once, and waitid() find no child. CMD gets the
    # default too, as under timeout(1).
    chld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        return _run_cmd(parser, args)
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if chld is None else chld)


def _run_cmd(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cmd: List[str] = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("exec needs a command after --")
    pid, gate_w, err_r = _start_gated(cmd)
    # A command named by bytes that are not UTF-8 still gets a scope the wire can carry.
    scope = args.scope or f"exec:{_shown(os.path.basename(cmd[0]))}"
    try:
        client = _arm_cmd(args, pid, scope)
    except (ServerUnavailable, ValueError, KeyboardInterrupt) as e:
        _abandon(pid, gate_w, err_r)
        if isinstance(e, KeyboardInterrupt):
            raise
        if isinstance(e, ServerUnavailable):
            print(f"ftimer: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        print(f"ftimer: {_usage_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    previous = _forward_signals(pid)
    failure = _open_gate(gate_w, err_r)
    status = _await_exit(pid)
    _disarm(client, scope)
    if status is None:
        _, status = os.waitpid(pid, 0)
    _restore(previous, (*FORWARDED, *IGNORED))
    if failure:
        exit_code, _, message = failure.partition(" ")
        print(f"ftimer: {_shown(cmd[0])}: {message}", file=sys.stderr)
        return int(exit_code)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        args.died_of = -code
    return 128 - code if code < 0 else code


def _start_gated(cmd: List[str]) -> tuple[int, int, int]:
    """Fork CMD's process, held at a gate before it execs CMD; return its pid, the
    gate's write end (write ``b"1"`` to open it, close it unwritten to end the process)
    and the read end of the pipe that brings back exec's error."""
    # CMD's process waits at a gate until its timer is armed, so CMD never runs
    # unwatched (unless the policy says so); exec errors come back through err_r.
    gate_r, gate_w = os.pipe()
    err_r, err_w = os.pipe()
    # CMD's process is Python until it execs: Python's SIGINT handler there would turn a
    # Ctrl-C at the gate into KeyboardInterrupt (exit 126, "cannot run") or lose it (the
    # handler tripped, never run before exec). It dies of it instead, as CMD would, and
    # this command with it. Blocked across the fork, so none lands in between.
    interrupts = {signal.SIGINT}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, interrupts)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    if pid == 0:  # pragma: no cover (the child, until exec)
        code = EXIT_CANNOT_RUN
        if callable(signal.getsignal(signal.SIGINT)):  # not if ignored: CMD keeps that
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            os.close(gate_w)
            os.close(err_r)
            if os.read(gate_r, 1) == b"1":
                # Python ignores SIGPIPE and SIGXFSZ; CMD gets the defaults back, as with
                # subprocess.
                for ignored in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(ignored, signal.SIG_DFL)
                _execvp(cmd)
        except OSError as e:
            code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_RUN
            os.write(err_w, f"{code} {e}".encode())
        except ValueError:  # an empty name, or a NUL in it
            code = EXIT_NOT_FOUND
            os.write(err_w, f"{code} command not found".encode())
        finally:
            os._exit(code)
    os.close(gate_r)
    os.close(err_w)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return pid, gate_w, err_r


def _execvp(cmd: List[str]) -> None:
    """``os.execvp``, and as POSIX's execvp (glibc's, a shell's) a file the kernel cannot
    run (ENOEXEC: an executable script without ``#!``) through ``/bin/sh``."""
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        path = cmd[0] if os.sep in cmd[0] else shutil.which(cmd[0])
        if e.errno != errno.ENOEXEC or path is None:
            raise
        os.execv("/bin/sh", ["/bin/sh", path, *cmd[1:]])


def _arm_cmd(args: argparse.Namespace, pid: int, scope: str) -> FileTimerClient:
    """Arm CMD's timer while CMD waits at the gate, and wait for the server's receipt.

    Raises:
        ServerUnavailable: no server took the arm (ServerStalled: none confirmed it).
        ValueError: a usage error.
    """
    client = _client(args, pid)
    client.arm(scope, args.after)
    # Judged while CMD waits at the gate: over the socket, an arm judged after CMD
    # had exited (a quick CMD) was refused, the subject gone.
    if not client._wait_read():
        _stalled(
            args,
            _connected_path(client),
            "the command was not run"
            if args.on_unavailable == "raise"
            else "the command runs, watched only if the server judges its arm while it lives",
        )
    return client


def _abandon(pid: int, gate_w: int, err_r: int) -> None:
    """End CMD's process at the gate, before it runs CMD, and reap it."""
    os.close(gate_w)  # CMD never runs
    os.close(err_r)
    os.waitpid(pid, 0)


def _forward_signals(pid: int) -> Dict[int, Any]:
    """Pass FORWARDED signals on to process ``pid`` and ignore IGNORED ones; return the
    handlers they had, for ``_restore``."""

    def forward(signum: int, _frame: object) -> None:
        # From a terminal, SIGINT and SIGQUIT reach CMD directly when CMD is in the
        # terminal's foreground group: not passed on. Otherwise (no terminal, a kill of
        # this process, or CMD in a group of its own: `timeout`, `setsid`) passed on.
        # Asked when the signal comes, not once at the start: a job started in the
        # background (`ftimer exec ... &`) may be brought to the foreground (`fg`)
        # later, and the other way round (Ctrl-Z, `bg`).
        if signum in IGNORED and _in_terminal_foreground(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # Put back when CMD is done: main() may be called in a process that goes on.
    previous: Dict[int, Any] = {s: signal.getsignal(s) for s in (*FORWARDED, *IGNORED)}
    for signum in (*FORWARDED, *IGNORED):
        signal.signal(signum, forward)
    return previous


def _in_terminal_foreground(pid: int = 0) -> bool:
    """Whether process ``pid`` (0: this one) is in the controlling terminal's foreground
    group."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgid(pid)
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_gate(gate_w: int, err_r: int) -> str:
    """Let CMD's process exec CMD; return exec's error ("STATUS MESSAGE"), or "" once
    CMD runs."""
    with contextlib.suppress(BrokenPipeError):  # CMD may be reaped at the gate already
        os.write(gate_w, b"1")
    os.close(gate_w)
    with os.fdopen(err_r, "rb") as err:
        return err.read().decode()  # empty once CMD is running (close-on-exec)


def _await_exit(pid: int) -> Optional[int]:
    """Wait for CMD to exit, then ignore FORWARDED signals. Return CMD's wait status if
    it had to be reaped for that (no ``waitid``), else None: CMD is left to reap."""
    reap_first = not hasattr(os, "waitid")
    if not reap_first:
        # Wait without reaping: the pid stays CMD's until the forwarding stops and the
        # disarm is sent (a pidfd of CMD names it until it is reaped). The client keeps
        # CMD's timer with a server that restarts meanwhile (its channel's watch).
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    # CMD is done: a signal sent now has nothing to go to (its pid is another's once it
    # is reaped), and must not end this command before the disarm, with another status.
    for signum in (*FORWARDED, *IGNORED):
        signal.signal(signum, signal.SIG_IGN)
    if reap_first:
        _, status = os.waitpid(pid, 0)
        return status
    return None


def _disarm(client: FileTimerClient, scope: str) -> None:
    """Disarm CMD's timer, waiting for the server's receipt, and close the client; a
    server that is not there is reported, not fatal."""
    try:
        client.release(scope)
        # Over the socket the server can name CMD by its pidfd only until CMD is
        # reaped: without this wait it read the disarm too late and refused it.
        client._wait_read()
        client.close()
    except ServerUnavailable as e:
        print(f"ftimer: could not disarm: {e}", file=sys.stderr)
