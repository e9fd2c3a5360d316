"""Properties of pyvmm.migration.vmstate: QEMU's wire bytes spelled out, random descriptions that
round-trip, hostile input that only ever raises FormatError, and a VMDESCRIPTION that walks the
bytes the way QEMU's scripts/analyze-migration.py does."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pyvmm.errors import FormatError, StreamError, VersionError
from pyvmm.migration.stream import QEMUFile
from pyvmm.migration.vmstate import (
    ScalarKind,
    VMStateDescription,
    array,
    boolean,
    buffer,
    int8,
    int16,
    int32,
    int64,
    struct,
    uint8,
    uint16,
    uint32,
    uint64,
    uint128,
    unused,
    vbuffer,
)
from pyvmm.migration.vmstate_interpreter import (
    describe,
    describe_device,
    load_state,
    save_state,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def save(vmsd: VMStateDescription, obj: object, **kw: Any) -> tuple[bytes, dict[str, Any]]:
    f = QEMUFile.memory()
    desc = save_state(f, vmsd, obj, **kw)
    return f.getvalue(), desc


def load(vmsd: VMStateDescription, data: bytes, obj: object, version: int | None = None) -> int:
    """Load and return how many bytes were consumed."""
    f = QEMUFile.memory(data)
    load_state(f, vmsd, obj, vmsd.version_id if version is None else version)
    return f.pos


# -- the analyzer's walk, as an oracle --------------------------------------------------------

# the field types QEMU's analyzer has readers for (others it reads as raw `size` bytes too)
ANALYZER_TYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "int32 equal", "uint32 equal", "int64 equal", "uint8 equal", "uint16 equal",
    "buffer", "unused_buffer", "struct",
}  # fmt: skip


def walk(desc: Mapping[str, Any], data: bytes, pos: int = 0) -> int:
    """Walk ``data`` from ``pos`` following a device description the way QEMU's
    analyze-migration.py does (array_len repeats an entry; struct recurses; each listed
    subsection must be there, in order); return where it ends."""
    assert isinstance(desc["fields"], list)
    for entry in desc["fields"]:
        assert entry["type"] in ANALYZER_TYPES, entry
        assert next(iter(entry)) == "name" and list(entry)[-1] == "size"
        for _ in range(entry.get("array_len", 1)):
            if entry["type"] == "struct":
                start = pos
                pos = walk(entry["struct"], data, pos)
                assert pos - start == entry["size"]
            else:
                pos += entry["size"]
                assert pos <= len(data), "description runs past the bytes"
    for sub in desc.get("subsections", []):
        assert data[pos] == 0x05, f"subsection {sub['vmsd_name']} not at {pos}"
        size = data[pos + 1]
        assert size < 0x80  # the analyzer reads this length as a signed byte
        assert data[pos + 2 : pos + 2 + size].decode() == sub["vmsd_name"]
        assert int.from_bytes(data[pos + 2 + size : pos + 6 + size], "big") == sub["version"]
        pos = walk(sub, data, pos + 6 + size)
    return pos


def fields_end(desc: Mapping[str, Any], data: bytes) -> int:
    """Where the top-level fields of a description end (before its subsections)."""
    return walk({"fields": desc["fields"]}, data)


# -- expected bytes, spelled out ----------------------------------------------------------------


@dataclass
class Scalars:
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0
    f: int = 0
    g: int = 0
    h: int = 0
    i: bool = False


VMS_SCALARS = VMStateDescription(
    "scalars",
    version_id=1,
    minimum_version_id=1,
    fields=[
        uint8("a"), int8("b"), uint16("c"), int16("d"),
        uint32("e"), int32("f"), uint64("g"), int64("h"), boolean("i"),
    ],
)  # fmt: skip


def test_scalars_wire_bytes() -> None:
    obj = Scalars(0x01, -2, 0x0304, -3, 0x05060708, -4, 0x090A0B0C0D0E0F10, -5, True)
    data, _ = save(VMS_SCALARS, obj)
    assert data == bytes(
        [
            0x01,  # a: uint8
            0xFE,  # b: int8 -2
            0x03, 0x04,  # c: uint16, big-endian
            0xFF, 0xFD,  # d: int16 -3
            0x05, 0x06, 0x07, 0x08,  # e: uint32
            0xFF, 0xFF, 0xFF, 0xFC,  # f: int32 -4
            0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F, 0x10,  # g: uint64
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFB,  # h: int64 -5
            0x01,  # i: bool
        ]
    )  # fmt: skip
    back = Scalars()
    assert load(VMS_SCALARS, data, back) == len(data)
    assert back == obj


@dataclass
class Timer:
    cval: int = 0
    ctl: int = 0


@dataclass
class Board:
    id: int = 0
    regs: list[int] = field(default_factory=lambda: [0, 0, 0])
    timer: Timer = field(default_factory=Timer)
    timers: list[Timer] = field(default_factory=lambda: [Timer(), Timer()])
    clock: int = 0
    extra: int = 0


VMS_TIMER = VMStateDescription("timer", 1, 1, [uint64("cval"), uint8("ctl")])
VMS_BOARD = VMStateDescription(
    "board",
    version_id=2,
    minimum_version_id=1,
    fields=[
        uint32("id"),
        array("regs", uint16, 3),
        struct("timer", VMS_TIMER),
        array("timers", VMS_TIMER, 2),
        uint32("clock", since=2),
    ],
    subsections=[
        VMStateDescription("board/extra", 1, 1, [uint64("extra")], needed=lambda b: b.extra != 0)
    ],
)


def board() -> Board:
    return Board(
        id=0xB0A4D,
        regs=[1, 2, 3],
        timer=Timer(0x1122334455667788, 0x99),
        timers=[Timer(5, 6), Timer(7, 8)],
        clock=24_000_000,
    )


BOARD_FIELDS = bytes(
    [
        0x00, 0x0B, 0x0A, 0x4D,  # id: uint32
        0x00, 0x01, 0x00, 0x02, 0x00, 0x03,  # regs: 3 x uint16
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,  # timer.cval: uint64
        0x99,  # timer.ctl: uint8
        0, 0, 0, 0, 0, 0, 0, 5, 6,  # timers[0]: cval, ctl
        0, 0, 0, 0, 0, 0, 0, 7, 8,  # timers[1]: cval, ctl
    ]
)  # fmt: skip
CLOCK = bytes([0x01, 0x6E, 0x36, 0x00])  # clock: uint32 24000000, only from version 2


def test_nested_struct_array_and_since_field_wire_bytes() -> None:
    data, _ = save(VMS_BOARD, board())
    assert data == BOARD_FIELDS + CLOCK  # no subsection: extra == 0, so not needed
    back = Board()
    assert load(VMS_BOARD, data, back) == len(data)
    assert back == board()


def test_version_1_stream_has_no_since_2_field() -> None:
    data, desc = save(VMS_BOARD, board(), version_id=1)
    assert data == BOARD_FIELDS
    assert desc["version"] == 1 and "clock" not in [e["name"] for e in desc["fields"]]
    back = Board(clock=42)
    load(VMS_BOARD, data, back, version=1)
    assert back == Board(**{**board().__dict__, "clock": 42})  # untouched, as in QEMU


def test_subsection_sent_when_needed_wire_bytes() -> None:
    obj = board()
    obj.extra = 0xE
    data, desc = save(VMS_BOARD, obj)
    assert data == BOARD_FIELDS + CLOCK + bytes(
        [
            0x05,  # QEMU_VM_SUBSECTION
            11, *b"board/extra",  # u8 length + name
            0x00, 0x00, 0x00, 0x01,  # be32 version_id of the subsection
            0, 0, 0, 0, 0, 0, 0, 0x0E,  # extra: uint64
        ]
    )  # fmt: skip
    assert [s["vmsd_name"] for s in desc["subsections"]] == ["board/extra"]
    back = Board()
    assert load(VMS_BOARD, data, back) == len(data)
    assert back == obj


def test_v_register_travels_as_two_be64_low_word_first() -> None:
    # QEMU's target/arm/machine.c: VMSTATE_UINT64_SUB_ARRAY(env.vfp.zregs[n].d, ARMCPU, 0, 2)
    vfp = VMStateDescription(
        "cpu/vfp",
        3,
        3,
        [
            uint128("env.vfp.zregs[0].d", attr="v0"),
            array("env.vfp.zregs[1].d", uint64, 2, attr="v1_words"),
        ],
    )
    obj = SimpleNamespace(v0=(0xAAAA << 64) | 0xBBBB, v1_words=[0xBBBB, 0xAAAA])
    data, desc = save(vfp, obj)
    pair = (0xBBBB).to_bytes(8, "big") + (0xAAAA).to_bytes(8, "big")  # d[0] (low), d[1] (high)
    assert data == pair + pair
    entry = {"array_len": 2, "type": "uint64", "size": 8}
    assert desc["fields"] == [
        {"name": "env.vfp.zregs[0].d", **entry},
        {"name": "env.vfp.zregs[1].d", **entry},
    ]
    back = SimpleNamespace(v0=0, v1_words=[0, 0])
    load(vfp, data, back, 3)
    assert back == obj


def test_vbuffer_and_unused_wire_bytes() -> None:
    vmsd = VMStateDescription(
        "uart", 1, 1, [uint8("len"), vbuffer("fifo", "len", 16), unused(3), buffer("id", 2)]
    )
    obj = SimpleNamespace(len=3, fifo=b"abc", id=b"\x12\x34")
    data, desc = save(vmsd, obj)
    assert data == bytes([3, *b"abc", 0, 0, 0, 0x12, 0x34])  # len, fifo, 3 zeros, id
    assert [(e["name"], e["type"], e["size"]) for e in desc["fields"]] == [
        ("len", "uint8", 1),
        ("fifo", "buffer", 3),
        ("unused", "unused_buffer", 3),
        ("id", "buffer", 2),
    ]
    ident = bytearray(2)
    back = SimpleNamespace(len=0, fifo=b"", id=ident)
    load(vmsd, bytes([3, *b"abc", 9, 9, 9, 0x12, 0x34]), back, 1)  # unused bytes are ignored
    assert back.fifo == b"abc" and back.id is ident and ident == b"\x12\x34"


# -- the description ------------------------------------------------------------------------------


def test_describe_matches_qemu_layout() -> None:
    obj = board()
    obj.extra = 1
    desc = describe(VMS_BOARD, obj)
    timer = {
        "vmsd_name": "timer",
        "version": 1,
        "fields": [
            {"name": "cval", "type": "uint64", "size": 8},
            {"name": "ctl", "type": "uint8", "size": 1},
        ],
    }
    assert desc == {
        "vmsd_name": "board",
        "version": 2,
        "fields": [
            {"name": "id", "type": "uint32", "size": 4},
            {"name": "regs", "array_len": 3, "type": "uint16", "size": 2},
            {"name": "timer", "type": "struct", "struct": timer, "size": 9},
            {"name": "timers", "array_len": 2, "type": "struct", "struct": timer, "size": 9},
            {"name": "clock", "type": "uint32", "size": 4},
        ],
        "subsections": [
            {
                "vmsd_name": "board/extra",
                "version": 1,
                "fields": [{"name": "extra", "type": "uint64", "size": 8}],
            }
        ],
    }
    device = describe_device("board", 3, desc)
    assert list(device)[:5] == ["name", "instance_id", "vmsd_name", "version", "fields"]
    assert device["name"] == "board" and device["instance_id"] == 3
    json.dumps(device)  # plain JSON types only
    data, _ = save(VMS_BOARD, obj)
    assert walk(device, data) == len(data)


def test_struct_array_with_subsections_is_described_per_element() -> None:
    # QEMU does not compress arrays whose elements may carry subsections: one entry per index
    vmsd_q = VMStateDescription(
        "queue",
        1,
        1,
        [uint16("head")],
        subsections=[
            VMStateDescription("queue/irq", 1, 1, [boolean("irq")], needed=lambda q: q.irq)
        ],
    )
    vmsd = VMStateDescription(
        "virtio", 1, 1, [array("queues", vmsd_q, 2), uint32("equal_n", equal=True)]
    )
    obj = SimpleNamespace(
        queues=[SimpleNamespace(head=1, irq=False), SimpleNamespace(head=2, irq=True)], equal_n=2
    )
    data, desc = save(vmsd, obj)
    entries = desc["fields"]
    assert [(e["name"], e.get("index"), e["type"], e["size"]) for e in entries] == [
        ("queues", 0, "struct", 2),
        ("queues", 1, "struct", 2 + 1 + 1 + 9 + 4 + 1),
        ("equal_n", None, "uint32 equal", 4),
    ]
    assert "subsections" not in entries[0]["struct"]
    assert entries[1]["struct"]["subsections"][0]["vmsd_name"] == "queue/irq"
    assert walk(desc, data) == len(data)
    back = SimpleNamespace(queues=[SimpleNamespace(head=0, irq=False) for _ in range(2)], equal_n=2)
    load(vmsd, data, back, 1)
    assert back == obj
    with pytest.raises(FormatError, match="equal_n"):
        load(vmsd, data, SimpleNamespace(queues=back.queues, equal_n=3), 1)


# -- hooks, versions, hostile input -------------------------------------------------------------


def test_hooks_run_in_qemu_order() -> None:
    calls: list[str] = []

    def needed(obj: object) -> bool:
        calls.append("needed")
        return True

    sub = VMStateDescription(
        "dev/sub",
        1,
        1,
        [uint8("y")],
        needed=needed,
        pre_save=lambda o: calls.append("sub.pre_save"),
        pre_load=lambda o: calls.append("sub.pre_load"),
        post_load=lambda o, v: calls.append(f"sub.post_load({v})"),
    )
    vmsd = VMStateDescription(
        "dev",
        2,
        1,
        [uint8("x")],
        subsections=[sub],
        pre_save=lambda o: calls.append("pre_save"),
        post_save=lambda o: calls.append("post_save"),
        pre_load=lambda o: calls.append("pre_load"),
        post_load=lambda o, v: calls.append(f"post_load({v})"),
    )
    data, _ = save(vmsd, SimpleNamespace(x=1, y=2))
    assert calls == ["pre_save", "needed", "sub.pre_save", "post_save"]
    calls.clear()
    load(vmsd, data, SimpleNamespace(x=0, y=0), 2)
    assert calls == ["pre_load", "sub.pre_load", "sub.post_load(1)", "post_load(2)"]


def test_versions_too_new_and_too_old() -> None:
    data, _ = save(VMS_BOARD, board())
    with pytest.raises(VersionError, match="version 3 is newer than supported 2"):
        load(VMS_BOARD, data, Board(), version=3)
    with pytest.raises(VersionError, match="too old"):
        load(VMS_BOARD, data, Board(), version=0)
    # a subsection's version comes from the stream: bump it past what this side knows
    obj = board()
    obj.extra = 1
    data, _ = save(VMS_BOARD, obj)
    bumped = data.replace(b"board/extra\x00\x00\x00\x01", b"board/extra\x00\x00\x00\x07")
    with pytest.raises(VersionError, match="board/extra"):
        load(VMS_BOARD, bumped, Board())


def test_unknown_subsection_is_named() -> None:
    data = BOARD_FIELDS + CLOCK + b"\x05\x0bboard/bogus" + bytes([0, 0, 0, 1])
    with pytest.raises(FormatError, match="unknown subsection 'board/bogus'"):
        load(VMS_BOARD, data, Board())


def test_foreign_subsection_is_left_for_the_caller() -> None:
    # a header that does not start with "board/" belongs to someone else: not consumed
    data = BOARD_FIELDS + CLOCK + b"\x05\x05other" + bytes([0, 0, 0, 1])
    assert load(VMS_BOARD, data, Board()) == len(BOARD_FIELDS + CLOCK)


def test_bool_must_be_0_or_1() -> None:
    vmsd = VMStateDescription("b", 1, 1, [boolean("on")])
    with pytest.raises(FormatError, match="bool"):
        load(vmsd, b"\x02", SimpleNamespace(on=False))


def test_vbuffer_length_is_bounded_before_allocation() -> None:
    vmsd = VMStateDescription("v", 1, 1, [uint32("n"), vbuffer("blob", "n", 64)])
    with pytest.raises(FormatError, match="not in 0..64"):
        load(vmsd, b"\xff\xff\xff\xff", SimpleNamespace(n=0, blob=b""))
    vmsd_big = VMStateDescription("v", 1, 1, [uint32("n"), vbuffer("blob", "n", 2**32)])
    with pytest.raises(StreamError, match="v.blob"):
        load(vmsd_big, b"\xff\xff\xff\xff", SimpleNamespace(n=0, blob=b""))


def test_save_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(FormatError, match="scalars.a"):
        save(VMS_SCALARS, Scalars(a=256))
    vmsd = VMStateDescription("v", 1, 1, [uint8("n"), vbuffer("blob", "n", 4)])
    with pytest.raises(FormatError):
        save(vmsd, SimpleNamespace(n=2, blob=b"abc"))
    with pytest.raises(FormatError):
        save(VMS_BOARD, Board(regs=[1, 2]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: VMStateDescription("d", 1, 1, [uint8("x"), uint16("x")]),
        lambda: VMStateDescription("d", 1, 1, [uint8("x", since=2)]),
        lambda: VMStateDescription("d", 1, 2, []),
        lambda: VMStateDescription(
            "d", 1, 1, [], subsections=[VMStateDescription("e/x", 1, 1, [])]
        ),
        lambda: VMStateDescription("d", 1, 1, [vbuffer("b", "n", 4), uint8("n")]),
        lambda: VMStateDescription("d", 2, 1, [uint8("n", since=2), vbuffer("b", "n", 4)]),
        lambda: VMStateDescription("x" * 256, 1, 1, []),
        lambda: int64("x", equal=True),
    ],
)
def test_malformed_descriptions_are_refused(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


# -- random descriptions -------------------------------------------------------------------------

SCALAR_KINDS: list[ScalarKind] = [
    uint8, uint16, uint32, uint64, int8, int16, int32, int64, boolean, uint128,
]  # fmt: skip


@dataclass(frozen=True)
class FieldSpec:
    kind: str  # scalar | buffer | vbuffer | struct | unused
    since: int
    scalar: ScalarKind = uint8
    count: int | None = None
    size: int = 0
    child: DescSpec | None = None


@dataclass(frozen=True)
class DescSpec:
    name: str
    version: int
    minimum: int
    fields: tuple[FieldSpec, ...]
    subsections: tuple[tuple[DescSpec, bool], ...]  # (description, needed)


@st.composite
def desc_specs(draw: st.DrawFn, name: str = "dev", depth: int = 0) -> DescSpec:
    version = draw(st.integers(1, 4))
    minimum = draw(st.integers(1, version))
    kinds = ["scalar", "scalar", "scalar", "buffer", "vbuffer", "unused"]
    if depth < 2:
        kinds.append("struct")
    fields = []
    for i in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(kinds))
        since = draw(st.one_of(st.just(0), st.integers(0, version)))
        count = draw(st.one_of(st.none(), st.integers(0, 4)))
        if kind == "scalar":
            fields.append(FieldSpec(kind, since, draw(st.sampled_from(SCALAR_KINDS)), count))
        elif kind == "struct":
            child = draw(desc_specs(f"{name}.s{i}", depth + 1))
            fields.append(FieldSpec(kind, since, count=count, child=child))
        else:
            fields.append(FieldSpec(kind, since, size=draw(st.integers(0, 40))))
    subsections = []
    if depth < 2:
        for j in range(draw(st.integers(0, 2))):
            subsections.append((draw(desc_specs(f"{name}/u{j}", depth + 1)), draw(st.booleans())))
    return DescSpec(name, version, minimum, tuple(fields), tuple(subsections))


def tag(spec: DescSpec) -> str:
    return re.sub(r"\W", "_", spec.name)


def build(spec: DescSpec, needed: bool | None = None) -> VMStateDescription:
    fields: list[Any] = []
    for i, fs in enumerate(spec.fields):
        attr = f"{tag(spec)}_f{i}"
        if fs.kind == "scalar":
            if fs.count is None:
                fields.append(fs.scalar(f"f{i}", since=fs.since, attr=attr))
            else:
                fields.append(array(f"f{i}", fs.scalar, fs.count, since=fs.since, attr=attr))
        elif fs.kind == "buffer":
            fields.append(buffer(f"f{i}", fs.size, since=fs.since, attr=attr))
        elif fs.kind == "vbuffer":
            fields.append(uint16(f"f{i}len", since=fs.since, attr=attr + "_len"))
            fields.append(vbuffer(f"f{i}", f"f{i}len", fs.size, since=fs.since, attr=attr))
        elif fs.kind == "struct":
            assert fs.child is not None
            child = build(fs.child)
            fields.append(struct(f"f{i}", child, count=fs.count, since=fs.since, attr=attr))
        else:
            fields.append(unused(fs.size, name=f"f{i}", since=fs.since))
    return VMStateDescription(
        spec.name,
        spec.version,
        spec.minimum,
        fields,
        subsections=[build(sub, flag) for sub, flag in spec.subsections],
        needed=None if needed is None else constant(needed),
    )


def constant(flag: bool) -> Any:
    """A ``needed`` hook that always answers ``flag``."""
    return lambda obj: flag


def scalar_values(kind: ScalarKind) -> st.SearchStrategy[Any]:
    if kind is boolean:
        return st.booleans()
    lo, hi = kind.bounds()
    return st.integers(lo, hi)


def fill(spec: DescSpec, obj: SimpleNamespace, draw: st.DrawFn | None) -> None:
    """Give ``obj`` the attributes of ``spec``: drawn values, or blank ones without ``draw``."""
    for i, fs in enumerate(spec.fields):
        attr = f"{tag(spec)}_f{i}"
        if fs.kind == "scalar":
            blank = False if fs.scalar is boolean else 0
            values = scalar_values(fs.scalar)
            if fs.count is None:
                setattr(obj, attr, draw(values) if draw else blank)
            else:
                setattr(obj, attr, [draw(values) if draw else blank for _ in range(fs.count)])
        elif fs.kind == "buffer":
            exact = st.binary(min_size=fs.size, max_size=fs.size)
            setattr(obj, attr, draw(exact) if draw else bytes(fs.size))
        elif fs.kind == "vbuffer":
            blob = draw(st.binary(max_size=fs.size)) if draw else b""
            setattr(obj, attr, blob)
            setattr(obj, attr + "_len", len(blob))
        elif fs.kind == "struct":
            assert fs.child is not None
            children = [SimpleNamespace() for _ in range(1 if fs.count is None else fs.count)]
            for child in children:
                fill(fs.child, child, draw)
            setattr(obj, attr, children[0] if fs.count is None else children)
    for sub, _ in spec.subsections:
        fill(sub, obj, draw)  # a subsection works on its parent's object


def reset_unsent(
    spec: DescSpec, expected: SimpleNamespace, blank: SimpleNamespace, version: int
) -> None:
    """What a blank object looks like after loading: fields that were not sent stay blank."""
    for i, fs in enumerate(spec.fields):
        attr = f"{tag(spec)}_f{i}"
        if fs.kind == "unused":
            continue
        if fs.since > version:
            setattr(expected, attr, getattr(blank, attr))
            if fs.kind == "vbuffer":
                setattr(expected, attr + "_len", getattr(blank, attr + "_len"))
        elif fs.kind == "struct":
            assert fs.child is not None
            pairs = (
                [(getattr(expected, attr), getattr(blank, attr))]
                if fs.count is None
                else list(zip(getattr(expected, attr), getattr(blank, attr)))
            )
            for e, b in pairs:
                reset_unsent(fs.child, e, b, fs.child.version)
    for sub, needed in spec.subsections:
        if needed:
            reset_unsent(sub, expected, blank, sub.version)
        else:
            fill(sub, expected, None)


@dataclass
class Case:
    spec: DescSpec
    vmsd: VMStateDescription
    obj: SimpleNamespace
    version: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    spec = draw(desc_specs())
    obj = SimpleNamespace()
    fill(spec, obj, draw)
    version = draw(st.integers(spec.minimum, spec.version))
    return Case(spec, build(spec), obj, version)


def blank_for(spec: DescSpec) -> SimpleNamespace:
    obj = SimpleNamespace()
    fill(spec, obj, None)
    return obj


def expected_after_load(case: Case) -> SimpleNamespace:
    import copy

    expected = copy.deepcopy(case.obj)
    reset_unsent(case.spec, expected, blank_for(case.spec), case.version)
    return expected


@FAST
@given(case=cases())
def test_random_descriptions_round_trip(case: Case) -> None:
    data, desc = save(case.vmsd, case.obj, version_id=case.version)
    note(f"{len(data)} bytes: {data.hex()}")
    back = blank_for(case.spec)
    assert load(case.vmsd, data, back, case.version) == len(data)
    assert back == expected_after_load(case)
    # the description walks exactly the bytes written, and is plain JSON
    assert walk(desc, data) == len(data)
    assert json.loads(json.dumps(desc)) == desc
    # saving what was loaded gives the same bytes
    data2, desc2 = save(case.vmsd, back, version_id=case.version)
    assert data2 == data and desc2 == desc


def _nested_subsections(desc: dict[str, Any]) -> bool:
    """Whether a struct field anywhere in ``desc`` carries subsections."""
    for fld in desc.get("fields", []):
        inner = fld.get("struct")
        if inner is not None and (inner.get("subsections") or _nested_subsections(inner)):
            return True
    return any(_nested_subsections(sub) for sub in desc.get("subsections", []))


@FAST
@given(case=cases(), data=st.data())
def test_truncated_input_raises_format_error(case: Case, data: st.DataObject) -> None:
    raw, desc = save(case.vmsd, case.obj, version_id=case.version)
    cut = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="cut")
    try:
        consumed = load(case.vmsd, raw[:cut], blank_for(case.spec), case.version)
    except FormatError:
        return
    # A nested struct's subsections are optional too, and fields_end() counts them as required:
    # for such descriptions only the "FormatError and nothing else" half of the property holds.
    if _nested_subsections(desc):
        return
    # Only a cut between subsections may load (a missing subsection is legal in QEMU's format),
    # or a cut inside a subsection header, which is then left unread for the section layer to
    # reject, as QEMU's vmstate_subsection_load does.
    assert cut >= fields_end(desc, raw) or consumed < cut or not raw


@FAST
@given(case=cases(), data=st.data())
def test_flipped_bytes_raise_only_format_error(case: Case, data: st.DataObject) -> None:
    raw = bytearray(save(case.vmsd, case.obj, version_id=case.version)[0])
    if not raw:
        return
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        load(case.vmsd, bytes(raw), blank_for(case.spec), case.version)
    except FormatError:
        pass


@FAST
@given(case=cases(), delta=st.integers(1, 2**31))
def test_random_versions_out_of_range(case: Case, delta: int) -> None:
    raw, _ = save(case.vmsd, case.obj, version_id=case.version)
    with pytest.raises(VersionError, match="newer"):
        load(case.vmsd, raw, blank_for(case.spec), case.spec.version + delta)
    with pytest.raises(VersionError, match="too old"):
        load(case.vmsd, raw, blank_for(case.spec), case.spec.minimum - delta)
