"""The daemon's settings: a TOML file and command-line options merged into one frozen config.

Precedence: command line, then the config file, then the environment (``FTIMER_FIFO``,
then ``TORCHELASTIC_TIMER_FILE``, for the FIFO path, as the client reads them), then
built-in defaults. The file is read with msgspec into a typed struct that forbids unknown
keys, so a typo is an error rather than a silently ignored setting. Keys are the long
option names without the leading dashes; the repeatable ``--allow-uid`` and
``--allow-signal`` become the lists ``allow-uids`` and ``allow-signals``::

    fifo = "/run/ftimer/timer.fifo"
    fifo-mode = 0o620          # or "0620"
    fifo-group = "ftimer"
    signal = "SIGTERM"
    grace = 10.0
    state-file = "/run/ftimer/state.json"
    allow-uids = [1000, 1001]
    allow-signals = ["SIGTERM", "SIGKILL", "SIGABRT"]
    log-format = "json"
    metrics-address = "127.0.0.1:9464"
    incident-dir = "/var/lib/ftimer/incidents"
    incidents-max-bytes = "1GiB"   # or a number of bytes
    capture = "py-spy"
    capture-timeout = 5.0
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import os
import re
import signal as signal_module
import sys
from collections.abc import Mapping
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple, TypeVar, Union

import msgspec

from ftimer_protocol import FIFO_ENV_VARS, default_fifo_path, signal_name, socket_path_for
from ftimer_protocol import parse_signal as _parse_signal
from ftimer_protocol._limits import LABEL_KEY_PATTERN
from ftimer_server._files import NotARegularFile, open_regular
from ftimer_server.core._policy import Policy
from ftimer_server.core._report import printable
from ftimer_server.incidents._options import CAPTURE_METHODS as INCIDENT_METHODS

from ._control import bound_first
from ._logging import LOG_FORMATS, LOG_LEVELS
from ._metrics import MetricsUnavailable, prometheus

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9 / 3.10 only
    # tomli is a dependency below 3.11 only; mypy (targeting 3.9) may not have it.
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "CAPTURE_METHODS",
    "DEFAULT_GRACE",
    "MAX_CONFIG_BYTES",
    "MAX_COUNT",
    "MAX_ID",
    "MAX_SIZE",
    "MAX_SOCKET_PATH",
    "ascii_int",
    "ConfigError",
    "DaemonConfig",
    "FileSettings",
    "control_socket_for",
    "default_incident_dir",
    "hidden_warning",
    "host_port",
    "load_config_file",
    "parse_signal",
    "parse_size",
    "resolve_config",
    "setting_text",
]

#: Seconds before SIGKILL when ``signal`` is set to something else and ``grace`` is not.
DEFAULT_GRACE = 10.0
#: How a reaped worker's stacks are captured: ``auto`` takes py-spy if it is found, else
#: the worker's own hook (if its client announced one), else the /proc facts alone;
#: ``facts`` takes the /proc facts alone; ``none`` captures nothing and writes no
#: incident (a reap as before incidents).
CAPTURE_METHODS = (*INCIDENT_METHODS, "none")
_MIB = 1024 * 1024
_GIB = 1024 * _MIB
#: A config file larger than this is not one (every setting fits in a few KiB).
MAX_CONFIG_BYTES = _MIB
#: The longest path an AF_UNIX socket can be reached at: ``sun_path``'s 108 bytes, less
#: the terminating NUL.
MAX_SOCKET_PATH = 107

# The ranges of the numeric settings (docs/deploy.md and --help state them). Durations
# are in seconds: a grace under a millisecond is none (the SIGKILL follows the signal at
# once: say --signal SIGKILL), and one over a day keeps a hung worker's GPUs for good.
_GRACE = (0.001, 86400.0)
_STATE_INTERVAL = (0.01, 60.0)
_RESTORE_GRACE = (0.0, 3600.0)
_CAPTURE_TIMEOUT = (0.05, 60.0)
#: A value with a leading zero (``fifo-mode = 0620``): TOML refuses it, with no word of why.
_LEADING_ZERO = re.compile(r"^\s*[\w-]+\s*=\s*[+-]?0[0-9]", re.MULTILINE)
#: A fifo-mode written as a decimal number (``fifo-mode = 440``), which TOML reads as such.
_DECIMAL_MODE = re.compile(
    r"""^\s*(?:fifo-mode|"fifo-mode"|'fifo-mode')\s*=\s*\+?([1-9][0-9_]*)\s*(?:#.*)?$""",
    re.MULTILINE,
)
#: The most timers (in all, or of one process) or incidents a limit may allow: a signed
#: 32-bit count, more timers than any host's memory holds; a larger limit is no limit.
MAX_COUNT = 2**31 - 1
#: The largest uid or gid: ids are 32-bit, and (uid_t)-1 means "leave unchanged" to
#: chown() and setresuid(), so it is no one's id.
MAX_ID = 2**32 - 2
#: The largest size in bytes: the largest offset of a file (a signed 64-bit off_t).
MAX_SIZE = 2**63 - 1


class ConfigError(Exception):
    """A setting is invalid or the config file cannot be read (exit code 2)."""


