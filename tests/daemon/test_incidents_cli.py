"""``ftimer-server incidents``: list, show and merge, on real incident directories,
through ``main`` (and once through the installed command, for its exit codes)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

import msgspec
import pytest

from ftimer_server.core._incident import Capture, Frame, Incident, ThreadStack
from ftimer_server.core._report import annotate, render
from ftimer_server.daemon._cli import main
from ftimer_server.incidents._store import IncidentStore, incident_id

T0 = 1_796_000_000.0
PY = "/usr/lib/python3.11"
OUTER = [Frame("<module>", "/app/train.py", 120), Frame("main", "/app/train.py", 100)]
REDUCE = [*OUTER, Frame("train", "/app/train.py", 42), Frame("wait", f"{PY}/threading.py", 320)]
LOADER = [*OUTER, Frame("train", "/app/train.py", 40), Frame("select", f"{PY}/selectors.py", 468)]


def worker(pid: int, rank: int, frames: List[Frame], role: str = "peer") -> Capture:
    return Capture(
        pid=pid,
        role=role,
        labels={"job": "71", "rank": str(rank)},
        method="py-spy",
        threads=[ThreadStack(tid=pid, name="MainThread", frames=frames[::-1], state="S")],
    )


def incident(
    host: str,
    first_pid: int,
    ranks: range,
    *,
    odd: Optional[int] = None,
    created: float = T0,
    job: str = "71",
) -> Incident:
    captures = [
        worker(first_pid + n, r, LOADER if r == odd else REDUCE, "stuck" if n == 0 else "peer")
        for n, r in enumerate(ranks)
    ]
    return annotate(
        Incident(
            id=incident_id(created, first_pid, "step"),
            host=host,
            created=created,
            pid=first_pid,
            scope_id="step",
            signal=9,
            deadline=50.0,
            labels={"job": job, "rank": str(ranks[0])},
            late=0.004,
            job=job,
            captures=captures,
            seconds=0.3,
        )
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def directory(tmp_path: pathlib.Path) -> pathlib.Path:
    """An incident directory with two incidents of one host."""
    store = IncidentStore(str(tmp_path / "incidents"))
    store.write(incident("node-a", 100, range(8), odd=3))
    store.write(incident("node-a", 300, range(2), created=T0 + 60))
    return tmp_path / "incidents"


def test_list_prints_one_line_per_incident_oldest_first(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path
) -> None:
    code, out, err = run(capsys, "incidents", "--dir", str(directory))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "TIME (UTC)           ID                             PID  LABELS         SUMMARY",
        "2026-11-30 00:53:20  20261130T005320.000Z-100-step  100  job=71 rank=0  "
        "rank 3 in train at train.py:40 ... select at selectors.py:468 (waiting for I/O)",
        "2026-11-30 00:54:20  20261130T005420.000Z-300-step  300  job=71 rank=0  "
        "2 ranks (0,1) in train at train.py:42 ... wait at threading.py:320 (waiting on a lock)",
    ]
    # `list` is the same, and the options may follow the action.
    assert run(capsys, "incidents", "list", "--dir", str(directory))[1] == out


def test_the_directory_is_the_daemons_from_its_config_or_its_options(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    config = tmp_path / "ftimer.toml"
    config.write_text(f'fifo = "{tmp_path}/run/timer.fifo"\nstate-file = "{tmp_path}/s.json"\n')
    code, out, _ = run(capsys, "incidents", "-c", str(config))
    assert code == 0
    assert "20261130T005320.000Z-100-step" in out
    # Without a state file: beside the FIFO.
    assert run(capsys, "incidents", "--fifo", str(tmp_path / "x.fifo"))[1] == out
    code, _, err = run(capsys, "incidents", "--fifo", str(tmp_path / "run" / "timer.fifo"))
    assert code == 1
    assert err == (
        f"ftimer-server: error: no incident directory {tmp_path}/run/incidents: the daemon "
        "makes it at its first incident (is this the daemon's config, -c FILE, or its "
        "--incident-dir? give --dir)\n"
    )


def test_an_empty_directory_and_a_bad_config(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    (tmp_path / "empty").mkdir()
    assert run(capsys, "incidents", "--dir", str(tmp_path / "empty")) == (
        0,
        f"no incidents in {tmp_path}/empty\n",
        "",
    )
    config = tmp_path / "bad.toml"
    config.write_text("capture = 'gdb'\n")
    code, _, err = run(capsys, "incidents", "-c", str(config))
    assert code == 2
    assert "bad.toml: capture: capture method 'gdb' is not one of" in err


def test_list_skips_an_invalid_record_with_a_warning(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path
) -> None:
    (directory / "20261130T005000.000Z-1-x.json").write_text('{"version": 1')
    code, out, err = run(capsys, "incidents", "--dir", str(directory))
    assert code == 0
    assert len(out.splitlines()) == 3
    assert err.startswith(
        f"ftimer-server: warning: skipping {directory}/20261130T005000.000Z-1-x.json is not "
        "an incident record: Input data was truncated"
    )


def test_a_directory_none_of_whose_records_can_be_read_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    # Records of another user's, or all damaged: it printed "no incidents" and exited 0,
    # as if the job had never hung.
    directory = tmp_path / "incidents"
    directory.mkdir()
    for name in ("20261130T005000.000Z-1-x.json", "20261130T005001.000Z-2-x.json"):
        (directory / name).write_text('{"version": 1')
    said = (
        f"ftimer-server: error: none of the incident records in {directory} could be read "
        "(2 skipped, above)\n"
    )
    for argv in (["incidents"], ["incidents", "show"], ["incidents", "merge", str(directory)]):
        if argv[-1] != str(directory):
            argv += ["--dir", str(directory)]
        code, out, err = run(capsys, *argv)
        assert (code, out) == (1, ""), argv
        assert err.count("ftimer-server: warning: skipping") == 2
        assert err.endswith(said), err


def test_show_prints_the_text_of_an_id_its_start_or_the_newest(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path
) -> None:
    first = IncidentStore(str(directory), create=False).load("20261130T005320.000Z-100-step")
    code, out, err = run(
        capsys, "incidents", "show", "20261130T005320.000Z-100-step", "--dir", str(directory)
    )
    assert (code, err) == (0, "")
    assert out == render(first)
    assert out.splitlines()[4] == (
        "  rank 3 in train at train.py:40 ... select at selectors.py:468 (waiting for I/O)"
    )
    assert run(capsys, "incidents", "--dir", str(directory), "show", "20261130T0053")[1] == out
    newest = run(capsys, "incidents", "--dir", str(directory), "show")[1]
    assert newest.startswith("incident 20261130T005420.000Z-300-step on node-a")


def test_show_of_the_newest_says_the_earlier_incidents_of_its_hang(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path
) -> None:
    # A job's ranks are reaped one after another, the hung one first: the newest incident
    # was a rank that waited on it, and said nothing of the one before.
    code, out, err = run(capsys, "incidents", "--dir", str(directory), "show")
    assert code == 0
    assert out.startswith("incident 20261130T005420.000Z-300-step on node-a")
    assert err == (
        "ftimer-server: the newest of 2 incidents of job 71 within 600 s; the first, "
        "20261130T005320.000Z-100-step (pid 100): rank 3 in train at train.py:40 ... "
        "select at selectors.py:468 (waiting for I/O). All of them: ftimer-server "
        f"incidents merge --job 71 {directory}\n"
    )
    # Not for one asked for by its id, nor for a job's only incident in the window.
    assert run(capsys, "incidents", "--dir", str(directory), "show", "20261130T0054")[2] == ""
    store = IncidentStore(str(directory), create=False)
    store.write(incident("node-a", 500, range(2), created=T0 + 3600))
    assert run(capsys, "incidents", "--dir", str(directory), "show")[2] == ""


def test_list_and_show_escape_what_the_worker_sent_and_json_keeps_it(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    hostile = "0\x1b]0;PWNED\x07\x1b[2J\nFAKE LOG LINE: reaped pid 1\u009b31m\u202e"
    shown = r"0\x1b]0;PWNED\x07\x1b[2J\nFAKE LOG LINE: reaped pid 1\x9b31m\u202e"
    record = incident("node-a", 100, range(2))
    labels = {"job": "71", "rank": hostile}
    record = annotate(
        msgspec.structs.replace(
            record,
            labels=labels,
            captures=[
                msgspec.structs.replace(record.captures[0], labels=labels),
                *record.captures[1:],
            ],
            groups=[],
        )
    )
    IncidentStore(str(tmp_path / "incidents")).write(record)
    directory = str(tmp_path / "incidents")
    code, listed, err = run(capsys, "incidents", "--dir", directory)
    assert (code, err) == (0, "")
    labels_cell = f"job=71 rank={shown}"[:57] + "..."  # the list cuts them; show does not
    assert listed.splitlines()[1].endswith(
        f"{labels_cell}  2 ranks (1,{shown}) in train at train.py:42 ... "
        "wait at threading.py:320 (waiting on a lock)"
    )
    code, text, err = run(capsys, "incidents", "--dir", directory, "show")
    assert (code, err) == (0, "")
    assert f"  labels: job=71 rank={shown}" in text.splitlines()
    for out in (listed, text):
        assert [line for line in out.split("\n") if not line.isprintable()] == []
    code, doc, _ = run(capsys, "incidents", "--dir", directory, "show", "--json")
    assert json.loads(doc)["labels"]["rank"] == hostile  # the record as the worker sent it
    # ... in JSON's escapes: an 8-bit CSI or a bidi override went to the terminal raw.
    assert doc.isascii()
    assert "\x1b" not in doc


def test_show_json_prints_the_record(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path
) -> None:
    code, out, _ = run(capsys, "incidents", "show", "--json", "--dir", str(directory))
    assert code == 0
    doc = json.loads(out)
    assert (doc["version"], doc["id"]) == (1, "20261130T005420.000Z-300-step")


@pytest.mark.parametrize(
    ("ident", "message"),
    [
        ("nope", "no incident 'nope' in {dir}"),
        ("2026", "'2026' is the start of 2 incident ids ("),
        ("{dir}/bad.json", "{dir}/bad.json is not an incident record: "),
    ],
)
def test_show_errors_say_what_is_wrong(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path, ident: str, message: str
) -> None:
    (directory / "bad.json").write_text("[]")
    code, out, err = run(
        capsys, "incidents", "show", ident.format(dir=directory), "--dir", str(directory)
    )
    assert (code, out) == (1, "")
    assert err.startswith("ftimer-server: error: " + message.format(dir=directory))


# -- merge -----------------------------------------------------------------------------


@pytest.fixture
def hosts(tmp_path: pathlib.Path) -> Tuple[pathlib.Path, pathlib.Path]:
    """Two hosts' incident directories: job 71's ranks 0-7 on node-a, 8-15 on node-b
    (rank 11 the odd one), an older hang of job 71 and one of job 72 on node-b."""
    a = IncidentStore(str(tmp_path / "node-a"))
    b = IncidentStore(str(tmp_path / "node-b"))
    a.write(incident("node-a", 100, range(8), created=T0 + 1))
    b.write(incident("node-b", 200, range(8, 16), odd=11, created=T0 + 1.2))
    b.write(incident("node-b", 900, range(8, 10), created=T0 - 3600))  # an hour before
    b.write(incident("node-b", 500, range(2), created=T0, job="72"))
    return tmp_path / "node-a", tmp_path / "node-b"


def test_merge_groups_the_ranks_of_every_host_and_names_the_outlier_first(
    capsys: pytest.CaptureFixture[str], hosts: Tuple[pathlib.Path, pathlib.Path]
) -> None:
    code, out, err = run(capsys, "incidents", "merge", *map(str, hosts), "--job", "71")
    assert code == 0
    assert err == (
        "ftimer-server: note: 1 older incident of the job left out (more than 600 s before "
        "the newest; --window 0 takes them all)\n"
    )
    lines = out.splitlines()
    assert lines[0] == (
        "2 incidents of job 71 on 2 hosts (node-a, node-b), 2026-11-30 00:53:21 UTC"
    )
    assert lines[4:7] == [
        "16 workers captured, grouped by stack:",
        "  rank 11 on node-b in train at train.py:40 ... select at selectors.py:468 "
        "(waiting for I/O)",
        "  15 ranks (0-10,12-15) on 2 hosts in train at train.py:42 ... wait at "
        "threading.py:320 (waiting on a lock)",
    ]
    assert "pid 203 on node-b, rank 11: peer, py-spy, 0.0 ms" in lines


def test_merge_of_files_and_with_every_incident_of_the_job(
    capsys: pytest.CaptureFixture[str], hosts: Tuple[pathlib.Path, pathlib.Path]
) -> None:
    a, b = hosts
    files = [str(p) for p in sorted(a.glob("*.json"))]
    code, out, err = run(
        capsys, "incidents", "merge", *files, str(b), "--job", "71", "--window", "0"
    )
    assert (code, err) == (0, "")
    assert out.startswith("3 incidents of job 71 on 2 hosts")


def test_merge_without_job_of_several_jobs_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], hosts: Tuple[pathlib.Path, pathlib.Path]
) -> None:
    code, out, err = run(capsys, "incidents", "merge", *map(str, hosts))
    assert (code, out) == (2, "")
    assert err == (
        "ftimer-server: error: these are incidents of 2 jobs (71: 3, 72: 1): choose one "
        "with --job\n"
    )


def test_merge_without_job_names_the_newest_jobs_of_hundreds_on_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    # A shared directory holds incidents of hundreds of jobs: the error once named every
    # one of them, on a line several KB long.
    store = IncidentStore(str(tmp_path / "shared"), keep=1000)
    for n in range(150):
        store.write(incident("node-a", 1000 + n, range(1), created=T0 + n, job=f"J{n}"))
    store.write(incident("node-a", 2000, range(1), created=T0 + 149.5, job="J147"))
    code, out, err = run(capsys, "incidents", "merge", str(tmp_path / "shared"))
    assert (code, out) == (2, "")
    newest = ", ".join(f"J{n}: 1" for n in range(146, 139, -1))
    assert err == (
        "ftimer-server: error: these are incidents of 150 jobs (J147: 2, J149: 1, J148: 1, "
        f"{newest}, and 140 more): choose one with --job\n"
    )
    code, out, err = run(capsys, "incidents", "merge", str(tmp_path / "shared"), "--job", "J")
    assert (code, out) == (1, "")
    newest = ", ".join(f"J{n}" for n in range(146, 139, -1))
    assert err == (
        f"ftimer-server: error: no incident of job 'J' in {tmp_path}/shared (their jobs: "
        f"J147, J149, J148, {newest}, and 140 more)\n"
    )


def test_merge_counts_an_incident_found_in_several_paths_once(
    capsys: pytest.CaptureFixture[str], hosts: Tuple[pathlib.Path, pathlib.Path]
) -> None:
    # Collected copies overlap: a host's directory and a copy of it, or one path twice.
    a, b = hosts
    copy = a.parent / "node-a-collected"
    shutil.copytree(a, copy)
    for paths in ([a, copy, b], [a, b, b]):
        code, out, err = run(capsys, "incidents", "merge", *map(str, paths), "--job", "71")
        assert code == 0
        assert err.startswith("ftimer-server: note: 1 older incident of the job left out")
        lines = out.splitlines()
        assert lines[0] == (
            "2 incidents of job 71 on 2 hosts (node-a, node-b), 2026-11-30 00:53:21 UTC"
        )
        assert lines[4] == "16 workers captured, grouped by stack:"
    code, out, err = run(
        capsys, "incidents", "merge", str(b), str(b), "--job", "71", "--window", "0"
    )
    assert (code, err) == (0, "")
    assert out.startswith("2 incidents of job 71 on 1 host")
    # Two hosts' incidents with one id (pids of containers repeat) are two incidents.
    c = IncidentStore(str(a.parent / "node-c"))
    c.write(incident("node-c", 100, range(16, 24), created=T0 + 1))
    code, out, err = run(capsys, "incidents", "merge", str(a), str(a.parent / "node-c"))
    assert (code, err) == (0, "")
    assert out.startswith("2 incidents of job 71 on 2 hosts (node-a, node-c)")
    # Two records of one host and id that differ (containers sharing their node's host
    # name) are two incidents: one was dropped, half the job's workers with it.
    d = IncidentStore(str(a.parent / "node-a-other"))
    d.write(incident("node-a", 100, range(24, 32), created=T0 + 1))
    code, out, err = run(capsys, "incidents", "merge", str(a), str(a.parent / "node-a-other"))
    assert (code, err) == (0, "")
    assert out.startswith("2 incidents of job 71 on 1 host (node-a)")


def test_merge_errors(
    capsys: pytest.CaptureFixture[str],
    hosts: Tuple[pathlib.Path, pathlib.Path],
    tmp_path: pathlib.Path,
) -> None:
    code, _, err = run(capsys, "incidents", "merge", str(hosts[0]), "--job", "99")
    assert code == 1
    assert err == f"ftimer-server: error: no incident of job '99' in {hosts[0]} (their jobs: 71)\n"
    code, _, err = run(capsys, "incidents", "merge", str(tmp_path / "node-c"))
    assert code == 1
    assert err == f"ftimer-server: error: no such file or directory: {tmp_path}/node-c\n"
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "incidents", "merge", str(tmp_path / "empty"))
    assert (code, err) == (1, f"ftimer-server: error: no incident records in {tmp_path}/empty\n")


def test_the_command_exits_with_the_documented_codes(directory: pathlib.Path) -> None:
    command = [sys.executable, "-m", "ftimer_server", "incidents"]  # = ftimer-server
    ok = subprocess.run([*command, "--dir", str(directory)], capture_output=True)
    missing = subprocess.run(
        [*command, "show", "nope", "--dir", str(directory)], capture_output=True
    )
    usage = subprocess.run([*command, "merge"], capture_output=True)
    assert (ok.returncode, missing.returncode, usage.returncode) == (0, 1, 2)
    assert b"the following arguments are required: FILE_OR_DIR" in usage.stderr


@pytest.mark.parametrize("window", ["nan", "-5", "inf"])
def test_a_window_that_is_no_time_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], directory: pathlib.Path, window: str
) -> None:
    # NaN, negative and infinite windows were taken, and meant "every incident".
    with pytest.raises(SystemExit) as exit_:
        main(["incidents", "merge", str(directory), "--window", window])
    assert exit_.value.code == 2
    assert f"not 0 or a finite number of seconds: '{window}'" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("action", [["list"], ["show"], ["show", "--json"]])
def test_output_that_cannot_be_written_is_an_error_line_not_a_traceback(
    directory: pathlib.Path, action: List[str]
) -> None:
    command = [sys.executable, "-m", "ftimer_server", "incidents", "--dir", str(directory)]
    # `show` of the newest says first that it is not its job's first incident.
    note = b"ftimer-server: the newest of 2 incidents" if action[0] == "show" else b""

    def said(stderr: bytes) -> bytes:
        assert stderr.startswith(note)
        return stderr.partition(b"\n")[2] if note else stderr

    with open("/dev/full", "w") as full:
        result = subprocess.run([*command, *action], stdout=full, stderr=subprocess.PIPE)
    assert (result.returncode, said(result.stderr)) == (
        1,
        b"ftimer-server: error: cannot write the output: No space left on device\n",
    )
    # A reader that left (`| head`) ends it quietly, with status 1.
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as gone:
        result = subprocess.run([*command, *action], stdout=gone, stderr=subprocess.PIPE)
    assert (result.returncode, said(result.stderr)) == (1, b"")
