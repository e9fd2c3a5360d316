"""QFS's tree: what each file of the control filesystem reads and does, over the VM controller.

No FUSE here (:mod:`pyvmm.monitor.qfs` mounts it): a path resolves to a :class:`Node`, a
directory or a file; a file's ``read()`` makes its text (ending in a newline), its ``write(text)``
or ``touch()`` acts.  Every action is a monitor command of :class:`~pyvmm.monitor.controller.
VmController` underneath, so the filesystem and QMP can never disagree.  A bad write raises
:class:`QfsError` with the reason (the mount answers EINVAL and logs the reason).

The tree (``NN``: an increment number, from 00; reload takes a count, from 01)::

    checkpoints/trigger              w: now | periodic:SECONDS (0 stops) | block:devices|memory;
                                     touch: now
    checkpoints/destination          rw: the chpt: target of triggered checkpoints
    checkpoints/capabilities         rw: one "name on|off" per line
    checkpoints/wait_until_finished  r: blocks until no checkpoint runs; its status line
    checkpoints/info/count           r: increments in the destination file
    checkpoints/info/time_since_last r: seconds since the last checkpoint ended (- if none)
    checkpoints/info/nb_dirty_pages  r: pages written since the last checkpoint's pause
    checkpoints/info/checkpoint_NN/  one file per statistic of increment NN, and stats.json
    checkpoints/reload/increment_NN  touch: reload the first NN increments into this process
    control/stop, cont, quit         w or touch: as the monitor commands
    control/status                   r: the run state (running, paused, ...)
    info/pid, info/vm_id, info/host_ram_location
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import PyvmmError

if TYPE_CHECKING:
    from .controller import VmController

#: Bytes a write may carry: every command is a short line; more is refused, not buffered.
MAX_WRITE = 4096
_INCREMENT = re.compile(r"checkpoint_(\d{2,})")
_RELOAD = re.compile(r"increment_(\d{2,})")


class QfsError(PyvmmError):
    """A write QFS refuses (EINVAL), with the reason the monitor's log gets."""


@dataclasses.dataclass
class Node:
    """A directory (``children``) or a file (``read``, ``write``, ``touch``; None: not
    allowed, EACCES/EINVAL).  ``blocking``: reading it waits (the kernel must not cache it)."""

    children: Callable[[], list[str]] | None = None
    read: Callable[[], str] | None = None
    write: Callable[[str], None] | None = None
    touch: Callable[[], None] | None = None
    blocking: bool = False

    @property
    def is_dir(self) -> bool:
        return self.children is not None


