"""The one interpreter of vmstate descriptions: save, load and describe, in QEMU's wire format.

It walks a :class:`~pyvmm.migration.vmstate.VMStateDescription` over a Python object whose
attributes hold the values: :func:`save_state` writes the fields in order, big-endian, with no
names or lengths on the wire (exactly QEMU's bytes) and returns the JSON description of what it
wrote; :func:`load_state` reads them back *into an existing object*, as QEMU does;
:func:`describe` gives the description alone.

Wire facts mirrored from QEMU (``migration/vmstate.c``): a field with ``since=N`` (QEMU's field
``version_id``) is present when the stream's version is ``>= N``; a nested struct is loaded with
its own description's ``version_id`` (no version on the wire); after the fields each *needed*
subsection is sent as ``0x05, u8 len, name, be32 version_id`` followed by its fields (and its
own subsections); a loader takes subsections while the next byte is ``0x05`` and the name starts
with the parent's name and ``/``. Hooks run in QEMU's order: ``pre_save`` before the fields,
``needed`` after them, ``post_save`` at the very end (also on failure); ``pre_load`` before the
fields, ``post_load(obj, version_id)`` after the fields *and* the subsections.

Incoming streams are hostile: every length is bounded before anything is allocated, and every
malformed input raises :class:`~pyvmm.errors.FormatError` (:class:`StreamError` for
truncation, :class:`VersionError` for versions) and nothing else.

Threads: the interpreter runs on the thread that owns the stream and the object (typically the
vCPU thread while it is paused).
"""

from __future__ import annotations

import struct as _struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyvmm.errors import FormatError, StreamError, VersionError
from pyvmm.migration.stream import QEMUFile
from pyvmm.migration.vmstate import (
    BufferField,
    ScalarField,
    StructField,
    UnusedField,
    VBufferField,
    VMStateDescription,
    VMStateField,
    boolean,
)

QEMU_VM_SUBSECTION = 0x05
"""Marker byte in front of each subsection on the wire."""

_U64_MASK = (1 << 64) - 1

Description = dict[str, Any]
"""One level of the VMDESCRIPTION JSON: ``{"vmsd_name", "version", "fields", "subsections"?}``."""


# -- leaf codecs ---------------------------------------------------------------------------


def _encode_scalars(path: str, fld: ScalarField, values: Sequence[Any], f: QEMUFile) -> bytes:
    kind = fld.kind
    words: Sequence[Any]
    if kind.words == 2:
        split: list[int] = []
        for v in values:
            if not isinstance(v, int) or v < 0 or v >> 128:
                raise FormatError(f"{path}: {v!r} does not fit {kind.name}", offset=f.offset)
            split += (v & _U64_MASK, v >> 64)
        words = split
    elif kind is boolean:
        words = [1 if v else 0 for v in values]
    else:
        words = values
    try:
        return fld.codec.pack(*words)
    except _struct.error as err:
        shown = values[0] if fld.count is None else values
        raise FormatError(
            f"{path}: {shown!r} does not fit {kind.name}", offset=f.offset
        ) from err


def _decode_scalars(path: str, f: ScalarField, raw: bytes, offset: int) -> list[Any]:
    kind = f.kind
    words = f.codec.unpack(raw)
    if kind.words == 2:
        return [words[i] | words[i + 1] << 64 for i in range(0, len(words), 2)]
    if kind is boolean:
        if any(w > 1 for w in words):
            raise FormatError(f"{path}: a bool must be 0 or 1, got {max(words)}", offset=offset)
        return [w == 1 for w in words]
    return list(words)


def _writable_buffer(value: object, size: int) -> memoryview | None:
    """A writable byte view of ``value`` if it can be loaded in place (right size)."""
    if isinstance(value, (bytearray, memoryview)):
        view = memoryview(value)
        if not view.readonly and view.nbytes == size and view.c_contiguous:
            return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return None


