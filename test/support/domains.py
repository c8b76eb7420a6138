"""The ROS domain ids of the test modules that talk DDS: one table, so no two share a domain.

Fast DDS binds UDP ports 7400 + 250 * domain + small offsets. Ids up to 101 keep every port
below Linux's ephemeral range (32768-60999), where the kernel hands out ports to any socket and
a test's bind would fail now and then. test/test_domains.py checks the table and that no test
source writes an id of its own.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ['ASSIGNED', 'DOMAINS', 'HIGHEST', 'LOWEST', 'RESERVED', 'domain_id', 'domain_ids']

LOWEST, HIGHEST = 1, 101
# Ids that other runs on this machine use; a test there would join their traffic.
RESERVED = {0: 'the ROS default', 42: 'the Makefile default', 61: 'bench/node_bench.py',
            77: 'CI (.ci/run) and the README'}

TEST_DIR = Path(__file__).resolve().parents[1]

# Test module (path under test/) -> its ids, in the order the module unpacks them. Each process
# group of a module (a node and its drivers) has an id of its own.
DOMAINS: dict[str, tuple[int, ...]] = {
    'evaluation/test_eval_end_to_end.py': (10,),  # live mode's node and evaluator
    'ros/test_dds_defaults.py': (11,),
    'ros/test_demo_and_wrappers.py': (12,),
    'ros/test_node_backends.py': (13, 14),  # the onnxruntime node, the torch node
    'ros/test_node_compressed_input.py': (15,),
    'ros/test_node_drops.py': (16,),
    'ros/test_node_engine_cache.py': (17,),
    'ros/test_node_image_bombs.py': (18,),
    'ros/test_node_input_checks.py': (19, 20, 21),  # the stamps / resets node, starved, remap
    'ros/test_node_raw_input.py': (22,),
    'ros/test_node_regressions.py': (23, 24),  # the compressed node, the raw node
    'ros/test_node_start_and_stop.py': (25, 26, 27),  # start-up cases, signals, NaN checkpoint
    'ros/test_node_startup.py': (28,),
    'ros/test_node_stream.py': (29,),
    'ros/test_node_termination.py': (30,),
    'ros/test_node_text.py': (31, 32),  # the node with a quick LLM, the one with a slow LLM
    'ros/test_node_text_startup.py': (33,),
    'ros/test_node_text_real.py': (47,),  # the node with the real SmolLM2 GGUF
    'ros/test_parameters.py': (34,),
    'ros/test_replay.py': tuple(range(50, 60)),  # one per test, in turn
    'robot_pythons/test_node_runtime_onnx.py': (35, 36, 37),  # Python 3.10, main, 3.12
    'ros/test_node_lifecycle.py': (38, 39),  # the managed node, its failing configure
    'ros/test_sim_time.py': (40, 41),
    'launch/test_launch_anticipate.py': (45, 46),
    'launch/test_launch_cameras.py': (60,),
    'launch/test_launch_managed.py': (62, 63),
}
ASSIGNED = frozenset(i for ids in DOMAINS.values() for i in ids)


def domain_ids(test_file: str | Path) -> tuple[int, ...]:
    """The ids of the test module at `test_file` (pass its __file__)."""
    name = Path(test_file).resolve().relative_to(TEST_DIR).as_posix()
    if name not in DOMAINS:
        raise KeyError(f'{name} has no ROS domain ids: add it to test/support/domains.py')
    return DOMAINS[name]


def domain_id(test_file: str | Path) -> int:
    """The one id of a test module that has a single process group."""
    (only,) = domain_ids(test_file)
    return only
