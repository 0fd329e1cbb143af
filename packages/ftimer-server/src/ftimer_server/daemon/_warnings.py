"""What is risky about the daemon's configuration, said at start-up: who may write its
FIFO and socket, who may replace them, and whose timers would be refused."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from typing import Dict, List, Optional, Tuple

from ftimer_server._files import directories_above

from ._config import DaemonConfig

__all__ = ["startup_warnings"]


def startup_warnings(c: DaemonConfig, euid: int) -> List[str]:
    """What is risky about running with ``c`` as user ``euid``, one sentence each.

    Anyone who can write the FIFO can have any process the policy allows signalled, by
    naming its pid. So: a FIFO others may write, and a root daemon (which may signal
    every user's processes) whose FIFO someone besides root may write while nothing
    restricts the target users. And a group named for the FIFO that may not write it,
    users allowed timers who may write neither the FIFO nor the socket, and a directory
    in which others could swap the FIFO for theirs. (A state file's directory others
    could change is refused at start, not warned about.)
    """
    fifo_dir = os.path.dirname(c.fifo) or "."
    socket_dir = None if c.socket is None else os.path.dirname(c.socket) or "."
    if socket_dir is None or os.path.realpath(socket_dir) == os.path.realpath(fifo_dir):
        holds = "the FIFO" if c.socket is None else "the FIFO and the socket"
        warnings = _directory_warnings(fifo_dir, "FIFO's", holds, euid)
    else:  # a socket elsewhere (--socket PATH): swapped, its clients would go unwatched
        warnings = _directory_warnings(fifo_dir, "FIFO's", "the FIFO", euid)
        warnings += _directory_warnings(socket_dir, "socket's", "the socket", euid)
    others_write = bool(c.fifo_mode & 0o002)
    group_write = bool(c.fifo_mode & 0o020)
    mode = f"{c.fifo_mode:04o}"
    if others_write:
        warnings.append(
            f"--fifo-mode {mode} lets every local user write the FIFO {c.fifo}, and so have "
            "any process the policy allows signalled; use 0600, or 0620 with --fifo-group "
            "for the workers' group"
        )
    if c.fifo_mode & 0o044:
        readers = "any local user" if c.fifo_mode & 0o004 else "its group"
        warnings.append(
            f"--fifo-mode {mode} lets {readers} read the FIFO {c.fifo}: a process that "
            "reads it takes lines the daemon never sees (a worker's disarm taken: the "
            "worker is reaped; its arm taken: it runs unwatched). Only the daemon reads "
            "its FIFO: use 0600, or 0620 with --fifo-group"
        )
    shut_out = sorted(set(c.allow_uids or ()) - {euid, 0})
    if shut_out and not c.fifo_mode & 0o022:
        warnings.append(
            f"--allow-uid {', '.join(map(str, shut_out))}: with --fifo-mode {mode} only "
            f"uid {euid} may write the FIFO {c.fifo} and the socket, so their workers "
            "cannot reach the daemon (and run unwatched); use 0620 with --fifo-group for "
            "their group"
        )
    if c.fifo_group is not None and not group_write:
        warnings.append(
            f"--fifo-group {c.fifo_group} is given, but --fifo-mode {mode} does not let the "
            f"group write the FIFO {c.fifo}: its members cannot send timers; use 0620"
        )
    gid = _fifo_gid(c)
    group = f"group {_group_name(gid)}" + ("" if c.fifo_group is not None else ", the FIFO's")
    if (
        group_write
        and c.allow_uids is not None
        and (c.fifo_group is not None or gid != os.getegid())
    ):
        members = _members(gid).items()
        refused = sorted((uid, name) for uid, name in members if uid not in c.allow_uids)
        if refused:
            who = ", ".join(f"{name} ({uid})" for uid, name in refused)
            warnings.append(
                f"members of {group} not in --allow-uid: {who}. They may write the FIFO "
                "and the socket, but their timers are refused (logged here): their "
                "workers are not told, and run unwatched"
            )
    if euid == 0 and c.allow_uids is None and (others_write or group_write):
        writers = "any local user" if others_write else f"any member of {group}"
        targets = (
            "any descendant of the daemon, whatever its user,"
            if c.descendants_only
            else "any process of any user"
        )
        warnings.append(
            f"running as root with no --allow-uid: {writers} (they can write the FIFO "
            f"{c.fifo}, mode {mode}) can have {targets} signalled, except pid 1, the daemon "
            "and its ancestors. Set --allow-uid to the workers' uids, or --fifo-mode 0600 "
            "if only root writes timers"
        )
    return warnings


def _fifo_gid(c: DaemonConfig) -> int:
    """The group the FIFO has once made: ``--fifo-group``, else the group of the FIFO at
    the path (a FIFO replaced keeps its group), else the daemon's."""
    if c.fifo_group is not None:
        return c.fifo_group
    with contextlib.suppress(OSError):
        st = os.lstat(c.fifo)
        if stat.S_ISFIFO(st.st_mode):
            return st.st_gid
    return os.getegid()


def _directory_warnings(directory: str, whose: str, holds: str, euid: int) -> List[str]:
    """What is risky about ``directory``, the ``whose`` ("FIFO's") directory, which
    ``holds`` ("the FIFO and the socket"): others who may rename or replace what is in
    it, or in a directory above it."""
    warnings = []
    shared = _shared(directory)
    if shared is not None:
        path, bits = shared
        # Above it, the directory itself can be renamed away and another put there.
        where = f"{path} (mode {bits:04o})"
        if path != directory:
            where = f"{directory}, through {where} above it,"
        warnings.append(
            f"the {whose} directory {where} lets users other than its owner rename or "
            f"replace {holds} in it, and so read the timers and keep workers unwatched: "
            "use a directory only the daemon's user may write (such as the default "
            "/run/ftimer), under directories only root may write"
        )
    owned = _owned_by_another(directory, euid)
    if owned is not None:
        path, uid = owned
        where = "" if path == directory else f", through {path} above it,"
        warnings.append(
            f"the {whose} directory {directory}{where} belongs to uid {uid}, who may "
            f"rename or replace {holds} in it, and so read the timers and keep workers "
            "unwatched: use a directory of the daemon's user or root's (such as the "
            "default /run/ftimer)"
        )
    return warnings


def _shared(directory: str) -> Optional[Tuple[str, int]]:
    """The first of ``directory`` and the directories above it (as written and as
    resolved) that users other than its owner may write and that is not sticky (as
    ``/tmp`` is: there only an entry's owner renames it), and its mode; or None (a
    directory yet to be made is the daemon's)."""
    for each in [directory, *directories_above(os.path.abspath(directory))]:
        with contextlib.suppress(OSError):
            mode = os.stat(each).st_mode
            if mode & 0o022 and not mode & stat.S_ISVTX:
                return each, stat.S_IMODE(mode)
    return None


def _owned_by_another(directory: str, euid: int) -> Optional[Tuple[str, int]]:
    """The first of ``directory`` and the directories above it (as the state file's are
    judged: as written and as resolved) owned by neither root nor ``euid``, and its
    owner: one who may rename what is in it. None if there is none (or it cannot be
    looked at: one yet to be made is the daemon's)."""
    path = os.path.abspath(directory)
    for each in [path, *directories_above(path)]:
        with contextlib.suppress(OSError):
            owner = os.stat(each).st_uid
            if owner not in (0, euid):
                return each, owner
    return None


def _group_name(gid: int) -> str:
    """``gid`` for people: "name (gid)", or the number alone."""
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except (KeyError, OverflowError):
        return str(gid)


def _members(gid: int) -> Dict[int, str]:
    """The users of group ``gid``, by uid: those it lists, and those whose own group it
    is (as the system's user database tells; none if it cannot)."""
    members: Dict[int, str] = {}
    with contextlib.suppress(KeyError, OSError):
        for name in grp.getgrgid(gid).gr_mem:
            with contextlib.suppress(KeyError):
                members[pwd.getpwnam(name).pw_uid] = name
    with contextlib.suppress(OSError):
        for user in pwd.getpwall():
            if user.pw_gid == gid:
                members[user.pw_uid] = user.pw_name
    return members