#: The most characters of a value an error quotes: the rest is counted, not shown.
SHOWN_CHARS = 64


def _shown(value: object) -> str:
    """``value`` quoted for an error message, cut after `SHOWN_CHARS` characters (a
    value thousands of characters long would otherwise fill the log, ``status`` and
    systemd's ``STATUS=``)."""
    text = str(value)
    if len(text) <= SHOWN_CHARS:
        return repr(value)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} chars)"


class FileSettings(msgspec.Struct, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    """Everything a config file may set; None means "not set here"."""

    fifo: Optional[str] = None
    fifo_mode: Union[int, str, None] = None
    fifo_group: Union[int, str, None] = None
    control_socket: Optional[str] = None
    socket: Optional[str] = None
    signal: Union[int, str, None] = None
    grace: Optional[float] = None
    state_file: Optional[str] = None
    state_interval: Optional[float] = None
    restore_grace: Optional[float] = None
    allow_uids: Optional[List[int]] = None
    allow_signals: Optional[List[Union[int, str]]] = None
    descendants_only: Optional[bool] = None
    max_timers: Optional[int] = None
    max_timers_per_pid: Optional[int] = None
    dry_run: Optional[bool] = None
    log_format: Optional[str] = None
    log_level: Optional[str] = None
    log_file: Optional[str] = None
    metrics_address: Optional[str] = None
    incident_dir: Optional[str] = None
    incidents_keep: Optional[int] = None
    incidents_max_bytes: Union[int, str, None] = None
    capture: Optional[str] = None
    capture_timeout: Optional[float] = None
    py_spy_native: Optional[bool] = None
    core: Optional[bool] = None
    core_max_bytes: Union[int, str, None] = None
    reap_tree: Optional[bool] = None
    job_label: Optional[str] = None


SETTING_NAMES = tuple(f.name for f in msgspec.structs.fields(FileSettings))


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """The validated settings of one daemon run (`resolve_config` refuses a number
    outside the range given here).

    Attributes:
        fifo: the FIFO path (absolute).
        fifo_mode: permission bits for a FIFO the daemon creates (0o600 by default,
            0o620 with a ``fifo_group``).
        fifo_group: gid (0..`MAX_ID`) given to the FIFO, or None to keep the daemon's.
        control_socket: the status socket's path.
        socket: the datagram socket (the kernel-verified transport) beside the FIFO, or
            None: the FIFO alone.
        signal: the signal every reap sends instead of the timer's own (report-only
            timers stay report-only); None: each timer's.
        grace: seconds (0.001..86400) a worker signalled with anything but SIGKILL has
            before SIGKILL; None: no escalation. With a ``signal`` other than SIGKILL it
            defaults to ``DEFAULT_GRACE``.
        state_file: where armed timers are saved, or None.
        state_interval: at most this many seconds (0.01..60) pass between a change of
            the armed timers and its save (and at least this many between two saves).
        restore_grace: after a start that restored timers, seconds (0..3600) in which
            nothing expires, for clients to re-send what they wrote while no daemon ran.
        allow_uids: only processes of these uids (0..`MAX_ID`) get timers; None: any
            user's.
        allow_signals: signals a timer may ask for (0, report only, always may); None: any.
        descendants_only: only descendants of the daemon get timers.
        max_timers, max_timers_per_pid: caps on armed timers (1..`MAX_COUNT`; None: the
            server's default).
        dry_run: log and count expiries instead of signalling.
        log_format, log_level, log_file: logging.
        metrics_address: (host, port) for Prometheus, or None.
        config_file: the file the settings came from, for SIGHUP reloads.
        incident_dir: where incidents are written (created 0700); by default
            `default_incident_dir`: ``incidents`` beside the state file, else beside
            the FIFO.
        incidents_keep, incidents_max_bytes: retention: the oldest incidents go beyond
            this many (1..`MAX_COUNT`), or beyond this many bytes of files (1..`MAX_SIZE`);
            the newest is always kept.
        capture: how stacks are captured before a reap (one of `CAPTURE_METHODS`).
        capture_timeout: seconds a reap's capture may take (0.05..60); then the signal
            goes anyway.
        py_spy_native: py-spy also shows native (C/C++) frames (``--native``).
        core: take a core file with ``gcore`` before the kill.
        core_max_bytes: no core of a worker larger than this (bytes of memory,
            1..`MAX_SIZE`).
        reap_tree: after the capture, signal the worker's descendants too.
        job_label: the label whose value names a worker's job, so the other workers of
            the job on this host are captured with it; None: no peers.
    """

    fifo: str
    fifo_mode: int = 0o600
    fifo_group: Optional[int] = None
    control_socket: str = ""
    socket: Optional[str] = None
    signal: Optional[int] = None
    grace: Optional[float] = None
    state_file: Optional[str] = None
    state_interval: float = 0.1
    restore_grace: float = 1.5
    allow_uids: Optional[FrozenSet[int]] = None
    allow_signals: Optional[FrozenSet[int]] = None
    descendants_only: bool = False
    max_timers: Optional[int] = None
    max_timers_per_pid: Optional[int] = None
    dry_run: bool = False
    log_format: str = "text"
    log_level: str = "info"
    log_file: Optional[str] = None
    metrics_address: Optional[Tuple[str, int]] = None
    config_file: Optional[str] = None
    incident_dir: str = ""
    incidents_keep: int = 200
    incidents_max_bytes: int = 256 * _MIB
    capture: str = "auto"
    capture_timeout: float = 3.0
    py_spy_native: bool = False
    core: bool = False
    core_max_bytes: int = 4 * _GIB
    reap_tree: bool = False
    job_label: Optional[str] = "job"

    def __post_init__(self) -> None:
        # The default directory follows the FIFO and the state file, so a config built
        # in code gets the same one as a config read from options.
        if not self.incident_dir:
            default = default_incident_dir(self.fifo, self.state_file)
            object.__setattr__(self, "incident_dir", default)


def default_incident_dir(fifo: str, state_file: Optional[str] = None) -> str:
    """Where incidents go unless told: ``incidents`` in the state file's directory (the
    daemon's own, kept across restarts), else in the FIFO's directory (for the default
    FIFO path, a directory only the daemon writes)."""
    return os.path.join(os.path.dirname(state_file or fifo), "incidents")


def load_config_file(path: str) -> FileSettings:
    """Read and type-check a TOML config file.

    Only a regular file (or a symlink to one) is read, and only up to `MAX_CONFIG_BYTES`:
    a FIFO would block the daemon in ``open()`` and a device like /dev/zero never ends.

    Raises:
        ConfigError: unreadable, not a regular file, larger than `MAX_CONFIG_BYTES`, not
            UTF-8, not TOML (or nested deeper than the parser recurses), an unknown key
            or a value of the wrong type.
    """
    data = _read_config_file(path)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte {e.start} is {data[e.start : e.end]!r}"
        ) from None
    except tomllib.TOMLDecodeError as e:
        hint = ""
        if _LEADING_ZERO.search(data.decode("utf-8")):  # a mode written as in chmod
            hint = ' (TOML has no numbers with a leading zero: write a mode as "0620" or 0o620)'
        elif data.startswith(b"\xef\xbb\xbf"):
            hint = " (the file starts with a byte order mark, BOM: save it as UTF-8 without one)"
        raise ConfigError(f"config file {path} is not valid TOML: {e}{hint}") from None
    except RecursionError:
        raise ConfigError(
            f"config file {path} is not valid TOML: arrays or tables nested too deeply"
        ) from None
    except ValueError:  # Python's limit on the digits int() reads: no setting takes them
        raise ConfigError(f"config file {path} has a number thousands of digits long") from None
    try:
        settings = msgspec.convert(raw, FileSettings)
    except msgspec.ValidationError as e:
        raise ConfigError(f"config file {path}: {_in_plain_words(str(e))}") from None
    decimal = _DECIMAL_MODE.search(data.decode("utf-8"))
    if isinstance(settings.fifo_mode, int) and decimal:
        # 440 is read as 0o670 and 400 as 0o620: a mode is meant in octal, always.
        digits = decimal.group(1).replace("_", "")
        octal = '0o620 or "0620"'
        if set(digits) <= set("01234567"):
            octal = f'"0{digits}" or 0o{digits}'
        raise ConfigError(
            f"config file {path}: fifo-mode: FIFO mode {digits} is a decimal number: write "
            f"the octal mode as {octal}"
        )
    return settings


