"""The QMP command table: names, argument checks with QEMU's error texts, and what each does.

Each command is a :class:`Command`: its arguments (name, JSON type, required or not), whether it
may block (stop, cont, migrate-incoming... run on a worker thread, queries answer on the server's
own thread), and a handler over :class:`~.controller.VmController`.  :func:`execute` checks the
arguments as QEMU's generated marshallers do (``Parameter 'uri' is missing``, ``Invalid parameter
type for 'uri', expected: string``, ``Parameter 'foo' is unexpected``) and raises
:class:`~.controller.CommandError` with QEMU's error class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import PyvmmError
from ..identity import vm_id
from ..migration.defaults import MIGRATION_CAPABILITIES
from .controller import CommandError, VmController
from .settings import PARAMETERS

Handler = Callable[[VmController, dict[str, Any]], Any]

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
               dict: "object"}


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    kind: type
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    blocking: bool = False
    help: str = ""


def qemu_version() -> dict[str, Any]:
    major, minor, micro = (int(part) for part in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"pyvmm {__version__}"}


def _set_capabilities(vm: VmController, args: dict[str, Any]) -> None:
    changes: dict[str, bool] = {}
    for item in args["capabilities"]:
        if not isinstance(item, dict):
            raise CommandError("Invalid parameter type for 'capabilities', expected: "
                               "MigrationCapabilityStatus")
        name, state = item.get("capability"), item.get("state")
        extra = set(item) - {"capability", "state"}
        if extra:
            raise CommandError(f"Parameter '{min(extra)}' is unexpected")
        if not isinstance(name, str):
            raise CommandError("Parameter 'capability' is missing" if name is None else
                               "Invalid parameter type for 'capability', expected: string")
        if name not in MIGRATION_CAPABILITIES:
            raise CommandError(f"Parameter 'capability' does not accept value '{name}'")
        if not isinstance(state, bool):
            raise CommandError("Parameter 'state' is missing" if state is None else
                               "Invalid parameter type for 'state', expected: boolean")
        changes[name] = state
    vm.set_capabilities(changes)


def _migrate(vm: VmController, args: dict[str, Any]) -> None:
    period = args.get("period")
    vm.migrate(args["uri"], period=None if period is None else float(period))


def _query_checkpoints(vm: VmController, args: dict[str, Any]) -> dict[str, Any]:
    from ..migration.inspect import file_info

    path = args.get("file") or vm.checkpoint_file()
    if path is None:
        raise CommandError("no checkpoint file yet: name one with 'file'")
    try:
        return file_info(path)
    except PyvmmError as err:
        raise CommandError(str(err)) from err
    except OSError as err:
        raise CommandError(f"{path}: {err.strerror}") from err


def _human_monitor_command(vm: VmController, args: dict[str, Any]) -> str:
    from .hmp import execute_line

    return execute_line(vm, args["command-line"])


def _command_list() -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(COMMANDS)]


_PARAMETER_ARGS = tuple(Arg(name, kind) for name, (_field, kind) in PARAMETERS.items())

COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("qmp_capabilities", lambda vm, a: {}, (Arg("enable", list),),
            help="negotiate capabilities (first command of a session)"),
    Command("query-version", lambda vm, a: qemu_version(), help="version of pyvmm"),
    Command("query-commands", lambda vm, a: _command_list(), help="list the commands"),
    Command("query-status", lambda vm, a: vm.status(), help="run state of the guest"),
    Command("query-name", lambda vm, a: {"name": vm_id()}, help="the VM id"),
    Command("stop", lambda vm, a: vm.stop(), blocking=True, help="pause the guest"),
    Command("cont", lambda vm, a: vm.cont(), blocking=True, help="resume the guest"),
    Command("quit", lambda vm, a: vm.quit(), blocking=True, help="end the run"),
    Command("migrate", _migrate, (Arg("uri", str, True), Arg("period", float),
                                  Arg("detach", bool)), blocking=True,
            help="checkpoint into chpt:FILE (every 'period' seconds)"),
    Command("migrate_cancel", lambda vm, a: vm.migrate_cancel(), blocking=True,
            help="cancel the checkpoint in flight and stop periodic ones"),
    Command("migrate-set-capabilities", _set_capabilities,
            (Arg("capabilities", list, True),), blocking=True,
            help="set incremental, live, cow, checksum"),
    Command("query-migrate-capabilities", lambda vm, a: vm.capabilities(),
            help="capabilities of the next checkpoint"),
    Command("migrate-set-parameters", lambda vm, a: vm.set_parameters(a), _PARAMETER_ARGS,
            blocking=True, help="set tracker, unprotect-pages, fault-mode, saver-nice, "
                                "max-increments"),
    Command("query-migrate-parameters", lambda vm, a: vm.settings.parameters(),
            help="parameters of the next checkpoint"),
    Command("query-migrate", lambda vm, a: vm.query_migrate(),
            help="status and statistics of the last checkpoint"),
    Command("query-checkpoints", _query_checkpoints, (Arg("file", str),), blocking=True,
            help="a checkpoint file's increments and their statistics"),
    Command("migrate-incoming", lambda vm, a: vm.migrate_incoming(a["uri"]),
            (Arg("uri", str, True),), blocking=True,
            help="reload chpt:[N:]FILE (after --incoming defer)"),
    Command("human-monitor-command", _human_monitor_command,
            (Arg("command-line", str, True), Arg("cpu-index", int)), blocking=True,
            help="run an HMP command, return its text"),
)}


def check_arguments(command: Command, arguments: dict[str, Any]) -> None:
    """CommandError (GenericError) with QEMU's text for a missing, unexpected or mistyped
    argument."""
    known = {arg.name: arg for arg in command.args}
    for name in arguments:
        if name not in known:
            raise CommandError(f"Parameter '{name}' is unexpected")
    for arg in command.args:
        if arg.name not in arguments:
            if arg.required:
                raise CommandError(f"Parameter '{arg.name}' is missing")
            continue
        value = arguments[arg.name]
        ok = isinstance(value, arg.kind) and not (arg.kind is int and isinstance(value, bool))
        if arg.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise CommandError(f"Invalid parameter type for '{arg.name}', expected: "
                               f"{_TYPE_NAMES[arg.kind]}")


def lookup(name: str) -> Command:
    command = COMMANDS.get(name)
    if command is None:
        raise CommandError(f"The command {name} has not been found", "CommandNotFound")
    return command


def execute(vm: VmController, command: Command, arguments: dict[str, Any]) -> Any:
    """Run ``command`` (arguments checked); its QMP ``return`` value (``{}`` for None).
    Every failure is a CommandError."""
    check_arguments(command, arguments)
    try:
        result = command.handler(vm, arguments)
    except CommandError:
        raise
    except PyvmmError as err:
        raise CommandError(str(err)) from err
    return {} if result is None else result
