# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Option values as MONAI's bundle runner and YAML configs pass them, normalised in one place.

``python -m monai.bundle run ... --input None`` arrives as the string ``"None"``, YAML ``null`` as ``None`` and an
empty override as ``""``: all three mean "not given".
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["is_unset", "optional"]

T = TypeVar("T")
_UNSET_TEXT = ("", "none", "null")


def is_unset(value: Any) -> bool:
    """Whether an option value means "not given": ``None``, ``""``, ``"None"`` or ``"null"`` (any case)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _UNSET_TEXT)


def optional(value: T) -> T | None:
    """``value``, or ``None`` when it means "not given" (see :func:`is_unset`)."""
    return None if is_unset(value) else value
