"""Per-sample gradient machinery: the handler registry and the capture/controller that drives it."""

from . import conv, embedding, linear, norms  # noqa: F401  (register the built-in handlers)
from .functorch import FALLBACK
from .registry import LayerHandler, NormMethod, Record, find_handler, register, registered_types

__all__ = ["FALLBACK", "LayerHandler", "NormMethod", "Record", "find_handler", "register", "registered_types"]
