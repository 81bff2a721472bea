//! The byte layout of the frames carried by the rings.
//!
//! Every frame starts with the same header, little endian:
//!
//! ```text
//! kind u8 | pad [u8; 3] | count u32 | batch_id u64
//! ```
//!
//! Task ring (dispatcher → actor):
//!
//! - `TASKS`: `count` task records of batch `batch_id`:
//!   ```text
//!   queue u16 | id_len u16 | type_len u16 | flags u16 | attempt u32 | max_retry u32
//!   enqueued_at_ms u64 | timeout_ms u64 | payload_len u32 | labels_len u32 (MAX = none)
//!   id | type | payload | labels
//!   ```
//!   Ids and types are bounded (`envelope::MAX_ID_BYTES`, `MAX_TYPE_BYTES`),
//!   so their `u16` lengths hold. Flag bit 0 (`KEEPS_RESULT`): the task keeps
//!   its outcome (`result_ttl`), so the actor sends its return value back;
//!   bit 1 (`RECORDS_RESULT`): the engine records history, so the actor
//!   sends the value back when it can.
//! - `CONTROL`: messages to a running actor (kept for cancellation); an
//!   actor refuses kinds it does not know, loudly.
//!
//! Result ring (actor → dispatcher):
//!
//! - `RESULTS`: outcomes of tasks of batch `batch_id`:
//!   ```text
//!   range_start u32 | range_count u32 | work_us u64 | parallel u32 | pad u32
//!   then count records:
//!   index u32 | outcome u8 | pad [u8; 3] | delay_ms u64
//!   message_len u32 | traceback_len u32 | value_len u32 | pad u32
//!   message | traceback | value
//!   ```
//!   Each record ends its task with its `Outcome` (a success may carry a
//!   return value). Then every task of `range_start .. range_start +
//!   range_count` not ended yet succeeded: a run of plain successes costs no
//!   record. `work_us` is the run time of the tasks the frame ends, and
//!   `parallel` how many ran at once (1 for sync handlers), which the
//!   dispatcher's prefetch learns from.
//! - `STARTED`: `count` records `index u32 | pad u32 | deadline_ms u64` of
//!   async tasks that started (deadline on `CLOCK_MONOTONIC`, 0 = none), so
//!   a dispatcher that kills a blocked event loop blames the tasks that ran.
//! - `RUN_TIMES`: JSON of handler run-time histograms (see `timing`).

use crate::envelope::TaskRef;
use crate::outcome::Outcome;

/// Frame kinds of the task ring.
pub mod task_kind {
    /// A batch of tasks.
    pub const TASKS: u8 = 1;
    /// Messages to a running actor.
    pub const CONTROL: u8 = 2;
}

/// Frame kinds of the result ring.
pub mod result_kind {
    /// Outcomes of finished tasks.
    pub const RESULTS: u8 = 1;
    /// Async tasks that started, with their deadlines.
    pub const STARTED: u8 = 2;
    /// Handler run-time histograms (JSON).
    pub const RUN_TIMES: u8 = 3;
}

/// Bytes of the common header.
pub const HEADER: usize = 16;
const TASK_RECORD: usize = 40;
const RESULTS_HEAD: usize = 24;
const RESULT_RECORD: usize = 32;
const STARTED_RECORD: usize = 16;
const NO_LABELS: u32 = u32::MAX;
/// Task record flag: the actor sends the return value back.
pub const KEEPS_RESULT: u16 = 1;
/// Task record flag: the actor sends the return value back when it can
/// (JSON, within `MAX_RESULT_BYTES`) for the task's history, and a note of
/// why not otherwise; unlike `KEEPS_RESULT` a value it cannot send is no
/// failure.
pub const RECORDS_RESULT: u16 = 2;

/// A frame that does not follow the layout (a bug or memory corruption).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} frame: {detail}")]
pub struct FrameError {
    what: &'static str,
    detail: String,
}

