import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tuneforge.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Model(_message.Message):
    __slots__ = ("id", "name", "description", "base_model", "method", "job_id", "dataset", "metrics", "hyperparameters", "files", "adapter_path", "agent_ids", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    base_model: str
    method: str
    job_id: str
    dataset: _common_pb2.DatasetSummary
    metrics: _common_pb2.TrainingMetrics
    hyperparameters: _common_pb2.Hyperparameters
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ArtifactFile]
    adapter_path: str
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., job_id: _Optional[str] = ..., dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., metrics: _Optional[_Union[_common_pb2.TrainingMetrics, _Mapping]] = ..., hyperparameters: _Optional[_Union[_common_pb2.Hyperparameters, _Mapping]] = ..., files: _Optional[_Iterable[_Union[_common_pb2.ArtifactFile, _Mapping]]] = ..., adapter_path: _Optional[str] = ..., agent_ids: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "base_model", "method", "agent_id", "include_base_models")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BASE_MODELS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    base_model: str
    method: str
    agent_id: str
    include_base_models: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., base_model: _Optional[str] = ..., method: _Optional[str] = ..., agent_id: _Optional[str] = ..., include_base_models: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token", "base_models")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BASE_MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    base_models: _containers.RepeatedCompositeFieldContainer[_common_pb2.BaseModel]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., base_models: _Optional[_Iterable[_Union[_common_pb2.BaseModel, _Mapping]]] = ...) -> None: ...

class ResolveModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResolveModelResponse(_message.Message):
    __slots__ = ("model_id", "base_model", "adapter_path", "adapter_sha256", "base_model_source", "adapter_uri", "chat_template", "vllm_lora_module", "lora_rank")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_URI_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VLLM_LORA_MODULE_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    base_model: str
    adapter_path: str
    adapter_sha256: str
    base_model_source: str
    adapter_uri: str
    chat_template: str
    vllm_lora_module: str
    lora_rank: int
    def __init__(self, model_id: _Optional[str] = ..., base_model: _Optional[str] = ..., adapter_path: _Optional[str] = ..., adapter_sha256: _Optional[str] = ..., base_model_source: _Optional[str] = ..., adapter_uri: _Optional[str] = ..., chat_template: _Optional[str] = ..., vllm_lora_module: _Optional[str] = ..., lora_rank: _Optional[int] = ...) -> None: ...

class AssignModelToAgentRequest(_message.Message):
    __slots__ = ("model", "agent_id", "replace")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    model: str
    agent_id: str
    replace: bool
    def __init__(self, model: _Optional[str] = ..., agent_id: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class AssignModelToAgentResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class UnassignModelRequest(_message.Message):
    __slots__ = ("model", "agent_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    agent_id: str
    def __init__(self, model: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class UnassignModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("agent_id", "model_id", "model_name", "base_model", "create_time")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    model_id: str
    model_name: str
    base_model: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, agent_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., base_model: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAssignmentsRequest(_message.Message):
    __slots__ = ("model", "agent_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    agent_id: str
    def __init__(self, model: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ListAssignmentsResponse(_message.Message):
    __slots__ = ("assignments",)
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.FileChunk
    def __init__(self, chunk: _Optional[_Union[_common_pb2.FileChunk, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
