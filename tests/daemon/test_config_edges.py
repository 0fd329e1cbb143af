"""The daemon's configuration at its edges, as a careless operator writes it: a setting at
the config file's own path, a command-line option that hides the file's value, a mode
written in decimal, a byte order mark, a path starting with ``~``."""

from __future__ import annotations

import pathlib
import subprocess
from typing import Callable

import pytest

from ftimer_server.daemon._config import ConfigError, load_config_file, resolve_config

from .conftest import PATIENCE, PYTHON, DaemonProcess

Spawn = Callable[..., DaemonProcess]


def write(directory: pathlib.Path, text: str, name: str = "ftimer.toml") -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def run_cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ftimer_server", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,  # a daemon that starts instead is killed, and the test fails
        cwd=cwd,
    )


@pytest.mark.parametrize("key", ["state-file", "log-file"])
def test_a_setting_at_the_config_files_own_path_is_refused(
    tmp_path: pathlib.Path, key: str
) -> None:
    # state-file = <the config file>: the start set the config file aside as a corrupt
    # state file and saved the state over it; the next start (or SIGHUP) found JSON, not
    # TOML. log-file = <the config file>: the log was appended to it, with the same end.
    path = write(tmp_path, f'{key} = "ftimer.toml"\n')  # relative: the file's directory
    with pytest.raises(ConfigError) as info:
        resolve_config(
            {"fifo": str(tmp_path / "t.fifo")}, load_config_file(path), environ={}, config_file=path
        )
    assert key in str(info.value)
    assert "config file" in str(info.value)


def test_check_config_refuses_a_state_file_at_the_config_files_path(
    tmp_path: pathlib.Path,
) -> None:
    config = tmp_path / "ftimer.toml"
    text = 'fifo = "t.fifo"\nstate-file = "ftimer.toml"\ncapture = "none"\n'
    config.write_text(text)
    result = run_cli("run", "-c", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert "state-file" in result.stderr
    assert config.read_text() == text


def test_check_config_says_which_settings_of_the_file_the_command_line_hides(
    tmp_path: pathlib.Path,
) -> None:
    # The unit still says --dry-run from the roll-out; the operator sets dry-run = false
    # in the file and checks it: nothing says the file's value is not the one applied.
    config = tmp_path / "ftimer.toml"
    config.write_text('fifo = "t.fifo"\ndry-run = false\ncapture = "none"\n')
    result = run_cli("run", "-c", str(config), "--dry-run", "--check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dry-run: true" in result.stdout.splitlines()
    assert "--dry-run" in result.stderr  # as a reload's warning names it


def test_a_start_warns_of_settings_of_the_file_the_command_line_hides(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text('dry-run = false\ncapture = "none"\n')
    d = spawn("-c", str(config), "--dry-run").ready()
    try:
        assert d.status()["dry_run"] is True
        # Logged before READY=1 was sent; flushed at the latest by the stop.
        assert d.stop() == 0
        warned = [r for r in d.records() if r["level"] == "warning" and "--dry-run" in r["msg"]]
        assert warned, [r["msg"] for r in d.records()]
    finally:
        d.cleanup()


@pytest.mark.parametrize("written", ["440", "400"])
def test_a_decimal_fifo_mode_below_0o777_is_not_silently_another_mode(
    tmp_path: pathlib.Path, written: str
) -> None:
    # `fifo-mode = 660` is explained; `fifo-mode = 440` was taken as 0o670 (group rwx),
    # `fifo-mode = 400` as 0o620: a mode nobody wrote, with no word.
    path = write(tmp_path, f"fifo-mode = {written}\n")
    with pytest.raises(ConfigError, match=f"fifo-mode: FIFO mode {written} is a decimal number"):
        load_config_file(path)


def test_a_config_file_with_a_byte_order_mark_is_named(
    tmp_path: pathlib.Path,
) -> None:
    # Saved by an editor that writes a BOM: "Invalid statement (at line 1, column 1)".
    path = tmp_path / "ftimer.toml"
    path.write_bytes(b"\xef\xbb\xbfgrace = 5.0\n")
    with pytest.raises(ConfigError, match="byte order mark"):
        load_config_file(str(path))


@pytest.mark.parametrize("key", ["state-file", "log-file", "incident-dir"])
def test_a_path_starting_with_a_tilde_is_not_a_directory_named_tilde(
    tmp_path: pathlib.Path, key: str
) -> None:
    # "~/ftimer/state.json" became <the config's directory>/~/ftimer/state.json.
    path = write(tmp_path, f'{key} = "~/ftimer/x"\n')
    with pytest.raises(ConfigError, match=f"{key}.*~ is no home directory here"):
        resolve_config(
            {"fifo": str(tmp_path / "t.fifo")}, load_config_file(path), environ={}, config_file=path
        )


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (
            {"log_level": "warn"},
            "log level 'warn' is not one of debug, info, warning, error (did you mean 'warning'?)",
        ),
        (
            {"capture": "pyspy"},
            "capture method 'pyspy' is not one of auto, py-spy, hook, "
            "facts, none (did you mean 'py-spy'?)",
        ),
        ({"log_format": "yaml"}, "log format 'yaml' is not one of text, json"),
    ],
)
def test_a_setting_of_a_few_words_suggests_the_word_meant(
    tmp_path: pathlib.Path, given: dict, said: str
) -> None:
    # `log-level = "warn"` (logging's own abbreviation) was told the four words, no more.
    with pytest.raises(ConfigError) as refused:
        resolve_config({"fifo": str(tmp_path / "t.fifo"), **given}, None)
    assert said in str(refused.value)
