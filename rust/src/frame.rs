//! The byte layout of the frames carried by the rings.
//!
//! Task frame (dispatcher → actor), little endian:
//!
//! ```text
//! batch_id u64 | count u32 | then count records:
//!   queue u16 | id_len u16 | type_len u16 | pad u16 | attempt u32 | max_retry u32
//!   enqueued_at_ms u64 | timeout_ms u64 | payload_len u32 | labels_len u32 (MAX = none)
//!   id | type | payload | labels
//! ```
//!
//! Result frame (actor → dispatcher): tasks `start .. start + count` of batch
//! `batch_id` are finished; the ones listed as failures failed, all others
//! succeeded.
//!
//! ```text
//! batch_id u64 | start u32 | count u32 | failures u32 | then per failure:
//!   index u32 | kind u8 | pad [u8; 3] | delay_ms u64 | message_len u32 | traceback_len u32
//!   message | traceback
//! ```

use crate::envelope::TaskRef;

/// The batch id that marks a run-times frame (actor → dispatcher) instead of
/// a result frame: `u64::MAX | JSON` where the JSON is a list of
/// `[queue index, type, seconds in all, [[bucket, runs], ...]]`.
/// Real batch ids count up from 1 and never get there.
pub const DURATIONS_BATCH: u64 = u64::MAX;

/// Encodes a run-times frame into `buffer` (cleared first).
pub fn write_durations(buffer: &mut Vec<u8>, json: &[u8]) {
    buffer.clear();
    buffer.extend_from_slice(&DURATIONS_BATCH.to_le_bytes());
    buffer.extend_from_slice(json);
}

/// The JSON of a run-times frame, or `None` for any other frame.
#[must_use]
pub fn read_durations(bytes: &[u8]) -> Option<&[u8]> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    (u64::from_le_bytes(*head) == DURATIONS_BATCH).then_some(rest)
}

const TASK_HEADER: usize = 12;
const TASK_RECORD: usize = 40;
const FAILURE_RECORD: usize = 24;
const NO_LABELS: u32 = u32::MAX;

/// A frame that does not follow the layout (a bug or memory corruption).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} frame: {detail}")]
pub struct FrameError {
    what: &'static str,
    detail: String,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, at: 0, what }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(FrameError {
                what: self.what,
                detail: format!(
                    "needs {len} bytes at offset {}, has {}",
                    self.at,
                    self.bytes.len()
                ),
            });
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn text(&mut self, len: usize) -> Result<&'a str, FrameError> {
        let what = self.what;
        std::str::from_utf8(self.take(len)?).map_err(|_| FrameError {
            what,
            detail: "text is not UTF-8".to_owned(),
        })
    }
}

/// Bytes one task record takes in a task frame.
#[must_use]
pub fn task_record_len(task: &TaskRef<'_>) -> usize {
    TASK_RECORD
        + task.id.len()
        + task.kind.len()
        + task.payload.len()
        + task.labels.map_or(0, <[u8]>::len)
}

/// Starts a task frame in `buffer` (cleared first).
pub fn begin_tasks(buffer: &mut Vec<u8>, batch_id: u64, count: u32) {
    buffer.clear();
    buffer.extend_from_slice(&batch_id.to_le_bytes());
    buffer.extend_from_slice(&count.to_le_bytes());
}

/// Appends one task record. Ids and types over 64 KiB are refused earlier
/// (the client and the envelope check), so the `u16` lengths hold.
pub fn push_task(buffer: &mut Vec<u8>, queue: u16, task: &TaskRef<'_>) {
    buffer.reserve(task_record_len(task));
    buffer.extend_from_slice(&queue.to_le_bytes());
    buffer.extend_from_slice(&(task.id.len() as u16).to_le_bytes());
    buffer.extend_from_slice(&(task.kind.len() as u16).to_le_bytes());
    buffer.extend_from_slice(&[0, 0]);
    buffer.extend_from_slice(&task.attempt.to_le_bytes());
    buffer.extend_from_slice(&task.max_retry.to_le_bytes());
    buffer.extend_from_slice(&task.enqueued_at_ms.to_le_bytes());
    buffer.extend_from_slice(&task.timeout_ms.to_le_bytes());
    buffer.extend_from_slice(&(task.payload.len() as u32).to_le_bytes());
    let labels_len = task.labels.map_or(NO_LABELS, |labels| labels.len() as u32);
    buffer.extend_from_slice(&labels_len.to_le_bytes());
    buffer.extend_from_slice(task.id.as_bytes());
    buffer.extend_from_slice(task.kind.as_bytes());
    buffer.extend_from_slice(task.payload);
    if let Some(labels) = task.labels {
        buffer.extend_from_slice(labels);
    }
}

