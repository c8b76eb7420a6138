"""ONNX Runtime session settings shared by the encoder and the step graphs."""

from __future__ import annotations

from typing import Any

from malmm_ros.errors import CheckpointError

__all__ = ['checked_providers', 'session_options']


def session_options(threads: int = 0, *, spinning: bool = False) -> Any:
    """All graph optimisations; `threads` intra-op threads (0: ONNX Runtime's choice), one
    inter-op thread. Idle threads spin by default in ONNX Runtime; here they do not unless asked:
    the encoder and the memory step take turns on the same cores, and a spinning pool would find
    them busy (spinning makes the encoder alone faster with 2 threads, not the step;
    bench/encoder_bench.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = '1' if spinning else '0'
    options.add_session_config_entry('session.intra_op.allow_spinning', spin)
    options.add_session_config_entry('session.inter_op.allow_spinning', spin)
    return options


def checked_providers(providers: list[str] | None) -> list[str]:
    """`providers` (default: the CPU), checked before any file is loaded, so a missing one is
    never taken for a corrupt graph."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = providers or ['CPUExecutionProvider']
    missing = [p for p in providers if p not in available]
    if missing:
        raise CheckpointError(f'ONNX Runtime providers {missing} are not available here '
                              f'(available: {available})')
    return providers
