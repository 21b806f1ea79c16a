"""Which processes of a run are still alive: a run started in a session of its own (``setsid``,
``start_new_session=True``) owns every process in that session, children and grandchildren
alike, whoever they were reparented to. Linux (/proc)."""
from __future__ import annotations

import os
import time
from typing import Dict


def session_processes(session: int) -> Dict[int, str]:
    """{pid: command line} of the live processes in ``session`` (zombies excluded)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            # Fields after the parenthesised command name: state ppid pgrp session ...
            state, _, _, sid = stat[stat.rindex(")") + 2:].split()[:4]
            if int(sid) != session or state == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError):  # ended while we looked
            continue
    return found


def wait_until_session_ends(session: int, timeout: float = 10.0) -> Dict[int, str]:
    """Wait up to ``timeout`` s for every process of ``session`` to end; returns the survivors."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
