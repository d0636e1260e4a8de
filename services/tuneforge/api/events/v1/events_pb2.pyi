import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tuneforge.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventMeta(_message.Message):
    __slots__ = ("event_id", "workspace_id", "job_id", "occurred_at", "producer")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    workspace_id: str
    job_id: str
    occurred_at: _timestamp_pb2.Timestamp
    producer: str
    def __init__(self, event_id: _Optional[str] = ..., workspace_id: _Optional[str] = ..., job_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., producer: _Optional[str] = ...) -> None: ...

class WorkspaceUpdated(_message.Message):
    __slots__ = ("meta", "workspace_id", "name", "plan", "owner_email", "api_key_hashes", "revision")
    META_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_HASHES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    workspace_id: str
    name: str
    plan: _common_pb2.Plan
    owner_email: str
    api_key_hashes: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., workspace_id: _Optional[str] = ..., name: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.Plan, str]] = ..., owner_email: _Optional[str] = ..., api_key_hashes: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class DatasetBuildRequested(_message.Message):
    __slots__ = ("meta", "topics", "method", "dataset_kind", "base_model", "test_fraction", "seed", "train_on_inputs", "overlength_policy", "max_epochs")
    META_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DATASET_KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_INPUTS_FIELD_NUMBER: _ClassVar[int]
    OVERLENGTH_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    topics: _containers.RepeatedScalarFieldContainer[str]
    method: str
    dataset_kind: str
    base_model: str
    test_fraction: float
    seed: int
    train_on_inputs: str
    overlength_policy: _common_pb2.OverlengthPolicy
    max_epochs: int
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., topics: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., dataset_kind: _Optional[str] = ..., base_model: _Optional[str] = ..., test_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., train_on_inputs: _Optional[str] = ..., overlength_policy: _Optional[_Union[_common_pb2.OverlengthPolicy, str]] = ..., max_epochs: _Optional[int] = ...) -> None: ...

class DatasetBuildSucceeded(_message.Message):
    __slots__ = ("meta", "dataset")
    META_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    dataset: _common_pb2.DatasetSummary
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ...) -> None: ...

class DatasetBuildFailed(_message.Message):
    __slots__ = ("meta", "reason", "failure_kind")
    META_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    reason: str
    failure_kind: _common_pb2.FailureKind
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., reason: _Optional[str] = ..., failure_kind: _Optional[_Union[_common_pb2.FailureKind, str]] = ...) -> None: ...

class TrainingRunRequested(_message.Message):
    __slots__ = ("meta", "base_model", "method", "method_options_json", "hyperparameters", "dataset", "job_name", "pool")
    META_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    base_model: str
    method: str
    method_options_json: str
    hyperparameters: _common_pb2.Hyperparameters
    dataset: _common_pb2.DatasetSummary
    job_name: str
    pool: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., method_options_json: _Optional[str] = ..., hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., job_name: _Optional[str] = ..., pool: _Optional[str] = ...) -> None: ...

class TrainingRunStarted(_message.Message):
    __slots__ = ("meta", "attempt", "worker_id", "resumed_from_step")
    META_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    attempt: int
    worker_id: str
    resumed_from_step: int
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., attempt: _Optional[int] = ..., worker_id: _Optional[str] = ..., resumed_from_step: _Optional[int] = ...) -> None: ...

class TrainingRunProgress(_message.Message):
    __slots__ = ("meta", "attempt", "progress")
    META_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    attempt: int
    progress: _common_pb2.TrainingProgress
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., attempt: _Optional[int] = ..., progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ...) -> None: ...

class TrainingRunCheckpoint(_message.Message):
    __slots__ = ("meta", "attempt", "step", "eval_loss", "artifact_path")
    META_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    attempt: int
    step: int
    eval_loss: float
    artifact_path: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., attempt: _Optional[int] = ..., step: _Optional[int] = ..., eval_loss: _Optional[float] = ..., artifact_path: _Optional[str] = ...) -> None: ...

class TrainingRunSucceeded(_message.Message):
    __slots__ = ("meta", "attempt", "adapter_path", "metrics", "report_path", "device_class", "trained_tokens")
    META_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    attempt: int
    adapter_path: str
    metrics: _common_pb2.TrainingMetrics
    report_path: str
    device_class: str
    trained_tokens: int
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., attempt: _Optional[int] = ..., adapter_path: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.TrainingMetrics, _Mapping]] = ..., report_path: _Optional[str] = ..., device_class: _Optional[str] = ..., trained_tokens: _Optional[int] = ...) -> None: ...

class TrainingRunFailed(_message.Message):
    __slots__ = ("meta", "attempt", "reason", "failure_kind", "report_path")
    META_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    attempt: int
    reason: str
    failure_kind: _common_pb2.FailureKind
    report_path: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ..., failure_kind: _Optional[_Union[_common_pb2.FailureKind, str]] = ..., report_path: _Optional[str] = ...) -> None: ...

