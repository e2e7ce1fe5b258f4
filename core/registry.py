"""Name -> thing registries for the choices a config names (``task: dit``), instead of if/elif chains.

An entry is the thing itself or a lazy ``"package.module:attr"`` string, imported on first ``get``: a registry
in a low layer can list names that higher layers implement (``models.tasks.TASKS``) without importing them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Optional

__all__ = ["Registry"]


class Registry:
    """Names -> things. ``kind`` names the things in errors and ``key`` the config key that chose one, e.g.
    ``Registry("task")``: ``get("x")`` raises ``ValueError("task: unknown task 'x'; known: 'dit', 'vavae'")``."""

    def __init__(self, kind: str, key: Optional[str] = None, *, unknown: Optional[str] = None) -> None:
        self.kind = kind
        self.key = key or kind
        # The error for an unknown name: a format string with {key}, {kind}, {name}, {known} ("'a', 'b'") and
        # {expected} ("'a' or 'b'").
        self.unknown = unknown or "{key}: unknown {kind} {name!r}; known: {known}"
        self._entries: dict[str, Any] = {}

    def register(self, name: str, target: Any = None) -> Any:
        """Add ``name`` -> ``target`` (an object or a lazy ``"module:attr"`` string); without ``target``, a
        decorator registering the decorated object. A name is registered once."""
        if target is None:

            def decorator(obj: Any) -> Any:
                self.register(name, obj)
                return obj

            return decorator
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: a lazy entry is 'package.module:attr', got {target!r}")
        self._entries[name] = target
        return target

    def get(self, name: str) -> Any:
        """The thing registered as ``name`` (imported now if the entry is lazy)."""
        if name not in self._entries:
            names = [repr(n) for n in self._entries]
            expected = " or ".join(filter(None, [", ".join(names[:-1]), *names[-1:]]))
            raise ValueError(
                self.unknown.format(key=self.key, kind=self.kind, name=name, known=", ".join(names), expected=expected)
            )
        target = self._entries[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[name] = target
        return target

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
