"""job-scheduler: jobs, their state machine and event history; workspaces and API keys."""
