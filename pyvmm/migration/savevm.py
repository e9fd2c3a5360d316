"""The savevm layer: a registry of save-state entries and QEMU v3 stream framing around them.

One :class:`SaveState` per machine holds its entries (no globals).  Live entries (RAM) implement
:class:`LiveHandler` and are saved in START / PART / END sections; plain entries (devices, CPU)
are a vmstate description over an object, saved in one FULL section each.  A whole increment is::

    QEVM, version 3, CONFIGURATION(machine name)
    START(ram) setup ... footer, PART(ram) pages ... footer, END(ram) ... footer
    FULL(device) fields ... footer      for every plain entry
    EOF, VMDESCRIPTION (JSON of every device section)

Loading dispatches sections by (idstr, instance_id) and rejects unknown ones with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import FormatError, PyvmmError
from .stream import QEMUFile
from .vmstate import VMStateDescription
from .vmstate_interpreter import describe_device, load_state, save_state

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_SECTION_FOOTER = 0x7E

_SECTION_NAMES = {QEMU_VM_SECTION_START: "START", QEMU_VM_SECTION_PART: "PART",
                  QEMU_VM_SECTION_END: "END", QEMU_VM_SECTION_FULL: "FULL"}
#: Bound on the JSON description we accept after EOF (it describes devices, not RAM).
MAX_DESCRIPTION = 16 << 20
#: Bound on the machine name in the CONFIGURATION section.
MAX_MACHINE_NAME = 256


class LiveHandler(Protocol):
    """An iterative save-state entry (QEMU's ``SaveVMHandlers``), e.g. RAM.

    Save methods write one section body each and run on the saving thread; ``load`` reads one
    section body (through its end marker) and runs on the loading thread.
    """

    def save_setup(self, f: QEMUFile) -> None: ...

    def save_iterate(self, f: QEMUFile) -> bool:
        """Send some data; True when nothing is left to send before completion."""
        ...

    def save_complete(self, f: QEMUFile) -> None: ...

    def load(self, f: QEMUFile, version_id: int) -> None: ...


@dataclasses.dataclass
class SaveStateEntry:
    """One registered piece of machine state (QEMU's ``SaveStateEntry``)."""

    idstr: str
    instance_id: int
    version_id: int
    #: Lower sorts first when saving; live entries always go before plain ones.
    priority: int = 0
    vmsd: VMStateDescription | None = None
    opaque: Any = None  # the object the vmsd describes
    handler: LiveHandler | None = None
    section_id: int = -1

    @property
    def live(self) -> bool:
        return self.handler is not None


@dataclasses.dataclass
class LoadResult:
    """What a load saw: which sections, and whether it stopped early."""

    sections: list[str] = dataclasses.field(default_factory=list)
    description: dict[str, Any] | None = None
    stopped_after_ram: bool = False


class SaveState:
    """The save-state registry of one machine and the stream framing that uses it."""

    def __init__(self, machine_name: str) -> None:
        if not machine_name or len(machine_name.encode()) > MAX_MACHINE_NAME:
            raise ValueError(f"machine name must have 1..{MAX_MACHINE_NAME} bytes")
        self.machine_name = machine_name
        self.entries: list[SaveStateEntry] = []

    def register(self, entry: SaveStateEntry) -> SaveStateEntry:
        if (entry.vmsd is None) == (entry.handler is None):
            raise ValueError(f"entry {entry.idstr}: give exactly one of vmsd and handler")
        if self.find(entry.idstr, entry.instance_id) is not None:
            raise ValueError(f"entry {entry.idstr}/{entry.instance_id} registered twice")
        self.entries.append(entry)
        self.entries.sort(key=lambda e: (not e.live, e.priority))
        for section_id, e in enumerate(self.entries):
            e.section_id = section_id
        return entry

    def find(self, idstr: str, instance_id: int) -> SaveStateEntry | None:
        for entry in self.entries:
            if entry.idstr == idstr and entry.instance_id == instance_id:
                return entry
        return None

    @property
    def live_entries(self) -> list[SaveStateEntry]:
        return [e for e in self.entries if e.live]

    @property
    def device_entries(self) -> list[SaveStateEntry]:
        return [e for e in self.entries if not e.live]

    # ------------------------------------------------------------------------- saving
    def save_header(self, f: QEMUFile) -> None:
        """Magic, version and the CONFIGURATION section (machine name, no subsection)."""
        f.put_be32(QEMU_VM_FILE_MAGIC)
        f.put_be32(QEMU_VM_FILE_VERSION)
        f.put_u8(QEMU_VM_CONFIGURATION)
        name = self.machine_name.encode()
        f.put_be32(len(name))
        f.put_bytes(name)

    def save_setup(self, f: QEMUFile) -> None:
        for entry in self.live_entries:
            self._section_header(f, QEMU_VM_SECTION_START, entry)
            assert entry.handler is not None
            entry.handler.save_setup(f)
            self._footer(f, entry)

    def save_iterate(self, f: QEMUFile) -> bool:
        """One PART section per live entry; True when all of them have nothing left."""
        done = True
        for entry in self.live_entries:
            self._section_header(f, QEMU_VM_SECTION_PART, entry)
            assert entry.handler is not None
            done = entry.handler.save_iterate(f) and done
            self._footer(f, entry)
        return done

    def save_complete(self, f: QEMUFile) -> None:
        for entry in self.live_entries:
            self._section_header(f, QEMU_VM_SECTION_END, entry)
            assert entry.handler is not None
            entry.handler.save_complete(f)
            self._footer(f, entry)

    def save_devices(self, f: QEMUFile) -> list[dict[str, Any]]:
        """A FULL section per plain entry; returns their JSON descriptions.

        ``f`` may be a memory stream: a live checkpoint serialises devices during its short
        pause and copies the bytes into the file later (:meth:`save_device_bytes`).
        """
        descriptions = []
        for entry in self.device_entries:
            assert entry.vmsd is not None
            if entry.vmsd.needed is not None and not entry.vmsd.needed(entry.opaque):
                continue
            self._section_header(f, QEMU_VM_SECTION_FULL, entry)
            desc = save_state(f, entry.vmsd, entry.opaque, version_id=entry.version_id)
            self._footer(f, entry)
            descriptions.append(describe_device(entry.idstr, entry.instance_id, desc))
        return descriptions

    def save_trailer(self, f: QEMUFile, devices: list[dict[str, Any]], page_size: int) -> None:
        """EOF, then the VMDESCRIPTION that lets QEMU's analyzer walk the device sections."""
        f.put_u8(QEMU_VM_EOF)
        text = json.dumps({"page_size": page_size, "devices": devices},
                          separators=(",", ":")).encode()
        # QEMU's analyzer finds the JSON as the first "{" after the file's last NUL byte, so
        # a "{" (0x7b) among the length's bytes would be taken for the JSON's start; trailing
        # spaces (still valid JSON) move the length past such values.
        while b"{" in len(text).to_bytes(4, "big"):
            text += b" "
        f.put_u8(QEMU_VM_VMDESCRIPTION)
        f.put_be32(len(text))
        f.put_bytes(text)

    def _section_header(self, f: QEMUFile, kind: int, entry: SaveStateEntry) -> None:
        f.put_u8(kind)
        f.put_be32(entry.section_id)
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            f.put_str8(entry.idstr)
            f.put_be32(entry.instance_id)
            f.put_be32(entry.version_id)

    @staticmethod
    def _footer(f: QEMUFile, entry: SaveStateEntry) -> None:
        f.put_u8(QEMU_VM_SECTION_FOOTER)
        f.put_be32(entry.section_id)

    # ------------------------------------------------------------------------- loading
    def load(self, f: QEMUFile, *, stop_after_ram: bool = False, post_load: bool = True,
             on_device: Callable[[SaveStateEntry], None] | None = None) -> LoadResult:
        """Read a whole stream into the registered entries.

        ``stop_after_ram``: return right after the last live entry's END section (the original's
        partial reload of non-last increments; device state is not touched).  ``post_load``
        false: load device sections without running their ``post_load`` hooks (a non-last
        increment of a sequential reload).  ``on_device`` is called after each device section.
        Raises
        FormatError (with the section named) for anything malformed or unknown.
        """
        result = LoadResult()
        self._load_header(f)
        by_section: dict[int, SaveStateEntry] = {}
        ended: set[int] = set()
        live_ids = {(e.idstr, e.instance_id) for e in self.live_entries}
        while True:
            at = f.offset
            kind = f.get_u8()
            f.check()
            if kind == QEMU_VM_EOF:
                break
            if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
                section_id = f.get_be32()
                idstr = f.get_str8()
                instance_id = f.get_be32()
                version_id = f.get_be32()
                f.check()
                entry = self.find(idstr, instance_id)
                if entry is None:
                    raise FormatError(f"unknown section {idstr!r} instance {instance_id}",
                                      offset=at, section=idstr)
                if (kind == QEMU_VM_SECTION_START) != entry.live:
                    raise FormatError(f"section {idstr} has the wrong type "
                                      f"{_SECTION_NAMES[kind]}", offset=at, section=idstr)
                if section_id in by_section:
                    raise FormatError(f"section id {section_id} used twice", offset=at,
                                      section=idstr)
                by_section[section_id] = entry
            elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                section_id = f.get_be32()
                f.check()
                found = by_section.get(section_id)
                if found is None or not found.live:
                    raise FormatError(f"{_SECTION_NAMES[kind]} section for unknown section id "
                                      f"{section_id}", offset=at)
                entry = found
                version_id = entry.version_id
            else:
                raise FormatError(f"unknown section type 0x{kind:02x}", offset=at)
            if version_id > entry.version_id:
                raise FormatError(f"section {entry.idstr} version {version_id} is newer than "
                                  f"the supported {entry.version_id}", offset=at,
                                  section=entry.idstr)
            try:
                if entry.live:
                    assert entry.handler is not None
                    entry.handler.load(f, version_id)
                else:
                    assert entry.vmsd is not None
                    load_state(f, entry.vmsd, entry.opaque, version_id, post_load=post_load)
                    if on_device is not None:
                        on_device(entry)
                f.check()
            except FormatError as err:
                raise err.located(section=entry.idstr) from err
            self._load_footer(f, entry, section_id)
            result.sections.append(f"{_SECTION_NAMES[kind]}:{entry.idstr}")
            if kind == QEMU_VM_SECTION_END:
                ended.add(section_id)
                if stop_after_ram and {(by_section[s].idstr, by_section[s].instance_id)
                                       for s in ended} >= live_ids:
                    result.stopped_after_ram = True
                    return result
        result.description = self._load_description(f)
        return result

    def _load_header(self, f: QEMUFile) -> None:
        magic = f.get_be32()
        version = f.get_be32()
        f.check()
        if magic != QEMU_VM_FILE_MAGIC:
            raise FormatError(f"not a QEMU migration stream (magic 0x{magic:08x})",
                              offset=f.offset - 8)
        if version != QEMU_VM_FILE_VERSION:
            raise FormatError(f"unsupported QEMU stream version {version} (expected 3)",
                              offset=f.offset - 4)
        if f.peek_byte() == QEMU_VM_CONFIGURATION:
            f.get_u8()
            length = f.get_be32()
            f.check()
            if length > MAX_MACHINE_NAME:
                raise FormatError(f"machine name of {length} bytes is too long",
                                  offset=f.offset - 4, section="configuration")
            name = f.get_bytes(length).decode("utf-8", "replace")
            if name != self.machine_name:
                raise FormatError(f"stream is for machine {name!r}, not {self.machine_name!r}",
                                  section="configuration")

    @staticmethod
    def _load_footer(f: QEMUFile, entry: SaveStateEntry, section_id: int) -> None:
        at = f.offset
        marker = f.get_u8()
        footer_id = f.get_be32()
        f.check()
        if marker != QEMU_VM_SECTION_FOOTER or footer_id != section_id:
            raise FormatError(f"section {entry.idstr} does not end with its footer "
                              f"(found 0x{marker:02x}, id {footer_id})", offset=at,
                              section=entry.idstr)

    @staticmethod
    def _load_description(f: QEMUFile) -> dict[str, Any] | None:
        if f.peek_byte() != QEMU_VM_VMDESCRIPTION:
            return None
        f.get_u8()
        length = f.get_be32()
        f.check()
        if length > MAX_DESCRIPTION:
            raise FormatError(f"VM description of {length} bytes is too long",
                              offset=f.offset - 4)
        try:
            value = json.loads(f.get_bytes(length))
        except ValueError as err:
            raise FormatError("VM description is not valid JSON", offset=f.offset) from err
        return value if isinstance(value, dict) else None


class SaveVMError(PyvmmError):
    """Saving the machine's state failed (the message says which part)."""
