import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tuneforge.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_VALIDATING: _ClassVar[JobState]
    JOB_STATE_BUILDING_DATASET: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_TRAINING: _ClassVar[JobState]
    JOB_STATE_REGISTERING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_VALIDATING: JobState
JOB_STATE_BUILDING_DATASET: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_TRAINING: JobState
JOB_STATE_REGISTERING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ListBaseModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBaseModelsResponse(_message.Message):
    __slots__ = ("base_models", "methods")
    BASE_MODELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    base_models: _containers.RepeatedCompositeFieldContainer[_common_pb2.BaseModel]
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, base_models: _Optional[_Iterable[_Union[_common_pb2.BaseModel, _Mapping]]] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "description", "topics", "base_model", "method", "hyperparameters", "method_options_json", "notify_email", "overlength_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METHOD_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_EMAIL_FIELD_NUMBER: _ClassVar[int]
    OVERLENGTH_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    topics: _containers.RepeatedScalarFieldContainer[str]
    base_model: str
    method: str
    hyperparameters: _common_pb2.Hyperparameters
    method_options_json: str
    notify_email: str
    overlength_policy: _common_pb2.OverlengthPolicy
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., topics: _Optional[_Iterable[str]] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ..., method_options_json: _Optional[str] = ..., notify_email: _Optional[str] = ..., overlength_policy: _Optional[_Union[_common_pb2.OverlengthPolicy, str]] = ...) -> None: ...

class ValidateJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class ValidateJobResponse(_message.Message):
    __slots__ = ("resolved_hyperparameters", "dataset_only", "warnings", "dataset_plan", "training_plan", "pool_plan")
    RESOLVED_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DATASET_ONLY_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    DATASET_PLAN_FIELD_NUMBER: _ClassVar[int]
    TRAINING_PLAN_FIELD_NUMBER: _ClassVar[int]
    POOL_PLAN_FIELD_NUMBER: _ClassVar[int]
    resolved_hyperparameters: _common_pb2.Hyperparameters
    dataset_only: bool
    warnings: _containers.RepeatedScalarFieldContainer[str]
    dataset_plan: DatasetPlan
    training_plan: TrainingPlan
    pool_plan: PoolPlan
    def __init__(self, resolved_hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ..., dataset_only: _Optional[bool] = ..., warnings: _Optional[_Iterable[str]] = ..., dataset_plan: _Optional[_Union[DatasetPlan, _Mapping]] = ..., training_plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., pool_plan: _Optional[_Union[PoolPlan, _Mapping]] = ...) -> None: ...

class PoolPlan(_message.Message):
    __slots__ = ("pool", "description", "required_memory_gib", "processes", "basis", "workers_registered")
    POOL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_MEMORY_GIB_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    pool: str
    description: str
    required_memory_gib: float
    processes: int
    basis: str
    workers_registered: int
    def __init__(self, pool: _Optional[str] = ..., description: _Optional[str] = ..., required_memory_gib: _Optional[float] = ..., processes: _Optional[int] = ..., basis: _Optional[str] = ..., workers_registered: _Optional[int] = ...) -> None: ...

class DatasetPlan(_message.Message):
    __slots__ = ("workspace_examples", "after_topics", "after_formats", "after_dedupe", "overlength", "after_overlength", "train_count", "test_count", "train_tokens", "test_tokens", "tokenizer", "warnings")
    WORKSPACE_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    AFTER_TOPICS_FIELD_NUMBER: _ClassVar[int]
    AFTER_FORMATS_FIELD_NUMBER: _ClassVar[int]
    AFTER_DEDUPE_FIELD_NUMBER: _ClassVar[int]
    OVERLENGTH_FIELD_NUMBER: _ClassVar[int]
    AFTER_OVERLENGTH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    workspace_examples: int
    after_topics: int
    after_formats: int
    after_dedupe: int
    overlength: int
    after_overlength: int
    train_count: int
    test_count: int
    train_tokens: int
    test_tokens: int
    tokenizer: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, workspace_examples: _Optional[int] = ..., after_topics: _Optional[int] = ..., after_formats: _Optional[int] = ..., after_dedupe: _Optional[int] = ..., overlength: _Optional[int] = ..., after_overlength: _Optional[int] = ..., train_count: _Optional[int] = ..., test_count: _Optional[int] = ..., train_tokens: _Optional[int] = ..., test_tokens: _Optional[int] = ..., tokenizer: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class LearningRatePoint(_message.Message):
    __slots__ = ("step", "learning_rate")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    step: int
    learning_rate: float
    def __init__(self, step: _Optional[int] = ..., learning_rate: _Optional[float] = ...) -> None: ...

