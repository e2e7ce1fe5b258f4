"""Distributed-training engines, by name: a registry of lazy ``"module:Class"`` entries (``engine.kind``).

``build_engine(cfg, dist)`` imports only the engine that ``cfg.kind`` names (DeepSpeed is a heavy, optional import).
The interface and the helpers every engine shares are in ``core.engines.base``; no engine imports another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.engines.base import Engine, LocalPart, PartSpec, TrainedPart, build_optimizer
from core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from core.config import EngineConfig
    from core.distributed import DistInfo

__all__ = [
    "ENGINES",
    "Engine",
    "LocalPart",
    "PartSpec",
    "TrainedPart",
    "build_engine",
    "build_optimizer",
    "engine_class",
    "register_engine",
]

# engine.kind -> "module:Class" (imported on first use)
ENGINES = Registry("engine", key="engine.kind", unknown="{key}: unknown {kind} {name!r} (expected {expected})")
ENGINES.register("fsdp2", "core.engines.fsdp2:FSDP2Engine")
ENGINES.register("deepspeed", "core.engines.deepspeed:DeepSpeedEngine")


def register_engine(kind: str, target: str) -> None:
    """Make ``engine.kind: <kind>`` build the class named by ``target`` (``"package.module:Class"``)."""
    if ":" not in target:
        raise ValueError(f"register_engine({kind!r}): target must be 'module:Class', got {target!r}")
    ENGINES.register(kind, target)


def engine_class(kind: str) -> type[Engine]:
    """The engine class registered for ``kind`` (imports its module)."""
    return ENGINES.get(kind)


def build_engine(cfg: EngineConfig, dist: DistInfo, **kwargs: Any) -> Engine:
    """The engine named by ``cfg.kind``. Extra keyword arguments go to the engine's constructor."""
    return engine_class(cfg.kind)(cfg, dist, **kwargs)
