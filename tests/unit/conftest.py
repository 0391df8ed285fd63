"""Fixtures shared by the unit tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def kt_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for ktproxy's logger, which does not propagate to the root once setup_logging() ran."""
    logger = logging.getLogger("ktproxy")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="ktproxy")
    yield caplog
    logger.removeHandler(caplog.handler)
