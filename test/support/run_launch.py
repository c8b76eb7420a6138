"""Test helper process: what `ros2 launch PACKAGE FILE name:=value ...` does, without the CLI.

    python run_launch.py PACKAGE FILE [name:=value ...]

The ROS 2 CLI is not installable here, so this is the part of ros2launch that matters: a
LaunchService given the arguments as its argv, including the installed
share/PACKAGE/launch/FILE with the arguments as launch arguments, run until it is done. Exits
with the LaunchService's return code. Like `ros2 launch`, it does not pass a SIGINT on to the
processes it started: a terminal's ctrl-c reaches the whole process group, so the tests signal
the group (they start this with start_new_session=True).

Imports only launch and the ament index: the environment is the one `source install/
local_setup.bash` gives, nothing from the test tree.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any(':=' not in arg for arg in argv[2:]):
        print('usage: run_launch.py PACKAGE FILE [name:=value ...]', file=sys.stderr)
        return 2
    package, file_name, *arguments = argv
    from ament_index_python.packages import get_package_share_directory
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description import LaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch.launch_service import LaunchService

    path = os.path.join(get_package_share_directory(package), 'launch', file_name)
    service = LaunchService(argv=arguments)
    service.include_launch_description(LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(path),
            launch_arguments=[tuple(arg.split(':=', 1)) for arg in arguments]),
    ]))
    return service.run()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
