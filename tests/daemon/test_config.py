"""Settings: TOML file typed by msgspec (unknown keys refused), command line wins."""

from __future__ import annotations

import grp
import os
import pathlib
import resource
import signal
import subprocess
import sys
from typing import Any, Callable, Dict, List

import pytest

from ftimer_server.daemon._config import (
    DEFAULT_GRACE,
    ConfigError,
    DaemonConfig,
    FileSettings,
    ascii_int,
    load_config_file,
    overridden,
    parse_address,
    parse_group,
    parse_mode,
    parse_signal,
    resolve_config,
)

from .conftest import PATIENCE, PYTHON, DaemonProcess, unblocked

MIB = 1024 * 1024

Spawn = Callable[..., DaemonProcess]


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "ftimer.toml"
    path.write_text(text)
    return str(path)


def test_defaults_follow_the_documented_fifo_path() -> None:
    config = resolve_config({}, environ={})
    uid = os.geteuid()
    expected = "/run/ftimer/timer.fifo" if uid == 0 else f"/tmp/ftimer-{uid}/timer.fifo"
    socket = expected[: -len(".fifo")] + ".socket"
    assert config == DaemonConfig(fifo=expected, control_socket=expected + ".sock", socket=socket)


def test_the_socket_is_beside_the_fifo_unless_told_otherwise() -> None:
    assert resolve_config({"fifo": "/srv/t/timer.fifo"}, environ={}).socket == "/srv/t/timer.socket"
    assert resolve_config({"fifo": "/srv/t/pipe"}, environ={}).socket == "/srv/t/pipe.socket"
    assert resolve_config({"socket": "/srv/s"}, environ={}).socket == "/srv/s"
    assert resolve_config({"socket": ""}, environ={}).socket is None  # --no-socket


def test_a_fifo_group_may_write_unless_the_mode_says_otherwise() -> None:
    assert resolve_config({}, environ={}).fifo_mode == 0o600
    assert resolve_config({"fifo_group": "0"}, environ={}).fifo_mode == 0o620
    explicit = resolve_config({"fifo_group": "0", "fifo_mode": "0640"}, environ={})
    assert explicit.fifo_mode == 0o640  # kept, with a warning at start


def test_fifo_from_the_environment_as_the_client_reads_it() -> None:
    config = resolve_config({}, environ={"TORCHELASTIC_TIMER_FILE": "/tmp/te/timer"})
    assert config.fifo == "/tmp/te/timer"
    both = {"TORCHELASTIC_TIMER_FILE": "/tmp/te/timer", "FTIMER_FIFO": "/tmp/ft/timer"}
    assert resolve_config({}, environ=both).fifo == "/tmp/ft/timer"


def test_file_settings_and_command_line_precedence(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """
fifo = "/srv/ftimer/a.fifo"
fifo-mode = 0o660
allow-signals = ["SIGTERM", 9]
grace = 5
state-file = "/srv/ftimer/state.json"
allow-uids = [1000, 1001]
log-format = "json"
metrics-address = ":9464"
dry-run = true
""",
    )
    file = load_config_file(path)
    config = resolve_config(
        {"fifo": "/srv/ftimer/b.fifo", "log_format": "text", "grace": None},
        file,
        environ={"TORCHELASTIC_TIMER_FILE": "/ignored"},
        config_file=path,
    )
    assert config.fifo == "/srv/ftimer/b.fifo"  # the command line wins
    assert config.control_socket == "/srv/ftimer/b.fifo.sock"
    assert config.fifo_mode == 0o660
    assert config.allow_signals == frozenset({signal.SIGTERM, signal.SIGKILL})
    assert config.grace == 5.0
    assert config.state_file == "/srv/ftimer/state.json"
    assert config.allow_uids == frozenset({1000, 1001})
    assert config.log_format == "text"
    assert config.metrics_address == ("127.0.0.1", 9464)
    assert config.dry_run
    assert config.config_file == path


