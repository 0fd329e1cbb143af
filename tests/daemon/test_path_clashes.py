"""The daemon's files must be different paths: two at one path clobber each other (the
state file saved over the FIFO, the log appended to the state file, ...)."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
from typing import Any, Callable, Dict

import pytest

from ftimer_server.daemon._config import ConfigError, FileSettings, resolve_config

from .conftest import PATIENCE, PYTHON, DaemonProcess

FIFO = "/srv/t/timer.fifo"


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        (
            {"state_file": FIFO},
            f"--fifo and --state-file are the same path {FIFO}",
        ),
        (
            {"state_file": "/srv/t/timer.socket"},
            "the default --socket and --state-file are the same path /srv/t/timer.socket",
        ),
        (
            {"socket": "/srv/s.sock", "state_file": "/srv/s.sock"},
            "--socket and --state-file are the same path /srv/s.sock",
        ),
        (
            {"state_file": FIFO + ".sock"},
            f"the default --control-socket and --state-file are the same path {FIFO}.sock",
        ),
        (
            {"control_socket": "/srv/t/timer.socket"},
            "--control-socket and the default --socket are the same path /srv/t/timer.socket",
        ),
        (
            {"state_file": FIFO + ".lock"},
            "the FIFO's lock file (the FIFO + .lock) and --state-file are the same path "
            f"{FIFO}.lock",
        ),
        (
            {"socket": FIFO + ".lock"},
            f"the FIFO's lock file (the FIFO + .lock) and --socket are the same path {FIFO}.lock",
        ),
        (
            {"state_file": "/srv/state.json", "log_file": "/srv/x/../state.json"},
            "--state-file and --log-file are the same path /srv/state.json",
        ),
        (
            {"log_file": FIFO},
            f"--fifo and --log-file are the same path {FIFO}",
        ),
        (
            {"state_file": "/srv/state.json", "log_file": "/srv/state.json.lock"},
            "the state file's lock file (the state file + .lock) and --log-file are the same "
            "path /srv/state.json.lock",
        ),
        (
            {"state_file": "/srv/state.json", "log_file": "/srv/state.json.journal.7"},
            "--log-file /srv/state.json.journal.7 is a segment of the state file's journal "
            "(/srv/state.json.journal.N)",
        ),
        # The incident directory, made at the start: at the state file's path, the daemon
        # ran with no save possible; at the FIFO's, it was left and refused every start.
        (
            {"state_file": "/srv/state.json", "incident_dir": "/srv/state.json"},
            "--state-file and --incident-dir are the same path /srv/state.json",
        ),
        (
            {"incident_dir": FIFO},
            f"--fifo and --incident-dir are the same path {FIFO}",
        ),
        (
            {"incident_dir": "/srv/t/timer.socket"},
            "the default --socket and --incident-dir are the same path /srv/t/timer.socket",
        ),
        (
            {"state_file": "/srv/t/incidents"},
            "--state-file and the default --incident-dir (incidents beside the state file, "
            "else the FIFO) are the same path /srv/t/incidents",
        ),
        (
            {"socket": "/srv/t/incidents"},
            "--socket and the default --incident-dir (incidents beside the state file, "
            "else the FIFO) are the same path /srv/t/incidents",
        ),
    ],
)
def test_two_files_at_one_path_are_refused(cli: Dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_config({"fifo": FIFO, **cli}, environ={})
    assert str(raised.value).startswith(message)


def test_no_incident_directory_clashes_without_captures() -> None:
    config = resolve_config({"fifo": FIFO, "state_file": "/srv/t/incidents", "capture": "none"})
    assert config.state_file == "/srv/t/incidents"


def test_a_clash_names_the_config_file_key() -> None:
    file = FileSettings(state_file=FIFO + ".sock")
    with pytest.raises(ConfigError, match=r"config file /etc/f\.toml: state-file are the same"):
        resolve_config({"fifo": FIFO}, file, environ={}, config_file="/etc/f.toml")


def test_a_clash_through_a_symlinked_directory_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    cli = {"fifo": str(tmp_path / "real/t.fifo"), "state_file": str(tmp_path / "alias/t.fifo")}
    with pytest.raises(ConfigError, match="--fifo and --state-file are the same path"):
        resolve_config(cli, environ={})


def test_distinct_paths_are_fine() -> None:
    cli = {
        "fifo": FIFO,
        "state_file": "/srv/t/state.json",
        "log_file": "/srv/t/state.json.journal",  # not a segment: no number
    }
    config = resolve_config(cli, environ={})
    assert config.state_file == "/srv/t/state.json"


def test_the_daemon_exits_2_before_touching_the_fifo(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "t.fifo"
    os.mkfifo(fifo, 0o600)
    result = subprocess.run(
        [PYTHON, "-m", "ftimer_server", "run", "--fifo", str(fifo), "--state-file", str(fifo)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,  # a daemon that starts is killed, and the test fails
        cwd=tmp_path,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"ftimer-server: error: --fifo and --state-file are the same path {fifo}: "
        "give each its own\n"
    )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not saved over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.fifo"]


def test_a_socket_path_that_cannot_be_used_is_called_a_socket(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    # It read "cannot start: FIFO <the socket's path>: ...".
    path = short_dir / "timer.socket"
    path.write_text("")
    d = spawn("--capture", "none")
    assert d.proc.wait(PATIENCE) == 3
    (record,) = [r for r in d.records() if r["level"] == "error"]
    assert record["msg"] == (
        f"cannot start: socket {path}: something other than a socket is there; not removing it"
    )
