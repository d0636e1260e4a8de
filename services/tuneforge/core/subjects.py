"""Every NATS subject and stream of tuneforge, in one place.

Subjects: ``tuneforge.<domain>.<entity>.<event>``. Work and facts live in separate streams whose
subjects never overlap.
"""

from __future__ import annotations

from google.protobuf.message import Message

from tuneforge.api.events.v1 import events_pb2 as ev

EVENTS_STREAM = "TUNEFORGE_EVENTS"
WORK_STREAM = "TUNEFORGE_TRAINING_WORK"

WORKSPACE_UPDATED = "tuneforge.workspace.workspace.updated"

DATASET_BUILD_REQUESTED = "tuneforge.dataset.build.requested"
DATASET_BUILD_SUCCEEDED = "tuneforge.dataset.build.succeeded"
DATASET_BUILD_FAILED = "tuneforge.dataset.build.failed"

# Work queue. An item goes to its trainer pool's subject, ``<this>.<pool>`` (work_subject,
# core/pools.py); the bare subject is what the release before pools published to: it stays in the
# work stream so such items are still trained (trainer/worker.py drains them).
TRAINING_RUN_REQUESTED = "tuneforge.training.run.requested"
TRAINING_RUN_STARTED = "tuneforge.training.run.started"
TRAINING_RUN_PROGRESS = "tuneforge.training.run.progress"
TRAINING_RUN_CHECKPOINT = "tuneforge.training.run.checkpoint"
TRAINING_RUN_SUCCEEDED = "tuneforge.training.run.succeeded"
TRAINING_RUN_FAILED = "tuneforge.training.run.failed"
TRAINING_RUN_CANCELLED = "tuneforge.training.run.cancelled"
TRAINING_RUN_CANCEL_REQUESTED = "tuneforge.training.run.cancel_requested"
TRAINER_WORKER_SEEN = "tuneforge.training.worker.seen"

MODEL_REGISTRATION_REQUESTED = "tuneforge.model.registration.requested"
MODEL_REGISTRATION_SUCCEEDED = "tuneforge.model.registration.succeeded"
MODEL_REGISTRATION_FAILED = "tuneforge.model.registration.failed"
MODEL_ASSIGNED = "tuneforge.model.assignment.created"
MODEL_UNASSIGNED = "tuneforge.model.assignment.deleted"
MODEL_DELETED = "tuneforge.model.model.deleted"

JOB_SUCCEEDED = "tuneforge.job.job.succeeded"
JOB_FAILED = "tuneforge.job.job.failed"
JOB_CANCELLED = "tuneforge.job.job.cancelled"

MESSAGE_TYPES: dict[str, type[Message]] = {
    WORKSPACE_UPDATED: ev.WorkspaceUpdated,
    DATASET_BUILD_REQUESTED: ev.DatasetBuildRequested,
    DATASET_BUILD_SUCCEEDED: ev.DatasetBuildSucceeded,
    DATASET_BUILD_FAILED: ev.DatasetBuildFailed,
    TRAINING_RUN_REQUESTED: ev.TrainingRunRequested,
    TRAINING_RUN_STARTED: ev.TrainingRunStarted,
    TRAINING_RUN_PROGRESS: ev.TrainingRunProgress,
    TRAINING_RUN_CHECKPOINT: ev.TrainingRunCheckpoint,
    TRAINING_RUN_SUCCEEDED: ev.TrainingRunSucceeded,
    TRAINING_RUN_FAILED: ev.TrainingRunFailed,
    TRAINING_RUN_CANCELLED: ev.TrainingRunCancelled,
    TRAINING_RUN_CANCEL_REQUESTED: ev.TrainingRunCancelRequested,
    TRAINER_WORKER_SEEN: ev.TrainerWorkerSeen,
    MODEL_REGISTRATION_REQUESTED: ev.ModelRegistrationRequested,
    MODEL_REGISTRATION_SUCCEEDED: ev.ModelRegistrationSucceeded,
    MODEL_REGISTRATION_FAILED: ev.ModelRegistrationFailed,
    MODEL_ASSIGNED: ev.ModelAssigned,
    MODEL_UNASSIGNED: ev.ModelUnassigned,
    MODEL_DELETED: ev.ModelDeleted,
    JOB_SUCCEEDED: ev.JobSucceeded,
    JOB_FAILED: ev.JobFailed,
    JOB_CANCELLED: ev.JobCancelled,
}

WORK_SUBJECTS = (TRAINING_RUN_REQUESTED, f"{TRAINING_RUN_REQUESTED}.>")
EVENT_SUBJECTS = tuple(s for s in MESSAGE_TYPES if s not in WORK_SUBJECTS)
_POOL_PREFIX = f"{TRAINING_RUN_REQUESTED}."


def work_subject(pool: str) -> str:
    """The work subject of trainer pool ``pool`` (one NATS token: letters, digits, '-', '_')."""
    if not pool or not all(c.isalnum() or c in "-_" for c in pool):
        raise ValueError(f"not a pool name: {pool!r}")
    return _POOL_PREFIX + pool


def pool_of(subject: str) -> str:
    """The pool a work subject routes to; "" for the bare (pre-pool) subject or any other."""
    rest = subject[len(_POOL_PREFIX):] if subject.startswith(_POOL_PREFIX) else ""
    return rest if rest and "." not in rest else ""


def message_type(subject: str) -> type[Message] | None:
    """The message type a subject carries (a pool's work subject: ``TrainingRunRequested``);
    None for a subject tuneforge does not use."""
    found = MESSAGE_TYPES.get(subject)
    if found is None and pool_of(subject):
        return ev.TrainingRunRequested
    return found
