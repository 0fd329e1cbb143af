"""The Kubernetes example (docs/examples/kubernetes/ftimer-daemonset.yaml) fits together.

Its worker pod has a PID namespace of its own and reaches the daemon over the socket,
which works only if the daemon is in the host's PID namespace, the worker names the
socket the daemon binds, on the same host directory, and runs as the uid and group the
daemon admits (docs/deploy.md, "Kubernetes"). PyYAML is no test dependency: the few
settings that matter are read from the file's text, written as the example writes them
(block or flow mappings of plain scalars, one document per kind, comments with ``#``).
"""

from __future__ import annotations

import pathlib
import posixpath
import re
from typing import Dict, List

from ftimer_protocol import socket_path_for

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "kubernetes" / "ftimer-daemonset.yaml"
COMMENT = re.compile(r"(?:^|\s)#.*$", re.M)
KIND = re.compile(r"^kind:\s*(\S+)\s*$", re.M)
#: One list item of the daemon's command: ``- --option=value``.
OPTION = re.compile(r"^\s*-\s+--(?P<name>[\w-]+)=(?P<value>\S+)\s*$", re.M)


def documents() -> Dict[str, str]:
    """Each document of the example, without comments, by its ``kind``."""
    found: Dict[str, str] = {}
    for doc in re.split(r"^---\s*$", EXAMPLE.read_text(), flags=re.M):
        text = COMMENT.sub("", doc)
        kinds = KIND.findall(text)
        assert len(kinds) == 1, f"a document of {EXAMPLE.name} has kinds {kinds}"
        assert kinds[0] not in found, f"two documents of kind {kinds[0]}"
        found[kinds[0]] = text
    return found


def values(text: str, key: str) -> List[str]:
    """Every plain scalar given to ``key``, in block (``key: v``) or flow (``{key: v}``)
    style."""
    return re.findall(rf"(?:^|[\s{{,]){re.escape(key)}:[ \t]*([^\s,{{}}\[\]]+)", text, re.M)


def value(text: str, key: str) -> str:
    (found,) = values(text, key)
    return found


def options(text: str) -> Dict[str, str]:
    """The daemon's ``--name=value`` options (each given once)."""
    found: Dict[str, str] = {}
    for m in OPTION.finditer(text):
        assert m["name"] not in found, f"--{m['name']} given twice"
        found[m["name"]] = m["value"]
    return found


def host_path_of(text: str, path: str) -> str:
    """Where ``path`` (inside the container) is on the host: through the one volume
    mount, which must be a hostPath, and hold it."""
    mount = value(text, "mountPath")
    assert path.startswith(mount.rstrip("/") + "/"), f"{path} is not under {mount}"
    return posixpath.join(value(text, "path"), posixpath.relpath(path, mount))


DOCS = documents()
DAEMON, WORKER = DOCS["DaemonSet"], DOCS["Pod"]


def test_the_example_is_a_daemonset_and_a_worker_pod() -> None:
    assert sorted(DOCS) == ["DaemonSet", "Pod"]


def test_the_daemon_is_in_the_hosts_pid_namespace() -> None:
    # The ancestor of every pod's: the kernel can name every worker to it.
    assert values(DAEMON, "hostPID") == ["true"]


def test_the_worker_keeps_a_pid_namespace_of_its_own() -> None:
    assert values(WORKER, "hostPID") == []
    assert values(WORKER, "shareProcessNamespace") == []


def test_the_worker_names_the_socket_the_daemon_binds_on_the_same_host_directory() -> None:
    fifo = options(DAEMON)["fifo"]
    env = dict(re.findall(r"\{name:\s*(\w+),\s*value:\s*([^\s,}]+)\}", WORKER))
    socket = env["FTIMER_SOCKET"]
    assert socket == socket_path_for(fifo)
    assert not {"FTIMER_FIFO", "TORCHELASTIC_TIMER_FILE"} & set(env)  # FIFO: refused
    assert host_path_of(WORKER, socket) == host_path_of(DAEMON, socket_path_for(fifo))
    assert value(WORKER, "type") == "Directory"  # the daemon's, never made by a worker


def test_the_worker_runs_as_the_uid_and_group_the_daemon_admits() -> None:
    daemon = options(DAEMON)
    assert daemon["allow-uid"] == value(WORKER, "runAsUser")
    assert daemon["fifo-group"] == value(WORKER, "runAsGroup")
    # The group may write the FIFO, and so the socket, which takes the FIFO's mode.
    assert int(daemon["fifo-mode"], 8) & 0o020


def test_the_probes_ask_the_daemon_on_its_fifo() -> None:
    # --health: no timers in the reply, which is as quick with 100k of them as with none.
    probes = re.findall(r"\[ftimer-server, status, --health, --fifo=([^\s,\]]+)\]", DAEMON)
    assert probes == [options(DAEMON)["fifo"]] * 2
