"""The daemon's incident settings: defaults, the config file and the command line,
validation that names the option or the file and key, and the commented example."""

from __future__ import annotations

import pathlib
import re
from typing import Any, Dict, List

import pytest

from ftimer_server.daemon._cli import _parser
from ftimer_server.daemon._config import (
    SETTING_NAMES,
    ConfigError,
    DaemonConfig,
    default_incident_dir,
    load_config_file,
    parse_size,
    resolve_config,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIB, GIB = 1 << 20, 1 << 30


def from_argv(*argv: str) -> DaemonConfig:
    """Settings as ``ftimer-server run ARGV`` resolves them (without running)."""
    args = _parser().parse_args(["run", "--fifo", "/srv/f/timer.fifo", *argv])
    cli = {k: v for k, v in vars(args).items() if k in SETTING_NAMES}
    return resolve_config(cli, environ={})


def from_file(tmp_path: pathlib.Path, text: str, **cli: Any) -> DaemonConfig:
    path = tmp_path / "ftimer.toml"
    path.write_text('fifo = "/srv/f/timer.fifo"\n' + text)
    return resolve_config(cli, load_config_file(str(path)), environ={}, config_file=str(path))


def test_defaults() -> None:
    config = from_argv()
    assert (
        config.incident_dir,
        config.incidents_keep,
        config.incidents_max_bytes,
        config.capture,
        config.capture_timeout,
        config.py_spy_native,
        config.core,
        config.core_max_bytes,
        config.reap_tree,
        config.job_label,
    ) == ("/srv/f/incidents", 200, 256 * MIB, "auto", 3.0, False, False, 4 * GIB, False, "job")


def test_the_incident_directory_defaults_beside_the_state_file_else_the_fifo() -> None:
    assert from_argv("--state-file", "/var/lib/ftimer/state.json").incident_dir == (
        "/var/lib/ftimer/incidents"
    )
    assert default_incident_dir("/run/ftimer/timer.fifo") == "/run/ftimer/incidents"
    # A config built in code gets the same default as one resolved from options.
    assert DaemonConfig(fifo="/a/t.fifo").incident_dir == "/a/incidents"
    assert DaemonConfig(fifo="/a/t.fifo", state_file="/b/s.json").incident_dir == "/b/incidents"
    assert DaemonConfig(fifo="/a/t.fifo", incident_dir="/c").incident_dir == "/c"


def test_every_setting_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/tmp")
    config = from_argv(
        "--incident-dir",
        "rel/incidents",
        "--incidents-keep",
        "7",
        "--incidents-max-bytes",
        "64M",
        "--capture",
        "hook",
        "--capture-timeout",
        "0.5",
        "--py-spy-native",
        "--core",
        "--core-max-bytes",
        "2GiB",
        "--reap-tree",
        "--job-label",
        "run_id",
    )
    assert config.incident_dir == "/tmp/rel/incidents"
    assert (config.incidents_keep, config.incidents_max_bytes) == (7, 64 * MIB)
    assert (config.capture, config.capture_timeout) == ("hook", 0.5)
    assert (config.py_spy_native, config.core, config.core_max_bytes) == (True, True, 2 * GIB)
    assert (config.reap_tree, config.job_label) == (True, "run_id")


def test_every_setting_from_the_file_and_the_command_line_wins(tmp_path: pathlib.Path) -> None:
    text = """
incident-dir = "/var/lib/ftimer/incidents"
incidents-keep = 50
incidents-max-bytes = 1048576
capture = "PY-SPY"
capture-timeout = 5
py-spy-native = true
core = true
core-max-bytes = "1 GB"
reap-tree = true
job-label = ""
"""
    config = from_file(tmp_path, text)
    assert config.incident_dir == "/var/lib/ftimer/incidents"
    assert (config.incidents_keep, config.incidents_max_bytes) == (50, MIB)
    assert (config.capture, config.capture_timeout) == ("py-spy", 5.0)
    assert (config.py_spy_native, config.core, config.core_max_bytes) == (True, True, GIB)
    assert config.reap_tree
    assert config.job_label is None  # "" names no label: no peers
    wins = from_file(tmp_path, text, capture="auto", core=False, reap_tree=False, job_label="j")
    assert (wins.capture, wins.core, wins.reap_tree, wins.job_label) == ("auto", False, False, "j")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("3 MB", 3 * MIB),
        ("256M", 256 * MIB),
        ("4GiB", 4 * GIB),
        ("1T", 1 << 40),
        ("10B", 10),
        (" 2 G ", 2 * GIB),
    ],
)
def test_sizes(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "M", "1.5G", "-1", "1 PB", "1e9", "٤", 0, -5, "0K"])
def test_sizes_refused(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"is not a size|must be at least 1 byte"):
        parse_size(value)


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"capture_timeout": 0.01}, r"--capture-timeout: 0.01 must be between 0.05 and 60 seconds"),
        ({"capture_timeout": 61.0}, r"--capture-timeout: 61.0 must be between 0.05 and 60"),
        ({"incidents_keep": 0}, r"--incidents-keep: 0 must be at least 1 incident$"),
        ({"incidents_max_bytes": "lots"}, r"--incidents-max-bytes: 'lots' is not a size"),
        ({"core_max_bytes": "0"}, r"--core-max-bytes: 0 must be at least 1 byte"),
        ({"capture": "gdb"}, r"--capture: capture method 'gdb' is not one of auto, py-spy"),
        ({"job_label": "1job"}, r"--job-label: '1job' is not a label name"),
        ({"job_label": "job-id"}, r"--job-label: 'job-id' is not a label name"),
        ({"job_label": "job\n"}, r"--job-label: 'job\\n' is not a label name"),
        (
            {"core": True, "capture": "none"},
            r'--core: a core file is a capture, and --capture says "none"',
        ),
        # The tree is signalled by an incident's reap: it was silently not signalled.
        (
            {"reap_tree": True, "capture": "none"},
            r"--reap-tree: the worker's descendants are signalled after an incident's "
            r'capture, and --capture says "none": set capture to "facts"',
        ),
    ],
)
def test_invalid_values_name_the_option(cli: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config({"fifo": "/srv/f/timer.fifo", **cli}, environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('capture = "pyspy"', r"ftimer.toml: capture: capture method 'pyspy' is not one of"),
        ("capture-timeout = 0", r"ftimer.toml: capture-timeout: 0.0 must be between 0.05"),
        ('incidents-max-bytes = "1 PB"', r"ftimer.toml: incidents-max-bytes: '1 PB' is not a"),
        ('capture-timeout = "3"', r"ftimer.toml: capture-timeout is a string; it takes a number"),
        ("core = 1", r"ftimer.toml: core is a whole number; it takes true or false"),
        ("incident-directory = '/x'", r"ftimer.toml: there is no setting 'incident-directory' \("),
        ("job-label = 'rank id'", r"ftimer.toml: job-label: 'rank id' is not a label name"),
        (
            'reap-tree = true\ncapture = "none"',
            r"ftimer.toml: reap-tree: the worker's descendants are signalled after an "
            r"incident's capture, and config file .*ftimer.toml: capture says \"none\"",
        ),
        (
            'core = true\ncapture = "none"',
            r"ftimer.toml: core: a core file is a capture, and config file .*ftimer.toml: "
            r'capture says "none"',
        ),
    ],
)
def test_invalid_values_name_the_file_and_key(
    tmp_path: pathlib.Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        from_file(tmp_path, text)


def test_a_bad_capture_method_on_the_command_line_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["run", "--capture", "gdb"])
    assert exit_.value.code == 2
    assert "invalid choice: 'gdb'" in capsys.readouterr().err


