"""Migration capabilities and parameters of the next checkpoint (QMP ``migrate-set-*``), checked.

:class:`MigrationSettings` is what the command line sets at start and a monitor changes between
migrations; :data:`PARAMETERS` maps QMP's parameter names to its fields.  Algorithm names are
checked against the registry only when they are not built-ins (start-up stays light).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError
from ..migration.defaults import (
    COMPRESS,
    ENCODERS,
    FAULT_MODES,
    MIGRATION_CAPABILITIES,
    SAVER_NICE,
    SAVERS,
    TRACKERS,
)


@dataclasses.dataclass
class MigrationSettings:
    """Capabilities and parameters of the next checkpoint (QMP ``migrate-set-*``)."""

    capabilities: dict[str, bool] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(MIGRATION_CAPABILITIES, False))
    tracker: str = "async"
    saver: str | None = None  # None: as the capabilities say
    encoder: str | None = None  # None: as the compress capability says
    compress_level: int | None = None  # None: the encoder's default
    unprotect_pages: int = 1
    fault_mode: str = "thread"
    saver_nice: int = SAVER_NICE
    max_increments: int | None = None
    durable: bool = True
    sanity_checks: bool = True

    def enabled(self) -> tuple[str, ...]:
        """The file's capabilities (compress is the encoder's: see :meth:`encoder_name`)."""
        return tuple(sorted(name for name, on in self.capabilities.items()
                            if on and name != COMPRESS))

    def encoder_name(self) -> str:
        return self.encoder or ("zstd" if self.capabilities.get(COMPRESS) else "plain")

    def file_settings(self) -> MigrationSettings:
        """These settings without the encoder's (which may change between the increments of
        one chain)."""
        return dataclasses.replace(self, capabilities={**self.capabilities, COMPRESS: False},
                                   encoder=None, compress_level=None)

    def check(self) -> None:
        """ConfigError naming the first setting that cannot be used."""
        if self.capabilities.get("cow") and self.capabilities.get("live"):
            raise ConfigError("the cow and live capabilities exclude each other")
        builtins = {"tracker": TRACKERS, "saver": SAVERS, "encoder": ENCODERS}
        for kind, name in (("tracker", self.tracker), ("saver", self.saver),
                           ("encoder", self.encoder)):
            if name is not None and ":" not in name and name not in builtins[kind]:
                from ..migration.algorithms import available

                known = available(kind)
                if name not in known:
                    raise ConfigError(f"{kind} must be one of {', '.join(known)} (or "
                                      f"module:attribute), not {name!r}")
        if self.capabilities.get(COMPRESS) and self.encoder not in (None, "zstd"):
            raise ConfigError(f"the compress capability is the zstd encoder, not "
                              f"{self.encoder}")
        compresses = self.encoder_name() != "plain" or self.compress_level is not None
        if self.capabilities.get("checksum") and compresses:
            raise ConfigError("the compress and checksum capabilities do not combine: the "
                              "checksums cover QEMU's plain page records only")
        if self.compress_level is not None:
            from ..migration.encoders import check_level

            check_level(self.compress_level)
        if self.saver is not None and self.saver not in ("live", "cow") and \
                (self.capabilities.get("live") or self.capabilities.get("cow")):
            raise ConfigError(f"the saver {self.saver} excludes the live and cow capabilities")
        if self.fault_mode not in FAULT_MODES:
            raise ConfigError(f"fault-mode must be one of {', '.join(FAULT_MODES)}, not "
                              f"{self.fault_mode!r}")
        if not 1 <= self.unprotect_pages <= 1 << 20:
            raise ConfigError(f"unprotect-pages must be 1..{1 << 20}, not "
                              f"{self.unprotect_pages}")
        if not 0 <= self.saver_nice <= 19:
            raise ConfigError(f"saver-nice must be 0..19, not {self.saver_nice}")
        if self.max_increments is not None and self.max_increments < 1:
            raise ConfigError(f"max-increments must be at least 1 (0: no limit), not "
                              f"{self.max_increments}")

    def default_saver(self) -> str:
        return "live" if self.capabilities.get("live") else \
            "cow" if self.capabilities.get("cow") else "stop-and-copy"

    def parameters(self) -> dict[str, Any]:
        """QMP ``query-migrate-parameters``."""
        return {"tracker": self.tracker, "saver": self.saver or self.default_saver(),
                "unprotect-pages": self.unprotect_pages,
                "fault-mode": self.fault_mode, "saver-nice": self.saver_nice,
                "max-increments": self.max_increments or 0, "encoder": self.encoder_name(),
                "compress-level": self.compress_level or 0}


#: QMP parameter name -> (MigrationSettings field, type)
PARAMETERS: dict[str, tuple[str, type]] = {
    "tracker": ("tracker", str), "saver": ("saver", str),
    "unprotect-pages": ("unprotect_pages", int),
    "fault-mode": ("fault_mode", str), "saver-nice": ("saver_nice", int),
    "max-increments": ("max_increments", int),
    "encoder": ("encoder", str), "compress-level": ("compress_level", int),
}
