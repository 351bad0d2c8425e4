from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CaptureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTURE_MODE_UNSPECIFIED: _ClassVar[CaptureMode]
    CAPTURE_MODE_FULL: _ClassVar[CaptureMode]
    CAPTURE_MODE_STACKS: _ClassVar[CaptureMode]
    CAPTURE_MODE_NOTES: _ClassVar[CaptureMode]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class FreezeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FREEZE_MODE_DEFAULT: _ClassVar[FreezeMode]
    FREEZE_MODE_LIVE: _ClassVar[FreezeMode]
    FREEZE_MODE_SNAPSHOT: _ClassVar[FreezeMode]
CAPTURE_MODE_UNSPECIFIED: CaptureMode
CAPTURE_MODE_FULL: CaptureMode
CAPTURE_MODE_STACKS: CaptureMode
CAPTURE_MODE_NOTES: CaptureMode
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
FREEZE_MODE_DEFAULT: FreezeMode
FREEZE_MODE_LIVE: FreezeMode
FREEZE_MODE_SNAPSHOT: FreezeMode

class ListProcessesRequest(_message.Message):
    __slots__ = ("comm", "exe_glob", "pid")
    COMM_FIELD_NUMBER: _ClassVar[int]
    EXE_GLOB_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    comm: str
    exe_glob: str
    pid: int
    def __init__(self, comm: _Optional[str] = ..., exe_glob: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ProcessInfo(_message.Message):
    __slots__ = ("pid", "ppid", "uid", "comm", "exe", "cmdline", "threads", "rss_bytes", "start_time", "cgroup", "state", "elf_class")
    PID_FIELD_NUMBER: _ClassVar[int]
    PPID_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    CMDLINE_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ELF_CLASS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    ppid: int
    uid: int
    comm: str
    exe: str
    cmdline: _containers.RepeatedScalarFieldContainer[str]
    threads: int
    rss_bytes: int
    start_time: int
    cgroup: str
    state: str
    elf_class: int
    def __init__(self, pid: _Optional[int] = ..., ppid: _Optional[int] = ..., uid: _Optional[int] = ..., comm: _Optional[str] = ..., exe: _Optional[str] = ..., cmdline: _Optional[_Iterable[str]] = ..., threads: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., start_time: _Optional[int] = ..., cgroup: _Optional[str] = ..., state: _Optional[str] = ..., elf_class: _Optional[int] = ...) -> None: ...

class ListProcessesResponse(_message.Message):
    __slots__ = ("processes", "hostname")
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessInfo]
    hostname: str
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessInfo, _Mapping]]] = ..., hostname: _Optional[str] = ...) -> None: ...

class CaptureOptions(_message.Message):
    __slots__ = ("freeze_timeout_ms", "mode", "max_chunk_bytes", "stack_bytes_per_thread", "snapshot", "packed_chunks", "compression", "wait_exclusive_seconds", "keep", "freeze_mode")
    FREEZE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STACK_BYTES_PER_THREAD_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PACKED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_EXCLUSIVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    FREEZE_MODE_FIELD_NUMBER: _ClassVar[int]
    freeze_timeout_ms: int
    mode: CaptureMode
    max_chunk_bytes: int
    stack_bytes_per_thread: int
    snapshot: bool
    packed_chunks: bool
    compression: Compression
    wait_exclusive_seconds: float
    keep: bool
    freeze_mode: FreezeMode
    def __init__(self, freeze_timeout_ms: _Optional[int] = ..., mode: _Optional[_Union[CaptureMode, str]] = ..., max_chunk_bytes: _Optional[int] = ..., stack_bytes_per_thread: _Optional[int] = ..., snapshot: _Optional[bool] = ..., packed_chunks: _Optional[bool] = ..., compression: _Optional[_Union[Compression, str]] = ..., wait_exclusive_seconds: _Optional[float] = ..., keep: _Optional[bool] = ..., freeze_mode: _Optional[_Union[FreezeMode, str]] = ...) -> None: ...