class TrainerWorkerSeen(_message.Message):
    __slots__ = ("meta", "worker_id", "device_class", "device_count", "period_seconds", "pools", "device_memory_bytes")
    META_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    worker_id: str
    device_class: str
    device_count: int
    period_seconds: int
    pools: _containers.RepeatedScalarFieldContainer[str]
    device_memory_bytes: int
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., worker_id: _Optional[str] = ..., device_class: _Optional[str] = ..., device_count: _Optional[int] = ..., period_seconds: _Optional[int] = ..., pools: _Optional[_Iterable[str]] = ..., device_memory_bytes: _Optional[int] = ...) -> None: ...

class TrainingRunCancelled(_message.Message):
    __slots__ = ("meta", "attempt", "adapter_path", "step")
    META_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    attempt: int
    adapter_path: str
    step: int
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., attempt: _Optional[int] = ..., adapter_path: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class TrainingRunCancelRequested(_message.Message):
    __slots__ = ("meta",)
    META_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ...) -> None: ...

class ModelRegistrationRequested(_message.Message):
    __slots__ = ("meta", "model_name", "description", "base_model", "method", "dataset", "adapter_path", "metrics", "hyperparameters")
    META_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    model_name: str
    description: str
    base_model: str
    method: str
    dataset: _common_pb2.DatasetSummary
    adapter_path: str
    metrics: _common_pb2.TrainingMetrics
    hyperparameters: _common_pb2.Hyperparameters
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., model_name: _Optional[str] = ..., description: _Optional[str] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., adapter_path: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.TrainingMetrics, _Mapping]] = ..., hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ...) -> None: ...

class ModelRegistrationSucceeded(_message.Message):
    __slots__ = ("meta", "model_id", "model_name")
    META_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    model_id: str
    model_name: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class ModelRegistrationFailed(_message.Message):
    __slots__ = ("meta", "reason", "failure_kind")
    META_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    reason: str
    failure_kind: _common_pb2.FailureKind
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., reason: _Optional[str] = ..., failure_kind: _Optional[_Union[_common_pb2.FailureKind, str]] = ...) -> None: ...

class JobSucceeded(_message.Message):
    __slots__ = ("meta", "job_name", "owner_email", "dataset_only", "dataset", "model_name", "model_id", "metrics", "base_model", "method", "report_path", "hyperparameters")
    META_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    DATASET_ONLY_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    job_name: str
    owner_email: str
    dataset_only: bool
    dataset: _common_pb2.DatasetSummary
    model_name: str
    model_id: str
    metrics: _common_pb2.TrainingMetrics
    base_model: str
    method: str
    report_path: str
    hyperparameters: _common_pb2.Hyperparameters
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., job_name: _Optional[str] = ..., owner_email: _Optional[str] = ..., dataset_only: _Optional[bool] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., model_name: _Optional[str] = ..., model_id: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.TrainingMetrics, _Mapping]] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., report_path: _Optional[str] = ..., hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ...) -> None: ...

class JobFailed(_message.Message):
    __slots__ = ("meta", "job_name", "owner_email", "reason", "failure_kind", "report_path", "failed_in_state", "base_model", "method")
    META_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    FAILED_IN_STATE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    job_name: str
    owner_email: str
    reason: str
    failure_kind: _common_pb2.FailureKind
    report_path: str
    failed_in_state: str
    base_model: str
    method: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., job_name: _Optional[str] = ..., owner_email: _Optional[str] = ..., reason: _Optional[str] = ..., failure_kind: _Optional[_Union[_common_pb2.FailureKind, str]] = ..., report_path: _Optional[str] = ..., failed_in_state: _Optional[str] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class JobCancelled(_message.Message):
    __slots__ = ("meta", "job_name", "owner_email")
    META_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    job_name: str
    owner_email: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., job_name: _Optional[str] = ..., owner_email: _Optional[str] = ...) -> None: ...

class ModelAssigned(_message.Message):
    __slots__ = ("meta", "model_id", "model_name", "agent_id", "replaced_model_id")
    META_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACED_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    model_id: str
    model_name: str
    agent_id: str
    replaced_model_id: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., agent_id: _Optional[str] = ..., replaced_model_id: _Optional[str] = ...) -> None: ...

class ModelUnassigned(_message.Message):
    __slots__ = ("meta", "model_id", "model_name", "agent_id")
    META_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    model_id: str
    model_name: str
    agent_id: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ModelDeleted(_message.Message):
    __slots__ = ("meta", "model_id", "model_name")
    META_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    meta: EventMeta
    model_id: str
    model_name: str
    def __init__(self, meta: _Optional[_Union[EventMeta, _Mapping]] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...