/// The common header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame holds (`task_kind` or `result_kind`).
    pub kind: u8,
    /// Records in the frame.
    pub count: u32,
    /// Batch the frame is about (0 when none).
    pub batch_id: u64,
}

fn put_header(buffer: &mut Vec<u8>, header: Header) {
    buffer.push(header.kind);
    buffer.extend_from_slice(&[0, 0, 0]);
    buffer.extend_from_slice(&header.count.to_le_bytes());
    buffer.extend_from_slice(&header.batch_id.to_le_bytes());
}

/// Reads the common header of `bytes`.
pub fn header(bytes: &[u8]) -> Result<Header, FrameError> {
    Reader::new(bytes, "any").head()
}

/// Sets the record count of a frame already written into `buffer`.
pub fn set_count(buffer: &mut [u8], count: u32) {
    buffer[4..8].copy_from_slice(&count.to_le_bytes());
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

    fn error(&self, detail: String) -> FrameError {
        FrameError {
            what: self.what,
            detail,
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.error(format!(
                "needs {len} bytes at offset {}, has {}",
                self.at,
                self.bytes.len()
            )));
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
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| self.error("text is not UTF-8".to_owned()))
    }

    /// Reads the common header.
    fn head(&mut self) -> Result<Header, FrameError> {
        let kind = self.u8()?;
        self.take(3)?;
        let count = self.u32()?;
        let batch_id = self.u64()?;
        Ok(Header {
            kind,
            count,
            batch_id,
        })
    }

    /// Reads the common header and checks the frame's kind.
    fn expect(&mut self, kind: u8) -> Result<Header, FrameError> {
        let head = self.head()?;
        if head.kind != kind {
            return Err(self.error(format!("kind {}, expected {kind}", head.kind)));
        }
        Ok(head)
    }
}

// ---- task frames ----------------------------------------------------------

/// Bytes one task record takes in a task frame.
#[must_use]
pub fn task_record_len(task: &TaskRef<'_>) -> usize {
    TASK_RECORD
        + task.id.len()
        + task.kind.len()
        + task.payload.len()
        + task.labels.map_or(0, <[u8]>::len)
}

/// Starts a task frame in `buffer` (cleared first); `set_count` fixes the
/// count once the records are in.
pub fn begin_tasks(buffer: &mut Vec<u8>, batch_id: u64) {
    buffer.clear();
    put_header(
        buffer,
        Header {
            kind: task_kind::TASKS,
            count: 0,
            batch_id,
        },
    );
}

/// Appends one task record. Ids and types are bounded by the envelope's
/// checks, so the `u16` lengths hold.
pub fn push_task(buffer: &mut Vec<u8>, queue: u16, task: &TaskRef<'_>, records_result: bool) {
    debug_assert!(u16::try_from(task.id.len()).is_ok() && u16::try_from(task.kind.len()).is_ok());
    buffer.reserve(task_record_len(task));
    buffer.extend_from_slice(&queue.to_le_bytes());
    buffer.extend_from_slice(&(task.id.len() as u16).to_le_bytes());
    buffer.extend_from_slice(&(task.kind.len() as u16).to_le_bytes());
    let mut flags = if task.result_ttl_ms > 0 {
        KEEPS_RESULT
    } else {
        0
    };
    if records_result || task.retention_ms > 0 {
        flags |= RECORDS_RESULT;
    }
    buffer.extend_from_slice(&flags.to_le_bytes());
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
    /// The actor sends the return value back (the task keeps its outcome).
    pub keeps_result: bool,
    /// The actor sends the return value back when it can (history).
    pub records_result: bool,
}

