from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Plan(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_UNSPECIFIED: _ClassVar[Plan]
    PLAN_STARTER: _ClassVar[Plan]
    PLAN_PRO: _ClassVar[Plan]
    PLAN_BUSINESS: _ClassVar[Plan]
    PLAN_ENTERPRISE: _ClassVar[Plan]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    FAILURE_KIND_USER: _ClassVar[FailureKind]
    FAILURE_KIND_SYSTEM: _ClassVar[FailureKind]

class OverlengthPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OVERLENGTH_POLICY_UNSPECIFIED: _ClassVar[OverlengthPolicy]
    OVERLENGTH_POLICY_DROP: _ClassVar[OverlengthPolicy]
    OVERLENGTH_POLICY_TRUNCATE: _ClassVar[OverlengthPolicy]
PLAN_UNSPECIFIED: Plan
PLAN_STARTER: Plan
PLAN_PRO: Plan
PLAN_BUSINESS: Plan
PLAN_ENTERPRISE: Plan
FAILURE_KIND_UNSPECIFIED: FailureKind
FAILURE_KIND_USER: FailureKind
FAILURE_KIND_SYSTEM: FailureKind
OVERLENGTH_POLICY_UNSPECIFIED: OverlengthPolicy
OVERLENGTH_POLICY_DROP: OverlengthPolicy
OVERLENGTH_POLICY_TRUNCATE: OverlengthPolicy

class TokenStats(_message.Message):
    __slots__ = ("count", "total", "mean", "p50", "p95", "max")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P95_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    count: int
    total: int
    mean: float
    p50: int
    p95: int
    max: int
    def __init__(self, count: _Optional[int] = ..., total: _Optional[int] = ..., mean: _Optional[float] = ..., p50: _Optional[int] = ..., p95: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("learning_rate", "lr_peak_ratio", "warmup_ratio", "min_examples", "test_fraction", "n_evals", "max_epochs", "n_checkpoints", "batch_size", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "train_on_inputs", "early_stopping_patience", "seed")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_PEAK_RATIO_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    N_EVALS_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    N_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_INPUTS_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    lr_peak_ratio: float
    warmup_ratio: float
    min_examples: int
    test_fraction: float
    n_evals: int
    max_epochs: int
    n_checkpoints: int
    batch_size: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    train_on_inputs: str
    early_stopping_patience: int
    seed: int
    def __init__(self, learning_rate: _Optional[float] = ..., lr_peak_ratio: _Optional[float] = ..., warmup_ratio: _Optional[float] = ..., min_examples: _Optional[int] = ..., test_fraction: _Optional[float] = ..., n_evals: _Optional[int] = ..., max_epochs: _Optional[int] = ..., n_checkpoints: _Optional[int] = ..., batch_size: _Optional[int] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., train_on_inputs: _Optional[str] = ..., early_stopping_patience: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class DatasetSummary(_message.Message):
    __slots__ = ("dataset_id", "content_hash", "train_count", "test_count", "topic_counts", "warnings", "filtered_count", "kind", "artifact_path", "workspace_example_count", "deduplicated_count", "overlength_count", "overlength_policy", "train_tokens", "test_tokens", "train_on_inputs_rule", "tokenizer", "context_length", "topic_matched_count")
    class TopicCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOPIC_COUNTS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    FILTERED_COUNT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_PATH_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    OVERLENGTH_COUNT_FIELD_NUMBER: _ClassVar[int]
    OVERLENGTH_POLICY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_INPUTS_RULE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOPIC_MATCHED_COUNT_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    content_hash: str
    train_count: int
    test_count: int
    topic_counts: _containers.ScalarMap[str, int]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    filtered_count: int
    kind: str
    artifact_path: str
    workspace_example_count: int
    deduplicated_count: int
    overlength_count: int
    overlength_policy: OverlengthPolicy
    train_tokens: TokenStats
    test_tokens: TokenStats
    train_on_inputs_rule: str
    tokenizer: str
    context_length: int
    topic_matched_count: int
    def __init__(self, dataset_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., train_count: _Optional[int] = ..., test_count: _Optional[int] = ..., topic_counts: _Optional[_Mapping[str, int]] = ..., warnings: _Optional[_Iterable[str]] = ..., filtered_count: _Optional[int] = ..., kind: _Optional[str] = ..., artifact_path: _Optional[str] = ..., workspace_example_count: _Optional[int] = ..., deduplicated_count: _Optional[int] = ..., overlength_count: _Optional[int] = ..., overlength_policy: _Optional[_Union[OverlengthPolicy, str]] = ..., train_tokens: _Optional[_Union[TokenStats, _Mapping]] = ..., test_tokens: _Optional[_Union[TokenStats, _Mapping]] = ..., train_on_inputs_rule: _Optional[str] = ..., tokenizer: _Optional[str] = ..., context_length: _Optional[int] = ..., topic_matched_count: _Optional[int] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "train_loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    train_loss: float
    eval_loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class TrainingMetrics(_message.Message):
    __slots__ = ("steps", "epochs", "train_loss", "eval_loss", "stopped_early", "train_seconds", "extra", "base_eval_loss", "tool_call_accuracy", "base_tool_call_accuracy", "samples")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    BASE_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BASE_TOOL_CALL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    epochs: float
    train_loss: float
    eval_loss: float
    stopped_early: bool
    train_seconds: float
    extra: _containers.ScalarMap[str, float]
    base_eval_loss: float
    tool_call_accuracy: float
    base_tool_call_accuracy: float
    samples: _containers.RepeatedCompositeFieldContainer[EvaluationSample]
    def __init__(self, steps: _Optional[int] = ..., epochs: _Optional[float] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., stopped_early: _Optional[bool] = ..., train_seconds: _Optional[float] = ..., extra: _Optional[_Mapping[str, float]] = ..., base_eval_loss: _Optional[float] = ..., tool_call_accuracy: _Optional[float] = ..., base_tool_call_accuracy: _Optional[float] = ..., samples: _Optional[_Iterable[_Union[EvaluationSample, _Mapping]]] = ...) -> None: ...

class EvaluationSample(_message.Message):
    __slots__ = ("prompt_json", "prompt", "reference", "base_answer", "tuned_answer")
    PROMPT_JSON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_ANSWER_FIELD_NUMBER: _ClassVar[int]
    TUNED_ANSWER_FIELD_NUMBER: _ClassVar[int]
    prompt_json: str
    prompt: str
    reference: str
    base_answer: str
    tuned_answer: str
    def __init__(self, prompt_json: _Optional[str] = ..., prompt: _Optional[str] = ..., reference: _Optional[str] = ..., base_answer: _Optional[str] = ..., tuned_answer: _Optional[str] = ...) -> None: ...

class ArtifactFile(_message.Message):
    __slots__ = ("path", "size_bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "data", "eof")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    eof: bool
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ...) -> None: ...

class BaseModel(_message.Message):
    __slots__ = ("id", "display_name", "description", "family", "parameter_count", "context_length", "lora_target_modules", "default_lora_target_modules", "capabilities", "source", "plugin")
    ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    display_name: str
    description: str
    family: str
    parameter_count: int
    context_length: int
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    default_lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    source: str
    plugin: str
    def __init__(self, id: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., family: _Optional[str] = ..., parameter_count: _Optional[int] = ..., context_length: _Optional[int] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., default_lora_target_modules: _Optional[_Iterable[str]] = ..., capabilities: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., plugin: _Optional[str] = ...) -> None: ...
