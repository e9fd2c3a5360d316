"""A monitor's view of its migrations: the status QEMU reports, and ``query-migrate``'s reply."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from ..ram import PAGE_SIZE

if TYPE_CHECKING:
    from ..migration.checkpoint import CheckpointStats

#: The states a migration passes through (QEMU's MigrationStatus, the subset pyvmm reaches).
ACTIVE = ("setup", "active", "cancelling")


@dataclasses.dataclass
class MigrationStatus:
    status: str = "none"
    started: float = 0.0  # time.monotonic() of the current checkpoint's start
    stats: CheckpointStats | None = None  # the last completed checkpoint's
    error: str | None = None
    path: str | None = None
    completed: int = 0  # checkpoints completed by this process

    def reply(self, ram_total: int) -> dict[str, Any]:
        """QMP ``query-migrate``, QEMU's field names (``ram_total``: the machine's RAM)."""
        reply: dict[str, Any] = {"status": self.status}
        if self.status == "none":
            return reply
        stats = self.stats
        if self.status in ACTIVE:
            reply["total-time"] = int((time.monotonic() - self.started) * 1000)
            if stats is not None:
                reply["expected-downtime"] = round(stats.downtime_ms)
        if stats is not None:
            if self.status not in ACTIVE:
                reply["total-time"] = round(stats.total_ms)
                reply["downtime"] = round(stats.downtime_ms)
            reply["setup-time"] = round(stats.setup_ms)
            seconds = max(stats.total_ms / 1000, 1e-9)
            reply["ram"] = {
                "transferred": stats.bytes_written,
                "total": ram_total,
                "remaining": 0,
                "duplicate": stats.zero_pages,
                "normal": stats.pages,
                "normal-bytes": stats.pages * PAGE_SIZE,
                "mbps": round(stats.bytes_written * 8 / 1e6 / seconds, 3),
                "pages-per-second": round((stats.pages + stats.zero_pages) / seconds),
                "dirty-sync-count": self.completed,
                "page-size": PAGE_SIZE,
            }
            reply["checkpoint"] = {"file": self.path, **stats_data(stats)}
        if self.error is not None and self.status == "failed":
            reply["error-desc"] = self.error
        return reply


def stats_data(stats: CheckpointStats) -> dict[str, Any]:
    """A checkpoint's statistics as event/reply data (kebab-case keys, as QMP's)."""
    return {key.replace("_", "-"): list(value) if isinstance(value, tuple) else value
            for key, value in stats.as_dict().items()}
