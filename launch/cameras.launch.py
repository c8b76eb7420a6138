"""Launch one malmm_anticipate node per camera, each in a namespace of its own.

Example:
    ros2 launch malmm_ros cameras.launch.py \\
        cameras:='left=/left/image_raw right=/right/image_raw' backend:=onnxruntime

starts /left/malmm_anticipate and /right/malmm_anticipate, predicting on /left/malmm/actions
and /right/malmm/actions. `cameras` lists NAME=TOPIC pairs, separated by spaces or commas:
NAME becomes the node's namespace, TOPIC its image topic (relative topics resolve in that
namespace). Every other argument of anticipate.launch.py (input_transport, backend,
params_file, ...) applies to all the cameras; this file includes anticipate.launch.py once per
camera, so each argument has one definition there.
"""

# `launch.launch_description`, not bare `launch`: ruff reads that as this repo's launch/ folder.
import os
import re

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    GroupAction,
    IncludeLaunchDescription,
    OpaqueFunction,
)
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

NODE_NAME = 'malmm_anticipate'
PER_CAMERA = ('namespace', 'image_topic')  # set from `cameras`, one value per camera
NAME_TOKEN = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')  # a ROS name token: one namespace level
EXAMPLE = "cameras:='left=/left/image_raw right=/right/image_raw'"


def parse_cameras(text: str) -> list[tuple[str, str]]:
    """`cameras` as [(name, topic)]; ValueError naming the entry and the rule it breaks."""
    from rclpy.expand_topic_name import expand_topic_name
    from rclpy.validate_full_topic_name import validate_full_topic_name

    entries = [entry for entry in re.split(r'[\s,]+', text.strip()) if entry]
    if not entries:
        raise ValueError(f'cameras is empty: give NAME=TOPIC pairs, e.g. {EXAMPLE}')
    cameras: list[tuple[str, str]] = []
    for entry in entries:
        name, equals, topic = entry.partition('=')
        if not equals or not topic:
            raise ValueError(f'cameras: {entry!r} is not NAME=TOPIC, e.g. {EXAMPLE}')
        if not NAME_TOKEN.fullmatch(name):
            raise ValueError(
                f'cameras: {name!r} (in {entry!r}) is not a valid namespace name: letters, '
                'digits and _, not starting with a digit')
        if name in (n for n, _ in cameras):
            raise ValueError(f'cameras: {name!r} is given twice: each camera needs its own name')
        try:
            validate_full_topic_name(expand_topic_name(topic, NODE_NAME, f'/{name}'))
        except Exception as exc:  # rclpy's Invalid*Exception: the message says what is wrong
            raise ValueError(f'cameras: {topic!r} (in {entry!r}) is not a valid topic name: '
                             f'{" ".join(str(exc).split())}') from None
        cameras.append((name, topic))
    return cameras


def _anticipate_launch_file() -> str:
    return os.path.join(get_package_share_directory('malmm_ros'), 'launch',
                        'anticipate.launch.py')


def _include_cameras(context: LaunchContext, passed: list[str]) -> list[GroupAction]:
    cameras = parse_cameras(LaunchConfiguration('cameras').perform(context))
    arguments = [(name, LaunchConfiguration(name)) for name in passed]
    # One scope per camera: its namespace and topic never leak into the next camera's include.
    return [GroupAction([IncludeLaunchDescription(
        PythonLaunchDescriptionSource(_anticipate_launch_file()),
        launch_arguments=[('namespace', name), ('image_topic', topic), *arguments])],
        scoped=True, forwarding=True) for name, topic in cameras]


def generate_launch_description() -> LaunchDescription:
    """`cameras`, plus anticipate.launch.py's own arguments (its names, defaults and
    descriptions, read from it) but the per-camera ones."""
    source = PythonLaunchDescriptionSource(_anticipate_launch_file())
    shared = [argument for argument in source.get_launch_description(LaunchContext())
              .get_launch_arguments() if argument.name not in PER_CAMERA]
    return LaunchDescription([
        DeclareLaunchArgument(
            'cameras', description='NAME=TOPIC pairs, separated by spaces or commas: one node '
            f'per camera in namespace NAME reading TOPIC, e.g. {EXAMPLE}'),
        *(DeclareLaunchArgument(argument.name, default_value=argument.default_value,
                                description=argument.description,
                                choices=argument.choices) for argument in shared),
        OpaqueFunction(function=_include_cameras,
                       args=[[argument.name for argument in shared]]),
    ])
