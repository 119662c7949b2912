"""Name -> class tables for the pluggable parts (linearization methods, evaluation tasks)."""

from .errors import UserError


class Registry(dict):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def register(self, cls):
        """Class decorator: the class is found under its `name`."""
        self[cls.name] = cls
        return cls

    def lookup(self, name):
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}: choose one of {', '.join(sorted(self))}")
        return self[name]
