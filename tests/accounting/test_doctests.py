"""Runs the doctests of every accounting module."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "dpengine.accounting",
    "dpengine.accounting._validate",
    "dpengine.accounting.rdp",
    "dpengine.accounting.accountants",
    "dpengine.accounting.calibration",
    "dpengine.accounting.budget",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if name != "dpengine.accounting.budget":
        assert result.attempted > 0


def test_at_least_one_example_ran() -> None:
    total = sum(doctest.testmod(importlib.import_module(n)).attempted for n in MODULES)
    assert total > 0
