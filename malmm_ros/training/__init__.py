"""Training of the Q-Former and heads on precomputed encoder features (no ROS imports)."""
