"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import evomerge

MODULES = sorted(m.name for m in pkgutil.walk_packages(evomerge.__path__, "evomerge."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_examples_are_found():
    counted = sum(doctest.testmod(importlib.import_module(n), optionflags=doctest.ELLIPSIS, report=False).attempted for n in MODULES)
    assert counted >= 40