def _bytes_value(path: str, value: Any, offset: int) -> memoryview:
    try:
        view = memoryview(value)
    except TypeError as err:
        raise FormatError(
            f"{path}: {type(value).__name__} is not a byte buffer", offset=offset
        ) from err
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# -- the interpreter's plan ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _ScalarRun:
    """Consecutive single integer fields, packed and unpacked with one ``struct`` call: a
    CPU's state is mostly that, and one call per field would cost most of a short pause."""

    fields: tuple[ScalarField, ...]
    attrs: tuple[str, ...]
    codec: _struct.Struct
    entries: tuple[dict[str, Any], ...]
    plain: bool  # no bool and no uint128: values are the wire words as they are

    @property
    def name(self) -> str:
        """How errors name the run: its first and last field."""
        first, last = self.fields[0].name, self.fields[-1].name
        return first if first == last else f"{first}..{last}"


_Step = _ScalarRun | VMStateField


def _runnable(fld: VMStateField) -> bool:
    return isinstance(fld, ScalarField) and fld.count is None and not fld.equal


def _plan(vmsd: VMStateDescription, version: int) -> tuple[_Step, ...]:
    """The fields present in ``version``, runs of plain integers merged; computed once per
    description and version (a racing second computation gives an equal plan)."""
    plan = vmsd._plans.get(version)
    if plan is not None:
        return plan
    steps: list[_Step] = []
    run: list[ScalarField] = []

    def close_run() -> None:
        if run:
            entries = tuple(e for e in map(_scalar_entry, run) if e is not None)
            codec = _struct.Struct(">" + "".join(r.kind.struct_char * r.kind.words for r in run))
            plain = all(r.kind.words == 1 and r.kind is not boolean for r in run)
            attrs = tuple(r.attr for r in run)
            steps.append(_ScalarRun(tuple(run), attrs, codec, entries, plain))
            run.clear()

    for fld in vmsd.fields:
        if fld.since > version:
            continue
        if _runnable(fld):
            assert isinstance(fld, ScalarField)
            run.append(fld)
        else:
            close_run()
            steps.append(fld)
    close_run()
    plan = vmsd._plans[version] = tuple(steps)
    return plan


def _run_words(run: _ScalarRun, values: list[Any]) -> list[Any]:
    """Wire words of a run's values: bools as 0/1, uint128 split low word first."""
    words: list[Any] = []
    for fld, v in zip(run.fields, values):
        if fld.kind.words == 2:
            if not isinstance(v, int) or v < 0 or v >> 128:
                raise ValueError("does not fit")
            words += (v & _U64_MASK, v >> 64)
        elif fld.kind is boolean:
            words.append(1 if v else 0)
        else:
            words.append(v)
    return words


def _load_run_words(
    f: QEMUFile, vmsd: VMStateDescription, run: _ScalarRun, words: tuple[Any, ...], obj: object
) -> None:
    """Store a run's values from its wire words (the inverse of :func:`_run_words`)."""
    i = 0
    values: list[Any] = []
    for fld in run.fields:
        if fld.kind.words == 2:
            values.append(words[i] | words[i + 1] << 64)
            i += 2
            continue
        value = words[i]
        i += 1
        if fld.kind is boolean:
            if value > 1:
                start = f.offset - run.codec.size + _run_offset(run, fld)
                raise FormatError(
                    f"{vmsd.name}.{fld.name}: a bool must be 0 or 1, got {value}", offset=start
                )
            value = value == 1
        values.append(value)
    # all checks passed: store, so a bad byte leaves none of the run half-loaded
    for attr, value in zip(run.attrs, values):
        setattr(obj, attr, value)


def _run_offset(run: _ScalarRun, target: ScalarField) -> int:
    """Byte offset of ``target`` inside its run's encoding."""
    offset = 0
    for fld in run.fields:
        if fld is target:
            break
        offset += fld.kind.size
    return offset


# -- the interpreter: save -----------------------------------------------------------------


def save_state(
    f: QEMUFile, vmsd: VMStateDescription, obj: object, *, version_id: int | None = None
) -> Description:
    """Write ``obj``'s state as ``vmsd`` describes it; return the JSON description of exactly
    the bytes written (put it in the VMDESCRIPTION with :func:`describe_device`).

    ``version_id`` (default: ``vmsd.version_id``) lets a test or a compatibility mode write an
    older layout: fields with ``since`` above it are left out. Values that do not fit their
    field raise :class:`FormatError`. I/O errors stay sticky in ``f`` (see ``QEMUFile``).
    """
    version = vmsd.version_id if version_id is None else version_id
    if not vmsd.minimum_version_id <= version <= vmsd.version_id:
        raise ValueError(
            f"{vmsd.name}: cannot save version {version}, only "
            f"{vmsd.minimum_version_id}..{vmsd.version_id}"
        )
    return _save(f, vmsd, obj, version)