class WallTimeEstimate(_message.Message):
    __slots__ = ("device_class", "seconds", "tokens_per_second", "guess", "basis", "workers")
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GUESS_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    device_class: str
    seconds: float
    tokens_per_second: float
    guess: bool
    basis: str
    workers: int
    def __init__(self, device_class: _Optional[str] = ..., seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., guess: _Optional[bool] = ..., basis: _Optional[str] = ..., workers: _Optional[int] = ...) -> None: ...

class TrainingPlan(_message.Message):
    __slots__ = ("steps_per_epoch", "epochs", "total_steps", "eval_steps", "checkpoint_steps", "learning_rate_schedule", "total_training_tokens", "wall_time_estimates")
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EVAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TRAINING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    steps_per_epoch: int
    epochs: int
    total_steps: int
    eval_steps: _containers.RepeatedScalarFieldContainer[int]
    checkpoint_steps: _containers.RepeatedScalarFieldContainer[int]
    learning_rate_schedule: _containers.RepeatedCompositeFieldContainer[LearningRatePoint]
    total_training_tokens: int
    wall_time_estimates: _containers.RepeatedCompositeFieldContainer[WallTimeEstimate]
    def __init__(self, steps_per_epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., total_steps: _Optional[int] = ..., eval_steps: _Optional[_Iterable[int]] = ..., checkpoint_steps: _Optional[_Iterable[int]] = ..., learning_rate_schedule: _Optional[_Iterable[_Union[LearningRatePoint, _Mapping]]] = ..., total_training_tokens: _Optional[int] = ..., wall_time_estimates: _Optional[_Iterable[_Union[WallTimeEstimate, _Mapping]]] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "resolved_hyperparameters", "state", "failure_reason", "failure_kind", "dataset_only", "dataset", "progress", "metrics", "model_name", "model_id", "notify_email", "create_time", "update_time", "attempt", "report_path", "pool", "state_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_KIND_FIELD_NUMBER: _ClassVar[int]
    DATASET_ONLY_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NOTIFY_EMAIL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    resolved_hyperparameters: _common_pb2.Hyperparameters
    state: JobState
    failure_reason: str
    failure_kind: _common_pb2.FailureKind
    dataset_only: bool
    dataset: _common_pb2.DatasetSummary
    progress: _common_pb2.TrainingProgress
    metrics: _common_pb2.TrainingMetrics
    model_name: str
    model_id: str
    notify_email: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    attempt: int
    report_path: str
    pool: str
    state_reason: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., resolved_hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., failure_reason: _Optional[str] = ..., failure_kind: _Optional[_Union[_common_pb2.FailureKind, str]] = ..., dataset_only: _Optional[bool] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ..., metrics: _Optional[_Union[_common_pb2.TrainingMetrics, _Mapping]] = ..., model_name: _Optional[str] = ..., model_id: _Optional[str] = ..., notify_email: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ..., report_path: _Optional[str] = ..., pool: _Optional[str] = ..., state_reason: _Optional[str] = ...) -> None: ...

class CreateJobResponse(_message.Message):
    __slots__ = ("job", "warnings")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    job: Job
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time", "kind", "state", "message", "progress")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    kind: str
    state: JobState
    message: str
    progress: _common_pb2.TrainingProgress
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence", "history_only")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ONLY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    history_only: bool
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ..., history_only: _Optional[bool] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step", "eval_loss", "artifact_path", "create_time")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    step: int
    eval_loss: float
    artifact_path: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[int] = ..., eval_loss: _Optional[float] = ..., artifact_path: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ...) -> None: ...

class Workspace(_message.Message):
    __slots__ = ("id", "name", "plan", "owner_email")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    plan: _common_pb2.Plan
    owner_email: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.Plan, str]] = ..., owner_email: _Optional[str] = ...) -> None: ...

class CreateWorkspaceRequest(_message.Message):
    __slots__ = ("name", "plan", "owner_email")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OWNER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    plan: _common_pb2.Plan
    owner_email: str
    def __init__(self, name: _Optional[str] = ..., plan: _Optional[_Union[_common_pb2.Plan, str]] = ..., owner_email: _Optional[str] = ...) -> None: ...

class CreateWorkspaceResponse(_message.Message):
    __slots__ = ("workspace", "api_key")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    workspace: Workspace
    api_key: str
    def __init__(self, workspace: _Optional[_Union[Workspace, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class GetWorkspaceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWorkspaceResponse(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: Workspace
    def __init__(self, workspace: _Optional[_Union[Workspace, _Mapping]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "prefix", "label", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    prefix: str
    label: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., prefix: _Optional[str] = ..., label: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("workspace_id", "label")
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    workspace_id: str
    label: str
    def __init__(self, workspace_id: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    api_key: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("workspace_id",)
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    workspace_id: str
    def __init__(self, workspace_id: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("workspace_id", "key_id")
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    workspace_id: str
    key_id: str
    def __init__(self, workspace_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...
