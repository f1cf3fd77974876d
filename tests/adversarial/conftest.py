"""Fixtures of the adversarial suite (the helpers live in ``adv_kit``, a uniquely named module,
so that no test imports a module called ``conftest``)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import adv_kit  # noqa: E402

hostile_dm = pytest.fixture(scope="module", name="hostile_dm")(adv_kit.hostile_dm_fixture)
