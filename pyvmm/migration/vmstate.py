"""Declarative device-state descriptions (QEMU's ``VMStateDescription`` and its fields).

A device declares its state once, as data::

    VMSTATE_PL011 = VMStateDescription(
        "pl011", version_id=2, minimum_version_id=2,
        fields=[uint32("flags"), array("read_fifo", uint32, 16), uint32("ifl", since=2)],
        subsections=[VMStateDescription("pl011/clock", 1, 1, [uint64("clock_hz")],
                                         needed=lambda dev: dev.clock_hz != 0)],
    )

naming the attributes of a Python object that hold the values (nested descriptions over
attributes holding nested objects). One interpreter, :mod:`pyvmm.migration.vmstate_interpreter`,
walks a description to save, load and describe it in QEMU's wire format; this module only
declares. A field with ``since=N`` (QEMU's field ``version_id``) exists in streams of version
``>= N``; subsections are descriptions named ``parent/...`` that travel when ``needed(obj)``.

A malformed *description* (a bug in pyvmm's source) raises ``ValueError`` when it is
constructed. Threads: descriptions are immutable and may be shared by any threads.
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

_NAME_MAX = 255  # names travel behind a u8 length
_VERSION_MAX = 0xFFFFFFFF  # versions travel as be32


# -- field kinds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalarKind:
    """A fixed-size integer (or bool) leaf type. Calling it makes a field: ``uint64("pc")``.

    ``type_name`` is QEMU's ``VMStateInfo`` name used in the JSON; ``size`` the bytes on the
    wire per value. ``uint128`` travels as two be64 words, low word first, exactly as QEMU
    sends an AArch64 V register (``env.vfp.zregs[n].d[0..1]``), and is described in the JSON as
    an array of two ``uint64``.
    """

    name: str
    type_name: str
    size: int
    signed: bool
    struct_char: str  # struct module code of one wire word
    words: int = 1  # wire words per value (2 for uint128)
    equal_type_name: str | None = None  # QEMU's "... equal" info, where QEMU has one

    def __call__(
        self, name: str, *, since: int = 0, attr: str | None = None, equal: bool = False
    ) -> ScalarField:
        """A field holding one value of this kind in attribute ``attr`` (default ``name``).

        ``equal=True``: the loaded value must equal the object's current value (QEMU's
        ``*_EQUAL`` fields, for things that must match, such as a register count); a mismatch
        is a :class:`FormatError` and nothing is stored.
        """
        return ScalarField(name=name, attr=attr or name, since=since, kind=self, equal=equal)

    def bounds(self) -> tuple[int, int]:
        """Smallest and largest value (inclusive)."""
        bits = 8 * self.size
        if self.signed:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1


uint8 = ScalarKind("uint8", "uint8", 1, False, "B", equal_type_name="uint8 equal")
uint16 = ScalarKind("uint16", "uint16", 2, False, "H", equal_type_name="uint16 equal")
uint32 = ScalarKind("uint32", "uint32", 4, False, "I", equal_type_name="uint32 equal")
# QEMU names its uint64 equality check "int64 equal"; the analyzer knows it by that name
uint64 = ScalarKind("uint64", "uint64", 8, False, "Q", equal_type_name="int64 equal")
int8 = ScalarKind("int8", "int8", 1, True, "b")
int16 = ScalarKind("int16", "int16", 2, True, "h")
int32 = ScalarKind("int32", "int32", 4, True, "i", equal_type_name="int32 equal")
int64 = ScalarKind("int64", "int64", 8, True, "q")
boolean = ScalarKind("bool", "bool", 1, False, "B")
"""One byte, 0 or 1 (a loader refuses any other value, which QEMU never writes)."""
uint128 = ScalarKind("uint128", "uint64", 16, False, "Q", words=2)


# -- fields --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _FieldBase:
    name: str  # the name in the JSON description (QEMU's field name)
    attr: str  # the attribute of the Python object that holds the value
    since: int = 0  # QEMU's field version_id: present from this stream version on


@dataclass(frozen=True, kw_only=True)
class ScalarField(_FieldBase):
    """One value, or ``count`` values (a fixed array: a sequence of ints), of a scalar kind."""

    kind: ScalarKind
    count: int | None = None
    equal: bool = False
    codec: _struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 0:
            raise ValueError(f"field {self.name}: negative array length {self.count}")
        if self.equal and (self.kind.equal_type_name is None or self.count is not None):
            raise ValueError(f"field {self.name}: QEMU has no equality check for this type")
        words = (1 if self.count is None else self.count) * self.kind.words
        object.__setattr__(self, "codec", _struct.Struct(f">{words}{self.kind.struct_char}"))

    @property
    def elements(self) -> int:
        """Values on the wire (1 for a single value)."""
        return 1 if self.count is None else self.count


@dataclass(frozen=True, kw_only=True)
class BufferField(_FieldBase):
    """Exactly ``size`` raw bytes (a bytes-like attribute)."""

    size: int


@dataclass(frozen=True, kw_only=True)
class VBufferField(_FieldBase):
    """Raw bytes whose length is the value of an earlier scalar field, at most ``max_size``."""

    length_field: str
    max_size: int


@dataclass(frozen=True, kw_only=True)
class StructField(_FieldBase):
    """A nested description over the object in ``attr`` (or ``count`` objects in a sequence)."""

    vmsd: VMStateDescription
    count: int | None = None


@dataclass(frozen=True, kw_only=True)
class UnusedField(_FieldBase):
    """``size`` zero bytes kept where a retired field was (QEMU's ``VMSTATE_UNUSED``)."""

    size: int


VMStateField = ScalarField | BufferField | VBufferField | StructField | UnusedField


def _check_size(name: str, size: int) -> None:
    if size < 0:
        raise ValueError(f"field {name}: negative size {size}")


def buffer(name: str, size: int, *, since: int = 0, attr: str | None = None) -> BufferField:
    """A fixed-size byte buffer. Loading fills a writable buffer of that size in place
    (``bytearray``, writable ``memoryview``), otherwise stores ``bytes``."""
    _check_size(name, size)
    return BufferField(name=name, attr=attr or name, since=since, size=size)


def vbuffer(
    name: str, length_field: str, max_size: int, *, since: int = 0, attr: str | None = None
) -> VBufferField:
    """A byte buffer whose length is held by the earlier scalar field named ``length_field``.

    On load the length (already loaded) must be ``0..max_size``, else :class:`FormatError`,
    before anything is allocated.
    """
    _check_size(name, max_size)
    return VBufferField(
        name=name, attr=attr or name, since=since, length_field=length_field, max_size=max_size
    )


def struct(
    name: str,
    vmsd: VMStateDescription,
    *,
    count: int | None = None,
    since: int = 0,
    attr: str | None = None,
) -> StructField:
    """A nested description; with ``count``, an array of nested objects (a sequence)."""
    if count is not None and count < 0:
        raise ValueError(f"field {name}: negative array length {count}")
    return StructField(name=name, attr=attr or name, since=since, vmsd=vmsd, count=count)


def array(
    name: str,
    kind: ScalarKind | VMStateDescription,
    count: int,
    *,
    since: int = 0,
    attr: str | None = None,
) -> ScalarField | StructField:
    """A fixed-length array of a scalar kind (a sequence of ints) or of a nested description
    (a sequence of objects). Loading a list updates it in place; otherwise stores a tuple."""
    if isinstance(kind, VMStateDescription):
        return struct(name, kind, count=count, since=since, attr=attr)
    return ScalarField(name=name, attr=attr or name, since=since, kind=kind, count=count)


def unused(size: int, *, name: str = "unused", since: int = 0) -> UnusedField:
    """``size`` bytes of zeros on the wire, skipped on load (no attribute)."""
    _check_size(name, size)
    return UnusedField(name=name, attr="", since=since, size=size)


# -- descriptions --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VMStateDescription:
    """The state of one device (or one nested part of it), declared once.

    ``subsections`` are descriptions whose names start with this one's name and ``/``; each is
    sent when its ``needed(obj)`` says so (always when ``needed`` is ``None``) and works on the
    same object as its parent. Hooks raise :class:`FormatError` (or another ``PyvmmError``) to
    reject state; ``post_load`` receives the stream's version of this description.
    Equality is identity.
    """

    name: str
    version_id: int
    minimum_version_id: int
    fields: Sequence[VMStateField]
    subsections: Sequence[VMStateDescription] = ()
    _: KW_ONLY
    needed: Callable[[Any], bool] | None = None
    pre_save: Callable[[Any], None] | None = None
    post_save: Callable[[Any], None] | None = None
    pre_load: Callable[[Any], None] | None = None
    post_load: Callable[[Any, int], None] | None = None
    # the interpreter's plan per stream version, derived lazily from `fields` (its steps are
    # vmstate_interpreter's, which sits above this module: see vmstate_interpreter._plan)
    _plans: dict[int, tuple[Any, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "subsections", tuple(self.subsections))
        where = f"vmstate {self.name!r}"
        if not self.name or len(self.name.encode()) > _NAME_MAX:
            raise ValueError(f"{where}: a name must have 1..{_NAME_MAX} bytes")
        if not 0 <= self.minimum_version_id <= self.version_id <= _VERSION_MAX:
            raise ValueError(
                f"{where}: need 0 <= minimum_version_id ({self.minimum_version_id}) <= "
                f"version_id ({self.version_id}) <= {_VERSION_MAX}"
            )
        names: set[str] = set()
        attrs: set[str] = set()
        earlier: dict[str, VMStateField] = {}
        for f in self.fields:
            if not isinstance(f, VMStateField):
                # every malformed description is a ValueError (see the module docstring)
                raise ValueError(f"{where}: {f!r} is not a field")  # noqa: TRY004
            if not f.name:
                raise ValueError(f"{where}: a field needs a name")
            if f.name in names:
                # QEMU renames duplicates "x[1]" in the JSON; a unique name per field is simpler
                raise ValueError(f"{where}: two fields named {f.name!r}")
            if f.attr and f.attr in attrs:
                raise ValueError(f"{where}: two fields store into attribute {f.attr!r}")
            if not 0 <= f.since <= self.version_id:
                raise ValueError(
                    f"{where}: field {f.name} since={f.since} is not in 0..{self.version_id}"
                )
            if isinstance(f, VBufferField):
                _check_length_field(where, f, earlier.get(f.length_field))
            names.add(f.name)
            attrs.add(f.attr)
            earlier[f.name] = f
        sub_names: set[str] = set()
        for sub in self.subsections:
            if not isinstance(sub, VMStateDescription):
                raise ValueError(  # noqa: TRY004  (as above)
                    f"{where}: subsection {sub!r} is not a VMStateDescription"
                )
            if not sub.name.startswith(self.name + "/") or sub.name == self.name + "/":
                raise ValueError(
                    f"{where}: subsection name {sub.name!r} must start with {self.name + '/'!r}"
                )
            if sub.name in sub_names:
                raise ValueError(f"{where}: two subsections named {sub.name!r}")
            sub_names.add(sub.name)

    def subsection(self, name: str) -> VMStateDescription | None:
        """The subsection called ``name``, if this description has one."""
        for sub in self.subsections:
            if sub.name == name:
                return sub
        return None


def _check_length_field(where: str, f: VBufferField, source: VMStateField | None) -> None:
    if (
        not isinstance(source, ScalarField)
        or source.count is not None
        or source.kind.words != 1
        or source.kind is boolean
    ):
        raise ValueError(
            f"{where}: vbuffer {f.name} needs an earlier single integer field "
            f"{f.length_field!r} for its length"
        )
    if source.since > f.since:
        raise ValueError(
            f"{where}: vbuffer {f.name} (since {f.since}) would exist without its length "
            f"field {source.name} (since {source.since})"
        )