class QfsTree:
    """The nodes of one VM's control filesystem."""

    def __init__(self, vm: VmController) -> None:
        self.vm = vm
        self._destination: str | None = None
        self._last_end: float | None = None
        self._lock = threading.Lock()
        vm.events.subscribe(self._on_event)

    def close(self) -> None:
        self.vm.events.unsubscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        if event.name == "CHECKPOINT":
            self._last_end = time.monotonic()

    # ------------------------------------------------------------------ the tree
    def lookup(self, path: str) -> Node | None:
        """The node at ``path`` (``/``-separated, from the mount's root), or None."""
        parts = [p for p in path.split("/") if p]
        tree = self._static()
        node: Any = tree
        for i, part in enumerate(parts):
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            return self._dynamic(parts[:i], part, parts[i + 1:])
        if isinstance(node, dict):
            names = list(node)
            return Node(children=lambda: names)
        return node if isinstance(node, Node) else None

    def _static(self) -> dict[str, Any]:
        vm = self.vm
        return {
            "checkpoints": {
                "trigger": Node(read=lambda: "now | periodic:SECONDS | block:devices|memory\n",
                                write=self._trigger, touch=lambda: self._trigger("now")),
                "destination": Node(read=lambda: f"chpt:{self.destination()}\n",
                                    write=self._set_destination),
                "capabilities": Node(read=self._capabilities, write=self._set_capabilities),
                "wait_until_finished": Node(read=self._wait, blocking=True),
                "info": {
                    "count": Node(read=lambda: f"{len(self._increments())}\n"),
                    "time_since_last": Node(read=self._time_since_last),
                    "nb_dirty_pages": Node(read=self._dirty_pages),
                },
                "reload": {},
            },
            "control": {
                "stop": Node(write=lambda _t: vm.stop(), touch=vm.stop),
                "cont": Node(write=lambda _t: vm.cont(), touch=vm.cont),
                "quit": Node(write=lambda _t: vm.quit(), touch=vm.quit),
                "status": Node(read=lambda: f"{vm.status()['status']}\n"),
            },
            "info": {
                "pid": Node(read=lambda: f"{os.getpid()}\n"),
                "vm_id": Node(read=self._vm_id),
                "host_ram_location": Node(read=self._ram_location),
            },
        }

    def _dynamic(self, parents: list[str], name: str, rest: list[str]) -> Node | None:
        """``checkpoints/info/checkpoint_NN[/STAT]`` and ``checkpoints/reload/increment_NN``."""
        if parents == ["checkpoints", "info"] and (match := _INCREMENT.fullmatch(name)):
            stats = self._stats(int(match.group(1)))
            if stats is None or len(rest) > 1:
                return None
            files = {key: value for key, value in stats.items()
                     if isinstance(value, (int, float, str)) and not isinstance(value, bool)}
            if not rest:
                return Node(children=lambda: [*files, "stats.json"])
            if rest[0] == "stats.json":
                return Node(read=lambda: json.dumps(stats, indent=1) + "\n")
            if rest[0] in files:
                value = files[rest[0]]
                return Node(read=lambda: f"{value}\n")
            return None
        if parents == ["checkpoints", "reload"] and not rest and \
                (match := _RELOAD.fullmatch(name)):
            count = int(match.group(1))
            if 1 <= count <= len(self._increments()):
                return Node(read=lambda: f"touch to reload the first {count} increment(s) "
                                         f"of {self.destination()} into this process\n",
                            touch=lambda: self._reload(count), write=lambda _t: self._reload(count))
        return None

    def listing(self, path: str) -> list[str]:
        """The names in directory ``path``, the dynamic ones included."""
        parts = [p for p in path.split("/") if p]
        node = self.lookup(path)
        if node is None or node.children is None:
            return []
        names = node.children()
        if parts == ["checkpoints", "info"]:
            names = [*names, *(f"checkpoint_{i.index:02d}" for i in self._increments())]
        elif parts == ["checkpoints", "reload"]:
            names = [f"increment_{n:02d}" for n in range(1, len(self._increments()) + 1)]
        return names

    # ------------------------------------------------------------------ checkpoints
    def destination(self) -> str:
        if self._destination is not None:
            return self._destination
        current = self.vm.checkpoint_file()
        if current is not None:
            return current
        from ..migration.checkpoint import CheckpointTarget

        return CheckpointTarget("").resolved().path

    def _set_destination(self, text: str) -> None:
        from ..migration.checkpoint import parse_target

        value = text.strip()
        target = parse_target(value if value.startswith("chpt:") else f"chpt:{value}")
        if target.count is not None or target.squash or not target.path:
            raise QfsError(f"destination takes chpt:FILE, not {value!r}")
        self._destination = os.path.abspath(target.path)

    def _trigger(self, text: str) -> None:
        command = text.strip()
        uri = f"chpt:{self.destination()}"
        if command == "now":
            self.vm.migrate(uri)
        elif command.startswith("periodic:"):
            try:
                period = float(command.partition(":")[2])
            except ValueError:
                raise QfsError(f"periodic takes seconds, not {command!r}") from None
            if period == 0:
                self.vm.migrate_cancel()
            elif 0 < period < float("inf"):
                self.vm.migrate(uri, period=period)
            else:
                raise QfsError(f"periodic takes seconds > 0 (0 stops), not {command!r}")
        elif command.startswith("block:"):
            what = command.partition(":")[2]
            if what == "none":
                raise QfsError("block:none does not map onto pyvmm: a checkpoint always "
                               "pauses the guest to capture its devices (block:devices is the "
                               "least, the live capability)")
            if what not in ("devices", "memory"):
                raise QfsError(f"block takes none, devices or memory, not {what!r}")
            self.vm.set_capabilities({"live": what == "devices"})
        else:
            raise QfsError(f"trigger takes now, periodic:SECONDS or block:devices|memory, not "
                           f"{command[:40]!r}")

    def _capabilities(self) -> str:
        return "".join(f"{c['capability']} {'on' if c['state'] else 'off'}\n"
                       for c in self.vm.capabilities())

    def _set_capabilities(self, text: str) -> None:
        known = {c["capability"] for c in self.vm.capabilities()}
        changes = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            words = line.split()
            if len(words) != 2 or words[0] not in known or words[1] not in ("on", "off"):
                raise QfsError(f"capabilities takes 'name on|off' lines ({', '.join(known)}), "
                               f"not {line[:60]!r}")
            changes[words[0]] = words[1] == "on"
        self.vm.set_capabilities(changes)

    def _wait(self) -> str:
        reply = self.vm.wait_migration()
        error = reply.get("error-desc")
        return f"{reply.get('status', 'none')}{f': {error}' if error else ''}\n"

    def _increments(self) -> tuple[Any, ...]:
        from ..migration.container import CheckpointFile

        path = self.destination()
        if not os.path.exists(path):
            return ()
        try:
            with CheckpointFile.open(path) as container:
                return container.header.increments
        except PyvmmError:
            return ()

    def _stats(self, index: int) -> dict[str, Any] | None:
        from ..migration.container import CheckpointFile

        if index >= len(self._increments()):
            return None
        try:
            with CheckpointFile.open(self.destination()) as container:
                stats: dict[str, Any] = container.stats(index)
                return stats
        except PyvmmError:
            return None

    def _time_since_last(self) -> str:
        last = self._last_end
        return "-\n" if last is None else f"{time.monotonic() - last:.3f}\n"

    def _dirty_pages(self) -> str:
        checkpointer = self.vm.checkpointer
        tracker = checkpointer.tracker if checkpointer is not None else None
        count = getattr(tracker, "dirty_count", None)
        if count is None:
            return "-\n"  # nothing tracks writes until an incremental checkpoint has run
        return f"{count()}\n"

    def _reload(self, count: int) -> None:
        self.vm.reload(f"chpt:{count}:{self.destination()}")

    # ------------------------------------------------------------------ info
    def _vm_id(self) -> str:
        from ..identity import vm_id

        return f"{vm_id()}\n"

    def _ram_location(self) -> str:
        machine = self.vm.machine
        if machine is None:
            return ""
        return "".join(f"{b.name} 0x{b.host_addr:x}-0x{b.host_addr + b.size:x} gpa 0x{b.gpa:x} "
                       f"{b.size}\n" for b in machine.ram_blocks)
