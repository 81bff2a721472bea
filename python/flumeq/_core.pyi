"""Stubs of flumeq's Rust extension module."""

from typing import Any, Final, Optional, final

from typing_extensions import Self

__all__ = [
    "ASYNC_GRACE_MS",
    "CORE_INTERFACE",
    "DEFAULT_BLOCK_MS",
    "DEFAULT_CANCEL_GRACE_MS",
    "DEFAULT_HISTORY_BUFFER",
    "DEFAULT_RETENTION_MAX_LENGTH",
    "MAX_HISTORY_FIELD_BYTES",
    "CANCEL_TTL_MS",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DEAD_MAX_LENGTH",
    "DEFAULT_PREFETCH",
    "DEFAULT_READ_COUNT",
    "DEFAULT_RESULT_RING_BYTES",
    "DEFAULT_TASK_RING_BYTES",
    "MAX_ID_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_RESULT_BYTES",
    "ENDED_MAX_LENGTH",
    "MAX_TYPE_BYTES",
    "REPORT_NAMES",
    "SLOT_LOST",
    "SLOT_RECLAIMED",
    "SLOT_RUNNING",
    "SLOT_STARTING",
    "WRITE_GRACE_MS",
    "ActorEnd",
    "Outcome",
    "Region",
    "Store",
    "__version__",
    "die_with_parent",
    "duration_buckets",
    "key_names",
    "new_task_id",
    "queue_problem",
    "run_dispatcher",
]

__version__: Final[str]
CORE_INTERFACE: Final[int]
SLOT_STARTING: Final[int]
SLOT_RUNNING: Final[int]
SLOT_LOST: Final[int]
SLOT_RECLAIMED: Final[int]
MAX_ID_BYTES: Final[int]
MAX_TYPE_BYTES: Final[int]
MAX_TEXT_BYTES: Final[int]
MAX_RESULT_BYTES: Final[int]
ENDED_MAX_LENGTH: Final[int]
DEFAULT_PREFETCH: Final[int]
DEFAULT_READ_COUNT: Final[int]
DEFAULT_TASK_RING_BYTES: Final[int]
DEFAULT_RESULT_RING_BYTES: Final[int]
DEFAULT_DEAD_MAX_LENGTH: Final[int]
DEFAULT_CONCURRENCY: Final[int]
DEFAULT_BLOCK_MS: Final[int]
DEFAULT_CANCEL_GRACE_MS: Final[int]
DEFAULT_HISTORY_BUFFER: Final[int]
DEFAULT_RETENTION_MAX_LENGTH: Final[int]
MAX_HISTORY_FIELD_BYTES: Final[int]
CANCEL_TTL_MS: Final[int]
WRITE_GRACE_MS: Final[int]
ASYNC_GRACE_MS: Final[int]
REPORT_NAMES: Final[list[str]]

@final
class Outcome:
    SUCCEEDED: Final[Outcome]
    FAILED: Final[Outcome]
    RETRY: Final[Outcome]
    REJECTED: Final[Outcome]
    UNKNOWN_TYPE: Final[Outcome]
    INVALID: Final[Outcome]
    NOT_STARTED: Final[Outcome]
    TIMED_OUT: Final[Outcome]
    CRASHED: Final[Outcome]
    EXPIRED: Final[Outcome]
    TOO_LARGE: Final[Outcome]
    POISON: Final[Outcome]
    BAD_RESULT: Final[Outcome]
    CANCELLED: Final[Outcome]
    def __int__(self) -> int: ...

@final
class Store:
    def __new__(cls, url: str, prefix: str = "flumeq", timeout: float = 5.0) -> Self: ...
    def ping(self) -> None: ...
    def enqueue(
        self,
        queue: str,
        items: list[tuple[str, bytes, Optional[str], bool]],
        max_retry: int,
        timeout_ms: int,
        deadline_ms: Optional[int] = None,
        labels: Optional[bytes] = None,
        unique_key: Optional[str] = None,
        unique_ttl_ms: int = 3600000,
        due_ms: int = 0,
        result_ttl_ms: int = 0,
        tick: Optional[tuple[str, int]] = None,
        retention_ms: int = 0,
    ) -> list[tuple[str, str]]: ...
    def cron_leases(self, entries: list[str], holder: str, ttl_ms: int) -> list[bool]: ...
    def read_ended(
        self, queue: str, cursor: str, block_ms: int, count: int
    ) -> tuple[str, list[str]]: ...
    def requeue_dead(self, queue: str, ids: Optional[list[str]] = None) -> int: ...
    def purge_dead(self, queue: str) -> int: ...
    def record_events(self, queue: str, count: int, events: bytes, cap: int) -> int: ...
    def ack_events(self, queue: str, group: str, entries: list[tuple[str, int]]) -> int: ...
    def cancel(self, queue: str, task_id: str, group: str) -> tuple[int, int, int]: ...
    def pipeline(self, commands: list[list[bytes]]) -> list[Any]: ...
    def close(self) -> None: ...

@final
class Region:
    def __new__(
        cls, processes: int, task_ring_bytes: int = ..., result_ring_bytes: int = ...
    ) -> Self: ...
    @property
    def processes(self) -> int: ...
    def request_stop(self) -> None: ...
    def stop_requested(self) -> bool: ...
    def mark_lost(self, slot: int, status: int) -> None: ...
    def mark_starting(self, slot: int) -> None: ...
    def slot_state(self, slot: int) -> int: ...
    def closing(self) -> bool: ...
    def close_all(self) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def reset_slots(self) -> None: ...
    def actor(self, slot: int, queues: list[str]) -> ActorEnd: ...

@final
class ActorEnd:
    def started(self, parallel: int = 1) -> None: ...
    def recv(self) -> Optional[tuple[int, list[tuple[Any, ...]]]]: ...
    def wait(self, timeout: float) -> Optional[bool]: ...
    def try_recv(self) -> Optional[tuple[int, list[tuple[Any, ...]]]]: ...
    def stopping(self) -> bool: ...
    def paused(self) -> Optional[frozenset[str]]: ...
    def take_cancels(self) -> list[tuple[int, int]]: ...
    def running(self) -> Optional[tuple[int, int]]: ...
    def begin(self, batch_id: int, index: int, timeout: float) -> bool: ...
    def finish(
        self,
        batch_id: int,
        start: int,
        count: int,
        records: list[tuple[int, int, int, str, str, bytes]],
        wake: bool = True,
        last: bool = True,
    ) -> None: ...
    def start_async(self, batch_id: int, index: int, timeout: float) -> bool: ...
    def done_async(
        self,
        batch_id: int,
        index: int,
        outcome: int,
        delay_ms: int,
        message: str,
        traceback: str,
        seconds: float,
        last: bool = False,
        value: bytes = ...,
    ) -> None: ...
    def wake(self) -> None: ...

def die_with_parent() -> None: ...
def duration_buckets() -> list[float]: ...
def queue_problem(name: str) -> Optional[str]: ...
def key_names(prefix: str, queue: Optional[str] = None) -> dict[str, str]: ...
def new_task_id() -> str: ...
def run_dispatcher(region: Region, settings: dict[str, Any]) -> dict[str, int]: ...
