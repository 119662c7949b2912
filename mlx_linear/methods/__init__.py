"""Linearization methods, by name. Each is one module that registers its class here."""

from ..registry import Registry

METHODS = Registry("method")
register = METHODS.register
get_method = METHODS.lookup

from . import liger_gla, liger_gsa, liger_hgrn2, lola, lolcats, supra  # noqa: E402,F401  (registers)
