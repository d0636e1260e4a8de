"""dataset-builder: training examples per workspace (with topics) and immutable dataset snapshots."""
