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

class ImportMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPORT_MODE_UNSPECIFIED: _ClassVar[ImportMode]
    IMPORT_MODE_KEEP_VALID: _ClassVar[ImportMode]
    IMPORT_MODE_ALL_OR_NOTHING: _ClassVar[ImportMode]
IMPORT_MODE_UNSPECIFIED: ImportMode
IMPORT_MODE_KEEP_VALID: ImportMode
IMPORT_MODE_ALL_OR_NOTHING: ImportMode

class ImportOptions(_message.Message):
    __slots__ = ("source_name", "topics", "mode")
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    source_name: str
    topics: _containers.RepeatedScalarFieldContainer[str]
    mode: ImportMode
    def __init__(self, source_name: _Optional[str] = ..., topics: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[ImportMode, str]] = ...) -> None: ...

class ImportExamplesRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: ImportOptions
    chunk: bytes
    def __init__(self, options: _Optional[_Union[ImportOptions, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class LineError(_message.Message):
    __slots__ = ("line", "field", "code", "message")
    LINE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    line: int
    field: str
    code: str
    message: str
    def __init__(self, line: _Optional[int] = ..., field: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ImportExamplesResponse(_message.Message):
    __slots__ = ("lines_read", "imported", "duplicates", "rejected", "errors", "error_count")
    LINES_READ_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_COUNT_FIELD_NUMBER: _ClassVar[int]
    lines_read: int
    imported: int
    duplicates: int
    rejected: int
    errors: _containers.RepeatedCompositeFieldContainer[LineError]
    error_count: int
    def __init__(self, lines_read: _Optional[int] = ..., imported: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[LineError, _Mapping]]] = ..., error_count: _Optional[int] = ...) -> None: ...

class ListTopicsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TopicCount(_message.Message):
    __slots__ = ("topic", "example_count", "format_counts")
    class FormatCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    topic: str
    example_count: int
    format_counts: _containers.ScalarMap[str, int]
    def __init__(self, topic: _Optional[str] = ..., example_count: _Optional[int] = ..., format_counts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListTopicsResponse(_message.Message):
    __slots__ = ("topics", "total_examples")
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    topics: _containers.RepeatedCompositeFieldContainer[TopicCount]
    total_examples: int
    def __init__(self, topics: _Optional[_Iterable[_Union[TopicCount, _Mapping]]] = ..., total_examples: _Optional[int] = ...) -> None: ...

class SummarizeExamplesRequest(_message.Message):
    __slots__ = ("topics", "dataset_kind")
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    DATASET_KIND_FIELD_NUMBER: _ClassVar[int]
    topics: _containers.RepeatedScalarFieldContainer[str]
    dataset_kind: str
    def __init__(self, topics: _Optional[_Iterable[str]] = ..., dataset_kind: _Optional[str] = ...) -> None: ...

class SummarizeExamplesResponse(_message.Message):
    __slots__ = ("example_count", "tool_call_example_count", "reasoning_example_count")
    EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REASONING_EXAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    example_count: int
    tool_call_example_count: int
    reasoning_example_count: int
    def __init__(self, example_count: _Optional[int] = ..., tool_call_example_count: _Optional[int] = ..., reasoning_example_count: _Optional[int] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("example_id", "content_hash", "format", "topics", "json", "source_name", "source_line", "created_at")
    EXAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    example_id: str
    content_hash: str
    format: str
    topics: _containers.RepeatedScalarFieldContainer[str]
    json: str
    source_name: str
    source_line: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, example_id: _Optional[str] = ..., content_hash: _Optional[str] = ..., format: _Optional[str] = ..., topics: _Optional[_Iterable[str]] = ..., json: _Optional[str] = ..., source_name: _Optional[str] = ..., source_line: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListExamplesRequest(_message.Message):
    __slots__ = ("topic", "page_size", "page_token")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    topic: str
    page_size: int
    page_token: str
    def __init__(self, topic: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExamplesResponse(_message.Message):
    __slots__ = ("examples", "next_page_token")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    next_page_token: str
    def __init__(self, examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteExamplesRequest(_message.Message):
    __slots__ = ("example_ids", "topics")
    EXAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    example_ids: _containers.RepeatedScalarFieldContainer[str]
    topics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, example_ids: _Optional[_Iterable[str]] = ..., topics: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteExamplesResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class BuildDatasetRequest(_message.Message):
    __slots__ = ("topics", "method", "base_model", "test_fraction", "seed", "train_on_inputs", "overlength_policy", "max_epochs", "dry_run")
    TOPICS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TEST_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_INPUTS_FIELD_NUMBER: _ClassVar[int]
    OVERLENGTH_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    topics: _containers.RepeatedScalarFieldContainer[str]
    method: str
    base_model: str
    test_fraction: float
    seed: int
    train_on_inputs: str
    overlength_policy: _common_pb2.OverlengthPolicy
    max_epochs: int
    dry_run: bool
    def __init__(self, topics: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., base_model: _Optional[str] = ..., test_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., train_on_inputs: _Optional[str] = ..., overlength_policy: _Optional[_Union[_common_pb2.OverlengthPolicy, str]] = ..., max_epochs: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class BuildDatasetResponse(_message.Message):
    __slots__ = ("dataset", "files")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.DatasetSummary
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ArtifactFile]
    def __init__(self, dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., files: _Optional[_Iterable[_Union[_common_pb2.ArtifactFile, _Mapping]]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class GetDatasetResponse(_message.Message):
    __slots__ = ("dataset", "files", "created_at")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.DatasetSummary
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ArtifactFile]
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., files: _Optional[_Iterable[_Union[_common_pb2.ArtifactFile, _Mapping]]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class DatasetListEntry(_message.Message):
    __slots__ = ("dataset", "create_time")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    dataset: _common_pb2.DatasetSummary
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, dataset: _Optional[_Union[_common_pb2.DatasetSummary, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetListEntry]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetListEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DownloadDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DownloadDatasetResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.FileChunk
    def __init__(self, chunk: _Optional[_Union[_common_pb2.FileChunk, _Mapping]] = ...) -> None: ...
