"""Reservation owners: each service process records itself and a heartbeat, so what a
dead process held is released at once, and what a live one holds is never touched.

A process is dead when its heartbeat is older than `stale_s`, or, faster, when it
ran on this machine (same Linux boot and pid namespace) and its pid is gone or
now belongs to a process started at another time. A `kill -9` followed by a
restart is so recovered at start-up; a crash elsewhere after `stale_s`.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from service.store.base import Instance, Store

log = logging.getLogger("imagegate.instances")


class Liveness:
    """This process's Instance row: registered, kept fresh, and used to free orphans."""

    def __init__(
        self, store: Store, stale_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._stale_s = stale_s
        self._clock = clock
        now = clock()
        self.instance = Instance(
            id="inst_" + secrets.token_hex(8),
            host=_host(),
            pid=os.getpid(),
            pid_start=_process_start(os.getpid()) or "",
            started_at=now,
            heartbeat_at=now,
        )

    @property
    def owner(self) -> str:
        return self.instance.id

    async def beat(self) -> int:
        """Refresh this process's heartbeat, then release what dead processes held."""
        await self._store.beat(replace(self.instance, heartbeat_at=self._clock()))
        return await self.release_orphans()

    async def release_orphans(self) -> int:
        me = self.instance
        dead = [i.id for i in await self._store.instances() if i.id != me.id and dead_here(i, me)]
        released = await self._store.release_orphans(dead, self._clock() - self._stale_s, me.id)
        if released:
            log.info("released %d reservations of stopped processes", released)
        return released

    async def retire(self) -> None:
        await self._store.retire(self.instance.id)


def dead_here(other: Instance, me: Instance) -> bool:
    """True only when this machine can prove `other`'s process has ended."""
    if not me.host or other.host != me.host:
        return False
    start = _process_start(other.pid)
    if start is None:
        return True
    # A reused pid: the process now there started at another time.
    return bool(start and other.pid_start and start != other.pid_start)


def _host() -> str:
    """This boot of this machine and this pid namespace: where pids mean the same."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        # Not Linux: no pid checks, heartbeats only.
        return ""
    return f"{boot}/{namespace}"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot; None if it is gone,
    "" if this machine cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # The command name, field 2, is in parentheses and may hold spaces.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20:
        return ""
    state, start = fields[0], fields[19]
    # A zombie has exited: it holds nothing any more.
    return None if state in ("Z", "X") else start
