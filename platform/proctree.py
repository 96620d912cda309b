"""Finding and stopping every process a command started, including the ones Flower detaches.

Flower's SuperLink starts its executor (flower-superexec) with `start_new_session=True`, and the
executor spawns the ServerApp (flwr-serverapp) in that new session. Signalling the SuperLink's
process group therefore misses both, and once the SuperLink has exited they are re-parented and
out of reach of a parent-id walk; the ServerApp also ignores SIGTERM while its exit handler
retries. So stopping works on the whole *tree*:

- the command becomes a child subreaper (Linux `prctl`), so orphans of its tree are re-parented
  to it instead of to init;
- every process ever seen in the tree is remembered by (pid, start time), so one that escaped is
  still found, and a reused pid is never signalled;
- `stop_tree` SIGTERMs the tree, waits a grace period, then SIGKILLs whatever is left;
- a watchdog process (`python -m fedveil.platform.proctree`) holds the same memory and stops the
  tree when the command itself dies without stopping it (kill -9, OOM).

Linux only (/proc); elsewhere the walk finds no descendants and stopping falls back to signalling
the started processes' groups.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, NamedTuple

PR_SET_CHILD_SUBREAPER = 36


class ProcInfo(NamedTuple):
    ppid: int
    sid: int
    zombie: bool
    start: int  # clock ticks since boot: with the pid, identifies one process across pid reuse


def proc_table() -> dict[int, ProcInfo]:
    """Every visible process's parent, session and start time, read from /proc."""
    table: dict[int, ProcInfo] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()  # the command name may contain spaces and parens
        try:
            table[int(entry)] = ProcInfo(int(fields[1]), int(fields[3]), fields[0] in ("Z", "X"), int(fields[19]))
        except (IndexError, ValueError):
            continue
    return table


def become_subreaper() -> bool:
    """Make this process inherit the orphans of its descendants (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(roots: Iterable[int], table: dict[int, ProcInfo] | None = None) -> dict[int, int]:
    """The live descendants of `roots` and the members of their own sessions, as {pid: start time}.

    Session members count because Flower's detached helpers keep the session of the process that
    spawned them even after it has exited. Our own process and session are never included.
    """
    table = proc_table() if table is None else table
    own_pid, own_sid = os.getpid(), os.getsid(0)
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: set[int] = set()
    frontier = [p for p in roots if p in table]
    while frontier:
        pid = frontier.pop()
        if pid in found or pid == own_pid:
            continue
        found.add(pid)
        frontier.extend(children.get(pid, []))
        sid = table[pid].sid
        if sid not in (own_sid, 0, 1):
            frontier.extend(p for p, info in table.items() if info.sid == sid)
    found -= set(roots)
    return {pid: table[pid].start for pid in found if not table[pid].zombie}


def runs_program(roots: Iterable[int], program: str, table: dict[int, ProcInfo] | None = None) -> bool:
    """Whether a live descendant of `roots` runs `program` (named as argv[0] or as a script's argv[1])."""
    for pid in descendants(roots, table):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
        except OSError:
            continue
        if any(os.path.basename(arg.decode(errors="replace")) == program for arg in argv):
            return True
    return False


def alive(tracked: dict[int, int], table: dict[int, ProcInfo] | None = None) -> dict[int, int]:
    """The subset of {pid: start time} that is still the same, running (not zombie) process."""
    table = proc_table() if table is None else table
    return {p: s for p, s in tracked.items() if p in table and table[p].start == s and not table[p].zombie}


def _reap(pids: Iterable[int]) -> None:
    """Collect exited orphans that were re-parented to us (we are their subreaper)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(tracked: dict[int, int], roots: Iterable[int] = (), grace: float = 5.0,
              kill_wait: float = 5.0, no_reap: Iterable[int] = ()) -> dict[int, int]:
    """SIGTERM every tracked process and the trees under `roots`, SIGKILL what is left after `grace`.

    `no_reap` are pids a `subprocess.Popen` owns (it must collect their exit status itself).
    Returns the processes still alive at the end (empty unless something is unkillable).
    """
    roots = list(roots)
    keep = set(no_reap)
    known = dict(tracked)

    def refresh() -> dict[int, int]:
        table = proc_table()
        known.update(descendants(roots + list(alive(known, table)), table))
        live = alive(known, table)
        _reap(p for p in known if p not in live and p not in keep)
        return live

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        live = refresh()
        _signal(live, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = refresh()
            _signal(live, sig)  # newly found processes get the same signal
        if not live:
            return {}
    return refresh()


# ---- the watchdog ---------------------------------------------------------------------------------
def start_watchdog() -> subprocess.Popen | None:
    """A process that stops our started processes' trees if this process dies without doing it.

    Tell it each started root's pid with `watch(dog, pid)`; closing its stdin (which happens when
    this process dies, however it dies) makes it stop every process it has seen in those trees.
    """
    try:
        return subprocess.Popen([sys.executable, "-m", "fedveil.platform.proctree"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                text=True)
    except OSError:
        return None


def watch(dog: subprocess.Popen | None, pid: int) -> None:
    if dog is None or dog.stdin is None or dog.poll() is not None:
        return
    try:
        dog.stdin.write(f"{pid}\n")
        dog.stdin.flush()
    except (BrokenPipeError, OSError):
        pass


def release(dog: subprocess.Popen | None) -> None:
    """Tell the watchdog everything was stopped: it checks once more and exits."""
    if dog is None:
        return
    try:
        if dog.stdin is not None:
            dog.stdin.close()
    except OSError:
        pass
    try:
        dog.wait(timeout=15)
    except subprocess.TimeoutExpired:
        dog.kill()
        dog.wait(timeout=5)


def _watchdog_main(poll: float = 0.5) -> None:
    """Remember every process in the watched trees; when stdin closes, stop them all."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C to the terminal must not kill the watchdog first
    roots: dict[int, int] = {}
    seen: dict[int, int] = {}
    fd = sys.stdin.fileno()
    buffer = b""
    while True:
        ready, _, _ = select.select([fd], [], [], poll)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            table = proc_table()
            for line in lines:
                if line.strip().isdigit() and int(line) in table:
                    roots[int(line)] = table[int(line)].start
        table = proc_table()
        seen.update(descendants(list(alive(roots, table)) + list(alive(seen, table)), table))
    stop_tree({**roots, **seen}, roots=list(alive(roots)), grace=3.0)


if __name__ == "__main__":
    _watchdog_main()
