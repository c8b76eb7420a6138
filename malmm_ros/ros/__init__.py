"""ROS 2 adapter: converts messages, manages threads, publishes."""
