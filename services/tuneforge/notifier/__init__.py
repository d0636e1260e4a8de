"""notifier: emails job owners when a job ends; keeps every delivery and attempt."""