/// Decodes a task frame into its batch id and records.
pub fn read_tasks(bytes: &[u8]) -> Result<(u64, Vec<TaskRecord<'_>>), FrameError> {
    let mut reader = Reader::new(bytes, "task");
    let head = reader.expect(task_kind::TASKS)?;
    let count = head.count as usize;
    let mut records = Vec::with_capacity(count.min(bytes.len() / TASK_RECORD));
    for _ in 0..count {
        let queue = reader.u16()?;
        let id_len = reader.u16()? as usize;
        let kind_len = reader.u16()? as usize;
        let flags = reader.u16()?;
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
            keeps_result: flags & KEEPS_RESULT != 0,
            records_result: flags & RECORDS_RESULT != 0,
        });
    }
    Ok((head.batch_id, records))
}

// ---- result frames --------------------------------------------------------

/// One task's outcome in a result frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Index of the task in its batch.
    pub index: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Requested delay before the next run (`Retry`).
    pub delay_ms: u64,
    /// Error text.
    pub message: &'a [u8],
    /// Formatted traceback, may be empty.
    pub traceback: &'a [u8],
    /// A success's return value (JSON), may be empty.
    pub value: &'a [u8],
}

impl Record<'_> {
    /// Bytes the record takes in a frame.
    #[must_use]
    pub fn len(&self) -> usize {
        RESULT_RECORD + self.message.len() + self.traceback.len() + self.value.len()
    }

    /// Whether the record is empty (never: records have a fixed part).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The tasks a result frame ends as plain successes, and what their runs cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// First index.
    pub start: u32,
    /// Number of indices.
    pub count: u32,
    /// Run time of the tasks the frame ends, µs.
    pub work_us: u64,
    /// How many of them ran at once (1 for sync handlers).
    pub parallel: u32,
}

/// Fixed bytes of a result frame without records.
pub const RESULTS_OVERHEAD: usize = HEADER + RESULTS_HEAD;

