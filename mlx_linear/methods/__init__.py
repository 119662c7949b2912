"""Linearization methods, by name. Each is one module that registers its class here."""

METHODS = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def get_method(name):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import liger_gla  # noqa: E402,F401  (registers)
