"""Running worker processes as another user (``Worker(user=..., group=...)``).

A master started as root binds its sockets (ports below 1024 included) and opens its
files as root; each worker process then switches to the configured user and group
right after it is forked, before ``on_worker_start``, so application code never runs
as root. What a worker needs afterwards is already open (the status table, stdout, its
listening socket) or is made reachable for it by the master (the log file).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """A user to run as: names and numeric ids."""

    user: str
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.user} (uid {self.uid}, gid {self.gid})"


def resolve(user: str | int | None, group: str | int | None = None) -> Identity | None:
    """The identity for ``user``/``group`` (names or ids), or None when neither is set.

    Raises ``ValueError`` for an unknown user or group. Without ``group``, the user's
    primary group is used.
    """
    if user is None and group is None:
        return None
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.getuid())
    except KeyError:
        raise ValueError(f"unknown user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(group).gr_gid if isinstance(group, int) else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"unknown group {group!r}") from None
    return Identity(entry.pw_name, entry.pw_uid, gid)


def can_switch() -> bool:
    """Only root can change to another user."""
    return os.geteuid() == 0


def needs_switch(identity: Identity | None) -> bool:
    """True when this process would have to change user or group to become ``identity``."""
    return identity is not None and (identity.uid != os.geteuid() or identity.gid != os.getegid())


def switch_to(identity: Identity) -> None:
    """Become ``identity`` for good: supplementary groups, then group, then user."""
    os.initgroups(identity.user, identity.gid)
    os.setgid(identity.gid)
    os.setuid(identity.uid)
