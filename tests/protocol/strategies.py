"""Hypothesis strategies for valid protocol messages."""

from __future__ import annotations

from hypothesis import strategies as st

from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_SIGNAL,
    MAX_TIME,
    Arm,
    Disarm,
    DisarmAll,
    DumpHook,
    Expire,
    Message,
    Sync,
    TimerRequestV1,
)

pids = st.integers(1, MAX_PID)
signals = st.integers(0, MAX_SIGNAL)
scopes = st.text(max_size=300)
start_times = st.none() | st.integers(0, 2**63 - 1)
deadlines = st.floats(0, MAX_TIME, allow_nan=False)
labels = st.none() | st.dictionaries(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,31}", fullmatch=True),
    st.text(max_size=MAX_LABEL_VALUE),
    max_size=MAX_LABELS,
)

dumps = st.none() | st.builds(
    DumpHook, signal=st.integers(1, MAX_SIGNAL), fd=st.integers(0, 2**31 - 1)
)

v1_messages = st.builds(
    TimerRequestV1,
    pid=pids,
    scope_id=scopes,
    expiration_time=st.floats(-MAX_TIME, MAX_TIME, allow_nan=False),
    signal=signals,
)
v2_messages = st.one_of(
    st.builds(
        Arm,
        pid=pids,
        scope_id=scopes,
        deadline=deadlines,
        signal=signals,
        start_time=start_times,
        labels=labels,
        dump=dumps,
    ),
    st.builds(Disarm, pid=pids, scope_id=scopes, start_time=start_times),
    st.builds(DisarmAll, pid=pids, start_time=start_times),
    st.builds(
        Expire,
        pid=pids,
        scope_id=scopes,
        signal=signals,
        start_time=start_times,
        labels=labels,
        dump=dumps,
    ),
    st.builds(Sync, token=st.text(max_size=128)),
)
messages: st.SearchStrategy[Message] = st.one_of(v1_messages, v2_messages)
