"""Training methods by name: ``create_method('mlc', virtual_lr=0.1)``.

Each method is a small strategy over the shared training loop (:mod:`metacorrect.train`)
and, for the meta methods, the meta-gradient engine (:mod:`metacorrect.meta`).
"""

from __future__ import annotations

import dataclasses

from .base import Method, Phase

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.NAME] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def create_method(name: str, **options) -> Method:
    """Create a registered method; unknown options are an error that lists the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(method_names())}")
    cls = METHODS[name]
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {', '.join(unknown)}; "
                         f"its options are: {', '.join(sorted(valid)) or 'none'}")
    # a switch must be given as one: the string "False" would switch it on
    switches = {f.name for f in dataclasses.fields(cls) if f.init and isinstance(f.default, bool)}
    for key in sorted(switches & set(options)):
        if not isinstance(options[key], bool):
            raise ValueError(f"method {name!r} option {key} must be true or false, got {options[key]!r}")
    return cls(**options)


def algorithm_version(name: str, resolved_options: dict | None) -> int:
    """The algorithm version of a recorded run of method ``name`` (1 for an unknown method)."""
    cls = METHODS.get(name)
    return 1 if cls is None else cls.algorithm_version(resolved_options)


# importing the modules registers the methods
from . import simple, mlc  # noqa: E402,F401

for _module in ("correction", "distillation", "reweighting"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is missing
        if _exc.name != f"{__name__}.{_module}":
            raise

__all__ = ["METHODS", "Method", "Phase", "algorithm_version", "create_method", "method_names", "register_method"]
