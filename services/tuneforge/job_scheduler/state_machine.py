"""The job state machine: which transitions exist. Every transition becomes a job event."""

from __future__ import annotations

from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as pb

S = pb.JobState

TERMINAL = frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED})

TRANSITIONS: dict[int, frozenset[int]] = {
    S.JOB_STATE_VALIDATING: frozenset({S.JOB_STATE_BUILDING_DATASET, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}),
    S.JOB_STATE_BUILDING_DATASET: frozenset(
        {S.JOB_STATE_QUEUED, S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}
    ),
    S.JOB_STATE_QUEUED: frozenset({S.JOB_STATE_TRAINING, S.JOB_STATE_REGISTERING, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}),
    S.JOB_STATE_TRAINING: frozenset({S.JOB_STATE_REGISTERING, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}),
    S.JOB_STATE_REGISTERING: frozenset({S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}),
    S.JOB_STATE_SUCCEEDED: frozenset(),
    S.JOB_STATE_FAILED: frozenset(),
    S.JOB_STATE_CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def name(state: int) -> str:
    return S.Name(state).removeprefix("JOB_STATE_")


def can_transition(current: int, new: int) -> bool:
    return new in TRANSITIONS.get(current, frozenset())


def check_transition(current: int, new: int) -> None:
    if not can_transition(current, new):
        raise InvalidTransition(f"{name(current)} -> {name(new)} is not a job transition")


def is_terminal(state: int) -> bool:
    return state in TERMINAL
