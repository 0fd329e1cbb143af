"""``ftimer-server``: the command line. Thin: argparse -> a frozen config -> the daemon.

Exit codes (also in docs/deploy.md):

- 0: clean shutdown (SIGTERM / SIGINT), or ``status`` answered and the daemon is healthy.
- 1: ``status`` found no running daemon, or one whose FIFO reader does not answer.
- 2: bad command-line options or config file.
- 3: start-up refused: unsafe or unusable FIFO path, another daemon on the same FIFO,
  metrics address in use, state directory not writable, ...

``incidents`` exits 0 when it printed what was asked, 1 when there is nothing to print
(no incident directory, no such incident, an unreadable record), 2 for bad options.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Annotated, Any, Dict, List, NoReturn, Optional, TextIO

import msgspec

from ftimer_protocol import SYSTEM_FIFO_PATH, default_fifo_path
from ftimer_server._version import __version__
from ftimer_server.core._reaper import KILL_CHECK
from ftimer_server.core._report import printable

from ._config import (
    CAPTURE_METHODS,
    SETTING_NAMES,
    ConfigError,
    DaemonConfig,
    FileSettings,
    ascii_int,
    control_socket_for,
    hidden_warning,
    load_config_file,
    overridden,
    resolve_config,
    setting_text,
)
from ._control import DaemonNotRunning, query_status
from ._daemon import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, defer_sighup, run_daemon
from ._daemon_log import signal_label
from ._incidents import DEFAULT_WINDOW, list_incidents, merge_incidents, show_incident
from ._logging import LOG_FORMATS, LOG_LEVELS

__all__ = ["format_status", "main"]


def _number(text: str) -> int:
    number = ascii_int(text)
    if number is None:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return number


def _seconds(text: str) -> float:
    try:
        # float() takes "1_0" as 10, where ascii_int() refuses "4_2" (and int() "٤٢").
        if not text.isascii() or "_" in text:
            raise ValueError(text)
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def _window(text: str) -> float:
    seconds = _seconds(text)
    if not 0 <= seconds < math.inf:  # NaN too
        raise argparse.ArgumentTypeError(f"not 0 or a finite number of seconds: {text!r}")
    return seconds


def _config_file(text: str) -> str:
    # Not a setting, so not checked with them: "" would silently mean no config file.
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def _socket_option(text: str) -> str:
    # "" is how --no-socket reaches the config: said as --socket "", it is a mistake.
    if not text:
        raise argparse.ArgumentTypeError("the path is empty (for the FIFO alone, give --no-socket)")
    return text


class _Parser(argparse.ArgumentParser):
    """Says a usage error in one line, not under the command's usage (``run``'s is
    nineteen lines: the one that matters came last), pointing to ``--help`` for what
    the usage said (an option's choices, when its value is missing). Options are taken
    by their whole names only: a prefix (``--dry`` for ``--dry-run``) that works today
    would be ambiguous, or another option's, once options are added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ftimer-server",
        description="The ftimer watchdog: reaps workers whose timers expire.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = _Parser(add_help=False)
    common.add_argument(
        "-c", "--config", type=_config_file, metavar="FILE", help="TOML config file"
    )
    common.add_argument(
        "--fifo",
        metavar="PATH",
        help="the FIFO (default: $FTIMER_FIFO, $TORCHELASTIC_TIMER_FILE, else "
        "/run/ftimer/timer.fifo for root, $XDG_RUNTIME_DIR/ftimer/timer.fifo or "
        "/tmp/ftimer-UID/timer.fifo otherwise)",
    )
    common.add_argument(
        "--control-socket", metavar="PATH", help="status socket (default: the FIFO path + .sock)"
    )

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the watchdog in the foreground",
        description="Run the watchdog in the foreground until SIGTERM or SIGINT. "
        "SIGHUP reopens the log file and reloads the config file.",
    )
    transport = run.add_mutually_exclusive_group()
    transport.add_argument(
        "--socket",
        type=_socket_option,
        metavar="PATH",
        help="also receive timers as datagrams on an AF_UNIX socket here, whose sender "
        "the kernel names (workers in containers without hostPID use it); default: "
        "beside the FIFO (timer.fifo -> timer.socket)",
    )
    transport.add_argument(
        "--no-socket",
        dest="socket",
        action="store_const",
        const="",
        help="the FIFO alone",
    )
    run.add_argument(
        "--fifo-mode",
        metavar="MODE",
        help="octal permissions of the FIFO, set at every start (a reused FIFO too); "
        "default 0600: only the daemon's user writes; with --fifo-group, 0620: the group "
        "writes too. Never let others write (0622, 0666): anyone who can write the FIFO "
        "can have the workers it names signalled",
    )
    run.add_argument(
        "--fifo-group",
        metavar="GROUP",
        help="group (an existing name, or a gid) given to the FIFO and to a directory the "
        "daemon manages, at every start",
    )
    run.add_argument(
        "--signal",
        metavar="SIG",
        help="signal every reap sends instead of the timer's own, e.g. SIGTERM or 15 "
        "(default: each timer's; report-only timers stay report-only)",
    )
    run.add_argument(
        "--grace",
        type=_seconds,
        metavar="SECONDS",
        help="time a worker signalled with anything but SIGKILL has to exit before "
        "SIGKILL, 0.001..86400 (default: 10 with --signal, else no escalation)",
    )
    run.add_argument(
        "--state-file", metavar="PATH", help="save armed timers here to survive restarts"
    )
    run.add_argument(
        "--state-interval",
        type=_seconds,
        metavar="SECONDS",
        help="longest delay between a change and its save, and shortest between two "
        "saves, 0.01..60 (default: 0.1)",
    )
    run.add_argument(
        "--restore-grace",
        type=_seconds,
        metavar="SECONDS",
        help="after a start that restored timers, nothing expires for this long, so that "
        "clients re-send what they wrote while no daemon ran, 0..3600 (default: 1.5)",
    )
    run.add_argument(
        "--allow-uid",
        dest="allow_uids",
        type=_number,
        action="append",
        metavar="UID",
        help="only accept timers of processes of this uid, 0..4294967294 (repeatable; "
        "default: any user)",
    )
    run.add_argument(
        "--allow-signal",
        dest="allow_signals",
        action="append",
        metavar="SIG",
        help="only accept timers asking for this signal, e.g. SIGTERM or 15 (repeatable; "
        "default: any)",
    )
    run.add_argument(
        "--descendants-only",
        action=argparse.BooleanOptionalAction,
        help="only accept timers of processes descended from the daemon",
    )
    run.add_argument(
        "--max-timers",
        type=_number,
        metavar="N",
        help="cap on armed timers, 1..2147483647 (default 1000000)",
    )
    run.add_argument(
        "--max-timers-per-pid",
        type=_number,
        metavar="N",
        help="cap on one process's timers, 1..2147483647 (default 10000)",
    )
    run.add_argument(
        "--dry-run",
        action=argparse.BooleanOptionalAction,
        help="log and count expiries instead of signalling (a safe roll-out)",
    )
    # Any case, as the config file takes them.
    run.add_argument(
        "--log-format", type=str.lower, choices=LOG_FORMATS, help="text (default) or JSON lines"
    )
    run.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help="default: info")
    run.add_argument("--log-file", metavar="PATH", help="append logs here (default: stderr)")
    run.add_argument(
        "--metrics-address",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics here (host defaults to 127.0.0.1; an IPv6 address "
        "in brackets: [::1]:9464; needs the ftimer-server[metrics] extra)",
    )
    _add_incident_options(run)
    run.add_argument(
        "--check-config",
        action="store_true",
        help="read the options and the config file as a start would, print the settings "
        "they make, and exit without starting: 0 if they are valid, 2 if not (the paths "
        "are tried by a start alone, which makes them)",
    )

    status = sub.add_parser(
        "status",
        parents=[common],
        help="show what the running daemon has armed",
        description="Ask the running daemon (through its control socket) what it has armed.",
    )
    status.add_argument("--json", action="store_true", help="print the daemon's JSON document")
    status.add_argument(
        "--health",
        action="store_true",
        help="ask for the health and the number of armed timers alone, not the timers: "
        "as quick however many are armed (for liveness probes)",
    )
    _add_incidents_command(sub)
    return parser


def _add_incident_options(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group(
        "incidents",
        "Before a reap, the daemon captures why the worker hung (the Python stacks of "
        "its threads and of the other workers of its job on this host, /proc facts) "
        "and writes an incident; the signal waits for the capture at most "
        "--capture-timeout seconds. See docs/incidents.md.",
    )
    group.add_argument(
        "--capture",
        type=str.lower,
        choices=CAPTURE_METHODS,
        help="how stacks are captured: auto (the default) takes py-spy if it is found "
        "(on PATH or beside this Python: the ftimer-server[pyspy] extra), else the "
        "worker's own hook if its client announced one, else the /proc facts alone; "
        "py-spy or hook: only that method (and the facts); facts: the /proc facts "
        "alone; none: capture nothing and write no incident (a reap signals at once)",
    )
    group.add_argument(
        "--capture-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="the capture's budget per reap, 0.05..60 (default 3): the signal goes when "
        "the capture is done or the budget spent, whichever comes first",
    )
    group.add_argument(
        "--incident-dir",
        metavar="DIR",
        help="where incidents are written, created 0700 (default: incidents/ beside the "
        "state file, else beside the FIFO; /run is lost at reboot: give a directory "
        "under /var/lib to keep them)",
    )
    group.add_argument(
        "--incidents-keep",
        type=_number,
        metavar="N",
        help="keep at most N incidents, removing the oldest, 1..2147483647 (default 200)",
    )
    group.add_argument(
        "--incidents-max-bytes",
        metavar="SIZE",
        help="keep at most SIZE of incident files (every file named after an incident's "
        "id), removing the oldest incidents; the newest is always kept (bytes, or K, M, "
        "G, T in powers of 1024; default 256M)",
    )
    group.add_argument(
        "--job-label",
        metavar="LABEL",
        help="the timer label whose value names a worker's job (default: job): the other "
        'workers of the job on this host are captured too, never signalled; "" for none',
    )
    group.add_argument(
        "--py-spy-native",
        action=argparse.BooleanOptionalAction,
        help="py-spy also captures native (C/C++) frames (several times slower; default off)",
    )
    group.add_argument(
        "--core",
        action=argparse.BooleanOptionalAction,
        help="write a core file of the worker with gcore before the kill (needs gdb and "
        "ptrace rights; the worker survives it, then is signalled; default off)",
    )
    group.add_argument(
        "--core-max-bytes",
        metavar="SIZE",
        help="no core of a worker whose resident memory is larger than SIZE (bytes, or "
        "K, M, G, T; default 4G)",
    )
    group.add_argument(
        "--reap-tree",
        action=argparse.BooleanOptionalAction,
        help="after the capture, signal the worker's descendants too (DataLoader and "
        "compile workers that would keep GPU memory), including those forked meanwhile "
        "(default off: the worker alone)",
    )


def _add_incidents_command(sub: Any) -> None:
    # The directory options are given to `incidents` and to each action, so they may
    # come before or after the action's name; SUPPRESS keeps an action's absent option
    # from overwriting the one given before it.
    def where(parser: argparse.ArgumentParser, default: Any) -> None:
        parser.add_argument(
            "-c",
            "--config",
            type=_config_file,
            metavar="FILE",
            default=default,
            help="the daemon's config file",
        )
        parser.add_argument(
            "--dir",
            dest="incident_dir",
            metavar="DIR",
            default=default,
            help="the incident directory (default: the daemon's, from -c FILE, --state-file "
            "or --fifo as `run` resolves it)",
        )
        parser.add_argument(
            "--fifo", metavar="PATH", default=default, help="the daemon's FIFO, as for `run`"
        )
        parser.add_argument(
            "--state-file", metavar="PATH", default=default, help="the daemon's state file"
        )

    incidents = sub.add_parser(
        "incidents",
        help="list, show or merge incidents (why reaped workers hung)",
        description="List the incidents the daemon wrote (one line each), show one, or "
        "merge the incidents of one job from several hosts into one report.",
    )
    where(incidents, None)
    actions = incidents.add_subparsers(dest="action", metavar="ACTION")
    where(
        actions.add_parser("list", help="one line per incident, oldest first (the default action)"),
        argparse.SUPPRESS,
    )
    show = actions.add_parser(
        "show",
        help="print an incident: its summary, then every worker's stacks",
        description="Print an incident: the summary a person reads first (what expired, "
        "the workers grouped by stack, outliers first), the call tree, then every "
        "worker's facts and every thread's stack, innermost frame last.",
    )
    where(show, argparse.SUPPRESS)
    show.add_argument(
        "id",
        nargs="?",
        metavar="ID",
        help="the incident's id, or its start if unique, or its file (default: the newest)",
    )
    show.add_argument("--json", action="store_true", help="print its JSON record instead")
    merge = actions.add_parser(
        "merge",
        help="one report over the incidents of a job from several hosts",
        description="Merge the incidents of one job taken on several hosts (their "
        "incident directories or files, on a shared file system or collected) into one "
        "report: the workers of every host grouped by stack, outliers first.",
    )
    merge.add_argument(
        "paths", nargs="+", metavar="FILE_OR_DIR", help="incident directories or records"
    )
    merge.add_argument(
        "--job",
        metavar="JOB",
        help="the job (the value of its job label) whose incidents to merge; needed when "
        "the paths hold several jobs' incidents",
    )
    merge.add_argument(
        "--window",
        type=_window,
        metavar="SECONDS",
        default=DEFAULT_WINDOW,
        help=f"take the job's incidents created up to this long before its newest "
        f"(default {DEFAULT_WINDOW:g}: one hang; 0: all)",
    )


def _error(message: str) -> None:
    print(f"ftimer-server: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        if not args.check_config:
            defer_sighup()  # until the daemon's own handler: its default action kills
        return _command(args, sys.stdout)
    # The other commands print a report, written once it is complete: one that cannot be
    # written (a full disk, a reader gone from the pipe) ends with an error line and
    # status 1, not a traceback.
    report = io.StringIO()
    code = _command(args, report)
    try:
        sys.stdout.write(report.getvalue())
        sys.stdout.flush()
    except OSError as e:
        _stdout_to_devnull()  # spares the interpreter's own flush at exit the same error
        if not isinstance(e, BrokenPipeError):  # `| head` leaving is no error to report
            _error(f"cannot write the output: {e.strerror or e}")
        return EXIT_FAILURE
    return code


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _command(args: argparse.Namespace, out: TextIO) -> int:
    action = getattr(args, "action", None)
    if args.command == "incidents" and action == "merge":
        return merge_incidents(args.paths, job=args.job, window=args.window, out=out)
    cli: Dict[str, Any] = {k: v for k, v in vars(args).items() if k in SETTING_NAMES}
    config_file = getattr(args, "config", None)
    try:
        file = load_config_file(config_file) if config_file else FileSettings()
        starting = args.command == "run"
        config = resolve_config(cli, file, config_file=config_file, starting=starting)
    except ConfigError as e:
        _error(str(e))
        return EXIT_USAGE
    if args.command == "status":
        return _status(config.control_socket, as_json=args.json, health=args.health, out=out)
    hidden = overridden(cli, file, config_file, config) if config_file else []
    if args.command == "run" and args.check_config:
        for name in DaemonConfig.__dataclass_fields__:
            out.write(f"{name.replace('_', '-')}: {setting_text(name, getattr(config, name))}\n")
        if hidden:
            warning = hidden_warning(config_file, hidden)
            print(f"ftimer-server: warning: {warning}", file=sys.stderr)
        return EXIT_OK
    if args.command == "incidents":
        hint = _system_daemon_hint(config.control_socket)
        if hint:  # a worker's user of the system daemon reads its own, maybe old, ones
            print(f"note: the incidents in {config.incident_dir}{hint}", file=sys.stderr)
        if action == "show":
            return show_incident(config.incident_dir, args.id, as_json=args.json, out=out)
        return list_incidents(config.incident_dir, out=out)
    return run_daemon(config, cli, hidden)


#: The FIFO of the system daemon (root's default), which `status` points other users to.
SYSTEM_FIFO = SYSTEM_FIFO_PATH


def _status(path: str, as_json: bool, health: bool, out: TextIO) -> int:
    try:
        doc = query_status(path, health=health)
    except DaemonNotRunning as e:
        _error(str(e) + _system_daemon_hint(path))
        return EXIT_FAILURE
    except PermissionError as e:
        _error(str(e))
        return EXIT_FAILURE
    except (OSError, ValueError) as e:
        _error(f"cannot get the status from {path}: {e}")
        return EXIT_FAILURE
    if "error" in doc and "version" not in doc:
        _error(f"the daemon on {path} refused the request: {printable(str(doc['error']))}")
        return EXIT_FAILURE
    try:
        # Before anything is printed, --json too: a reply that is no status is an error.
        status = _read_status(doc)
    except ValueError as e:
        _error(f"the server's reply could not be read: {printable(str(e))}")
        return EXIT_FAILURE
    if as_json:
        json.dump(doc, out, indent=2)
        out.write("\n")
    else:
        out.write(_format(status))
    if not status.healthy:
        why = _lost(status) if status.lost_paths else "its FIFO reader does not"
        _error(f"the daemon on {path} answers, but {why}")
        return EXIT_FAILURE
    return EXIT_OK


def _lost(status: _Status) -> str:
    """What a status says of the FIFO's or socket's paths that no longer name them."""
    if len(status.lost_paths) == 1:
        [path] = status.lost_paths
        what = "FIFO" if path == status.fifo else "socket"
        return f"{printable(path)} no longer names its {what}"
    return " and ".join(map(printable, status.lost_paths)) + " no longer name its FIFO and socket"


def _system_daemon_hint(path: str) -> str:
    """Where else to ask, when nothing answers at ``path``: "" unless ``path`` is the
    user's own default while the system daemon's control socket exists.

    A user's default (``/tmp/ftimer-UID/...``) is not root's (``/run/ftimer/...``), and
    the client library sends a user's timers to the system daemon's FIFO whenever it
    exists: that daemon is likely the one meant.
    """
    system = control_socket_for(SYSTEM_FIFO)
    own_default = control_socket_for(default_fifo_path())
    if path != own_default or path == system or not os.path.exists(system):
        return ""
    return (
        f" (this user's default); the system daemon's control socket {system} exists: "
        f"ask it with --fifo {SYSTEM_FIFO} (only root and the daemon's user may)"
    )


def _duration(seconds: float) -> str:
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(abs(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
    return ("-" if seconds < 0 else "") + text


#: Seconds as the status document gives them: finite (``json`` reads ``1e999`` as inf
#: and ``NaN`` as nan, which no duration can show), and at most about 30 million years.
_Seconds = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]


class _StatusTimer(msgspec.Struct):
    """One armed timer of the status document: what the table shows of it."""

    pid: int
    scope_id: str
    remaining: _Seconds
    signal: int
    labels: Optional[Dict[str, str]] = None


class _StatusStats(msgspec.Struct):
    """What `format_status` shows of the server's counters."""

    rejections: Dict[str, Annotated[int, msgspec.Meta(ge=0)]] = {}
    unkillable: Annotated[int, msgspec.Meta(ge=0)] = 0
    unkillable_alive: Optional[Annotated[int, msgspec.Meta(ge=0)]] = None  # a newer daemon's


class _Status(msgspec.Struct):
    """What `format_status` shows of the daemon's status document (other fields, a newer
    daemon's too, are ignored)."""

    version: str
    pid: int
    healthy: bool
    fifo: str
    uptime: _Seconds
    # The soonest armed timers; absent from a health document. None as well when the
    # loop held its table (stalled), as ``armed`` then (a daemon before it: the count
    # is how many timers it lists).
    timers: Optional[List[_StatusTimer]] = None
    armed: Optional[Annotated[int, msgspec.Meta(ge=0)]] = None
    socket: Optional[str] = None
    dry_run: bool = False
    signal: Optional[int] = None
    last_progress: Optional[_Seconds] = None
    # The FIFO's or socket's paths that no longer name them (removed, replaced).
    lost_paths: List[str] = []
    state_file: Optional[str] = None
    # Why the last save of the state file failed, or None.
    state_failing: Optional[str] = None
    # Why the last incident could not be written, or None (none failed, or one was since).
    incidents_failing: Optional[str] = None
    # What the last reload (SIGHUP) failed to do, and why, or None.
    reload_failed: Optional[str] = None
    # The settings the config file changes that wait for a restart.
    restart_needed: List[str] = []
    # None when the loop held its table (stalled).
    stats: Optional[_StatusStats] = None


def _read_status(doc: Dict[str, Any]) -> _Status:
    """The status document ``doc`` (as `query_status` returns it), typed.

    Raises:
        ValueError: a field is missing or of the wrong type; the message names it.
    """
    try:
        return msgspec.convert(doc, _Status)
    except msgspec.ValidationError as e:
        raise ValueError(str(e)) from None


def format_status(doc: Dict[str, Any]) -> str:
    """Render the daemon's status document as a header and a table of armed timers.

    Raises:
        ValueError: ``doc`` is not a status document (see `_read_status`).
    """
    return _format(_read_status(doc))


def _format(status: _Status) -> str:
    timers = sorted(status.timers or [], key=lambda t: t.remaining)
    mode = "DRY RUN (expiries are logged, not signalled)" if status.dry_run else "enforcing"
    if status.signal:
        mode += f", reaps with {signal_label(status.signal)}"
    health = "" if status.healthy else ", NOT READING ITS FIFO"
    if status.lost_paths:
        health = f", PATHS LOST: {_lost(status)}"
    if status.state_failing is not None:
        # What a restart would lose: not a matter of health, but said as loudly.
        state_file = printable(str(status.state_file))
        health += f", STATE NOT SAVED to {state_file}: {printable(status.state_failing)}"
    if status.incidents_failing is not None:
        # The reaps go on; what the engineer on call would read of them is lost.
        health += f", INCIDENTS NOT WRITTEN: {printable(status.incidents_failing)}"
    if status.reload_failed is not None:
        # The settings (or the log file) before it hold; a restart would refuse the file.
        health += f", RELOAD FAILED: {printable(status.reload_failed)}"
    count = status.armed if status.armed is not None else len(timers)
    armed = f"{count} timer{'s' if count != 1 else ''} armed"
    if status.timers is not None and len(timers) < count:
        armed += f" (the {len(timers)} soonest shown)"
    if status.armed is None and status.timers is None:
        armed = "armed timers unknown: the server's loop is busy"
        if status.last_progress is not None:
            armed += f" (no progress for {_duration(time.time() - status.last_progress)})"
    lines = [
        f"ftimer-server {status.version} (pid {status.pid}), {mode}{health}",
        f"FIFO {printable(status.fifo)}"
        + (f", socket {printable(status.socket)}" if status.socket else "")
        + f", up {_duration(status.uptime)}",
        armed,
    ]
    if status.restart_needed:
        lines.append(
            "config changes that need a restart: "
            + ", ".join(printable(change) for change in status.restart_needed)
        )
    unkillable = status.stats.unkillable if status.stats is not None else 0
    if unkillable:
        # Reaped, and alive all the same: what the log said once is said here until a restart.
        assert status.stats is not None
        alive = status.stats.unkillable_alive
        lines.append(
            f"{unkillable} worker{'s' if unkillable != 1 else ''} outlived "
            f"{'their' if unkillable != 1 else 'its'} SIGKILL by {KILL_CHECK:g} s since the "
            "start (stuck in the kernel)"
            + ("" if alive is None else f", {alive or 'none'} still alive")
            + ": the log says what each waited in"
        )
    refused = status.stats.rejections if status.stats is not None else {}
    if refused:
        # Each is a timer not enforced: said here, not left to the log alone.
        counts = sorted(refused.items(), key=lambda item: (-item[1], item[0]))
        reasons = ", ".join(f"{printable(reason)} {n}" for reason, n in counts)
        total = sum(refused.values())
        lines.append(
            f"{total} request{'s' if total != 1 else ''} refused since the start "
            f"({reasons}): the log says why, of each"
        )
    if timers:
        rows = [("PID", "SCOPE", "LEFT", "SIGNAL", "LABELS")]
        for t in timers:
            labels = ",".join(f"{k}={v}" for k, v in sorted((t.labels or {}).items()))
            rows.append(
                (
                    str(t.pid),
                    printable(t.scope_id),  # what workers sent, shown escaped
                    _duration(t.remaining),
                    signal_label(t.signal),
                    printable(labels),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]
            lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