def _save(f: QEMUFile, vmsd: VMStateDescription, obj: object, version: int) -> Description:
    if vmsd.pre_save is not None:
        vmsd.pre_save(obj)
    entries: list[dict[str, Any]] = []
    desc: Description = {"vmsd_name": vmsd.name, "version": version, "fields": entries}
    try:
        for step in _plan(vmsd, version):
            if isinstance(step, _ScalarRun):
                values = [getattr(obj, a) for a in step.attrs]
                try:
                    if not step.plain:
                        values = _run_words(step, values)
                    f.put_bytes(step.codec.pack(*values))
                except (_struct.error, ValueError):
                    # find the culprit field and report it by name
                    for fld in step.fields:
                        _encode_scalars(f"{vmsd.name}.{fld.name}", fld, [getattr(obj, fld.attr)], f)
                    raise
                entries.extend([dict(e) for e in step.entries])
            else:
                _save_field(f, vmsd, step, obj, entries)
        described: list[Description] = []
        for sub in vmsd.subsections:
            if sub.needed is None or sub.needed(obj):
                f.put_u8(QEMU_VM_SUBSECTION)
                f.put_str8(sub.name)
                f.put_be32(sub.version_id)
                described.append(_save(f, sub, obj, sub.version_id))
        if described:
            desc["subsections"] = described
    finally:
        # QEMU calls post_save on failure too: it undoes what pre_save prepared
        if vmsd.post_save is not None:
            vmsd.post_save(obj)
    return desc


def _scalar_entry(fld: ScalarField) -> dict[str, Any] | None:
    """The JSON entry of a scalar field (fixed: it does not depend on the value)."""
    wire_elements = fld.elements * fld.kind.words
    if not wire_elements:
        return None  # QEMU describes nothing for an empty array
    type_name = fld.kind.type_name
    if fld.equal:
        assert fld.kind.equal_type_name is not None
        type_name = fld.kind.equal_type_name
    entry = _entry(fld.name, wire_elements, 0, True, type_name)
    entry["size"] = fld.kind.size // fld.kind.words
    return entry


def _entry(name: str, elements: int, index: int, compress: bool, type_name: str) -> dict[str, Any]:
    """Start a field's JSON entry with QEMU's key order: name, array_len|index, type."""
    entry: dict[str, Any] = {"name": name}
    if elements > 1:
        if compress:
            entry["array_len"] = elements
        else:
            entry["index"] = index
    entry["type"] = type_name
    return entry


def _save_field(
    f: QEMUFile,
    vmsd: VMStateDescription,
    fld: VMStateField,
    obj: object,
    entries: list[dict[str, Any]],
) -> None:
    path = f"{vmsd.name}.{fld.name}"
    if isinstance(fld, ScalarField):
        value = getattr(obj, fld.attr)
        if fld.count is None:
            values: Sequence[Any] = (value,)
        else:
            values = value
            if len(values) != fld.count:
                raise FormatError(
                    f"{path}: {len(values)} values for an array of {fld.count}", offset=f.offset
                )
        f.put_bytes(_encode_scalars(path, fld, values, f))
        entry = _scalar_entry(fld)
        if entry is not None:
            entries.append(entry)
    elif isinstance(fld, BufferField):
        view = _bytes_value(path, getattr(obj, fld.attr), f.offset)
        if view.nbytes != fld.size:
            raise FormatError(
                f"{path}: {view.nbytes} bytes for a buffer of {fld.size}", offset=f.offset
            )
        f.put_bytes(view)
        entries.append({"name": fld.name, "type": "buffer", "size": fld.size})
    elif isinstance(fld, VBufferField):
        view = _bytes_value(path, getattr(obj, fld.attr), f.offset)
        length = getattr(obj, _length_attr(vmsd, fld))
        if view.nbytes != length or view.nbytes > fld.max_size:
            raise FormatError(
                f"{path}: {view.nbytes} bytes, but length field {fld.length_field} says "
                f"{length} (at most {fld.max_size})",
                offset=f.offset,
            )
        f.put_bytes(view)
        entries.append({"name": fld.name, "type": "buffer", "size": view.nbytes})
    elif isinstance(fld, StructField):
        value = getattr(obj, fld.attr)
        if fld.count is None:
            targets: Sequence[object] = (value,)
        else:
            targets = value
            if len(targets) != fld.count:
                raise FormatError(
                    f"{path}: {len(targets)} objects for an array of {fld.count}",
                    offset=f.offset,
                )
        compress = _can_compress(fld.vmsd)
        for i, target in enumerate(targets):
            entry = _entry(fld.name, len(targets), i, compress, "struct")
            start = f.pos
            entry["struct"] = _save(f, fld.vmsd, target, fld.vmsd.version_id)
            entry["size"] = f.pos - start
            # a compressed array is described by its first element, as QEMU does
            if i == 0 or not compress:
                entries.append(entry)
    else:
        f.put_bytes(bytes(fld.size))
        entries.append({"name": fld.name, "type": "unused_buffer", "size": fld.size})


