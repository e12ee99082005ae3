"""Shared test fixtures: paths to the reference fixtures and deterministic seeding."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Reference outputs of the original CLIP implementation live beside the repository (../shared/fixtures).
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not SHARED_FIXTURES.is_dir():
        raise FileNotFoundError(
            f"reference fixtures not found at {SHARED_FIXTURES}: "
            "clone the repository next to the shared/ folder"
        )
    return SHARED_FIXTURES


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
