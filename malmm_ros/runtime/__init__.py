"""Image encoder backends behind one interface: `.name` and `.run(frames) -> tokens`."""

from __future__ import annotations

import logging

from malmm_ros.errors import ConfigError
from malmm_ros.runtime.torch_encoder import TorchEncoder

__all__ = ['BACKENDS', 'TorchEncoder', 'create_encoder']

BACKENDS = ('torch', 'auto')
_log = logging.getLogger(__name__)


def create_encoder(backend: str, *, device: str = 'cpu') -> TorchEncoder:
    """An encoder runner for `backend`; `auto` picks the best one available here."""
    if backend == 'auto':
        _log.info('encoder backend auto -> torch (%s)', device)
        backend = 'torch'
    if backend == 'torch':
        return TorchEncoder(device)
    raise ConfigError(f'unknown encoder backend {backend!r}; choose one of {list(BACKENDS)}')
