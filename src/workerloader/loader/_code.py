"""What a worker is made of: ``WorkerCode`` and its ``Limits``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Limits", "WorkerCode"]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-worker limits. Each ends, where the worker will not stop, in SIGKILL from the host and
    a typed ``LimitExceeded`` for the caller."""

    cpu_ms: int = 1000
    """CPU time one call may use."""
    memory_mb: int = 128
    """Memory the worker may map beyond the interpreter's own."""
    wall_ms: int = 30_000
    """Wall-clock time one call may take."""
    output_bytes: int = 64 * 1024
    """Characters of print/logging/warnings output one call may write."""
    subrequests: int = 1000
    """Binding calls one call may make (enforced with the bindings)."""


@dataclass(frozen=True, kw_only=True)
class WorkerCode:
    """The code and bindings of a worker, mirroring Cloudflare's ``WorkerCode``.

    ``modules`` maps file names to Python source (str) or ``{"json": ...}``, ``{"text": str}``,
    ``{"data": bytes}``. ``env`` holds clonable data and capabilities. ``global_outbound=None``
    means no network at all; a binding there (an ``HttpGateway``, or any capability with an
    async ``fetch(request_dict)``) receives every ``workers.fetch`` of the worker instead.
    """

    main_module: str
    modules: Mapping[str, object]
    env: Mapping[str, object] = field(default_factory=dict)
    global_outbound: object = None
    limits: Limits = field(default_factory=Limits)
    compatibility_date: str = "2025-01-01"
    compatibility_flags: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, object]:
        limits = self.limits
        return {
            "main_module": self.main_module,
            "modules": dict(self.modules),
            "env": dict(self.env),
            "limits": {"memory_mb": limits.memory_mb, "output_bytes": limits.output_bytes},
            "outbound": self.global_outbound,
        }
