"""Shared fixtures: the small random-weight test backbones (no files needed)."""
from __future__ import annotations

import pytest

from toprovar.models.registry import build_backbone


@pytest.fixture(scope="module")
def small():
    return build_backbone("test-small", device="cpu")


@pytest.fixture(scope="module")
def patchify():
    return build_backbone("test-small-patchify", device="cpu")
