import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingMethodInfo(_message.Message):
    __slots__ = ("name", "display_name", "dataset_kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    dataset_kind: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., dataset_kind: _Optional[str] = ...) -> None: ...

class BaseModelInfo(_message.Message):
    __slots__ = ("id", "family", "available", "standin")
    ID_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    STANDIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    family: str
    available: bool
    standin: bool
    def __init__(self, id: _Optional[str] = ..., family: _Optional[str] = ..., available: _Optional[bool] = ..., standin: _Optional[bool] = ...) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("methods", "base_models", "plugins", "device")
    METHODS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODELS_FIELD_NUMBER: _ClassVar[int]
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[TrainingMethodInfo]
    base_models: _containers.RepeatedCompositeFieldContainer[BaseModelInfo]
    plugins: _containers.RepeatedScalarFieldContainer[str]
    device: str
    def __init__(self, methods: _Optional[_Iterable[_Union[TrainingMethodInfo, _Mapping]]] = ..., base_models: _Optional[_Iterable[_Union[BaseModelInfo, _Mapping]]] = ..., plugins: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ...) -> None: ...

class GetWorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetWorkerStatusResponse(_message.Message):
    __slots__ = ("worker_id", "current_job_id", "current_attempt", "current_step", "runs_completed", "start_time")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STEP_FIELD_NUMBER: _ClassVar[int]
    RUNS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    current_job_id: str
    current_attempt: int
    current_step: int
    runs_completed: int
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, worker_id: _Optional[str] = ..., current_job_id: _Optional[str] = ..., current_attempt: _Optional[int] = ..., current_step: _Optional[int] = ..., runs_completed: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
