"""HMP: the monitor's human text commands, over the same controller QMP uses.

:func:`execute_line` runs one command line and returns its output as QEMU's monitor does: lines
ending in ``\\r\\n``, errors as ``Error: ...`` in the output (an HMP command never fails at the
protocol level; ``human-monitor-command`` returns that text).  The command names, arguments and
``info`` outputs follow QEMU's HMP (``info migrate`` prints the capabilities first, even before
the first checkpoint, as the original fork did).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from typing import Any

from ..errors import PyvmmError
from ..identity import vm_id
from ..machine import RunState
from ..migration.defaults import MIGRATION_CAPABILITIES
from .controller import CommandError, VmController
from .settings import PARAMETERS

_NL = "\r\n"


@dataclasses.dataclass(frozen=True)
class HmpCommand:
    names: tuple[str, ...]
    params: str
    help: str
    run: Callable[[VmController, list[str]], str]


def _info_status(vm: VmController, _args: list[str]) -> str:
    status = vm.status()
    state = status["status"]
    if status["running"]:
        return f"VM status: running{_NL}"
    if state == RunState.PAUSED.value:
        return f"VM status: paused{_NL}"
    return f"VM status: paused ({state}){_NL}"


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _info_migrate(vm: VmController, _args: list[str]) -> str:
    caps = " ".join(f"{c['capability']}: {_on_off(c['state'])}" for c in vm.capabilities())
    lines = [f"capabilities: {caps}"]
    reply = vm.query_migrate()
    if reply["status"] != "none":
        lines.append(f"Migration status: {reply['status']}")
        if "error-desc" in reply:
            lines.append(f"Error: {reply['error-desc']}")
        if "checkpoint" in reply:
            lines.append(f"checkpoint file: {reply['checkpoint']['file']} (increment "
                         f"{reply['checkpoint']['increment']}, {reply['checkpoint']['kind']})")
        for key, label in (("total-time", "total time"), ("expected-downtime",
                                                           "expected downtime"),
                           ("downtime", "downtime"), ("setup-time", "setup")):
            if key in reply:
                lines.append(f"{label}: {reply[key]} ms")
        ram = reply.get("ram")
        if ram is not None:
            lines += [f"transferred ram: {ram['transferred'] >> 10} kbytes",
                      f"throughput: {ram['mbps']:.2f} mbps",
                      f"remaining ram: {ram['remaining'] >> 10} kbytes",
                      f"total ram: {ram['total'] >> 10} kbytes",
                      f"duplicate: {ram['duplicate']} pages",
                      f"normal: {ram['normal']} pages",
                      f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
                      f"dirty sync count: {ram['dirty-sync-count']}",
                      f"page size: {ram['page-size'] >> 10} kbytes",
                      f"dirty pages rate: {ram['pages-per-second']} pages"]
    return _NL.join(lines) + _NL


def _info_capabilities(vm: VmController, _args: list[str]) -> str:
    return "".join(f"{c['capability']}: {_on_off(c['state'])}{_NL}" for c in vm.capabilities())


def _info_parameters(vm: VmController, _args: list[str]) -> str:
    return "".join(f"{name}: {value}{_NL}" for name, value in vm.settings.parameters().items())


def _info_checkpoints(vm: VmController, args: list[str]) -> str:
    from ..migration.inspect import format_info
    from .qmp_commands import _query_checkpoints

    info = _query_checkpoints(vm, {"file": args[0]} if args else {})
    return format_info(info).replace("\n", _NL) + _NL


def _migrate(vm: VmController, args: list[str]) -> str:
    detach, period, rest = False, None, list(args)
    while rest and rest[0].startswith("-") and rest[0] not in ("-",):
        flag = rest.pop(0)
        if flag == "-d":
            detach = True
        elif flag == "-p" and rest:
            try:
                period = float(rest.pop(0))
            except ValueError as err:
                raise CommandError(f"-p takes a number of seconds, not {err}") from err
        else:
            raise CommandError(f"migrate: unknown option {flag}")
    if len(rest) != 1:
        raise CommandError("usage: migrate [-d] [-p SECONDS] chpt:FILE")
    vm.migrate(rest[0], period=period)
    if detach or period is not None:
        return ""
    reply = vm.wait_migration()
    if reply["status"] == "failed":
        raise CommandError(reply.get("error-desc", "migration failed"))
    if reply["status"] != "completed":
        return f"migration {reply['status']}{_NL}"
    stats = reply["checkpoint"]
    return (f"checkpoint {stats['increment']} ({stats['kind']}) -> {stats['file']}: "
            f"{stats['pages']} pages + {stats['zero-pages']} zero, "
            f"{stats['bytes-written']} bytes in {stats['total-ms']:.0f} ms, downtime "
            f"{stats['downtime-ms']:.1f} ms{_NL}")


def _set_capability(vm: VmController, args: list[str]) -> str:
    if len(args) != 2 or args[1] not in ("on", "off"):
        raise CommandError("usage: migrate_set_capability NAME on|off")
    if args[0] not in MIGRATION_CAPABILITIES:
        raise CommandError(f"Parameter 'capability' does not accept value '{args[0]}'")
    vm.set_capabilities({args[0]: args[1] == "on"})
    return ""


def _set_parameter(vm: VmController, args: list[str]) -> str:
    if len(args) != 2:
        raise CommandError("usage: migrate_set_parameter NAME VALUE")
    name, text = args
    spec = PARAMETERS.get(name.replace("_", "-"))
    if spec is None:
        raise CommandError(f"Parameter '{name}' is unexpected (choose from "
                           f"{', '.join(PARAMETERS)})")
    value: Any = text
    if spec[1] is int:
        try:
            value = int(text, 0)
        except ValueError as err:
            raise CommandError(f"Parameter '{name}' expects an integer, not {text!r}") from err
    vm.set_parameters({name.replace("_", "-"): value})
    return ""


def _nothing(action: Callable[[VmController], None]) -> Callable[[VmController, list[str]],
                                                                    str]:
    def run(vm: VmController, _args: list[str]) -> str:
        action(vm)
        return ""

    return run


INFO: dict[str, HmpCommand] = {c.names[0]: c for c in (
    HmpCommand(("status",), "", "show the current VM status", _info_status),
    HmpCommand(("name",), "", "show the current VM name (its VM id)",
               lambda vm, a: f"{vm_id()}{_NL}"),
    HmpCommand(("version",), "", "show the version of pyvmm",
               lambda vm, a: f"{__import__('pyvmm').__version__}{_NL}"),
    HmpCommand(("migrate",), "", "show migration status", _info_migrate),
    HmpCommand(("migrate_capabilities",), "", "show current migration capabilities",
               _info_capabilities),
    HmpCommand(("migrate_parameters",), "", "show current migration parameters",
               _info_parameters),
    HmpCommand(("checkpoints",), "[FILE]", "show the increments of the checkpoint file",
               _info_checkpoints),
)}


def _info(vm: VmController, args: list[str]) -> str:
    if not args:
        return "".join(f"info {c.names[0]} {c.params} -- {c.help}".replace("  ", " ") + _NL
                       for c in INFO.values())
    command = INFO.get(args[0])
    if command is None:
        raise CommandError(f"unknown info command: '{args[0]}' (see 'info')")
    return command.run(vm, args[1:])


def _help(vm: VmController, args: list[str]) -> str:
    if args and args[0] == "info":
        return _info(vm, [])
    chosen = [c for c in COMMANDS if not args or args[0] in c.names]
    if args and not chosen:
        raise CommandError(f"unknown command: '{args[0]}'")
    return "".join(f"{'|'.join(c.names)} {c.params} -- {c.help}".replace("  ", " ") + _NL
                   for c in chosen)


COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand(("help", "?"), "[cmd]", "show the help", _help),
    HmpCommand(("info",), "[subcommand]", "show various information about the system state",
               _info),
    HmpCommand(("stop", "s"), "", "stop emulation", _nothing(VmController.stop)),
    HmpCommand(("cont", "c"), "", "resume emulation", _nothing(VmController.cont)),
    HmpCommand(("quit", "q"), "", "quit the emulator (the run ends)",
               _nothing(VmController.quit)),
    HmpCommand(("migrate",), "[-d] [-p SECONDS] chpt:FILE",
               "checkpoint the VM into FILE (-d: do not wait; -p: every SECONDS)", _migrate),
    HmpCommand(("migrate_cancel",), "", "cancel the current checkpoint(s)",
               _nothing(VmController.migrate_cancel)),
    HmpCommand(("migrate_set_capability",), "NAME on|off",
               f"enable/disable a capability ({', '.join(MIGRATION_CAPABILITIES)})", _set_capability),
    HmpCommand(("migrate_set_parameter",), "NAME VALUE",
               f"set a parameter ({', '.join(PARAMETERS)})", _set_parameter),
    HmpCommand(("migrate_incoming",), "chpt:[N:]FILE",
               "reload a checkpoint (after --incoming defer)",
               lambda vm, a: _one_uri(vm.migrate_incoming, "migrate_incoming", a)),
)


def _one_uri(action: Callable[[str], None], name: str, args: list[str]) -> str:
    if len(args) != 1:
        raise CommandError(f"usage: {name} chpt:[N:]FILE")
    action(args[0])
    return ""


def execute_line(vm: VmController, line: str) -> str:
    """Run one HMP command line; its output (errors included, as ``Error: ...``)."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    if not words:
        return ""
    for command in COMMANDS:
        if words[0] in command.names:
            try:
                return command.run(vm, words[1:])
            except CommandError as err:
                return f"Error: {err}{_NL}"
            except PyvmmError as err:
                return f"Error: {err}{_NL}"
    return f"unknown command: '{words[0]}'{_NL}"
