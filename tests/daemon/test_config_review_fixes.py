"""The daemon's configuration as a careless operator writes it: a path of another user's
home (`~user/...`), a SIGHUP while the daemon starts, a file the daemon writes that is
its config file behind a symlink. Real daemons; no timer is armed, they signal nothing."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Callable

import pytest

from ftimer_server.daemon._config import ConfigError, load_config_file, resolve_config

from .conftest import PATIENCE, PYTHON, DaemonProcess

# -- 1. a path starting with "~user" is silently taken relative to the config's directory


@pytest.mark.parametrize("key", ["state-file", "log-file", "fifo", "incident-dir"])
def test_a_tilde_user_path_in_the_config_file_is_refused(short_dir: pathlib.Path, key: str) -> None:
    # docs/deploy.md: a path "never starts with `~` (no shell expands it: give the home
    # directory's path whole)". "~/x" is refused; "~root/x" became <config dir>/~root/x.
    conf = short_dir / "ftimer.toml"
    conf.write_text(f'{key} = "~root/ftimer/x"\n')
    with pytest.raises(ConfigError, match="~"):
        resolve_config(
            {"fifo": str(short_dir / "t.fifo")} if key != "fifo" else {},
            load_config_file(str(conf)),
            config_file=str(conf),
        )


def test_check_config_refuses_a_tilde_user_state_file(short_dir: pathlib.Path) -> None:
    conf = short_dir / "ftimer.toml"
    conf.write_text('state-file = "~root/state.json"\n')
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftimer_server",
            "run",
            "-c",
            str(conf),
            "--fifo",
            str(short_dir / "t.fifo"),
            "--check-config",
        ],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    # Exit 0 and "state-file: <short_dir>/~root/state.json" today.
    assert r.returncode == 2, r.stdout + r.stderr
    assert "~" in r.stderr


# -- 2. a SIGHUP that arrives while `run` reads its config at start-up kills the daemon

SIGHUP_WHILE_READING_CONFIG = r"""
import os, signal, sys
from ftimer_server.daemon import _cli
real = _cli.load_config_file
def reading(path):
    # what `kill -HUP` (logrotate, an operator) does if it lands during the start-up
    os.kill(os.getpid(), signal.SIGHUP)
    return real(path)
_cli.load_config_file = reading
sys.exit(_cli.main(sys.argv[1:]))
"""


def test_a_sighup_while_the_daemon_starts_is_one_reload_once_started(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    # Its default action ended the daemon a `kill -HUP` (logrotate, an operator) meant
    # to reload, when it came before the daemon's own handler.
    conf = short_dir / "ftimer.toml"
    conf.write_text('log-level = "info"\n')
    d = spawn("-c", str(conf), command=[PYTHON, "-c", SIGHUP_WHILE_READING_CONFIG])
    d.ready()
    d.wait_for_record(where=lambda r: r["msg"] == f"config reloaded from {conf}")
    assert d.stop() == 0


# -- 3. a file the daemon writes may be the config file when the config is read via a symlink


@pytest.mark.parametrize("option", ["--log-file", "--state-file"])
def test_no_file_the_daemon_writes_is_the_config_file_behind_its_symlink(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path, option: str
) -> None:
    # docs/deploy.md: "no file the daemon writes (the state file, the log file, ...) may be
    # the config file itself". Given the config's own path it is refused (exit 2); given
    # the file a symlinked config (a ConfigMap, a versioned /etc) points to, it was taken,
    # and the daemon wrote its log (or state) into its config: the next SIGHUP failed and
    # the next start was refused (exit 2, "not valid TOML").
    (short_dir / "real").mkdir()
    (short_dir / "etc").mkdir()
    target = short_dir / "real" / "ftimer.toml"
    text = 'log-level = "info"\n'
    target.write_text(text)
    link = short_dir / "etc" / "ftimer.toml"
    link.symlink_to("../real/ftimer.toml")
    d = spawn("-c", str(link), option, str(target))
    assert d.proc.wait(PATIENCE) == 2  # refused, as for the config file's own path
    assert target.read_text() == text, "the daemon wrote into (or moved) its own config file"