/// One task as the actor reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord<'a> {
    /// Index into the engine's queue list.
    pub queue: u16,
    /// Task id.
    pub id: &'a str,
    /// Task type.
    pub kind: &'a str,
    /// Failed runs so far.
    pub attempt: u32,
    /// Retries allowed.
    pub max_retry: u32,
    /// Enqueue time, ms.
    pub enqueued_at_ms: u64,
    /// Hard timeout, ms (0 = none).
    pub timeout_ms: u64,
    /// JSON payload.
    pub payload: &'a [u8],
    /// Labels JSON.
    pub labels: Option<&'a [u8]>,
}

/// Decodes a task frame into its batch id and records.
pub fn read_tasks(bytes: &[u8]) -> Result<(u64, Vec<TaskRecord<'_>>), FrameError> {
    let mut reader = Reader::new(bytes, "task");
    let batch_id = reader.u64()?;
    let count = reader.u32()? as usize;
    let mut records = Vec::with_capacity(count.min(bytes.len() / TASK_RECORD));
    for _ in 0..count {
        let queue = reader.u16()?;
        let id_len = reader.u16()? as usize;
        let kind_len = reader.u16()? as usize;
        reader.u16()?;
        let attempt = reader.u32()?;
        let max_retry = reader.u32()?;
        let enqueued_at_ms = reader.u64()?;
        let timeout_ms = reader.u64()?;
        let payload_len = reader.u32()? as usize;
        let labels_len = reader.u32()?;
        let id = reader.text(id_len)?;
        let kind = reader.text(kind_len)?;
        let payload = reader.take(payload_len)?;
        let labels = if labels_len == NO_LABELS {
            None
        } else {
            Some(reader.take(labels_len as usize)?)
        };
        records.push(TaskRecord {
            queue,
            id,
            kind,
            attempt,
            max_retry,
            enqueued_at_ms,
            timeout_ms,
            payload,
            labels,
        });
    }
    Ok((batch_id, records))
}

/// How a task failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FailureKind {
    /// The handler raised an exception.
    Error = 1,
    /// No handler is registered for the task type.
    UnknownType = 2,
    /// The handler raised `Reject`: dead-letter, no retry.
    Reject = 3,
    /// The handler raised `Retry`: run again after `delay_ms`.
    Retry = 4,
    /// The task could not be decoded (bad payload JSON, bad labels).
    Invalid = 5,
    /// The actor did not start it because the engine is stopping.
    NotStarted = 6,
}

impl FailureKind {
    /// The kind for a wire byte.
    #[must_use]
    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Error,
            2 => Self::UnknownType,
            3 => Self::Reject,
            4 => Self::Retry,
            5 => Self::Invalid,
            6 => Self::NotStarted,
            _ => return None,
        })
    }
}

/// One failed task in a result frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<'a> {
    /// Index of the task in its batch.
    pub index: u32,
    /// What happened.
    pub kind: FailureKind,
    /// Requested delay before the next run (for `Retry`).
    pub delay_ms: u64,
    /// Error text.
    pub message: &'a [u8],
    /// Formatted traceback, may be empty.
    pub traceback: &'a [u8],
}

/// Encodes a result frame into `buffer` (cleared first).
pub fn write_results(
    buffer: &mut Vec<u8>,
    batch_id: u64,
    start: u32,
    count: u32,
    failures: &[Failure<'_>],
) {
    buffer.clear();
    buffer.extend_from_slice(&batch_id.to_le_bytes());
    buffer.extend_from_slice(&start.to_le_bytes());
    buffer.extend_from_slice(&count.to_le_bytes());
    buffer.extend_from_slice(&(failures.len() as u32).to_le_bytes());
    for failure in failures {
        buffer.extend_from_slice(&failure.index.to_le_bytes());
        buffer.extend_from_slice(&[failure.kind as u8, 0, 0, 0]);
        buffer.extend_from_slice(&failure.delay_ms.to_le_bytes());
        buffer.extend_from_slice(&(failure.message.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&(failure.traceback.len() as u32).to_le_bytes());
        buffer.extend_from_slice(failure.message);
        buffer.extend_from_slice(failure.traceback);
    }
}

/// A decoded result frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Results<'a> {
    /// Batch the results belong to.
    pub batch_id: u64,
    /// First finished index.
    pub start: u32,
    /// Number of finished tasks from `start`.
    pub count: u32,
    /// The finished tasks that failed.
    pub failures: Vec<Failure<'a>>,
}

/// Decodes a result frame.
pub fn read_results(bytes: &[u8]) -> Result<Results<'_>, FrameError> {
    let mut reader = Reader::new(bytes, "result");
    let batch_id = reader.u64()?;
    let start = reader.u32()?;
    let count = reader.u32()?;
    let total = reader.u32()? as usize;
    let mut failures = Vec::with_capacity(total.min(bytes.len() / FAILURE_RECORD));
    for _ in 0..total {
        let index = reader.u32()?;
        let kind_byte = reader.u8()?;
        reader.take(3)?;
        let kind = FailureKind::from_byte(kind_byte).ok_or_else(|| FrameError {
            what: "result",
            detail: format!("unknown failure kind {kind_byte}"),
        })?;
        let delay_ms = reader.u64()?;
        let message_len = reader.u32()? as usize;
        let traceback_len = reader.u32()? as usize;
        let message = reader.take(message_len)?;
        let traceback = reader.take(traceback_len)?;
        if index < start || index - start >= count {
            return Err(FrameError {
                what: "result",
                detail: format!("failure index {index} outside {start}..{}", start + count),
            });
        }
        failures.push(Failure {
            index,
            kind,
            delay_ms,
            message,
            traceback,
        });
    }
    Ok(Results {
        batch_id,
        start,
        count,
        failures,
    })
}