#: What the schema's types are called in a config file.
_KINDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
}
_GOT = {**_KINDS, "bool": "a boolean", "object": "a table"}


def _in_plain_words(error: str) -> str:
    """msgspec's message about a config file, in the file's terms ("Expected `int | null`,
    got `str` - at `$.max-timers`": "max-timers is a string; it takes a whole number")."""
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", error)
    if unknown:
        key = unknown.group(1)
        names = [f.encode_name for f in msgspec.structs.fields(FileSettings)]
        close = difflib.get_close_matches(key, names, n=1)
        hint = (
            f" (did you mean {close[0]!r}?)" if close else " (ftimer-server run --help lists them)"
        )
        return f"there is no setting {_shown(key)}{hint}"
    wrong = re.fullmatch(r"Expected `(.*)`, got `(.*)` - at `\$\.([^`]*)`", error)
    if wrong:
        wanted = [t for t in wrong.group(1).split(" | ") if t != "null"]
        takes = " or ".join(_KINDS.get(t, t) for t in wanted)
        got = _GOT.get(wrong.group(2), f"a {wrong.group(2)}")
        return f"{wrong.group(3)} is {got}; it takes {takes}"
    return error


def _read_config_file(path: str) -> bytes:
    try:
        fd, _ = open_regular(path, follow=True)
    except NotARegularFile as e:
        raise ConfigError(f"config file {path} is {e.kind}, not a regular file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except ValueError:  # a NUL byte: only from code, a command line cannot hold one
        raise ConfigError(f"config file {path!r}: the path contains a NUL byte") from None
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return data


def ascii_int(text: str) -> Optional[int]:
    """``"42"`` -> 42; None for anything but ASCII digits.

    ``str.isdigit()`` is true for ``"²"`` and ``int()`` accepts ``"٤٢"`` and ``"4_2"``:
    a setting is read as a number only when it is written as one in plain ASCII.
    """
    text = text.strip()
    if text.isascii() and text.isdecimal():
        # int() of thousands of digits raises ValueError; any such number is out of range.
        digits = text.lstrip("0") or "0"
        return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS
    return None


#: Digits of a number read as they are: a longer one is past every setting's range.
_MAX_DIGITS = 30


def parse_signal(value: Union[int, str]) -> int:
    """``9``, ``"9"``, ``"KILL"``, ``"SIGKILL"``, ``"sigkill"`` or ``"SIGRTMIN+2"`` -> its
    number (``ftimer_protocol.parse_signal``, which the client's command line uses too).

    Raises:
        ConfigError: not a signal known on this platform.
    """
    try:
        return _parse_signal(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_mode(value: Union[int, str]) -> int:
    """``0o660`` or ``"0660"`` / ``"660"`` / ``"0o660"`` -> 0o660.

    Raises:
        ConfigError: not an octal permission mode, or one without owner read/write.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0o") else text
        if not text or any(c not in "01234567" for c in text):
            raise ConfigError(f"FIFO mode {_shown(value)} is not an octal mode like 0620")
        value = int(text, 8)
    elif value > 0o777 and set(str(value)) <= set("01234567") and int(str(value), 8) <= 0o777:
        # TOML reads `fifo-mode = 660` as the decimal number 660 (0o1224).
        raise ConfigError(
            f'FIFO mode {value} is a decimal number: write the octal mode as "0{value}" '
            f"or 0o{value}"
        )
    if not 0 <= value <= 0o777:
        raise ConfigError(f"FIFO mode {value:#o} is not a permission mode (0..0777)")
    if value & 0o600 != 0o600:
        raise ConfigError(f"FIFO mode {value:04o} must let the owner read and write (0600)")
    return value


def parse_group(value: Union[int, str]) -> int:
    """A group name or number -> gid.

    Raises:
        ConfigError: no such group name, or a number that is not a gid (0..`MAX_ID`).
    """
    number = value if isinstance(value, int) else ascii_int(value)
    if number is not None:
        return _within(number, 0, MAX_ID, shown=f"gid {str(value).strip()}")
    assert isinstance(value, str)
    try:
        return grp.getgrnam(value).gr_gid
    except (KeyError, ValueError):  # ValueError: a NUL byte in the name
        raise ConfigError(
            f"unknown group {_shown(value)}: the group must exist before the daemon starts "
            f"(create it, e.g. `groupadd {value if len(value) <= SHOWN_CHARS else 'NAME'}`, "
            "and put the workers' users in it), or give a gid"
        ) from None


#: The longest host name DNS allows (RFC 1035), so the longest a metrics host can be.
_MAX_HOST = 253


def parse_address(value: str) -> Tuple[str, int]:
    """``"9464"``, ``":9464"``, ``"0.0.0.0:9464"``, ``"[::1]:9464"`` -> (host, port).

    The host defaults to loopback (127.0.0.1): metrics are exposed to the network only
    when asked for explicitly. An IPv6 address is written in brackets, as in a URL.

    Raises:
        ConfigError: no port number, or one out of range; an IPv6 address without its
            brackets; a host that cannot be one.
    """
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not host:
            raise ConfigError(
                f"metrics address {_shown(value)}: give an IPv6 address in brackets and a port, "
                "like [::1]:9464"
            )
    elif text.count(":") > 1:
        raise ConfigError(
            f"metrics address {_shown(value)}: write an IPv6 address in brackets, with the port "
            "after them, like [::1]:9464"
        )
    else:
        host, _, port_text = text.rpartition(":")
        host = host or "127.0.0.1"
    if not host.isprintable() or any(c.isspace() or c in "[]" for c in host):
        raise ConfigError(
            f"metrics address {_shown(value)}: {_shown(host)} is not a host name or address"
        )
    if len(host) > _MAX_HOST:
        raise ConfigError(
            f"metrics address {_shown(value)}: a host name or address has at most "
            f"{_MAX_HOST} characters"
        )
    port = ascii_int(port_text)
    if port is None:
        raise ConfigError(
            f"metrics address {_shown(value)} has no port number: give [HOST:]PORT, "
            "like 127.0.0.1:9464"
        )
    if port > 65535:
        shown = port_text if len(port_text) <= SHOWN_CHARS else _shown(port_text)
        raise ConfigError(f"metrics address {_shown(value)}: port {shown} is out of range 0..65535")
    return host, port


_SIZE = re.compile(r"^\s*([0-9]+)\s*(?:([KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: Union[int, str]) -> int:
    """``1048576``, ``"1048576"``, ``"1M"``, ``"1MiB"``, ``"1 MB"`` -> 1048576: a number
    of bytes, or one with a unit K, M, G or T (powers of 1024, as systemd reads them).

    Raises:
        ConfigError: not a whole number of bytes, or not in 1..`MAX_SIZE`.
    """
    if isinstance(value, int):
        return _within(value, 1, MAX_SIZE, "bytes")
    match = _SIZE.match(value) if value.isascii() else None
    if match is None:
        raise ConfigError(
            f"{_shown(value)} is not a size: give bytes, or a number with K, M, G or T "
            '(powers of 1024), like "256M" or "4GiB"'
        )
    number = ascii_int(match[1])
    assert number is not None, "the pattern matched digits"
    size = number * _UNITS[(match[2] or "").upper()]
    # Named as written: "99999999999999999999T", not the 33 digits it makes.
    return _within(size, 1, MAX_SIZE, "bytes", shown=value.strip())


def parse_job_label(value: str) -> Optional[str]:
    """A label name, or "" for none (None: no peers are captured).

    Raises:
        ConfigError: not a label name the protocol allows.
    """
    if value == "":
        return None
    if not re.fullmatch(LABEL_KEY_PATTERN, value):
        raise ConfigError(
            f"{_shown(value)} is not a label name (a letter or _, then letters, digits or _, at "
            'most 32 in all), nor "" for none'
        )
    return value


def setting_text(name: str, value: Any) -> str:
    """The value of setting ``name`` (a `DaemonConfig` field) as its option takes it, in
    one line."""
    if name in ("max_timers", "max_timers_per_pid") and value is None:
        value = getattr(Policy(), name)  # the server's own cap
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "any" if name in ("allow_uids", "allow_signals") else "none"
    if name == "fifo_mode":
        return f"{value:04o}"
    if name == "signal":
        return signal_name(value)
    if name == "metrics_address":
        value = host_port(*value)
    elif name == "allow_signals":
        value = ", ".join(map(signal_name, sorted(value)))
    elif isinstance(value, frozenset):
        value = ", ".join(map(str, sorted(value)))
    return printable(str(value))


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def control_socket_for(fifo: str) -> str:
    """The control socket beside ``fifo``: the same path with ``.sock`` appended."""
    return fifo + ".sock"


def resolve_config(
    cli: Mapping[str, Any],
    file: Optional[FileSettings] = None,
    environ: Optional[Mapping[str, str]] = None,
    config_file: Optional[str] = None,
    *,
    starting: bool = False,
) -> DaemonConfig:
    """Merge command-line values over file values over defaults, and validate them.

    Args:
        cli: setting name (as in `FileSettings`) -> value; None means not given.
        file: the config file's settings, if any.
        environ: for ``FTIMER_FIFO`` / ``TORCHELASTIC_TIMER_FILE`` and the default
            path's ``XDG_RUNTIME_DIR``; ``os.environ`` by default.
        config_file: the file ``file`` was read from: named in errors, recorded in the
            config for reloads.
        starting: the config is for a daemon about to start (``run``, not ``status``):
            also check that what its settings need is installed (prometheus_client for
            ``metrics-address``).

    Raises:
        ConfigError: a value is invalid, or (``starting``) needs what is not installed;
            the message names the option or the file and key it came from.
    """
    env = os.environ if environ is None else environ
    merged = _merge(cli, file, config_file)
    # Section by section, in an order that decides which error a user sees first.
    fifo, control_socket, socket = _fifo_and_sockets(merged, env)
    signal, grace = _signal_and_grace(merged)
    capture = _capture(merged)
    fifo_group = merged.check("fifo_group", parse_group)
    # What was given, parsed; DaemonConfig's defaults stand for the rest.
    given = {
        **_state_and_admission(merged),
        **_logging_and_metrics(merged, starting),
        **_incident_settings(merged),
        **_fifo_mode(merged, fifo_group),
    }
    if capture is not None:
        given["capture"] = capture
    _check_own_paths(merged, fifo, control_socket, socket, given, config_file=config_file)
    return DaemonConfig(
        fifo=fifo,
        fifo_group=fifo_group,
        control_socket=control_socket,
        socket=socket,
        signal=signal,
        grace=grace,
        config_file=config_file,
        **given,
    )


@dataclasses.dataclass(frozen=True)
class _Merged:
    """Every setting's merged value (None: not given) and where it came from."""

    values: Dict[str, Any]
    origin: Dict[str, str]

    def check(self, name: str, parse: Callable[[Any], Any]) -> Any:
        """``parse`` the merged value (None stays None); errors name where it came from."""
        if self.values[name] is None:
            return None
        try:
            return parse(self.values[name])
        except ConfigError as e:
            raise ConfigError(f"{self.origin[name]}: {e}") from None

    def given(self, parsers: Mapping[str, Callable[[Any], Any]]) -> Dict[str, Any]:
        """The settings of ``parsers`` that were given, each parsed by its own (`check`),
        in ``parsers``' order."""
        return {
            name: self.check(name, parse)
            for name, parse in parsers.items()
            if self.values[name] is not None
        }


def hidden_warning(config_file: Optional[str], hidden: List[str]) -> str:
    """The warning that the options ``hidden`` (`overridden`) hide values of ``config_file``."""
    return (
        f"settings of {config_file} that the command line gives otherwise, not applied "
        f"(now or at a restart): {', '.join(hidden)}"
    )


def overridden(
    cli: Mapping[str, Any], file: FileSettings, config_file: str, applied: DaemonConfig
) -> List[str]:
    """The options (``--name``) that override another value ``file`` gives (read from
    ``config_file``; ``applied`` is ``resolve_config`` of both): the command line wins,
    so the file's value is never used. Values are compared as they apply (``INFO`` is
    ``info``, ``TERM`` is ``SIGTERM``, a path is absolute); a file's value that would not
    apply at all is another one."""
    options = _merge(cli, None, None).origin
    hidden = []
    for name in SETTING_NAMES:
        if cli.get(name) is None or getattr(file, name) is None:
            continue
        try:
            differs = resolve_config({**cli, name: None}, file, config_file=config_file) != applied
        except ConfigError:
            differs = True
        if differs:
            hidden.append(options[name])
    return hidden


def _merge(
    cli: Mapping[str, Any], file: Optional[FileSettings], config_file: Optional[str]
) -> _Merged:
    """Each setting from the command line, else from the config file (a relative path
    made absolute against the file's directory), with the option or key it came from."""
    merged: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for name in SETTING_NAMES:
        key = name.replace("_", "-")
        value = cli.get(name)
        origin[name] = f"--{_OPTION.get(name, key)}"
        if value is None and file is not None:
            value = getattr(file, name)
            origin[name] = f"config file {config_file or '(unnamed)'}: {key}"
            if name in _PATHS and value and config_file is not None and not _home(value):
                # Relative to the file, not to wherever the daemon (or `status -c`) runs.
                value = os.path.join(os.path.dirname(os.path.abspath(config_file)), value)
        merged[name] = value
    return _Merged(merged, origin)


def _fifo_and_sockets(merged: _Merged, env: Mapping[str, str]) -> Tuple[str, str, Optional[str]]:
    """The FIFO's path (given, else from the environment, else the default), the control
    socket's and the datagram socket's (given, else beside the FIFO; None: no socket)."""
    from_env = next((env[name] for name in FIFO_ENV_VARS if env.get(name)), None)
    fifo = merged.check("fifo", _path) or os.path.abspath(
        from_env or default_fifo_path(environ=env)
    )
    control_socket = merged.check("control_socket", lambda v: _control_socket_path(_path(v)))
    if control_socket is None:
        control_socket = _beside_the_fifo(
            control_socket_for(fifo), "the control socket", "--control-socket", _control_socket_path
        )
    if merged.values["socket"] is None:
        socket: Optional[str] = _beside_the_fifo(
            socket_path_for(fifo), "the socket", "--socket PATH or --no-socket"
        )
    else:  # "" is --no-socket (the config file's socket = "")
        socket = merged.check("socket", lambda v: _socket_path(_path(v)) if v else None)
    return fifo, control_socket, socket


def _signal_and_grace(merged: _Merged) -> Tuple[Optional[int], Optional[float]]:
    """The signal every reap sends (None: each timer's) and the grace before SIGKILL,
    `DEFAULT_GRACE` for a signal other than SIGKILL if none is given."""
    signal = merged.check("signal", _platform_signal)
    grace = merged.check("grace", lambda v: _within(v, *_GRACE, "seconds"))
    if grace is None and signal is not None and signal != signal_module.SIGKILL:
        grace = DEFAULT_GRACE  # a worker that ignores the signal must not outlive its reap
    return signal, grace


def _capture(merged: _Merged) -> Optional[str]:
    """The capture method (None: not given); "none" is refused with core or reap-tree
    on, as both need an incident's capture."""
    capture: Optional[str] = merged.check(
        "capture", lambda v: _choice(v, CAPTURE_METHODS, "capture method")
    )
    origin = merged.origin
    if merged.values["core"] and capture == "none":
        raise ConfigError(
            f"{origin['core']}: a core file is a capture, and {origin['capture']} says "
            '"none": set capture to "auto" (or a method), or leave core off'
        )
    if merged.values["reap_tree"] and capture == "none":
        # The tree is signalled by an incident's reap: with none, it would silently not be.
        raise ConfigError(
            f"{origin['reap_tree']}: the worker's descendants are signalled after an "
            f'incident\'s capture, and {origin["capture"]} says "none": set capture to '
            '"facts" (the /proc facts alone, the cheapest) or another method, or leave '
            "reap-tree off"
        )
    return capture


def _state_and_admission(merged: _Merged) -> Dict[str, Any]:
    """The state file's settings, and which timers are accepted (users, signals,
    descendants, caps, dry run): those given, parsed."""
    return merged.given(
        {
            "state_file": _path,
            "state_interval": lambda v: _within(v, *_STATE_INTERVAL, "seconds"),
            "restore_grace": lambda v: _within(v, *_RESTORE_GRACE, "seconds"),
            "allow_uids": _uids,
            "allow_signals": _signals,
            "descendants_only": bool,
            "max_timers": lambda v: _within(v, 1, MAX_COUNT, "timers"),
            "max_timers_per_pid": lambda v: _within(v, 1, MAX_COUNT, "timers"),
            "dry_run": bool,
        }
    )


def _logging_and_metrics(merged: _Merged, starting: bool) -> Dict[str, Any]:
    """The logging and metrics settings given, parsed (``starting``: the metrics address
    also needs prometheus_client)."""
    return merged.given(
        {
            "log_format": lambda v: _choice(v, LOG_FORMATS, "log format"),
            "log_level": lambda v: _choice(v, LOG_LEVELS, "log level"),
            "log_file": _path,
            "metrics_address": _served if starting else parse_address,
        }
    )


def _incident_settings(merged: _Merged) -> Dict[str, Any]:
    """The incidents' settings given (where, how many, how captured), parsed; the
    capture method itself is `_capture`'s."""
    return merged.given(
        {
            "incident_dir": _path,
            "incidents_keep": lambda v: _within(v, 1, MAX_COUNT, "incidents"),
            "incidents_max_bytes": parse_size,
            "capture_timeout": lambda v: _within(v, *_CAPTURE_TIMEOUT, "seconds"),
            "py_spy_native": bool,
            "core": bool,
            "core_max_bytes": parse_size,
            "reap_tree": bool,
            "job_label": parse_job_label,  # "" is None: no peers
        }
    )


def _fifo_mode(merged: _Merged, fifo_group: Optional[int]) -> Dict[str, int]:
    """The FIFO's mode, if given or implied by its group; else nothing (the default)."""
    given: Dict[str, int] = merged.given({"fifo_mode": parse_mode})
    if "fifo_mode" not in given and fifo_group is not None:
        given["fifo_mode"] = 0o620  # a group is named so that it may write
    return given


def _check_own_paths(
    merged: _Merged,
    fifo: str,
    control_socket: str,
    socket: Optional[str],
    given: Mapping[str, Any],
    *,
    config_file: Optional[str] = None,
) -> None:
    """Check the paths of the daemon's own files (`_check_distinct`): the FIFO, the
    sockets, the state file, the log file, the lock files beside them and the incident
    directory (made at the start: at the state file's path, say, it took the file's
    place, and no save could be made)."""
    origin, values = merged.origin, merged.values
    # Each file the daemon makes, replaces or appends to needs a path of its own.
    state_file = given.get("state_file")
    files = [
        # Read again at every SIGHUP and start: a file the daemon writes there replaces it.
        (
            f"the config file {config_file}",
            None if config_file is None else os.path.abspath(config_file),
        ),
        (
            # Read through its symlinks: a file written at the end of them replaces it too.
            f"the file the config file {config_file} links to",
            _behind_links(config_file),
        ),
        (_label("--fifo", origin, values, "fifo"), fifo),
        ("the FIFO's lock file (the FIFO + .lock)", fifo + ".lock"),
        (_label("--control-socket", origin, values, "control_socket"), control_socket),
        (_label("--socket", origin, values, "socket"), socket),
        (origin["state_file"], state_file),
        (
            "the state file's lock file (the state file + .lock)",
            None if state_file is None else state_file + ".lock",
        ),
        (origin["log_file"], given.get("log_file")),
    ]
    if given.get("capture") != "none":  # else no incident is written, nor the directory made
        incident_dir = given.get("incident_dir")
        what = origin["incident_dir"]
        if incident_dir is None:
            incident_dir = default_incident_dir(fifo, state_file)
            what = "the default --incident-dir (incidents beside the state file, else the FIFO)"
        files.append((what, incident_dir))
    _check_distinct([(what, path) for what, path in files if path is not None], state_file)


def _behind_links(config_file: Optional[str]) -> Optional[str]:
    """The file a symlinked ``config_file`` is read from, or None (no config file, or one
    that is no symlink: its own path is checked already)."""
    if config_file is None:
        return None
    real = os.path.realpath(config_file)
    return None if _normalized(real) == _normalized(config_file) else real


def _label(option: str, origin: Mapping[str, str], merged: Mapping[str, Any], name: str) -> str:
    """Where a path setting came from, for an error: its option or file key, or (not
    given) its default."""
    return origin[name] if merged[name] is not None else f"the default {option}"


def _check_distinct(files: List[Tuple[str, str]], state_file: Optional[str]) -> None:
    """Check that the daemon's files (what each is, its absolute path) are all different
    paths, and that none is a segment of the state file's journal (``<state>.journal.N``).

    Two at one path would clobber each other: the state file saved over the FIFO, the
    log appended to the state file, a socket bound where the lock file is.

    Raises:
        ConfigError: two are one path; the message names both.
    """
    seen: Dict[str, str] = {}
    journal = None if state_file is None else _normalized(state_file) + ".journal."
    for what, path in files:
        key = _normalized(path)
        if key in seen:
            raise ConfigError(f"{seen[key]} and {what} are the same path {path}: give each its own")
        seen[key] = what
        number = key[len(journal) :] if journal and key.startswith(journal) else ""
        # The journal's own test for a segment's name (``Journal.segments``).
        if number.isascii() and number.isdecimal():
            raise ConfigError(
                f"{what} {path} is a segment of the state file's journal ({journal}N): "
                "give it another path"
            )


def _normalized(path: str) -> str:
    """The absolute ``path`` with its directory's symlinks resolved (/var/run is /run)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(directory), name)


#: Settings whose command-line option is not the setting's name (repeatable options).
_OPTION = {"allow_uids": "allow-uid", "allow_signals": "allow-signal"}


#: The settings that are paths: in a config file, relative to its directory.
_PATHS = frozenset(("fifo", "control_socket", "socket", "state_file", "log_file", "incident_dir"))


def _path(value: str) -> str:
    """A path setting -> its absolute path.

    Raises:
        ConfigError: empty (``os.path.abspath`` would make it the working directory), or
            holding a NUL byte (no system call takes one).
    """
    if not value:
        raise ConfigError("the path is empty")
    if "\0" in value:
        raise ConfigError(f"the path {_shown(value)} contains a NUL byte")
    if _home(value):
        raise ConfigError(f"the path {_shown(value)}: ~ is no home directory here; give it whole")
    return os.path.abspath(value)


def _home(value: str) -> bool:
    """``value`` starts with ``~``, as a shell's path in a home directory (``~/x``, and
    ``~user/x`` too: no shell expands either here, and joined to the config file's
    directory it named a path nobody meant)."""
    return value.startswith("~")


def _socket_path(path: str) -> str:
    """``path``, if an AF_UNIX socket can be reached there.

    Raises:
        ConfigError: longer than `MAX_SOCKET_PATH` bytes: the daemon could bind it (under
            a short name, then renamed) but no client could ever connect to it.
    """
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{path} is {size} bytes long; a socket's path may be at most {MAX_SOCKET_PATH} bytes"
        )
    return path


def _control_socket_path(path: str) -> str:
    """``path``, if the control socket can be bound and reached there: it is bound first
    in a private directory beside it (`bound_first`), then renamed to ``path``.

    Raises:
        ConfigError: that path or ``path`` is longer than `MAX_SOCKET_PATH` bytes.
    """
    first = bound_first(_socket_path(path))
    size = len(os.fsencode(first))
    if size > MAX_SOCKET_PATH:
        most = MAX_SOCKET_PATH - (size - len(os.fsencode(os.path.dirname(path))))
        raise ConfigError(
            f"{path} is bound first at {first}, {size} bytes long; a socket's path may be "
            f"at most {MAX_SOCKET_PATH} bytes, so the directory at most {most}"
        )
    return path


def _beside_the_fifo(
    path: str, what: str, option: str, check: Callable[[str], str] = _socket_path
) -> str:
    """``path``, a socket's path made from the FIFO's, if ``check`` finds a socket can be
    reached there.

    Raises:
        ConfigError: the path is too long for a socket; the message says what to give.
    """
    try:
        return check(path)
    except ConfigError as e:
        raise ConfigError(
            f"{what} beside the FIFO: {e}: give a shorter FIFO path, or {option}"
        ) from None


def _served(value: str) -> Tuple[str, int]:
    """``parse_address(value)``, once prometheus_client is found importable.

    Raises:
        ConfigError: the address is invalid, or prometheus_client cannot be imported.
    """
    address = parse_address(value)
    try:
        prometheus()
    except MetricsUnavailable as e:
        raise ConfigError(str(e)) from None
    return address


def _platform_signal(value: Union[int, str]) -> int:
    sig = parse_signal(value)
    if sig not in signal_module.valid_signals():
        raise ConfigError(f"signal {sig} is not a signal of this platform")
    return sig


_Number = TypeVar("_Number", int, float)


def _within(
    value: _Number, low: _Number, high: _Number, unit: str = "", shown: Optional[str] = None
) -> _Number:
    """``value``, if it is in ``low..high`` (the range check of every numeric setting).

    Args:
        unit: what the numbers count ("seconds"), said after the bounds.
        shown: how the value is named in the error, if not as the number.

    Raises:
        ConfigError: out of range (NaN always is). A duration's range is named whole
            ("between 0.05 and 60 seconds"); a whole number's by the bound it crosses
            ("at least 1", "at most 4294967294"): its upper bound is the most the
            setting's type holds rather than a choice.
    """
    if low <= value <= high:
        return value
    if isinstance(low, float):
        bounds = f"between {low:g} and {high:g}"
    else:
        bounds = f"at least {low}" if value < low else f"at most {high}"
        if low == 1 and value < low:
            unit = unit.removesuffix("s")  # "at least 1 timer"
    text = f"{value if shown is None else shown} must be {bounds}"
    raise ConfigError(f"{text} {unit}" if unit else text)


def _choice(value: str, choices: Tuple[str, ...], what: str) -> str:
    if value.lower() not in choices:
        close = difflib.get_close_matches(value.lower(), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{what} {_shown(value)} is not one of {', '.join(choices)}{hint}")
    return value.lower()


def _uids(values: List[int]) -> FrozenSet[int]:
    # Fail closed, loudly: an empty list would let the daemon start and accept nobody's
    # timers; "any user" is said by leaving the setting out, never by an empty list.
    if not values:
        raise ConfigError(
            "an empty list allows no user's timers: leave it out to allow every user, or "
            "list the uids whose workers may hold timers"
        )
    return frozenset(_within(uid, 0, MAX_ID, shown=f"uid {uid}") for uid in values)


def _signals(values: List[Union[int, str]]) -> FrozenSet[int]:
    if not values:
        raise ConfigError(
            "an empty list allows no signal (only report-only timers): leave it out to "
            "allow every signal, or list the signals timers may ask for"
        )
    return frozenset(_platform_signal(v) for v in values)
