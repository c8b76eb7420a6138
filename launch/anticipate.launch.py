"""Launch the malmm_anticipate node with the installed parameter file.

Example: ros2 launch malmm_ros anticipate.launch.py image_topic:=/camera/color/image_raw

With managed:=true it is the lifecycle node (`anticipate --managed`): it comes up
unconfigured, for a bring-up (or `ros2 lifecycle set`) to configure and activate it;
autostart:=true has this launch configure and then activate it.
"""

# `launch.launch_description`, not bare `launch`: ruff reads that as this repo's launch/ folder.
import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, RegisterEventHandler
from launch.conditions import IfCondition, UnlessCondition
from launch.event_handlers import OnProcessStart
from launch.events import matches_action
from launch.launch_description import LaunchDescription
from launch.substitutions import AndSubstitution, LaunchConfiguration, NotSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition


def generate_launch_description() -> LaunchDescription:
    """Arguments override the params file for the settings most often changed per camera."""
    default_params = os.path.join(
        get_package_share_directory('malmm_ros'), 'config', 'anticipate.yaml')
    image_topic = LaunchConfiguration('image_topic')
    input_transport = LaunchConfiguration('input_transport')
    backend = LaunchConfiguration('backend')
    params_file = LaunchConfiguration('params_file')
    namespace = LaunchConfiguration('namespace')
    managed = LaunchConfiguration('managed')
    autostart = LaunchConfiguration('autostart')
    node = {
        'package': 'malmm_ros',
        'executable': 'anticipate',
        'name': 'malmm_anticipate',
        'namespace': namespace,
        # Later entries win: the explicit arguments override the file.
        'parameters': [params_file, {'input_transport': input_transport, 'backend': backend}],
        # With input_transport compressed the node reads `<image_topic>/compressed`. It
        # applies the package's Fast DDS profile itself when none is exported.
        'remappings': [('image', image_topic)],
        'output': 'screen',
        'emulate_tty': True,
    }
    lifecycle_node = LifecycleNode(**node, arguments=['--managed'],
                                   condition=IfCondition(managed))

    def transition(transition_id: int) -> EmitEvent:
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(lifecycle_node),
                                           transition_id=transition_id))

    # Conditions on the registrations, not in the handlers: they are read where the arguments
    # are in scope (cameras.launch.py includes this file once per camera).
    starts = IfCondition(AndSubstitution(managed, autostart))
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
        DeclareLaunchArgument(
            'managed', default_value='false',
            description='true: the lifecycle node, which starts unconfigured'),
        DeclareLaunchArgument(
            'autostart', default_value='false',
            description='with managed:=true: configure, then activate, once it is up'),
        Node(**node, condition=UnlessCondition(managed)),
        lifecycle_node,
        # Configure waits for the node's change_state service; activate follows a configure
        # that succeeded (a failed one leaves the node unconfigured, its reason logged).
        RegisterEventHandler(OnProcessStart(
            target_action=lifecycle_node,
            on_start=[transition(Transition.TRANSITION_CONFIGURE)]), condition=starts),
        RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=lifecycle_node, start_state='configuring',
            goal_state='inactive', entities=[transition(Transition.TRANSITION_ACTIVATE)]),
            condition=starts),
        LogInfo(msg='autostart:=true does nothing without managed:=true (the plain node takes '
                'frames from the start)',
                condition=IfCondition(AndSubstitution(autostart, NotSubstitution(managed)))),
    ])
