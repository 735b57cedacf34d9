"""dpengine: differentially private training for PyTorch.

Heavy imports (torch) are lazy, so ``dpengine budget`` and ``import dpengine.accounting`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PrivacyEngine": "dpengine.engine",
    "DPOptimizer": "dpengine.optimizer",
    "PrivacyBudgetExhaustedError": "dpengine.optimizer",
    "VirtualSteps": "dpengine.data",
    "no_capture": "dpengine.grad_sample.controller",
    "DPDataLoader": "dpengine.data",
    "validate": "dpengine.validation",
    "fix": "dpengine.validation",
    "UnsupportedModuleError": "dpengine.validation",
}

__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    """Public names for help() and tab completion, without importing torch."""
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpengine' has no attribute {name!r}")