/// Encodes a result frame into `buffer` (cleared first).
pub fn write_results(buffer: &mut Vec<u8>, batch_id: u64, range: Range, records: &[Record<'_>]) {
    buffer.clear();
    put_header(
        buffer,
        Header {
            kind: result_kind::RESULTS,
            count: records.len() as u32,
            batch_id,
        },
    );
    buffer.extend_from_slice(&range.start.to_le_bytes());
    buffer.extend_from_slice(&range.count.to_le_bytes());
    buffer.extend_from_slice(&range.work_us.to_le_bytes());
    buffer.extend_from_slice(&range.parallel.to_le_bytes());
    buffer.extend_from_slice(&[0; 4]);
    for record in records {
        buffer.extend_from_slice(&record.index.to_le_bytes());
        buffer.extend_from_slice(&[record.outcome as u8, 0, 0, 0]);
        buffer.extend_from_slice(&record.delay_ms.to_le_bytes());
        buffer.extend_from_slice(&(record.message.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&(record.traceback.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&[0; 4]);
        buffer.extend_from_slice(record.message);
        buffer.extend_from_slice(record.traceback);
        buffer.extend_from_slice(record.value);
    }
}

/// A decoded result frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Results<'a> {
    /// Batch the results belong to.
    pub batch_id: u64,
    /// Plain successes and what the runs cost.
    pub range: Range,
    /// Tasks ended with their own outcome.
    pub records: Vec<Record<'a>>,
}

/// Decodes a result frame.
pub fn read_results(bytes: &[u8]) -> Result<Results<'_>, FrameError> {
    let mut reader = Reader::new(bytes, "result");
    let head = reader.expect(result_kind::RESULTS)?;
    let range = Range {
        start: reader.u32()?,
        count: reader.u32()?,
        work_us: reader.u64()?,
        parallel: reader.u32()?,
    };
    reader.take(4)?;
    if range.start.checked_add(range.count).is_none() {
        return Err(reader.error(format!("range {}+{} overflows", range.start, range.count)));
    }
    let total = head.count as usize;
    let mut records = Vec::with_capacity(total.min(bytes.len() / RESULT_RECORD));
    for _ in 0..total {
        let index = reader.u32()?;
        let byte = reader.u8()?;
        reader.take(3)?;
        let outcome = Outcome::from_byte(byte)
            .ok_or_else(|| reader.error(format!("unknown outcome {byte}")))?;
        let delay_ms = reader.u64()?;
        let message_len = reader.u32()? as usize;
        let traceback_len = reader.u32()? as usize;
        let value_len = reader.u32()? as usize;
        reader.take(4)?;
        records.push(Record {
            index,
            outcome,
            delay_ms,
            message: reader.take(message_len)?,
            traceback: reader.take(traceback_len)?,
            value: reader.take(value_len)?,
        });
    }
    Ok(Results {
        batch_id: head.batch_id,
        range,
        records,
    })
}

/// Splits `records` into result frames of at most `max_frame` bytes each and
/// hands each encoded frame to `emit`. The range goes into the last frame,
/// so every record is applied before the range counts the rest as
/// successes. Records must each fit a frame (texts are clipped first).
pub fn write_results_split(
    buffer: &mut Vec<u8>,
    max_frame: usize,
    batch_id: u64,
    range: Range,
    records: &[Record<'_>],
    mut emit: impl FnMut(&[u8]),
) {
    let mut first = 0;
    let mut size = RESULTS_OVERHEAD;
    for (at, record) in records.iter().enumerate() {
        if size + record.len() > max_frame && at > first {
            let part = Range {
                start: 0,
                count: 0,
                work_us: 0,
                parallel: range.parallel,
            };
            write_results(buffer, batch_id, part, &records[first..at]);
            emit(buffer);
            first = at;
            size = RESULTS_OVERHEAD;
        }
        size += record.len();
    }
    write_results(buffer, batch_id, range, &records[first..]);
    emit(buffer);
}

/// Encodes a `STARTED` frame: async tasks `(index, deadline_ms)` of a batch.
pub fn write_started(buffer: &mut Vec<u8>, batch_id: u64, started: &[(u32, u64)]) {
    buffer.clear();
    put_header(
        buffer,
        Header {
            kind: result_kind::STARTED,
            count: started.len() as u32,
            batch_id,
        },
    );
    for (index, deadline_ms) in started {
        buffer.extend_from_slice(&index.to_le_bytes());
        buffer.extend_from_slice(&[0; 4]);
        buffer.extend_from_slice(&deadline_ms.to_le_bytes());
    }
}

/// Decodes a `STARTED` frame into its batch id and `(index, deadline_ms)`.
pub fn read_started(bytes: &[u8]) -> Result<(u64, Vec<(u32, u64)>), FrameError> {
    let mut reader = Reader::new(bytes, "started");
    let head = reader.expect(result_kind::STARTED)?;
    let mut started = Vec::with_capacity((head.count as usize).min(bytes.len() / STARTED_RECORD));
    for _ in 0..head.count {
        let index = reader.u32()?;
        reader.take(4)?;
        started.push((index, reader.u64()?));
    }
    Ok((head.batch_id, started))
}

/// Encodes a run-times frame into `buffer` (cleared first).
pub fn write_run_times(buffer: &mut Vec<u8>, json: &[u8]) {
    buffer.clear();
    put_header(
        buffer,
        Header {
            kind: result_kind::RUN_TIMES,
            count: 0,
            batch_id: 0,
        },
    );
    buffer.extend_from_slice(json);
}

/// The JSON of a run-times frame.
pub fn read_run_times(bytes: &[u8]) -> Result<&[u8], FrameError> {
    let mut reader = Reader::new(bytes, "run-times");
    reader.expect(result_kind::RUN_TIMES)?;
    reader.take(bytes.len() - HEADER)
}

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
            result_ttl_ms: 0,
            retention_ms: 0,
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
        begin_tasks(&mut buffer, 77);
        for (queue, task) in tasks.iter().enumerate() {
            push_task(&mut buffer, queue as u16, task, false);
        }
        set_count(&mut buffer, tasks.len() as u32);
        let expected_len: usize = HEADER + tasks.iter().map(task_record_len).sum::<usize>();
        assert_eq!(buffer.len(), expected_len);
        assert_eq!(header(&buffer).map(|h| h.kind), Ok(task_kind::TASKS));
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

    fn record(index: u32, outcome: Outcome, message: &[u8]) -> Record<'_> {
        Record {
            index,
            outcome,
            delay_ms: 0,
            message,
            traceback: b"",
            value: b"",
        }
    }

    #[test]
    fn result_frame_round_trips_with_values() {
        let mut records = vec![
            record(3, Outcome::Failed, b"ValueError: boom"),
            record(5, Outcome::Retry, b""),
            record(9, Outcome::Succeeded, b""),
        ];
        records[0].traceback = b"Traceback ...";
        records[1].delay_ms = 1500;
        records[2].value = b"[1,2]";
        let range = Range {
            start: 2,
            count: 4,
            work_us: 1234,
            parallel: 1,
        };
        let mut buffer = Vec::new();
        write_results(&mut buffer, 9, range, &records);
        let results = read_results(&buffer).expect("valid");
        assert_eq!(results.batch_id, 9);
        assert_eq!(results.range, range);
        assert_eq!(results.records, records);
    }

    #[test]
    fn big_result_sets_split_into_frames_with_the_range_last() {
        let text = vec![b'x'; 1000];
        let records: Vec<Record<'_>> = (0..50)
            .map(|index| record(index, Outcome::Failed, &text))
            .collect();
        let range = Range {
            start: 0,
            count: 60,
            work_us: 7,
            parallel: 1,
        };
        let mut frames = Vec::new();
        write_results_split(&mut Vec::new(), 4096, 1, range, &records, |frame| {
            assert!(frame.len() <= 4096);
            frames.push(frame.to_vec());
        });
        assert!(frames.len() > 10);
        let decoded: Vec<Results<'_>> = frames
            .iter()
            .map(|frame| read_results(frame).expect("valid"))
            .collect();
        let all: Vec<u32> = decoded
            .iter()
            .flat_map(|results| results.records.iter().map(|record| record.index))
            .collect();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        assert!(decoded[..decoded.len() - 1]
            .iter()
            .all(|results| results.range.count == 0));
        assert_eq!(decoded.last().map(|results| results.range), Some(range));
    }

    #[test]
    fn started_and_run_time_frames_round_trip() {
        let mut buffer = Vec::new();
        write_started(&mut buffer, 4, &[(0, 10), (7, 0)]);
        assert_eq!(read_started(&buffer), Ok((4, vec![(0, 10), (7, 0)])));
        write_run_times(&mut buffer, b"[]");
        assert_eq!(read_run_times(&buffer), Ok(&b"[]"[..]));
        assert!(read_results(&buffer).is_err(), "kinds are checked");
    }

    #[test]
    fn truncated_or_inconsistent_frames_are_errors_not_panics() {
        let mut buffer = Vec::new();
        begin_tasks(&mut buffer, 1);
        push_task(&mut buffer, 0, &task("a", b"{}", None), true);
        set_count(&mut buffer, 1);
        for cut in 0..buffer.len() {
            assert!(read_tasks(&buffer[..cut]).is_err(), "cut at {cut}");
        }
        write_results(
            &mut buffer,
            1,
            Range::default(),
            &[record(0, Outcome::Failed, b"m")],
        );
        for cut in 0..buffer.len() {
            assert!(read_results(&buffer[..cut]).is_err(), "cut at {cut}");
        }
        buffer[RESULTS_OVERHEAD + 4] = 200;
        let message = read_results(&buffer).err().map(|error| error.to_string());
        assert_eq!(
            message.as_deref(),
            Some("malformed result frame: unknown outcome 200")
        );
    }
}
