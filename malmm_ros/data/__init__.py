"""EPIC-KITCHENS-100 annotations, bags, features and extraction (no ROS imports).

Import from the modules: `epic` (annotations and the protocol's samples), `bags`, `features`,
`extraction`, `sample_stream`.

The label vocabularies (LabelMaps, class CSVs) live one layer down in malmm_ros.labels: the
model's checkpoints carry them.
"""
