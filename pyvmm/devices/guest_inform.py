"""The guest-inform device: lets the guest see how checkpointing of it is going.

Register map (32-bit registers, little-endian; offsets from GUEST_INFORM_BASE):

  0x00 MAGIC            RO  0x50564749 ("PVGI")
  0x04 VERSION          RO  1
  0x08 CHECKPOINT_COUNT RO  checkpoints completed since power-on (survives save/reload)
  0x0c CHECKPOINT_STATE RO  0 none yet, 1 in progress, 2 completed, 3 failed
  0x10 RESTORE_COUNT    RO  how many times this machine's state was reloaded from a checkpoint
  0x14 REQUEST          RW  guest-written request word; the host side (monitor) decides what a
                            request means; reading returns the last value written
  0x18 REQUEST_COUNT    RO  number of writes to REQUEST
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from ..migration.vmstate import VMStateDescription, uint32
from .base import MmioDevice

GUEST_INFORM_BASE = 0x090F_0000
GUEST_INFORM_SIZE = 0x1000
MAGIC = 0x5056_4749
VERSION = 1

MAGIC_REG, VERSION_REG, CHECKPOINT_COUNT_REG, CHECKPOINT_STATE_REG = 0x00, 0x04, 0x08, 0x0C
RESTORE_COUNT_REG, REQUEST_REG, REQUEST_COUNT_REG = 0x10, 0x14, 0x18


class CheckpointStatus(enum.IntEnum):
    NONE = 0
    IN_PROGRESS = 1
    COMPLETED = 2
    FAILED = 3


@dataclasses.dataclass
class GuestInformState:
    checkpoint_count: int = 0
    checkpoint_status: int = CheckpointStatus.NONE
    restore_count: int = 0
    request: int = 0
    request_count: int = 0


VMSTATE_GUEST_INFORM = VMStateDescription(
    "guest-inform", version_id=1, minimum_version_id=1,
    fields=[uint32("checkpoint_count"), uint32("checkpoint_status"), uint32("restore_count"),
            uint32("request"), uint32("request_count")],
)


class GuestInform(MmioDevice):
    """The device; the host updates it through :meth:`checkpoint_started` and friends."""

    name = "guest-inform"

    def __init__(self, base: int = GUEST_INFORM_BASE,
                 on_request: Callable[[int], None] | None = None) -> None:
        self.base = base
        self.size = GUEST_INFORM_SIZE
        self.on_request = on_request
        self.state = GuestInformState()

    def reset(self) -> None:
        self.state = GuestInformState()

    def checkpoint_started(self) -> None:
        self.state.checkpoint_status = CheckpointStatus.IN_PROGRESS

    def checkpoint_finished(self, ok: bool) -> None:
        if ok:
            self.state.checkpoint_count += 1
        self.state.checkpoint_status = CheckpointStatus.COMPLETED if ok else CheckpointStatus.FAILED

    def restored(self) -> None:
        self.state.restore_count += 1

    def read(self, offset: int, size: int) -> int:
        s = self.state
        return {
            MAGIC_REG: MAGIC,
            VERSION_REG: VERSION,
            CHECKPOINT_COUNT_REG: s.checkpoint_count,
            CHECKPOINT_STATE_REG: int(s.checkpoint_status),
            RESTORE_COUNT_REG: s.restore_count,
            REQUEST_REG: s.request,
            REQUEST_COUNT_REG: s.request_count,
        }.get(offset, 0) & 0xFFFF_FFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == REQUEST_REG:
            self.state.request = value & 0xFFFF_FFFF
            self.state.request_count += 1
            if self.on_request is not None:
                self.on_request(self.state.request)
