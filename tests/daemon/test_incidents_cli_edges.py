"""``ftimer-server incidents`` at its edges: records nested deeper than a decoder goes, an
id that ends as a file name does, a directory whose name is not UTF-8, labels that would
widen every line of the list."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import msgspec
import pytest
from tests.server.test_incident_store_edges import DEEP, make

from ftimer_server.daemon._incidents import list_incidents, show_incident
from ftimer_server.incidents._store import IncidentStore


def test_a_deeply_nested_record_is_skipped_by_list_and_show_not_a_traceback(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path))
    good = make(0)
    store.write(good)
    (tmp_path / "20261130T005400.000Z-1-deep.json").write_bytes(DEEP)
    out, err = io.StringIO(), io.StringIO()
    assert list_incidents(str(tmp_path), out=out, err=err) == 0
    assert good.id in out.getvalue()
    assert "20261130T005400.000Z-1-deep" in err.getvalue()  # skipped, with a warning
    out, err = io.StringIO(), io.StringIO()
    assert show_incident(str(tmp_path), "20261130T005400.000Z-1-deep", out=out, err=err) == 1
    assert err.getvalue().startswith("ftimer-server: error: ")


def test_a_record_nested_just_below_msgspecs_limit_is_no_traceback_for_show_json(
    tmp_path: pathlib.Path,
) -> None:
    # msgspec reads a few levels of nesting more than Python's json (998 and 994 from
    # the top of the stack): a record between passed load(), then show --json re-read
    # it with json.loads(), whose RecursionError was not caught. The window moves with
    # the depth of the stack: every depth around it is tried.
    store = IncidentStore(str(tmp_path))
    store.write(make(0))
    path = tmp_path / f"{make(0).id}.json"
    raw = path.read_bytes().rstrip()
    for depth in range(900, 1001):
        path.write_bytes(raw[:-1] + b',"zz":' + b"[" * depth + b"]" * depth + b"}\n")
        out, err = io.StringIO(), io.StringIO()
        code = show_incident(str(tmp_path), make(0).id, as_json=True, out=out, err=err)
        assert code == 0 or err.getvalue().startswith("ftimer-server: error: "), depth


@pytest.mark.parametrize("scope", ["step.txt", "step.json"])
def test_an_incident_whose_scope_ends_like_a_file_name_is_shown_by_its_id(
    tmp_path: pathlib.Path, scope: str
) -> None:
    # A scope is the worker's to choose; ``list`` prints the id, ``show ID`` took an id
    # ending in .txt/.json for a file name and looked for another file.
    store = IncidentStore(str(tmp_path))
    incident = make(0, scope=scope)
    store.write(incident)
    out, err = io.StringIO(), io.StringIO()
    assert show_incident(str(tmp_path), incident.id, out=out, err=err) == 0, err.getvalue()
    assert incident.id in out.getvalue()


def test_no_incidents_in_a_directory_whose_name_is_not_utf8_is_no_traceback(
    tmp_path: pathlib.Path,
) -> None:
    directory = os.path.join(os.fsencode(tmp_path), b"incidents-\xff")
    os.mkdir(directory, 0o700)
    result = subprocess.run(
        [sys.executable, "-m", "ftimer_server", "incidents", "--dir", directory],
        capture_output=True,
        # A UTF-8 locale's stdout (strict); C.UTF-8's is lenient, and would hide it.
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        timeout=60,
        check=False,
    )
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.returncode == 0
    assert result.stdout.startswith(b"no incidents in ")


def test_one_incidents_long_labels_do_not_widen_every_line_of_the_list(
    tmp_path: pathlib.Path,
) -> None:
    # Labels are the worker's (16 of them, values of 128 characters, each character
    # escaped to as many as 6 by printable()): the LABELS column was as wide as the
    # widest, so one incident padded every other line of `incidents` with kilobytes of
    # spaces before its SUMMARY.
    store = IncidentStore(str(tmp_path))
    store.write(make(0))
    noisy = msgspec.structs.replace(
        make(1, pid=99), labels={f"l{i}": "\u202e" * 128 for i in range(16)}
    )
    store.write(noisy)
    out = io.StringIO()
    assert list_incidents(str(tmp_path), out=out, err=io.StringIO()) == 0
    plain = next(line for line in out.getvalue().splitlines() if make(0).id in line)
    assert len(plain) < 300, len(plain)
