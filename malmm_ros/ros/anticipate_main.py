"""malmm-anticipate's entry point: the checks and settings that come before ROS and the model.

`--help` prints every parameter from the config schema without starting ROS; a parameter file
that does not exist is one ERROR line naming the absolute path (rcl would give a traceback);
the package's Fast DDS profile is applied before rclpy.init when none is set. The node module
(rclpy, torch) is imported only after Ctrl-C handling is in place, so a signal at any moment of
start-up ends the program with exit 0 and no traceback.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from malmm_ros.config import parameter_help

__all__ = ['main', 'usage']

PROG = 'malmm-anticipate'


def usage() -> str:
    return (
        f'usage: {PROG} [-h] [--managed] [--ros-args [--params-file FILE] [-p NAME:=VALUE ...] '
        '[-r image:=TOPIC ...]]\n\n'
        'Camera frames in (topic `image`, or `<image>/compressed` with input_transport '
        'compressed),\nnext-action predictions out on malmm/actions (JSON schema '
        'malmm_ros/actions/v1).\n\n'
        '--managed: a lifecycle node; it starts unconfigured, configure loads the model,\n'
        'activate takes frames (ros2 lifecycle set, or launch with managed:=true).\n\n'
        'Parameters (set with --params-file config/anticipate.yaml or -p NAME:=VALUE):\n'
        f'{parameter_help()}\n'
    )


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(program arguments, ROS arguments) of argv without the program name.

    ROS arguments are those between `--ros-args` and the next `--` (or the end), as rcl reads
    them; several `--ros-args` blocks are allowed.
    """
    own: list[str] = []
    ros: list[str] = []
    in_ros = False
    for arg in argv:
        if arg == '--ros-args':
            in_ros = True
        elif arg == '--' and in_ros:
            in_ros = False
        elif in_ros:
            ros.append(arg)
        else:
            own.append(arg)
    return own, ros


def missing_params_files(ros_args: list[str]) -> list[Path]:
    """Absolute paths of `--params-file` arguments that are not readable files."""
    missing = []
    for flag, value in zip(ros_args, ros_args[1:], strict=False):
        if flag == '--params-file' and not Path(value).is_file():
            missing.append(Path(value).resolve())
    return missing


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(args: list[str] | None = None) -> int:
    """Run the node; `args` is a full argv (program name first), sys.argv by default."""
    argv = list(sys.argv if args is None else args)
    # Ctrl-C and SIGTERM raise KeyboardInterrupt from now on, even where the parent shell
    # ignored SIGINT (background jobs); rclpy.init later adds its own handlers on top.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        own, ros = split_arguments(argv[1:])
        if any(arg in ('-h', '--help') for arg in own):
            print(usage(), end='')
            return 0
        managed = '--managed' in own
        own = [arg for arg in own if arg != '--managed']
        if own:
            print(f'ERROR: unknown argument(s) {" ".join(own)}; node settings are ROS '
                  f'parameters: {PROG} --ros-args -p NAME:=VALUE (see {PROG} --help)',
                  file=sys.stderr)
            return 1
        missing = missing_params_files(ros)
        if missing:
            print(f'ERROR: parameter file {missing[0]} does not exist', file=sys.stderr)
            return 1
        from malmm_ros.ros.dds_profile import apply_default_profile

        dds = apply_default_profile()  # before rclpy.init: Fast DDS reads it then
        try:
            from malmm_ros.ros.anticipate_node import run
        except ModuleNotFoundError as exc:
            print(missing_module_hint(exc.name), file=sys.stderr)
            return 1
        return run(argv, dds_note=dds, managed=managed)
    except KeyboardInterrupt:  # during imports or start-up: nothing to clean up yet
        return 0


def missing_module_hint(module: str | None) -> str:
    """What to do when the interpreter running the node lacks rclpy or our dependencies."""
    return (f'ERROR: Python module {module!r} is not installed for {sys.executable}. Run the '
            'node with the Python that has malmm_ros and its requirements: activate that '
            'virtualenv (or install requirements.txt), run `colcon build` with it active, then '
            '`source install/setup.bash` (README: Run the node)')


if __name__ == '__main__':
    sys.exit(main())