def test_choices_are_taken_in_any_case_on_the_command_line_as_in_the_file() -> None:
    # `log-level = "INFO"` was taken in the config file, `--log-level INFO` refused.
    args = _parser().parse_args(
        ["run", "--log-level", "INFO", "--log-format", "Json", "--capture", "Py-Spy"]
    )
    assert (args.log_level, args.log_format, args.capture) == ("info", "json", "py-spy")


def test_run_help_documents_every_incident_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, words in [
        ("--capture {auto,py-spy,hook,facts,none}", "none: capture nothing and write no incident"),
        ("--capture-timeout SECONDS", "0.05..60 (default 3)"),
        ("--incident-dir DIR", "default: incidents/ beside the state file, else beside the FIFO"),
        ("--incidents-keep N", "(default 200)"),
        ("--incidents-max-bytes SIZE", "the newest is always kept"),
        ("--job-label LABEL", '"" for none'),
        ("--py-spy-native, --no-py-spy-native", "native (C/C++) frames"),
        ("--core, --no-core", "gcore before the kill"),
        ("--core-max-bytes SIZE", "(bytes, or K, M, G, T; default 4G)"),
        ("--reap-tree, --no-reap-tree", "signal the worker's descendants too"),
    ]:
        assert option in text
        assert words in text, words


def test_the_example_config_documents_every_incident_key_with_its_default(
    tmp_path: pathlib.Path,
) -> None:
    example = (ROOT / "docs/examples/ftimer.toml").read_text()
    keys = [
        "capture",
        "capture-timeout",
        "incident-dir",
        "incidents-keep",
        "incidents-max-bytes",
        "job-label",
        "py-spy-native",
        "core",
        "core-max-bytes",
        "reap-tree",
    ]
    commented: List[str] = [
        line[2:]
        for line in example.splitlines()
        if re.match(r"# [a-z-]+ = ", line) and line[2:].split(" =")[0] in keys
    ]
    assert sorted(line.split(" =")[0] for line in commented) == sorted(keys)
    # Uncommented, they are valid and (the directory aside) the defaults.
    config = from_file(tmp_path, "\n".join(commented) + "\n")
    defaults = from_argv()
    for key in keys:
        name = key.replace("-", "_")
        if name != "incident_dir":
            assert getattr(config, name) == getattr(defaults, name), key
    assert config.incident_dir == "/var/lib/ftimer/incidents"
