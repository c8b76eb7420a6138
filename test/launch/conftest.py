"""The launch files run for real: launch/launch_ros from ../shared/ros-extras, the package
built with colcon into a temporary workspace, both sourced, once per test session."""

from __future__ import annotations

import pytest

from support.colcon_ws import colcon_build, colcon_missing, sourced_env
from support.ros_extras import ros_extras_env


@pytest.fixture(scope='session')
def installed_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a shell that sourced build/ros-extras/install/local_setup.bash and
    then the workspace's install/local_setup.bash: where `ros2 launch malmm_ros ...` works."""
    missing = colcon_missing()
    if missing:
        pytest.skip(missing)
    extras = ros_extras_env()
    prefix, _ = colcon_build(tmp_path_factory.mktemp('launch_ws'))
    return sourced_env(prefix.parent / 'local_setup.bash', env=extras)
