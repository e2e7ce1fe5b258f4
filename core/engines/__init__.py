"""Distributed-training engines. ``build_engine`` imports the concrete engine (FSDP2, DeepSpeed) lazily."""
from core.engines.base import Engine, TrainedPart, build_engine, build_optimizer

__all__ = ["Engine", "TrainedPart", "build_engine", "build_optimizer"]