class OpenCapture(_message.Message):
    __slots__ = ("pid", "start_time", "options", "capture_id")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_ID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start_time: int
    options: CaptureOptions
    capture_id: str
    def __init__(self, pid: _Optional[int] = ..., start_time: _Optional[int] = ..., options: _Optional[_Union[CaptureOptions, _Mapping]] = ..., capture_id: _Optional[str] = ...) -> None: ...

class ReadRange(_message.Message):
    __slots__ = ("offset", "length", "request_id")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    request_id: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class ReadFile(_message.Message):
    __slots__ = ("file", "offset", "length", "request_id")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    file: int
    offset: int
    length: int
    request_id: int
    def __init__(self, file: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., request_id: _Optional[int] = ...) -> None: ...

class CaptureRequest(_message.Message):
    __slots__ = ("open", "read", "read_file")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    READ_FILE_FIELD_NUMBER: _ClassVar[int]
    open: OpenCapture
    read: ReadRange
    read_file: ReadFile
    def __init__(self, open: _Optional[_Union[OpenCapture, _Mapping]] = ..., read: _Optional[_Union[ReadRange, _Mapping]] = ..., read_file: _Optional[_Union[ReadFile, _Mapping]] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("file_offset", "vaddr", "file_size", "mem_size", "flags", "name", "file_page_offset", "shared", "stack", "read_after_thaw", "file")
    FILE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    VADDR_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEM_SIZE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILE_PAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    READ_AFTER_THAW_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    file_offset: int
    vaddr: int
    file_size: int
    mem_size: int
    flags: int
    name: str
    file_page_offset: int
    shared: bool
    stack: bool
    read_after_thaw: bool
    file: int
    def __init__(self, file_offset: _Optional[int] = ..., vaddr: _Optional[int] = ..., file_size: _Optional[int] = ..., mem_size: _Optional[int] = ..., flags: _Optional[int] = ..., name: _Optional[str] = ..., file_page_offset: _Optional[int] = ..., shared: _Optional[bool] = ..., stack: _Optional[bool] = ..., read_after_thaw: _Optional[bool] = ..., file: _Optional[int] = ...) -> None: ...

class MappedFile(_message.Message):
    __slots__ = ("id", "path", "size", "build_id", "deleted", "elf", "readable", "device", "inode")
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    ELF_FIELD_NUMBER: _ClassVar[int]
    READABLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    id: int
    path: str
    size: int
    build_id: str
    deleted: bool
    elf: bool
    readable: bool
    device: int
    inode: int
    def __init__(self, id: _Optional[int] = ..., path: _Optional[str] = ..., size: _Optional[int] = ..., build_id: _Optional[str] = ..., deleted: _Optional[bool] = ..., elf: _Optional[bool] = ..., readable: _Optional[bool] = ..., device: _Optional[int] = ..., inode: _Optional[int] = ...) -> None: ...

class ThreadInfo(_message.Message):
    __slots__ = ("tid", "frozen", "pc", "sp", "comm", "state")
    TID_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    PC_FIELD_NUMBER: _ClassVar[int]
    SP_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    tid: int
    frozen: bool
    pc: int
    sp: int
    comm: str
    state: str
    def __init__(self, tid: _Optional[int] = ..., frozen: _Optional[bool] = ..., pc: _Optional[int] = ..., sp: _Optional[int] = ..., comm: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class CoreLayout(_message.Message):
    __slots__ = ("session_id", "total_size", "headers", "notes", "segments", "threads", "elf_class", "arch", "pid", "start_time", "comm", "exe", "section_headers", "freeze_micros", "max_chunk_bytes", "mode", "readable", "snapshot", "snapshot_status", "compression", "stopped_micros", "target_running", "joined", "freeze_id", "snapshot_reason", "stack_bytes_per_thread", "environment_hidden", "stored_capture_id", "files")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ELF_CLASS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    SECTION_HEADERS_FIELD_NUMBER: _ClassVar[int]
    FREEZE_MICROS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    READABLE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_STATUS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    STOPPED_MICROS_FIELD_NUMBER: _ClassVar[int]
    TARGET_RUNNING_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    FREEZE_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REASON_FIELD_NUMBER: _ClassVar[int]
    STACK_BYTES_PER_THREAD_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STORED_CAPTURE_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    total_size: int
    headers: ByteRange
    notes: ByteRange
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    threads: _containers.RepeatedCompositeFieldContainer[ThreadInfo]
    elf_class: int
    arch: str
    pid: int
    start_time: int
    comm: str
    exe: str
    section_headers: ByteRange
    freeze_micros: int
    max_chunk_bytes: int
    mode: CaptureMode
    readable: _containers.RepeatedCompositeFieldContainer[ByteRange]
    snapshot: bool
    snapshot_status: str
    compression: Compression
    stopped_micros: int
    target_running: bool
    joined: bool
    freeze_id: str
    snapshot_reason: str
    stack_bytes_per_thread: int
    environment_hidden: bool
    stored_capture_id: str
    files: _containers.RepeatedCompositeFieldContainer[MappedFile]
    def __init__(self, session_id: _Optional[str] = ..., total_size: _Optional[int] = ..., headers: _Optional[_Union[ByteRange, _Mapping]] = ..., notes: _Optional[_Union[ByteRange, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., threads: _Optional[_Iterable[_Union[ThreadInfo, _Mapping]]] = ..., elf_class: _Optional[int] = ..., arch: _Optional[str] = ..., pid: _Optional[int] = ..., start_time: _Optional[int] = ..., comm: _Optional[str] = ..., exe: _Optional[str] = ..., section_headers: _Optional[_Union[ByteRange, _Mapping]] = ..., freeze_micros: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., mode: _Optional[_Union[CaptureMode, str]] = ..., readable: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ..., snapshot: _Optional[bool] = ..., snapshot_status: _Optional[str] = ..., compression: _Optional[_Union[Compression, str]] = ..., stopped_micros: _Optional[int] = ..., target_running: _Optional[bool] = ..., joined: _Optional[bool] = ..., freeze_id: _Optional[str] = ..., snapshot_reason: _Optional[str] = ..., stack_bytes_per_thread: _Optional[int] = ..., environment_hidden: _Optional[bool] = ..., stored_capture_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[MappedFile, _Mapping]]] = ...) -> None: ...

class CoreChunk(_message.Message):
    __slots__ = ("offset", "data", "hole_length", "request_id", "last", "extents", "raw_length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HOLE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    RAW_LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    hole_length: int
    request_id: int
    last: bool
    extents: _containers.RepeatedScalarFieldContainer[int]
    raw_length: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., hole_length: _Optional[int] = ..., request_id: _Optional[int] = ..., last: _Optional[bool] = ..., extents: _Optional[_Iterable[int]] = ..., raw_length: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file", "offset", "data", "request_id", "last")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    file: int
    offset: int
    data: bytes
    request_id: int
    last: bool
    def __init__(self, file: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., request_id: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class CaptureResponse(_message.Message):
    __slots__ = ("layout", "chunk", "file_chunk")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FILE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    layout: CoreLayout
    chunk: CoreChunk
    file_chunk: FileChunk
    def __init__(self, layout: _Optional[_Union[CoreLayout, _Mapping]] = ..., chunk: _Optional[_Union[CoreChunk, _Mapping]] = ..., file_chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class TriggerSelector(_message.Message):
    __slots__ = ("pid", "comm", "exe", "cgroup", "container")
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    pid: int
    comm: _containers.RepeatedScalarFieldContainer[str]
    exe: _containers.RepeatedScalarFieldContainer[str]
    cgroup: _containers.RepeatedScalarFieldContainer[str]
    container: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pid: _Optional[int] = ..., comm: _Optional[_Iterable[str]] = ..., exe: _Optional[_Iterable[str]] = ..., cgroup: _Optional[_Iterable[str]] = ..., container: _Optional[_Iterable[str]] = ...) -> None: ...

class TriggerSpec(_message.Message):
    __slots__ = ("selector", "rss_above_bytes", "cpu_above_percent", "cpu_for_seconds", "threads_above", "fds_above", "every_seconds", "mode", "count", "cooldown_seconds", "name")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RSS_ABOVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_ABOVE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CPU_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THREADS_ABOVE_FIELD_NUMBER: _ClassVar[int]
    FDS_ABOVE_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    selector: TriggerSelector
    rss_above_bytes: int
    cpu_above_percent: float
    cpu_for_seconds: float
    threads_above: int
    fds_above: int
    every_seconds: float
    mode: CaptureMode
    count: int
    cooldown_seconds: float
    name: str
    def __init__(self, selector: _Optional[_Union[TriggerSelector, _Mapping]] = ..., rss_above_bytes: _Optional[int] = ..., cpu_above_percent: _Optional[float] = ..., cpu_for_seconds: _Optional[float] = ..., threads_above: _Optional[int] = ..., fds_above: _Optional[int] = ..., every_seconds: _Optional[float] = ..., mode: _Optional[_Union[CaptureMode, str]] = ..., count: _Optional[int] = ..., cooldown_seconds: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class TriggerInfo(_message.Message):
    __slots__ = ("id", "spec", "owner", "source", "fired", "last_fired", "last_error")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    LAST_FIRED_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: TriggerSpec
    owner: str
    source: str
    fired: int
    last_fired: float
    last_error: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[TriggerSpec, _Mapping]] = ..., owner: _Optional[str] = ..., source: _Optional[str] = ..., fired: _Optional[int] = ..., last_fired: _Optional[float] = ..., last_error: _Optional[str] = ...) -> None: ...

class AddTriggerRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: TriggerSpec
    def __init__(self, spec: _Optional[_Union[TriggerSpec, _Mapping]] = ...) -> None: ...

class ListTriggersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTriggersResponse(_message.Message):
    __slots__ = ("triggers",)
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    triggers: _containers.RepeatedCompositeFieldContainer[TriggerInfo]
    def __init__(self, triggers: _Optional[_Iterable[_Union[TriggerInfo, _Mapping]]] = ...) -> None: ...

class RemoveTriggerRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RemoveTriggerResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class StoredCapture(_message.Message):
    __slots__ = ("id", "pid", "start_time", "comm", "exe", "build_ids", "trigger_id", "owner", "time", "core_size", "stored_bytes", "mode", "corrupt", "cgroup")
    ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    EXE_FIELD_NUMBER: _ClassVar[int]
    BUILD_IDS_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CORE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    CGROUP_FIELD_NUMBER: _ClassVar[int]
    id: str
    pid: int
    start_time: int
    comm: str
    exe: str
    build_ids: _containers.RepeatedScalarFieldContainer[str]
    trigger_id: str
    owner: str
    time: float
    core_size: int
    stored_bytes: int
    mode: CaptureMode
    corrupt: bool
    cgroup: str
    def __init__(self, id: _Optional[str] = ..., pid: _Optional[int] = ..., start_time: _Optional[int] = ..., comm: _Optional[str] = ..., exe: _Optional[str] = ..., build_ids: _Optional[_Iterable[str]] = ..., trigger_id: _Optional[str] = ..., owner: _Optional[str] = ..., time: _Optional[float] = ..., core_size: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., mode: _Optional[_Union[CaptureMode, str]] = ..., corrupt: _Optional[bool] = ..., cgroup: _Optional[str] = ...) -> None: ...

class ListCapturesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCapturesResponse(_message.Message):
    __slots__ = ("captures", "hostname")
    CAPTURES_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    captures: _containers.RepeatedCompositeFieldContainer[StoredCapture]
    hostname: str
    def __init__(self, captures: _Optional[_Iterable[_Union[StoredCapture, _Mapping]]] = ..., hostname: _Optional[str] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("open", "destination")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    open: OpenCapture
    destination: str
    def __init__(self, open: _Optional[_Union[OpenCapture, _Mapping]] = ..., destination: _Optional[str] = ...) -> None: ...

class UploadProgress(_message.Message):
    __slots__ = ("layout", "bytes_uploaded", "done", "url", "size", "sha256")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_UPLOADED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    layout: CoreLayout
    bytes_uploaded: int
    done: bool
    url: str
    size: int
    sha256: str
    def __init__(self, layout: _Optional[_Union[CoreLayout, _Mapping]] = ..., bytes_uploaded: _Optional[int] = ..., done: _Optional[bool] = ..., url: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
