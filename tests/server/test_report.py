"""The text of an incident: the summary a person reads first, the whole report, and the
report merged over several hosts. Hand-built records, no processes."""

from __future__ import annotations

from typing import List, Optional

import msgspec
import pytest

from ftimer_server.core._incident import (
    Capture,
    ChildState,
    Frame,
    Incident,
    ProcessFacts,
    ThreadStack,
)
from ftimer_server.core._report import (
    annotate,
    merge_captures,
    printable,
    render,
    render_merged,
    summarize,
)

PY = "/usr/lib/python3.11"
OUTER = [Frame("<module>", "/app/train.py", 120), Frame("main", "/app/train.py", 100)]
REDUCE = [*OUTER, Frame("train", "/app/train.py", 42), Frame("wait", f"{PY}/threading.py", 320)]
LOADER = [*OUTER, Frame("train", "/app/train.py", 40), Frame("select", f"{PY}/selectors.py", 468)]


def worker(pid: int, rank: int, frames: List[Frame], role: str = "peer", host: str = "") -> Capture:
    main = ThreadStack(tid=pid, name="MainThread", frames=frames[::-1], state="S")
    return Capture(
        pid=pid,
        start_time=pid * 10,
        role=role,
        labels={"job": "71", "rank": str(rank)},
        method="py-spy",
        seconds=0.2,
        threads=[main],
        host=host,
    )


def incident(
    captures: List[Capture],
    *,
    host: str = "node-a",
    pid: int = 100,
    rank: str = "0",
    created: float = 1_796_000_000.0,
    **kw: object,
) -> Incident:
    fields = {
        "id": f"20261130T005320.000Z-{pid}-step",
        "host": host,
        "created": created,
        "pid": pid,
        "scope_id": "step",
        "signal": 9,
        "deadline": 5.0,
        "labels": {"job": "71", "rank": rank},
        "late": 0.012,
        "job": "71",
        "captures": captures,
        "seconds": 0.41,
        "delivered": True,
    }
    fields.update(kw)
    return Incident(**fields)  # type: ignore[arg-type]


def eight_ranks(host: str = "", base: int = 100, odd: Optional[int] = 3) -> List[Capture]:
    return [
        worker(base + r, r, LOADER if r == odd else REDUCE, "stuck" if r == 0 else "peer", host)
        for r in range(8)
    ]


def test_summary_says_what_expired_what_was_captured_and_names_the_outlier_first() -> None:
    assert summarize(incident(eight_ranks())) == [
        "timer 'step' of pid 100 (job=71 rank=0) expired 12 ms after its deadline; "
        "reaped with SIGKILL",
        "captured 8 workers of job 71 in 410 ms (py-spy)",
        "  rank 3 in train at train.py:40 ... select at selectors.py:468 (waiting for I/O)",
        "  7 ranks (0-2,4-7) in train at train.py:42 ... wait at threading.py:320 "
        "(waiting on a lock)",
    ]


def test_summary_says_when_the_budget_ran_out_and_lists_errors() -> None:
    lines = summarize(
        incident(
            [worker(100, 0, REDUCE, "stuck")],
            timed_out=True,
            seconds=3.0,
            delivered=False,
            errors=["py-spy of pid 101: timed out after 3.0 s", "incident directory full"],
        )
    )
    assert lines[0].endswith("reaped with SIGKILL (NOT delivered)")
    assert lines[1] == "captured 1 worker of job 71 in 3.0 s (py-spy)"
    assert lines[3:] == [
        "the capture ran out of its budget after 3.0 s: the signal was sent then, and what "
        "was not captured by then is missing",
        "error: py-spy of pid 101: timed out after 3.0 s",
        "error: incident directory full",
    ]


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_capture_out_of_its_budget_with_no_signal_sent_says_it_was_due(dry_run: bool) -> None:
    # It said "the signal was sent then" of a worker that exited during the capture, or
    # of a dry run, neither of which was signalled.
    lines = summarize(incident([], timed_out=True, seconds=3.0, delivered=None, dry_run=dry_run))
    assert lines[-1] == (
        "the capture ran out of its budget after 3.0 s: the signal was due then, and what "
        "was not captured by then is missing"
    )