def test_relative_paths_in_a_config_file_are_the_files(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # They were the working directory's: `status -c FILE` run from elsewhere looked for
    # another control socket than the daemon's, and found no daemon.
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(
        etc,
        """
fifo = "../run/t.fifo"
socket = "t.socket"
state-file = "state/s.json"
log-file = "/var/log/ftimer.log"
incident-dir = "./incidents"
""",
    )
    monkeypatch.chdir("/")
    config = resolve_config({}, load_config_file(path), config_file=path)
    assert config.fifo == str(tmp_path / "run" / "t.fifo")
    assert config.control_socket == str(tmp_path / "run" / "t.fifo.sock")
    assert config.socket == str(etc / "t.socket")
    assert config.state_file == str(etc / "state" / "s.json")
    assert config.log_file == "/var/log/ftimer.log"  # absolute: as it is
    assert config.incident_dir == str(etc / "incidents")
    # The command line's are the working directory's, as any command's.
    monkeypatch.chdir(tmp_path)
    given = resolve_config({"fifo": "x.fifo"}, load_config_file(path), config_file=path)
    assert given.fifo == str(tmp_path / "x.fifo")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # In the file's terms, not the schema library's ("Object contains unknown field").
        ('fifo-mod = "0600"', "there is no setting 'fifo-mod' (did you mean 'fifo-mode'?)"),
        ("grace = 'soon'", "grace is a string; it takes a number"),
        ("allow-uids = 5", "allow-uids is a whole number; it takes a list"),
        ("fifo = ", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path: pathlib.Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config_file(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_config_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config_file(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(9, 9), ("9", 9), ("KILL", 9), ("sigterm", 15), ("SIGABRT", 6), (" SIGUSR1 ", 10)],
)
def test_parse_signal(value: int | str, expected: int) -> None:
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", [0, 65, "-1", "SIGNOPE", "", "SIG_DFL", "kill -9"])
def test_parse_signal_rejects(value: int | str) -> None:
    with pytest.raises(ConfigError):
        parse_signal(value)


@pytest.mark.parametrize(
    ("value", "expected"), [(0o600, 0o600), ("0660", 0o660), ("660", 0o660), ("0o620", 0o620)]
)
def test_parse_mode(value: int | str, expected: int) -> None:
    assert parse_mode(value) == expected


@pytest.mark.parametrize("value", ["0999", "rw-rw----", 0o1777, 0o400, "0060"])
def test_parse_mode_rejects(value: int | str) -> None:
    with pytest.raises(ConfigError):
        parse_mode(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("a" * 253 + ":9464", ("a" * 253, 9464)),  # DNS's longest name
    ],
)
def test_parse_address(value: str, expected: tuple[str, int]) -> None:
    assert parse_address(value) == expected


@pytest.mark.parametrize(
    "value", ["", "host:", "host:http", "1.2.3.4:70000", "a" * 254 + ":9464", "a" * 5000 + ":1"]
)
def test_parse_address_rejects(value: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(value)


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"grace": -1.0}, "grace"),
        ({"state_interval": 0.0}, "state-interval"),
        ({"restore_grace": -1.0}, "restore-grace"),
        ({"restore_grace": 3601.0}, "restore-grace"),
        ({"log_format": "xml"}, "log format"),
        ({"log_level": "loud"}, "log level"),
        ({"max_timers": 0}, "max-timers"),
        ({"max_timers_per_pid": 0}, "max-timers-per-pid"),
        ({"allow_signals": ["SIGNOPE"]}, "unknown signal"),
        ({"signal": "SIGNOPE"}, "unknown signal"),
        ({"signal": "0"}, "is not a signal number"),
        ({"signal": 32}, "not a signal of this platform"),
        ({"allow_uids": [-1]}, "--allow-uid: "),
        ({"fifo_group": "no-such-group-ftimer"}, "--fifo-group: unknown group"),
        ({"fifo_group": -1}, "--fifo-group: gid -1 must be at least 0"),
        ({"metrics_address": "host:70000"}, "port 70000 is out of range 0..65535"),
        ({"metrics_address": "host:http"}, "has no port number"),
    ],
)
def test_invalid_values(cli: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(cli, environ={})


# "\u00b2" ("²") is a digit to str.isdigit() but int() refuses it; "\u0662" (Arabic-Indic
# two) is one that int() accepts. Neither is a number in a config file or an option.
SUPERSCRIPT_TWO = "\u00b2"
ARABIC_TWO = "\u0662"


@pytest.mark.parametrize("text", [SUPERSCRIPT_TWO, ARABIC_TWO, "1" + SUPERSCRIPT_TWO])
def test_non_ascii_digits_are_not_numbers_to_any_parser(text: str) -> None:
    with pytest.raises(ConfigError, match="unknown signal"):
        parse_signal(text)
    with pytest.raises(ConfigError, match="not an octal mode"):
        parse_mode(text)
    with pytest.raises(ConfigError, match="unknown group"):
        parse_group(text)
    with pytest.raises(ConfigError, match="has no port number"):
        parse_address(text)
    with pytest.raises(ConfigError, match="has no port number"):
        parse_address("127.0.0.1:" + text)
    assert ascii_int(text) is None
    assert ascii_int(" 42 ") == 42


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("signal", f'"{SUPERSCRIPT_TWO}"', "unknown signal"),
        ("allow-signals", f'["{SUPERSCRIPT_TWO}"]', "unknown signal"),
        ("fifo-group", f'"{SUPERSCRIPT_TWO}"', "unknown group"),
        ("fifo-mode", f'"{SUPERSCRIPT_TWO}"', "not an octal mode"),
        ("metrics-address", f'"{SUPERSCRIPT_TWO}"', "has no port number"),
        ("max-timers", f'"{SUPERSCRIPT_TWO}"', "max-timers is a string; it takes a whole number"),
        ("max-timers-per-pid", f'"{SUPERSCRIPT_TWO}"', "is a string; it takes a whole number"),
        ("allow-uids", f'["{SUPERSCRIPT_TWO}"]', "allow-uids[0] is a string; it takes a whole"),
    ],
)
def test_non_ascii_digits_in_the_config_file_are_config_errors(
    tmp_path: pathlib.Path, key: str, value: str, message: str
) -> None:
    path = write(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert message in str(info.value)
    assert path in str(info.value)  # the error names the file
    assert key in str(info.value)  # and the key


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("allow-uids", "allows no user's timers"),
        ("allow-signals", "allows no signal (only report-only timers)"),
    ],
)
def test_an_empty_allow_list_fails_closed(tmp_path: pathlib.Path, key: str, message: str) -> None:
    path = write(tmp_path, f"{key} = []\n")
    with pytest.raises(ConfigError) as info:
        resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert str(info.value).startswith(f"config file {path}: {key}: an empty list")
    assert message in str(info.value)
    # The same from a caller passing the settings directly (argparse cannot: the options
    # are repeatable, so they are absent or hold at least one value).
    with pytest.raises(ConfigError, match="an empty list"):
        resolve_config({key.replace("-", "_"): []}, environ={})


