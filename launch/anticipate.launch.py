"""Launch the malmm_anticipate node with the installed parameter file.

Example: ros2 launch malmm_ros anticipate.launch.py image_topic:=/camera/color/image_raw
"""

# `launch.launch_description`, not bare `launch`: ruff reads that as this repo's launch/ folder.
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    """Arguments override the params file for the settings most often changed per camera."""
    default_params = os.path.join(
        get_package_share_directory('malmm_ros'), 'config', 'anticipate.yaml')
    image_topic = LaunchConfiguration('image_topic')
    input_transport = LaunchConfiguration('input_transport')
    backend = LaunchConfiguration('backend')
    params_file = LaunchConfiguration('params_file')
    namespace = LaunchConfiguration('namespace')

    return LaunchDescription([
        DeclareLaunchArgument(
            'image_topic', default_value='/camera/image_raw',
            description='camera image topic (raw); `<topic>/compressed` when compressed'),
        DeclareLaunchArgument(
            'input_transport', default_value='raw',
            description='raw: sensor_msgs/Image; compressed: sensor_msgs/CompressedImage'),
        DeclareLaunchArgument(
            'backend', default_value='onnxruntime',
            description='image encoder backend: onnxruntime | torch | tensorrt | auto'),
        DeclareLaunchArgument(
            'params_file', default_value=default_params,
            description='ROS 2 parameter file with every node parameter'),
        DeclareLaunchArgument(
            'namespace', default_value='', description='namespace of the node and its topics'),
        Node(
            package='malmm_ros',
            executable='anticipate',
            name='malmm_anticipate',
            namespace=namespace,
            # Later entries win: the explicit arguments override the file.
            parameters=[params_file, {'input_transport': input_transport, 'backend': backend}],
            # With input_transport compressed the node reads `<image_topic>/compressed`. It
            # applies the package's Fast DDS profile itself when none is exported.
            remappings=[('image', image_topic)],
            output='screen',
            emulate_tty=True,
        ),
    ])