def _can_compress(vmsd: VMStateDescription) -> bool:
    """Whether every element of an array of ``vmsd`` has the same layout, so the JSON may
    describe the first one with ``array_len`` (QEMU's ``vmsd_can_compress``).

    QEMU refuses when subsections may come and go; variable buffers change the layout too, a
    case QEMU does not check, so they refuse here as well.
    """
    if vmsd.subsections:
        return False
    for fld in vmsd.fields:
        if isinstance(fld, VBufferField):
            return False
        if isinstance(fld, StructField) and not _can_compress(fld.vmsd):
            return False
    return True


def _length_attr(vmsd: VMStateDescription, fld: VBufferField) -> str:
    for other in vmsd.fields:
        if other.name == fld.length_field:
            return other.attr
    raise AssertionError("checked when the description was made")


# -- the interpreter: load -----------------------------------------------------------------


def load_state(f: QEMUFile, vmsd: VMStateDescription, obj: object, version_id: int, *,
               post_load: bool = True) -> None:
    """Read state written with ``version_id`` of ``vmsd`` into the existing ``obj``.

    ``post_load`` false: do not run the ``post_load`` hooks (of ``vmsd`` and its subsections),
    as for the non-last increments of a reload, whose state is overwritten by the last one.

    Nested objects must already exist (they are loaded in place); fixed arrays in ``list``s
    and buffers in writable buffers are updated in place. Raises :class:`VersionError` when
    ``version_id`` is newer than ``vmsd.version_id`` or older than its
    ``minimum_version_id``, :class:`StreamError` when the data ends early, and
    :class:`FormatError` for anything else malformed (an unknown subsection, a bad bool, a
    buffer length out of bounds, an ``equal`` field that differs).
    """
    if version_id > vmsd.version_id:
        raise VersionError(
            f"{vmsd.name}: stream version {version_id} is newer than supported "
            f"{vmsd.version_id}",
            offset=f.offset,
        )
    if version_id < vmsd.minimum_version_id:
        raise VersionError(
            f"{vmsd.name}: stream version {version_id} is too old (oldest supported "
            f"{vmsd.minimum_version_id})",
            offset=f.offset,
        )
    if vmsd.pre_load is not None:
        vmsd.pre_load(obj)
    for step in _plan(vmsd, version_id):
        if isinstance(step, StructField):
            _load_structs(f, step, obj)
            continue
        try:
            if isinstance(step, _ScalarRun):
                words = step.codec.unpack(f.get_bytes(step.codec.size))
                if step.plain:
                    for attr, value in zip(step.attrs, words):
                        setattr(obj, attr, value)
                else:
                    _load_run_words(f, vmsd, step, words, obj)
            else:
                _load_leaf(f, vmsd, step, obj)
        except StreamError as err:
            raise StreamError(f"{vmsd.name}.{step.name}: {err.reason}", offset=err.offset) from err
    _load_subsections(f, vmsd, obj, post_load)
    if post_load and vmsd.post_load is not None:
        vmsd.post_load(obj, version_id)