def test_file_errors_name_the_file_and_the_key_command_line_errors_the_option(
    tmp_path: pathlib.Path,
) -> None:
    path = write(tmp_path, 'fifo-group = "no-such-group-ftimer"\ngrace = -1.0\n')
    file = load_config_file(path)
    with pytest.raises(ConfigError) as info:
        resolve_config({"grace": 1.0}, file, environ={}, config_file=path)
    assert str(info.value).startswith(f"config file {path}: fifo-group: unknown group")
    assert "the group must exist" in str(info.value)
    with pytest.raises(ConfigError) as info:
        resolve_config({"fifo_group": "4242"}, file, environ={}, config_file=path)
    assert (
        str(info.value)
        == f"config file {path}: grace: -1.0 must be between 0.001 and 86400 seconds"
    )
    with pytest.raises(ConfigError, match=r"^--grace: -2.0 must be between 0.001 and 86400"):
        resolve_config({"grace": -2.0, "fifo_group": "4242"}, file, environ={})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # Accepted before, though no setting means anything there.
        ("grace = 1e-300", "1e-300 must be between 0.001 and 86400 seconds"),
        ("grace = 0", "0.0 must be between 0.001 and 86400 seconds"),
        (
            "max-timers = 9223372036854775807",
            "9223372036854775807 must be at most 2147483647 timers",
        ),
        ("max-timers-per-pid = 2147483648", "2147483648 must be at most 2147483647 timers"),
        ("incidents-keep = 2147483648", "2147483648 must be at most 2147483647 incidents"),
        ("allow-uids = [1000, 1099511627776]", "uid 1099511627776 must be at most 4294967294"),
        ("allow-uids = [4294967295]", "uid 4294967295 must be at most 4294967294"),
        (
            'core-max-bytes = "99999999999999999999T"',
            "99999999999999999999T must be at most 9223372036854775807 bytes",
        ),
        (
            "incidents-max-bytes = 9223372036854775808",
            "9223372036854775808 must be at most 9223372036854775807 bytes",
        ),
        # Refused before, with the same helper's words now.
        ('fifo-group = "4294967295"', "gid 4294967295 must be at most 4294967294"),
        ("allow-uids = [-1]", "uid -1 must be at least 0"),
        ("state-interval = nan", "nan must be between 0.01 and 60 seconds"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_key_and_the_range(
    tmp_path: pathlib.Path, line: str, message: str
) -> None:
    path = write(tmp_path, line + "\n")
    key = line.partition(" = ")[0]
    with pytest.raises(ConfigError) as info:
        resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert str(info.value) == f"config file {path}: {key}: {message}"


def test_numbers_at_the_ends_of_their_ranges_are_accepted(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """
grace = 0.001
max-timers = 2147483647
max-timers-per-pid = 1
allow-uids = [0, 4294967294]
fifo-group = 4294967294
incidents-keep = 2147483647
incidents-max-bytes = 9223372036854775807
core-max-bytes = "8388607T"
""",
    )
    config = resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert (config.grace, config.max_timers, config.max_timers_per_pid) == (0.001, 2**31 - 1, 1)
    assert (config.allow_uids, config.fifo_group) == (frozenset({0, 2**32 - 2}), 2**32 - 2)
    assert (config.incidents_keep, config.incidents_max_bytes) == (2**31 - 1, 2**63 - 1)
    assert config.core_max_bytes == 8388607 << 40  # 8 EiB less 1 TiB


def test_metrics_without_prometheus_client_are_refused_when_the_daemon_is_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    advice = (
        "metrics need prometheus_client (the ftimer-server[metrics] extra): "
        "pip install prometheus_client"
    )
    with pytest.raises(ConfigError) as info:
        resolve_config({"metrics_address": "9464"}, environ={}, starting=True)
    assert str(info.value) == f"--metrics-address: {advice}"
    path = write(tmp_path, 'metrics-address = "9464"\n')
    file = load_config_file(path)
    with pytest.raises(ConfigError) as info:
        resolve_config({}, file, environ={}, config_file=path, starting=True)
    assert str(info.value) == f"config file {path}: metrics-address: {advice}"
    # `status` and `incidents` read the same file and serve no metrics.
    config = resolve_config({}, file, environ={}, config_file=path)
    assert config.metrics_address == ("127.0.0.1", 9464)


def test_a_decimal_fifo_mode_in_toml_is_explained(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "fifo-mode = 660\n")
    with pytest.raises(ConfigError, match=r'decimal number: write the octal mode as "0660"'):
        resolve_config({}, load_config_file(path), environ={}, config_file=path)


def test_group_by_name_or_number() -> None:
    name = grp.getgrgid(os.getegid()).gr_name
    assert resolve_config({"fifo_group": name}, environ={}).fifo_group == os.getegid()
    assert resolve_config({"fifo_group": "12345"}, environ={}).fifo_group == 12345


def test_signal_override_and_its_default_grace(tmp_path: pathlib.Path) -> None:
    file = load_config_file(write(tmp_path, 'signal = "SIGTERM"\n'))
    config = resolve_config({}, file, environ={})
    assert (config.signal, config.grace) == (signal.SIGTERM, DEFAULT_GRACE)
    assert resolve_config({"signal": "15", "grace": 2.5}, environ={}).grace == 2.5
    assert resolve_config({"signal": "KILL"}, environ={}).grace is None  # nothing to escalate
    assert resolve_config({}, environ={}).signal is None
    assert resolve_config({}, environ={}).grace is None
    with pytest.raises(ConfigError, match="signal is a boolean; it takes a whole number or"):
        load_config_file(write(tmp_path, "signal = true\n"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("fifo", "is a FIFO, not a regular file"),
        ("directory", "is a directory, not a regular file"),
        ("/dev/null", "is a character device, not a regular file"),
        ("huge", f"is larger than {MIB} bytes"),
    ],
)
def test_only_a_regular_file_of_at_most_1_mib_is_read(
    tmp_path: pathlib.Path, kind: str, message: str
) -> None:
    path = tmp_path / "ftimer.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "/dev/null":
        path.symlink_to("/dev/null")  # /dev/zero in a daemon below, under a memory limit
    else:  # valid TOML, only too much of it
        path.write_text("# a comment\n" * (MIB // 12 + 1))
    outcome = unblocked(lambda: load_config_file(str(path)), path)
    assert isinstance(outcome, ConfigError), outcome
    assert str(outcome) == f"config file {path} {message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'log-level = "\xff"\n', "is not UTF-8 text: byte 13 is b'\\xff'"),
        (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "arrays or tables nested too deeply"),
        (b"x = " + b"{a=" * 3000 + b"1" + b"}" * 3000 + b"\n", "nested too deeply"),
    ],
)
def test_undecodable_or_too_deep_files_are_config_errors(
    tmp_path: pathlib.Path, data: bytes, message: str
) -> None:
    path = tmp_path / "ftimer.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path))
    assert str(info.value).startswith(f"config file {path} ")
    assert message in str(info.value)


PATH_KEYS = ["fifo", "control-socket", "state-file", "log-file", "incident-dir"]


@pytest.mark.parametrize("key", PATH_KEYS)
def test_an_empty_path_is_an_error_naming_the_key(tmp_path: pathlib.Path, key: str) -> None:
    # "" is no working directory: a state file there had the whole directory set aside.
    path = write(tmp_path, f'{key} = ""\n')
    with pytest.raises(ConfigError) as info:
        resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert str(info.value) == f"config file {path}: {key}: the path is empty"
    option = f"--{key}"
    with pytest.raises(ConfigError, match=f"^{option}: the path is empty$"):
        resolve_config({key.replace("-", "_"): ""}, environ={})


def test_an_empty_socket_in_the_file_is_no_socket(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, 'socket = ""\n')
    config = resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert config.socket is None


@pytest.mark.parametrize("key", [*PATH_KEYS, "socket"])
def test_a_nul_byte_in_a_path_is_an_error_naming_the_key(tmp_path: pathlib.Path, key: str) -> None:
    path = write(tmp_path, f'{key} = "/tmp/a\\u0000b"\n')
    with pytest.raises(ConfigError) as info:
        resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert (
        str(info.value) == f"config file {path}: {key}: the path '/tmp/a\\x00b' contains a NUL byte"
    )


def test_a_nul_byte_in_a_group_name_is_an_unknown_group() -> None:
    with pytest.raises(ConfigError, match="unknown group 'a\\\\x00b'"):
        resolve_config({"fifo_group": "a\0b"}, environ={})


def test_socket_paths_longer_than_af_unix_allows_are_refused() -> None:
    short = "/srv/ftimer/timer.fifo"
    long_dir = "/srv/" + "d" * 96  # a FIFO fits; the sockets beside it do not
    control = long_dir + "/status.sock"  # 113 bytes
    with pytest.raises(ConfigError) as info:
        resolve_config({"control_socket": control}, environ={})
    assert str(info.value) == (
        f"--control-socket: {control} is 113 bytes long; a socket's path may be at most 107 bytes"
    )
    with pytest.raises(ConfigError, match=r"^--socket: .* a socket's path may be at most 107"):
        resolve_config({"fifo": short, "socket": long_dir + "/timer.socket"}, environ={})
    fifo = long_dir + "/t.fifo"
    with pytest.raises(ConfigError) as info:
        resolve_config({"fifo": fifo, "socket": ""}, environ={})
    assert str(info.value).startswith(f"the control socket beside the FIFO: {fifo}.sock is ")
    assert str(info.value).endswith(": give a shorter FIFO path, or --control-socket")
    with pytest.raises(ConfigError) as info:
        resolve_config({"fifo": fifo, "control_socket": "/srv/s.sock"}, environ={})
    assert str(info.value).startswith("the socket beside the FIFO: ")
    assert str(info.value).endswith(": give a shorter FIFO path, or --socket PATH or --no-socket")
    # Told where the sockets go, a FIFO there is fine.
    config = resolve_config(
        {"fifo": fifo, "control_socket": "/srv/s.sock", "socket": ""}, environ={}
    )
    assert (config.fifo, config.control_socket, config.socket) == (fifo, "/srv/s.sock", None)
    exactly = "/" + "s" * 106  # 107 bytes: the most AF_UNIX takes
    assert resolve_config({"control_socket": exactly}, environ={}).control_socket == exactly


def run_cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """``ftimer-server ARGS`` in ``cwd``; at most 512 MiB of address space, so a config
    read without bound (/dev/zero) fails fast instead of filling the machine's memory."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))

    return subprocess.run(
        [PYTHON, "-m", "ftimer_server", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,  # a daemon that blocks or starts is killed, and the test fails
        cwd=cwd,
        preexec_fn=limit_memory,
    )


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not UTF-8", "is not UTF-8 text: byte 13 is b'\\xff'"),
        ("nested", "is not valid TOML: arrays or tables nested too deeply"),
        (
            "a mode as in chmod",
            "is not valid TOML: Expected newline or end of document after a statement (at "
            'line 1, column 14) (TOML has no numbers with a leading zero: write a mode as "0620" '
            "or 0o620)",
        ),
        ("FIFO", "is a FIFO, not a regular file"),
        ("/dev/zero", "is a character device, not a regular file"),
    ],
)
def test_a_bad_config_file_at_start_is_one_line_and_exit_2(
    short_dir: pathlib.Path, kind: str, message: str
) -> None:
    config = short_dir / "ftimer.toml"
    if kind == "not UTF-8":
        config.write_bytes(b'log-level = "\xff"\n')
    elif kind == "nested":
        config.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "a mode as in chmod":
        config.write_text("fifo-mode = 0620\n")
    elif kind == "FIFO":
        os.mkfifo(config)  # open() would wait for a writer
    else:
        config.symlink_to("/dev/zero")  # read() would never end
    result = run_cli("run", "-c", str(config), "--fifo", str(short_dir / "t.fifo"), cwd=short_dir)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"ftimer-server: error: config file {config} {message}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--state-file", ""], "ftimer-server: error: --state-file: the path is empty\n"),
        (["--control-socket", ""], "ftimer-server: error: --control-socket: the path is empty\n"),
        (
            ["-c", ""],
            "argument -c/--config: the path is empty (see ftimer-server run --help)\n",
        ),
        (
            ["--socket", ""],
            "argument --socket: the path is empty (for the FIFO alone, give --no-socket) "
            "(see ftimer-server run --help)\n",
        ),
    ],
)
def test_an_empty_path_is_a_usage_error_and_the_working_directory_is_untouched(
    short_dir: pathlib.Path, args: list[str], message: str
) -> None:
    cwd = short_dir / "work"
    cwd.mkdir()
    (cwd / "precious").write_bytes(b"precious")
    result = run_cli(
        "run", "--fifo", str(short_dir / "t.fifo"), "--capture", "none", *args, cwd=cwd
    )
    assert result.returncode == 2
    assert result.stderr.endswith(message)
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in short_dir.iterdir()) == ["work"]  # nothing set aside
    assert sorted(p.name for p in cwd.iterdir()) == ["precious"]


def test_no_socket_still_means_the_fifo_alone(spawn: Spawn) -> None:
    d = spawn("--no-socket", "--capture", "none").ready()
    assert d.status()["socket"] is None
    assert d.stop() == 0


@pytest.mark.parametrize("kind", ["not UTF-8", "nested", "FIFO"])
def test_sighup_with_a_bad_config_file_is_logged_and_the_daemon_runs_on(
    spawn: Spawn, short_dir: pathlib.Path, kind: str
) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text('capture = "none"\n')
    d = spawn("-c", str(config)).ready()
    config.unlink()
    if kind == "not UTF-8":
        config.write_bytes(b'log-level = "\xff"\n')
    elif kind == "nested":
        config.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "a mode as in chmod":
        config.write_text("fifo-mode = 0620\n")
    else:
        os.mkfifo(config)  # open() would wait for a writer, on the thread that handles SIGTERM
    d.proc.send_signal(signal.SIGHUP)
    error = d.wait_for_record(where=lambda r: r["msg"].startswith("config not reloaded: "))
    assert error["level"] == "error"
    assert f"config file {config} " in error["msg"]
    assert d.proc.poll() is None
    assert d.status()["healthy"]
    assert d.stop() == 0  # SIGTERM is still heard


def test_the_restore_grace_is_an_option_the_server_is_given(
    tmp_path: pathlib.Path, text_log: Any
) -> None:
    # A worker whose client cannot re-send within 1.5 s (a long C call holding the GIL as
    # the daemon comes back) was reaped for a disarm it wrote during the outage, and the
    # grace could not be raised.
    from ftimer_server.daemon._daemon import Daemon

    assert resolve_config({}, environ={}).restore_grace == 1.5
    path = write(tmp_path, "restore-grace = 10\n")
    config = resolve_config({}, load_config_file(path), environ={}, config_file=path)
    assert config.restore_grace == 10.0
    config = resolve_config({"restore_grace": 30.0}, environ={})
    daemon = Daemon(config, text_log, environ={})
    server = daemon._new_server(None, None)
    try:
        assert server._restore_grace == 30.0  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_overridden_names_the_options_that_hide_another_value_of_the_file(
    tmp_path: pathlib.Path,
) -> None:
    config = tmp_path / "ftimer.toml"
    config.write_text('log-level = "debug"\ngrace = 5\nfifo = "timer.fifo"\nmax-timers = 9\n')
    settings = load_config_file(str(config))

    def hidden(cli: Dict[str, Any], settings: FileSettings) -> List[str]:
        applied = resolve_config(cli, settings, config_file=str(config))
        return overridden(cli, settings, str(config), applied)

    cli = {"log_level": "info", "grace": 5.0, "fifo": str(tmp_path / "timer.fifo")}
    # The same value (a path as the file's directory makes it) hides nothing.
    assert hidden(cli, settings) == ["--log-level"]
    with_max = hidden({**cli, "max_timers": 10}, settings)
    assert sorted(with_max) == ["--log-level", "--max-timers"]
    assert hidden({}, settings) == []
    # Compared as they apply: another spelling of a value is the same value.
    config.write_text('log-level = "INFO"\nsignal = "SIGTERM"\nfifo = "timer.fifo"\n')
    cli = {"log_level": "info", "signal": "TERM", "fifo": str(tmp_path / "timer.fifo")}
    assert hidden(cli, load_config_file(str(config))) == []


@pytest.mark.parametrize(
    "key",
    [
        "fifo-mode",
        "fifo-group",
        "metrics-address",
        "incidents-max-bytes",
        "log-format",
        "signal",
        "job-label",
        "x" * 5000,  # no such setting
    ],
)
def test_an_error_quotes_a_value_thousands_of_characters_long_cut(
    tmp_path: pathlib.Path, key: str
) -> None:
    # The whole value was quoted: a 10 KB message in the log, `status` and STATUS=.
    path = write(tmp_path, f'{key} = "{"x" * 5000}"\n')
    with pytest.raises(ConfigError) as e:
        resolve_config({"fifo": str(tmp_path / "t.fifo")}, load_config_file(path))
    assert len(str(e.value)) < 400, str(e.value)
    assert "xxxxxxxx" in str(e.value)  # enough of it is shown to know it


def test_an_error_quotes_a_port_thousands_of_digits_long_cut(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, f'metrics-address = "127.0.0.1:{"9" * 5000}"\n')
    with pytest.raises(ConfigError, match="is out of range") as e:
        resolve_config({"fifo": str(tmp_path / "t.fifo")}, load_config_file(path))
    assert len(str(e.value)) < 400, str(e.value)
