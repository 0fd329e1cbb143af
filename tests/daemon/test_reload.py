"""Changing the daemon's configuration: SIGHUP's reload, what it says when it fails or
leaves changes for a restart, and ``run --check-config``."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import signal
import subprocess
import threading
import urllib.request
from typing import Callable

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon._cli import format_status
from ftimer_server.daemon._config import ConfigError, DaemonConfig, load_config_file, resolve_config
from ftimer_server.daemon._daemon import Daemon
from ftimer_server.daemon._logging import LoggingSetup
from ftimer_server.daemon._systemd import MAX_STATUS

from .conftest import PATIENCE, PYTHON, DaemonProcess, Notifications

Spawn = Callable[..., DaemonProcess]

#: Past Python's limit on the digits int() reads (4300): int() raised ValueError.
HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (f'incidents-max-bytes = "{HUGE}"\n', "incidents-max-bytes"),
        (f'core-max-bytes = "{HUGE}"\n', "core-max-bytes"),
        (f'fifo-group = "{HUGE}"\n', "fifo-group"),
        (f'metrics-address = "{HUGE}"\n', "metrics-address"),
        (f'metrics-address = "127.0.0.1:{HUGE}"\n', "metrics-address"),
        # A TOML integer: the parser's own int() raised it, unnamed.
        (f"max-timers = {HUGE}\n", "has a number thousands of digits long"),
    ],
    ids=["size", "core size", "group", "port alone", "port", "toml integer"],
)
def test_a_number_thousands_of_digits_long_is_a_config_error(
    tmp_path: pathlib.Path, text: str, said: str
) -> None:
    # A ValueError, not a ConfigError: a start died with a traceback (a restart loop
    # under systemd), and a reload ended the daemon.
    path = tmp_path / "ftimer.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_config({"fifo": str(tmp_path / "t.fifo")}, load_config_file(str(path)))
    assert said in str(e.value)


def test_a_failed_reload_is_said_to_status_metrics_and_systemd_until_one_succeeds(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    pytest.importorskip("prometheus_client")
    config = short_dir / "ftimer.toml"
    config.write_text("dry-run = false\n")
    d = spawn("--config", str(config), "--metrics-address", "127.0.0.1:0").ready()
    url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))["msg"].split()[-1]

    def metric(name: str) -> float:
        with urllib.request.urlopen(url, timeout=PATIENCE) as r:
            body = r.read().decode()
        return float(next(ln for ln in body.splitlines() if ln.startswith(name + " ")).split()[1])

    def reload(text: str, said: str) -> None:
        config.write_text(text)
        d.notify.received.clear()
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING=1")
        d.notify.wait_for("READY=1")
        assert any(said in n for n in d.notify.received), d.notify.received

    assert metric("ftimer_config_last_reload_successful") == 1
    # Once a reload's ValueError ended the daemon.
    reload(f'incidents-max-bytes = "{HUGE}"\n', "STATUS=watching ")
    assert d.proc.poll() is None
    doc = d.status()
    assert doc["reload_failed"].startswith(f"config not reloaded: config file {config}: ")
    assert "incidents-max-bytes" in doc["reload_failed"]
    [status] = [n for n in d.notify.received if "STATUS=" in n]
    status_line = status.split("\n")[-1]
    assert status_line.startswith(f"STATUS=watching {d.fifo}; config not reloaded: config file")
    assert len(status_line) <= 7 + MAX_STATUS  # the value is quoted: systemd'd drop READY=1
    header = format_status(doc).splitlines()[0]
    assert ", RELOAD FAILED: config not reloaded: config file " in header
    assert metric("ftimer_config_last_reload_successful") == 0
    # Valid again, with a change that waits for a restart: said with its values.
    reload("dry-run = true\n", "a restart is needed to apply: dry-run (false -> true)")
    doc = d.status()
    assert (doc["reload_failed"], doc["restart_needed"]) == (None, ["dry-run (false -> true)"])
    assert doc["dry_run"] is False  # not half-applied
    text = format_status(doc)
    assert "RELOAD FAILED" not in text
    assert "config changes that need a restart: dry-run (false -> true)" in text.splitlines()
    assert metric("ftimer_config_last_reload_successful") == 1
    assert metric("ftimer_config_restart_needed") == 1
    warned = d.wait_for_record(where=lambda r: r["msg"].startswith("config changes that need"))
    assert warned["msg"].endswith("not applied: dry-run (false -> true)")
    assert d.stop() == 0


def test_sighups_read_together_reload_the_config_once(tmp_path: pathlib.Path) -> None:
    # A storm of SIGHUPs (a loop of `kill -HUP`) cost a full reload each: 6,500 a second
    # on the loop's thread, reaps 100 ms late.
    config = tmp_path / "ftimer.toml"
    config.write_text('log-level = "info"\n')
    stream = io.StringIO()
    setup = LoggingSetup("text", "info", stream=stream)
    daemon = Daemon(
        DaemonConfig(fifo=str(tmp_path / "t.fifo"), config_file=str(config)), setup, environ={}
    )
    signals_r, signals_w = os.pipe()
    os.set_blocking(signals_r, False)  # as run() sets it up
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(daemon._loop(signals_r)))
    loop.start()
    try:
        os.write(signals_w, bytes([signal.SIGHUP]) * 50)  # one write: read in one go
        wait_until(lambda: "config reloaded" in stream.getvalue(), what="the reload")
    finally:
        os.write(signals_w, bytes([signal.SIGTERM]))
        loop.join(PATIENCE)
        os.close(signals_r)
        os.close(signals_w)
        setup.close()
    assert result == [0]
    assert stream.getvalue().count("config reloaded") == 1


def test_a_reload_held_past_the_stop_applies_nothing(tmp_path: pathlib.Path) -> None:
    # A reload runs on a thread of its own, which a mount that hangs can hold past the
    # stop: what it read then must not be applied, nor READY=1 sent after the stop.
    config = tmp_path / "ftimer.toml"
    config.write_text('log-level = "info"\n')
    stream = io.StringIO()
    setup = LoggingSetup("text", "info", stream=stream)
    systemd = Notifications(str(tmp_path / "notify"))
    daemon = Daemon(
        DaemonConfig(fifo=str(tmp_path / "t.fifo"), config_file=str(config)),
        setup,
        environ={"NOTIFY_SOCKET": systemd.path},
    )
    config.write_text('log-level = "debug"\n')
    reading, release = threading.Event(), threading.Event()
    read = daemon._read_config

    def held(path: str) -> object:  # as a path on a mount that hangs holds it
        reading.set()
        release.wait(PATIENCE)
        return read(path)

    daemon._read_config = held  # type: ignore[method-assign]
    reload = threading.Thread(target=daemon._reload)
    reload.start()
    try:
        assert reading.wait(PATIENCE)
        daemon._shutdown()
        release.set()
        reload.join(PATIENCE)
        assert not logging.getLogger().isEnabledFor(logging.DEBUG)
    finally:
        release.set()
        setup.close()
    systemd.drain()
    systemd.close()
    assert systemd.has("RELOADING=1"), systemd.received
    assert not systemd.has("READY=1"), systemd.received
    assert "config reloaded" not in stream.getvalue()


def test_a_reloads_warnings_are_in_the_log_format_it_sets(tmp_path: pathlib.Path) -> None:
    # The warning of a change waiting for a restart was written in the old format: one
    # text line in a log that had just become JSON lines.
    config = tmp_path / "ftimer.toml"
    config.write_text('log-format = "text"\n')
    stream = io.StringIO()
    setup = LoggingSetup("text", "info", stream=stream)
    cli = {"fifo": str(tmp_path / "t.fifo")}
    start = resolve_config(cli, load_config_file(str(config)), config_file=str(config))
    daemon = Daemon(start, setup, cli=cli, environ={})
    config.write_text('log-format = "json"\nmax-timers = 5\n')
    try:
        daemon._reload()
    finally:
        setup.close()
    lines = stream.getvalue().splitlines()
    warning = next(json.loads(ln) for ln in lines if "need a restart" in ln)
    assert warning["msg"].endswith("not applied: max-timers (1000000 -> 5)")


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ftimer_server", "run", "--check-config", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )


def test_check_config_prints_the_settings_and_starts_nothing(short_dir: pathlib.Path) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text('signal = "SIGTERM"\nfifo-mode = "0620"\nallow-uids = [1000, 0]\n')
    fifo = short_dir / "run" / "timer.fifo"
    result = run_check("-c", str(config), "--fifo", str(fifo), "--dry-run")
    assert (result.returncode, result.stderr) == (0, "")
    settings = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert settings["fifo"] == str(fifo)
    assert settings["signal"] == "SIGTERM"
    assert settings["grace"] == "10.0"  # the default that --signal brings
    assert settings["fifo-mode"] == "0620"
    assert settings["allow-uids"] == "0, 1000"
    assert settings["dry-run"] == "true"  # the command line's
    assert settings["incident-dir"] == str(short_dir / "run" / "incidents")
    assert not (short_dir / "run").exists()  # nothing made


def test_check_config_of_a_bad_file_exits_2_with_the_error(short_dir: pathlib.Path) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text("grace = 0.0\n")
    result = run_check("-c", str(config), "--fifo", str(short_dir / "timer.fifo"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"config file {config}: grace" in result.stderr


def test_a_reload_refuses_what_a_restart_would(spawn: Spawn, short_dir: pathlib.Path) -> None:
    # A reload took metrics without prometheus_client: "needs a restart", and the
    # restart then refused to start (a restart loop under systemd).
    blocker = short_dir / "blocked"
    (blocker / "prometheus_client").mkdir(parents=True)
    (blocker / "prometheus_client" / "__init__.py").write_text("raise ImportError('blocked')\n")
    config = short_dir / "ftimer.toml"
    config.write_text("")
    path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    d = spawn("--config", str(config), env={"PYTHONPATH": path}).ready()
    config.write_text('metrics-address = "9464"\n')
    d.proc.send_signal(signal.SIGHUP)
    failed = wait_until(lambda: d.status()["reload_failed"], what="the reload's failure")
    assert "metrics need prometheus_client" in failed
    assert d.status()["restart_needed"] == []
    assert d.stop() == 0


def test_a_log_file_that_cannot_be_reopened_is_a_failed_reload(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # Said in one log line (to the old file), and the metrics said the reload went well.
    d = spawn().ready()
    d.log.rename(d.log.with_name("d.log.1"))
    d.log.mkdir()  # where the new file would go
    d.proc.send_signal(signal.SIGHUP)
    failed = wait_until(lambda: d.status()["reload_failed"], what="the reload's failure")
    assert failed.startswith(f"log file not reopened: [Errno 21] Is a directory: '{d.log}'")
    d.log.rmdir()
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.status()["reload_failed"] is None, what="a good reload")
    assert d.stop() == 0


@pytest.mark.parametrize(
    ("options", "setting", "shown"),
    [
        (["--metrics-address", "[::1]:9464"], "metrics-address", "[::1]:9464"),
        (
            ["--metrics-address", "00000000000000000000000000000009464"],
            "metrics-address",
            "127.0.0.1:9464",
        ),
        ([], "allow-uids", "any"),
        (["--allow-signal", "TERM", "--allow-signal", "9"], "allow-signals", "SIGKILL, SIGTERM"),
        ([], "max-timers", "1000000"),
        ([], "max-timers-per-pid", "10000"),
        ([], "grace", "none"),
    ],
)
def test_check_config_shows_each_setting_as_its_option_takes_it(
    short_dir: pathlib.Path, options: list[str], setting: str, shown: str
) -> None:
    result = run_check("--fifo", str(short_dir / "timer.fifo"), *options)
    assert result.returncode == 0, result.stderr
    assert f"{setting}: {shown}" in result.stdout.splitlines()


def test_a_metrics_host_with_a_newline_is_refused(short_dir: pathlib.Path) -> None:
    # Shown in systemd's STATUS= at a reload, it made lines of its own ("STOPPING=1").
    result = run_check(
        "--fifo", str(short_dir / "t.fifo"), "--metrics-address", "[x\nSTOPPING=1\ny]:1"
    )
    assert result.returncode == 2
    assert "is not a host name or address" in result.stderr
