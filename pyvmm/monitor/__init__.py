"""The monitor: what drives a running pyvmm from outside, as QEMU's monitor drives QEMU.

Layers, each calling only the ones below it:

* :mod:`.events` — the asynchronous events (STOP, RESUME, MIGRATION, CHECKPOINT, ...), fanned out
  to whoever listens (QMP clients, the guest-inform listener);
* :mod:`.controller` — :class:`~.controller.VmController`, the one object that changes a running
  machine on request: stop, cont, quit, checkpoints (``migrate``), reloads; with
  :mod:`.settings` (capabilities and parameters) and :mod:`.migration_status` (what
  ``query-migrate`` says).  Every front end below goes through it;
* :mod:`.qmp_commands` — the QMP command table (argument checks, QEMU's error classes) and
  :mod:`.hmp` — the same commands as HMP text;
* :mod:`.qmp_server` — QMP and HMP sockets (``--qmp``, ``--monitor``), served from one thread;
  :mod:`.sockets` — their addresses; :mod:`.console` — HMP on the terminal; :mod:`.inform` —
  the guest-inform channel both ways; :mod:`.client` — ``pyvmm monitor``.
"""
