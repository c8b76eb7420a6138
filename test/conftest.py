"""Fixtures and markers shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from support.domains import DOMAINS, TEST_DIR


@pytest.fixture(scope='module', autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is fastest and immune to CPU contention. Every module
    starts with one (code under test that sets its own count still does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A module with ROS domain ids (test/support/domains.py) joins DDS: its tests are `dds`,
    so the table is also the list of what `make test-fast` leaves out for that reason."""
    for item in items:
        if item.path.is_relative_to(TEST_DIR) and \
                item.path.relative_to(TEST_DIR).as_posix() in DOMAINS:
            item.add_marker(pytest.mark.dds)


@pytest.fixture(scope='session')
def edge_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the config's untrained edge model, written by `malmm-export bundle --out`
    with its defaults (config/anticipate.yaml, real encoder weights, INT8 calibrated on the
    sample photos), once per session; tests that use it are slow (tens of seconds)."""
    from malmm_ros.cli.export import main as export_main

    out = tmp_path_factory.mktemp('edge_bundle') / 'bundle'
    assert export_main(['bundle', '--out', str(out)]) == 0
    return out