def _load_leaf(f: QEMUFile, vmsd: VMStateDescription, fld: VMStateField, obj: object) -> None:
    path = f"{vmsd.name}.{fld.name}"
    offset = f.offset
    if isinstance(fld, ScalarField):
        values = _decode_scalars(path, fld, f.get_bytes(fld.codec.size), offset)
        if fld.equal:
            current = getattr(obj, fld.attr)
            if current != values[0]:
                raise FormatError(
                    f"{path}: stream has {values[0]}, this machine needs {current}", offset=offset
                )
        elif fld.count is None:
            setattr(obj, fld.attr, values[0])
        else:
            current = getattr(obj, fld.attr, None)
            if isinstance(current, list) and len(current) == len(values):
                current[:] = values
            else:
                setattr(obj, fld.attr, tuple(values))
    elif isinstance(fld, BufferField):
        current = getattr(obj, fld.attr, None)
        in_place = _writable_buffer(current, fld.size)
        if in_place is not None:
            f.read_into(in_place)
        else:
            setattr(obj, fld.attr, f.get_bytes(fld.size))
    elif isinstance(fld, VBufferField):
        length = getattr(obj, _length_attr(vmsd, fld))
        if not isinstance(length, int) or not 0 <= length <= fld.max_size:
            raise FormatError(
                f"{path}: length {length!r} (from {fld.length_field}) is not in "
                f"0..{fld.max_size}",
                offset=offset,
            )
        data = f.get_bytes(length)
        current = getattr(obj, fld.attr, None)
        setattr(obj, fld.attr, bytearray(data) if isinstance(current, bytearray) else data)
    elif isinstance(fld, UnusedField):
        f.skip(fld.size)
    else:
        raise AssertionError(f"unexpected field {fld!r}")  # noqa: TRY004  (unreachable)


def _load_structs(f: QEMUFile, fld: StructField, obj: object) -> None:
    value = getattr(obj, fld.attr)
    targets: Sequence[object] = (value,) if fld.count is None else value
    if len(targets) != (1 if fld.count is None else fld.count):
        raise FormatError(
            f"{fld.vmsd.name}: {len(targets)} objects to load an array of {fld.count} into",
            offset=f.offset,
        )
    for target in targets:
        load_state(f, fld.vmsd, target, fld.vmsd.version_id)


def _load_subsections(f: QEMUFile, vmsd: VMStateDescription, obj: object,
                      post_load: bool) -> None:
    prefix = vmsd.name + "/"
    loaded: set[str] = set()
    while True:
        head = f.peek(2)
        if len(head) < 2 or head[0] != QEMU_VM_SUBSECTION:
            return
        # a header that is not ours belongs to an enclosing description: leave it (as QEMU)
        size = head[1]
        if size <= len(prefix):
            return
        raw = f.peek(size, 2)
        if len(raw) < size:
            return
        name = raw.decode("utf-8", "backslashreplace")
        if not name.startswith(prefix):
            return
        if name in loaded:
            # the next element of an array of this description (QEMU would load it again here,
            # into the wrong element); a real duplicate fails where the caller expects a footer
            return
        sub = vmsd.subsection(name)
        if sub is None:
            raise FormatError(f"{vmsd.name}: unknown subsection {name!r}", offset=f.offset)
        loaded.add(name)
        f.skip(2 + size)
        try:
            version = int.from_bytes(f.get_bytes(4), "big")
        except StreamError as err:
            raise StreamError(f"{name}: header: {err.reason}", offset=err.offset) from err
        load_state(f, sub, obj, version, post_load=post_load)


# -- the description -----------------------------------------------------------------------


def describe(vmsd: VMStateDescription, obj: object) -> Description:
    """The JSON description :func:`save_state` would return for ``obj`` now.

    It depends on the object (which subsections are needed, variable buffer lengths), so it
    runs the save hooks and encodes into a scratch buffer. Prefer the description that
    ``save_state`` returns for the bytes actually written.
    """
    return save_state(QEMUFile.memory(), vmsd, obj)


def describe_device(idstr: str, instance_id: int, description: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of the VMDESCRIPTION's ``"devices"`` list: QEMU's key order is ``name``,
    ``instance_id``, then the description's ``vmsd_name``, ``version``, ``fields``,
    ``subsections``. ``description`` is what :func:`save_state` returned for the section."""
    return {"name": idstr, "instance_id": instance_id, **description}