def test_summary_of_a_report_only_timer_without_captures() -> None:
    lines = summarize(incident([], signal=0, labels=None, job=None, late=2.5))
    assert lines == [
        "timer 'step' of pid 100 expired 2.5 s after its deadline; report only (no signal)",
        "nothing captured",
    ]


def test_summary_counts_methods_when_they_differ() -> None:
    hooked = msgspec.structs.replace(worker(101, 1, REDUCE), method="hook")
    lines = summarize(incident([worker(100, 0, REDUCE, "stuck"), hooked]))
    assert lines[1] == "captured 2 workers of job 71 in 410 ms (py-spy 1, hook 1)"


def test_annotate_fills_doing_groups_and_summary_and_keeps_what_the_capture_said() -> None:
    said = ThreadStack(tid=5, frames=REDUCE[::-1], doing="what the capture said")
    captures = [*eight_ranks(), Capture(pid=5, threads=[said])]
    done = annotate(incident(captures))
    assert [t.doing for c in done.captures[:8] for t in c.threads] == [
        "waiting on a lock" if c.pid != 103 else "waiting for I/O" for c in done.captures[:8]
    ]
    assert done.captures[8].threads[0].doing == "what the capture said"
    assert [g.pids for g in done.groups] == [[5], [103], [100, 101, 102, 104, 105, 106, 107]]
    assert done.summary == summarize(done)
    # A record that was annotated says the same when decoded again.
    again = msgspec.json.decode(msgspec.json.encode(done), type=Incident)
    assert again == done


def test_a_peer_whose_timer_ran_is_said_so() -> None:
    captures = eight_ranks()
    captures[3] = msgspec.structs.replace(captures[3], timer_running=True)
    done = annotate(incident(captures))
    assert done.summary[2] == (
        "  rank 3 (its timer running) in train at train.py:40 ... select at selectors.py:468 "
        "(waiting for I/O)"
    )
    assert "pid 103, rank 3: peer (its timer running), py-spy, 200 ms" in render(done)
    assert "rank 0: stuck, py-spy" in render(done)
    # Of a group of several, which: rank 5 in the loader too.
    captures[5] = msgspec.structs.replace(
        captures[5], timer_running=True, threads=captures[3].threads
    )
    assert annotate(incident(captures)).summary[2] == (
        "  2 ranks (3,5; timers running: 3,5) in train at train.py:40 ... select at "
        "selectors.py:468 (waiting for I/O)"
    )


def test_render_says_where_each_child_waits() -> None:
    # A worker waiting on its data loader's workers: where they wait is why it hangs.
    loader = ChildState(pid=29, name="pt_data_worker", state="D", wchan="nfs_wait_bit_killable")
    states = [loader, ChildState(pid=30, state="S"), ChildState(pid=32, name="x\x1b[2J")]
    facts = ProcessFacts(state="S", children=[29, 30, 31, 32], child_states=states)
    stuck = msgspec.structs.replace(eight_ranks()[0], facts=facts)
    text = render(annotate(incident([stuck])))
    assert (
        "  process: state S, children 29 (pt_data_worker: D in nfs_wait_bit_killable), "
        "30 (S), 31, 32, 0 FIFOs, 0 sockets"
    ) in text.splitlines()


