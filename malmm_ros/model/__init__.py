"""Neural-network modules of malmm_ros (ROS-free)."""