/// Fixed overhead of a task frame, for size checks.
pub const TASK_FRAME_OVERHEAD: usize = TASK_HEADER;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::tests::HeapRing;

    fn task<'a>(id: &'a str, payload: &'a [u8], labels: Option<&'a [u8]>) -> TaskRef<'a> {
        TaskRef {
            id,
            kind: "email:send",
            payload,
            attempt: 2,
            max_retry: 5,
            timeout_ms: 30_000,
            enqueued_at_ms: 1_700_000_000_000,
            deadline_ms: None,
            labels,
            unique_key: None,
            idempotent: false,
        }
    }

    #[test]
    fn task_batch_round_trips_through_a_ring() {
        let heap = HeapRing::new(4096);
        let tasks = [
            task("a", br#"{"x":1}"#, None),
            task("bb", b"[]", Some(br#"{"k":"v"}"#)),
            task("ccc", b"", Some(b"{}")),
        ];
        let mut buffer = Vec::new();
        begin_tasks(&mut buffer, 77, tasks.len() as u32);
        for (queue, task) in tasks.iter().enumerate() {
            push_task(&mut buffer, queue as u16, task);
        }
        let expected_len: usize =
            TASK_FRAME_OVERHEAD + tasks.iter().map(task_record_len).sum::<usize>();
        assert_eq!(buffer.len(), expected_len);
        assert!(heap.ring.write_frame(&[&buffer]));
        let decoded = heap
            .ring
            .read_frame(|bytes| {
                let (batch_id, records) = read_tasks(bytes).expect("valid frame");
                let summary: Vec<_> = records
                    .iter()
                    .map(|record| {
                        (
                            record.queue,
                            record.id.to_owned(),
                            record.payload.to_vec(),
                            record.labels.map(<[u8]>::to_vec),
                        )
                    })
                    .collect();
                (batch_id, summary, records[1].attempt, records[1].timeout_ms)
            })
            .expect("a frame");
        assert_eq!(decoded.0, 77);
        assert_eq!(
            decoded.1[1],
            (
                1,
                "bb".to_owned(),
                b"[]".to_vec(),
                Some(br#"{"k":"v"}"#.to_vec())
            )
        );
        assert_eq!(decoded.1[2].3, Some(b"{}".to_vec()));
        assert_eq!(decoded.1[0].3, None);
        assert_eq!((decoded.2, decoded.3), (2, 30_000));
    }

    #[test]
    fn result_frame_round_trips() {
        let failures = [
            Failure {
                index: 3,
                kind: FailureKind::Error,
                delay_ms: 0,
                message: b"ValueError: boom",
                traceback: b"Traceback ...",
            },
            Failure {
                index: 5,
                kind: FailureKind::Retry,
                delay_ms: 1500,
                message: b"",
                traceback: b"",
            },
        ];
        let mut buffer = Vec::new();
        write_results(&mut buffer, 9, 2, 4, &failures);
        let results = read_results(&buffer).expect("valid");
        assert_eq!(results.batch_id, 9);
        assert_eq!((results.start, results.count), (2, 4));
        assert_eq!(results.failures, failures.to_vec());
    }

    #[test]
    fn truncated_or_inconsistent_frames_are_errors_not_panics() {
        let mut buffer = Vec::new();
        begin_tasks(&mut buffer, 1, 1);
        push_task(&mut buffer, 0, &task("a", b"{}", None));
        for cut in 0..buffer.len() {
            assert!(read_tasks(&buffer[..cut]).is_err(), "cut at {cut}");
        }
        let failure = Failure {
            index: 10,
            kind: FailureKind::Error,
            delay_ms: 0,
            message: b"",
            traceback: b"",
        };
        write_results(&mut buffer, 1, 0, 4, &[failure]);
        let message = read_results(&buffer).err().map(|error| error.to_string());
        assert_eq!(
            message.as_deref(),
            Some("malformed result frame: failure index 10 outside 0..4")
        );
    }
}