def test_render_shows_the_summary_the_tree_and_every_stack_innermost_last() -> None:
    captures = eight_ranks()
    stuck = msgspec.structs.replace(
        captures[0],
        facts=ProcessFacts(
            cmdline=["python", "train.py"],
            state="S",
            rss=3 << 30,
            threads=1,
            age=4000.0,
            uid=1000,
            fifos=1,
            sockets=2,
        ),
        core="/var/lib/ftimer/cores/core.100",
        threads=[
            *captures[0].threads,
            ThreadStack(
                tid=170,
                name="io",
                frames=[Frame("clock_nanosleep", "libc.so.6", native=True), *REDUCE[::-1]],
                state="S",
                wchan="hrtimer_nanosleep",
                active=False,
                kernel_stack=["[<0>] hrtimer_nanosleep+0x9a/0x140"],
            ),
        ],
    )
    text = render(annotate(incident([stuck, *captures[1:]], errors=["gcore: not installed"])))
    lines = text.splitlines()
    assert lines[0] == "incident 20261130T005320.000Z-100-step on node-a, 2026-11-30 00:53:20 UTC"
    assert lines[2].startswith("timer 'step' of pid 100")
    assert (
        "  rank 3 in train at train.py:40 ... select at selectors.py:468 (waiting for I/O)" in lines
    )
    tree = lines.index(
        "call tree of the stuck threads (outermost first; workers through each frame):"
    )
    assert lines[tree + 1 : tree + 4] == [
        "  8  <module> at train.py:120",
        "  8  main at train.py:100",
        "  1  + train at train.py:40",
    ]
    worker_100 = lines.index("pid 100, rank 0: stuck, py-spy, 200 ms")
    assert lines[worker_100 + 1 : worker_100 + 17] == [
        "  labels: job=71 rank=0",
        "  command: python train.py",
        "  process: state S, 3.0 GiB resident, 1 thread, up 1h06m, uid 1000, 1 FIFO, 2 sockets",
        "  core: /var/lib/ftimer/cores/core.100",
        '  thread 100 "MainThread" [S]: waiting on a lock',
        '    File "/app/train.py", line 120, in <module>',
        '    File "/app/train.py", line 100, in main',
        '    File "/app/train.py", line 42, in train',
        f'    File "{PY}/threading.py", line 320, in wait',
        '  thread 170 "io" [S in hrtimer_nanosleep; idle]: sleeping',
        '    File "/app/train.py", line 120, in <module>',
        '    File "/app/train.py", line 100, in main',
        '    File "/app/train.py", line 42, in train',
        f'    File "{PY}/threading.py", line 320, in wait',
        "    [native] clock_nanosleep in libc.so.6",
        "    kernel:",
    ]
    assert lines[-2:] == ["errors:", "  gcore: not installed"]


def test_render_says_how_many_outer_frames_a_capture_left_out() -> None:
    stuck = worker(100, 0, REDUCE)
    [main] = stuck.threads
    cut = msgspec.structs.replace(main, frames_cut=37)
    text = render(annotate(incident([msgspec.structs.replace(stuck, threads=[cut])])))
    lines = text.splitlines()
    at = lines.index("    ... 37 outer frames not shown")
    assert lines[at + 1] == '    File "/app/train.py", line 120, in <module>'  # then the rest


def test_render_counts_a_frame_repeated_in_a_row_as_a_traceback_does() -> None:
    # A recursion's 200 identical lines pushed the other workers off the page.
    walk = Frame("walk", "/app/tree.py", 106)
    frames = [Frame("step", "/app/train.py", 110)] + [walk] * 200  # outermost first
    stuck = worker(100, 0, frames)
    lines = render(annotate(incident([stuck]))).splitlines()
    at = lines.index('    File "/app/train.py", line 110, in step')
    assert lines[at + 1 : at + 5] == [
        '    File "/app/tree.py", line 106, in walk',
        '    File "/app/tree.py", line 106, in walk',
        '    File "/app/tree.py", line 106, in walk',
        "    [Previous line repeated 197 more times]",
    ]
    assert sum("line 106, in walk" in line for line in lines) == 3


def test_render_shows_the_summarized_thread_first_and_the_client_librarys_own_last() -> None:
    # py-spy lists the client's watch thread first: a reader meant to learn why the
    # worker hung met ftimer's own idle thread, "waiting on a lock", and its seven frames.
    watch = ThreadStack(
        tid=271,
        name="ftimer-client-watch",
        frames=[
            Frame("wait", f"{PY}/threading.py", 331),
            Frame("_watch", f"{PY}/site-packages/ftimer_client/_channel.py", 9),
        ],
        state="S",
        active=False,
    )
    other = ThreadStack(tid=272, name="loader", frames=LOADER[::-1], state="S")
    capture = worker(100, 0, REDUCE, "stuck")
    capture = msgspec.structs.replace(capture, threads=[watch, other, *capture.threads])
    text = render(annotate(incident([capture])))
    heads = [line for line in text.splitlines() if line.startswith("  thread ")]
    assert [h.split()[1] for h in heads] == ["100", "272", "271"]
    assert heads[-1] == '  thread 271 "ftimer-client-watch" [S; idle]: ftimer\'s client library'
    assert "_channel.py" not in text  # its frames are in the record


def test_render_of_a_worker_without_threads_shows_the_raw_output_and_the_error() -> None:
    failed = Capture(
        pid=100, method="hook", error="hook: no dump within the budget", raw="Fatal Python\n..."
    )
    text = render(incident([failed]))
    assert "pid 100: stuck, hook, 0.0 ms" in text
    assert "  error: hook: no dump within the budget\n  raw output:\n    Fatal Python\n" in text
    assert "call tree" not in text  # one group: nothing to compare


def test_render_of_an_unannotated_record_still_groups_and_summarizes() -> None:
    assert render(incident(eight_ranks())) == render(annotate(incident(eight_ranks())))


# -- what a worker sent --------------------------------------------------------------

#: A terminal's title and screen cleared, then a line of its own that looks like the log's.
HOSTILE = "\x1b]0;PWNED\x07\x1b[2J\x1b[31m\n2026-12-02 WARNING reaped: pid 1\r\u2028\u202e\x9b"
HOSTILE_SHOWN = (
    r"\x1b]0;PWNED\x07\x1b[2J\x1b[31m\n2026-12-02 WARNING reaped: pid 1\r\u2028\u202e\x9b"
)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("job=71 rank=0 name=ünï 名前 'q' \\x1b", "job=71 rank=0 name=ünï 名前 'q' \\x1b"),
        ("0\nFAKE LOG LINE", r"0\nFAKE LOG LINE"),
        (HOSTILE, HOSTILE_SHOWN),
        (
            "\t\x00\x7f\x85\u2029\u2066\ufeff\xa0\udcff",
            r"\t\x00\x7f\x85\u2029\u2066\ufeff\xa0\udcff",
        ),
        (repr("scope" + HOSTILE), repr("scope" + HOSTILE)),  # a repr is printable already
    ],
)
def test_printable_escapes_what_is_not_printable_as_repr_does(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert shown.isprintable()


def hostile_incident() -> Incident:
    """A worker that put control characters wherever it can: labels, scope, command line,
    thread names, frames, its output, its errors."""
    thread = ThreadStack(
        tid=100,
        name="thr" + HOSTILE,
        frames=[Frame("wait" + HOSTILE, "/app/" + HOSTILE + ".py", 3), *REDUCE[::-1]],
        state="S",
        wchan="futex" + HOSTILE,
        kernel_stack=["[<0>] " + HOSTILE],
    )
    stuck = Capture(
        pid=100,
        labels={"job": "j" + HOSTILE, "rank": "0" + HOSTILE, "k" + HOSTILE: "v"},
        method="py-spy",
        facts=ProcessFacts(cmdline=["python", "argv" + HOSTILE], state="S"),
        error="py-spy: " + HOSTILE,
        threads=[thread],
    )
    silent = Capture(pid=101, role="peer", method="hook", raw="dump" + HOSTILE)
    return annotate(
        incident(
            [stuck, silent],
            scope_id="scope" + HOSTILE,
            labels=stuck.labels,
            job="j" + HOSTILE,
            errors=["capture: " + HOSTILE],
        )
    )


def test_render_escapes_what_the_worker_sent_and_the_record_keeps_it_exact() -> None:
    record = hostile_incident()
    for text in (render(record), render_merged([record])):
        lines = text.split("\n")  # splitlines() would cut at U+2028
        assert [line for line in lines if not line.isprintable()] == []
        assert not any(line.startswith("2026-12-02") for line in lines)
        assert f"  labels: job=j{HOSTILE_SHOWN} k{HOSTILE_SHOWN}=v rank=0{HOSTILE_SHOWN}" in lines
        assert f"  command: python argv{HOSTILE_SHOWN}" in lines
        # Raw output is lines of its own (py-spy's, a dump's): each kept indented under it.
        assert r"    dump\x1b]0;PWNED\x07\x1b[2J\x1b[31m" in lines
    text = render(record)
    assert (
        f'  thread 100 "thr{HOSTILE_SHOWN}" [S in futex{HOSTILE_SHOWN}]: waiting on a lock' in text
    )
    # Escaped as it is shown, not as it is kept: the record has what the worker sent.
    assert record.labels == {"job": "j" + HOSTILE, "rank": "0" + HOSTILE, "k" + HOSTILE: "v"}
    assert record.captures[0].threads[0].name == "thr" + HOSTILE
    assert HOSTILE in record.summary[0]
    assert msgspec.json.decode(msgspec.json.encode(record), type=Incident) == record


# -- several hosts ---------------------------------------------------------------------


def test_merge_names_hosts_and_counts_a_worker_seen_twice_once() -> None:
    a = incident(eight_ranks(odd=None), host="node-a")
    # node-b: rank 11 hung first (incident 1, the others as peers), then rank 12's own
    # incident saw rank 12 as stuck: it counts once, as stuck.
    b_workers = [worker(200 + r, 8 + r, REDUCE, host="") for r in range(8)]
    b_workers[3] = worker(203, 11, LOADER)
    b1 = incident(
        [msgspec.structs.replace(b_workers[3], role="stuck"), *b_workers[:3], *b_workers[4:]],
        host="node-b",
        pid=203,
        rank="11",
        created=1_796_000_000.5,
    )
    b2 = incident(
        [msgspec.structs.replace(b_workers[4], role="stuck")],
        host="node-b",
        pid=204,
        rank="12",
        created=1_796_000_001.0,
    )
    merged = merge_captures([b2, a, b1])
    assert len(merged) == 16
    assert [(c.host, c.pid, c.role) for c in merged][:2] == [
        ("node-a", 100, "stuck"),
        ("node-a", 101, "peer"),
    ]
    assert ("node-b", 204, "stuck") in [(c.host, c.pid, c.role) for c in merged]
    assert ("node-b", 204, "peer") not in [(c.host, c.pid, c.role) for c in merged]

    text = render_merged([b2, a, b1], job="71")
    lines = text.splitlines()
    assert lines[0] == (
        "3 incidents of job 71 on 2 hosts (node-a, node-b), 2026-11-30 00:53:20 UTC to "
        "2026-11-30 00:53:21 UTC"
    )
    assert lines[2:5] == [
        "rank 0 on node-a expired ('step', 12 ms late): 20261130T005320.000Z-100-step",
        "rank 11 on node-b expired ('step', 12 ms late): 20261130T005320.000Z-203-step",
        "rank 12 on node-b expired ('step', 12 ms late): 20261130T005320.000Z-204-step",
    ]
    assert lines[5:8] == [
        "16 workers captured, grouped by stack:",
        "  rank 11 on node-b in train at train.py:40 ... select at selectors.py:468 "
        "(waiting for I/O)",
        "  15 ranks (0-10,12-15) on 2 hosts in train at train.py:42 ... wait at "
        "threading.py:320 (waiting on a lock)",
    ]
    assert "pid 203 on node-b, rank 11: stuck, py-spy, 200 ms" in lines


def test_merge_of_one_host_with_errors() -> None:
    one = incident([worker(100, 0, REDUCE, "stuck")], errors=["disk full"])
    text = render_merged([one])
    assert text.splitlines()[0] == "1 incident on 1 host (node-a), 2026-11-30 00:53:20 UTC"
    assert text.endswith("errors:\n  node-a 20261130T005320.000Z-100-step: disk full\n")


def test_signals_are_named_where_every_platform_agrees_and_numbered_elsewhere() -> None:
    # The core asks no platform: SIGUSR1 is 10 on Linux and 30 on macOS.
    assert summarize(incident([], signal=15))[0].endswith("reaped with SIGTERM")
    assert summarize(incident([], signal=6))[0].endswith("reaped with SIGABRT")
    assert summarize(incident([], signal=10))[0].endswith("reaped with signal 10")
