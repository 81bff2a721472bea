//! A bounded single-producer / single-consumer byte ring in shared memory.
//!
//! The ring carries *frames* (one frame = one batch of tasks or results). A frame
//! is a `u32` length followed by its bytes, padded to 8 bytes, and never split:
//! when it does not fit before the end of the buffer the producer writes a wrap
//! marker and starts again at offset 0. The reader therefore always sees a frame
//! as one contiguous slice.
//!
//! `head` and `tail` count bytes ever written / consumed, so `head - tail` is the
//! fill level and no "full vs empty" ambiguity exists. Each side may sleep in the
//! kernel on a futex word: the consumer on `data_seq` (until a frame arrives),
//! the producer on `space_seq` (until the consumer frees room). Wake-ups are only
//! issued when the other side announced it is about to sleep, so a busy ring
//! costs no syscalls at all.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::futex;

/// Frames are aligned to this many bytes.
const ALIGN: usize = 8;
/// Length prefix written before each frame.
const PREFIX: usize = 4;
/// Marker in the length prefix: "nothing more until the end, continue at 0".
const WRAP: u32 = u32::MAX;

/// Shared ring state; lives in the shared mapping right before the data bytes.
#[repr(C, align(64))]
pub struct RingHeader {
    head: AtomicU64,
    _pad0: [u64; 7],
    tail: AtomicU64,
    _pad1: [u64; 7],
    data_seq: AtomicU32,
    consumer_waiting: AtomicU32,
    space_seq: AtomicU32,
    producer_waiting: AtomicU32,
    closed: AtomicU32,
    _pad2: [u32; 11],
}

impl RingHeader {
    /// Bytes the header occupies; the data area follows it.
    pub const SIZE: usize = std::mem::size_of::<Self>();

    /// Puts the header in its empty state (used when a ring is (re)created).
    pub fn reset(&self) {
        self.head.store(0, Ordering::SeqCst);
        self.tail.store(0, Ordering::SeqCst);
        self.consumer_waiting.store(0, Ordering::SeqCst);
        self.producer_waiting.store(0, Ordering::SeqCst);
        self.closed.store(0, Ordering::SeqCst);
    }
}

/// Why a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The condition may now hold; check again.
    Ready,
    /// The timeout passed.
    TimedOut,
    /// The ring was closed by either side.
    Closed,
}

/// A handle on one ring. It does not own the memory: the shared region does, and
/// it outlives every `Ring` built on it.
#[derive(Clone, Copy)]
pub struct Ring {
    header: *const RingHeader,
    data: *mut u8,
    capacity: usize,
}

// SAFETY: all shared state is accessed through atomics, and the SPSC protocol
// guarantees that the bytes a side touches are not touched by the other side
// at the same time.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    /// Builds a ring over `header` followed by `capacity` data bytes.
    ///
    /// # Safety
    /// `header` must point to a valid `RingHeader` and `data` to `capacity`
    /// writable bytes, both alive for as long as the ring is used; at most one
    /// producer and one consumer may use them at a time. `capacity` must be a
    /// multiple of 8 and at least 64.
    pub unsafe fn from_raw(header: *const RingHeader, data: *mut u8, capacity: usize) -> Self {
        debug_assert!(capacity.is_multiple_of(ALIGN) && capacity >= 64);
        Self {
            header,
            data,
            capacity,
        }
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: guaranteed valid by `from_raw`'s contract.
        unsafe { &*self.header }
    }

    /// Data bytes in the ring.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Largest frame body `write_frame` accepts: half the ring, so that such a
    /// frame fits into an empty ring whatever the current offset.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.capacity / 2 - PREFIX - ALIGN
    }

    /// Bytes written and not yet consumed.
    #[must_use]
    pub fn used(&self) -> usize {
        let header = self.header();
        (header.head.load(Ordering::Acquire) - header.tail.load(Ordering::Acquire)) as usize
    }

    fn padded(len: usize) -> usize {
        (PREFIX + len).div_ceil(ALIGN) * ALIGN
    }

    /// Producer: appends one frame made of `parts` concatenated. Returns `false`
    /// (writing nothing) when the ring has no room for it right now.
    ///
    /// # Panics
    /// If the frame can never fit (`len > max_frame()`); callers check first.
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "frames start at 8-byte offsets of a 64-byte aligned data area"
    )]
    #[must_use]
    pub fn write_frame(&self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        assert!(len <= self.max_frame(), "frame larger than the ring");
        let header = self.header();
        let head = header.head.load(Ordering::Relaxed);
        let tail = header.tail.load(Ordering::Acquire);
        let free = self.capacity - (head - tail) as usize;
        let offset = (head as usize) % self.capacity;
        let to_end = self.capacity - offset;
        let need = Self::padded(len);
        let (skip, start) = if need <= to_end {
            (0, offset)
        } else {
            (to_end, 0)
        };
        if skip + need > free {
            return false;
        }
        // SAFETY: the bytes [offset, offset + skip + need) modulo capacity are
        // free (checked above) and only the producer writes them.
        unsafe {
            if skip > 0 {
                self.data.add(offset).cast::<u32>().write(WRAP);
            }
            let mut cursor = self.data.add(start);
            cursor.cast::<u32>().write(len as u32);
            cursor = cursor.add(PREFIX);
            for part in parts {
                std::ptr::copy_nonoverlapping(part.as_ptr(), cursor, part.len());
                cursor = cursor.add(part.len());
            }
        }
        header
            .head
            .store(head + (skip + need) as u64, Ordering::Release);
        true
    }

    /// Consumer: hands the next frame to `read` and then releases its bytes.
    /// Returns `None` when the ring is empty.
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "frames start at 8-byte offsets of a 64-byte aligned data area"
    )]
    pub fn read_frame<R>(&self, read: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let header = self.header();
        let mut tail = header.tail.load(Ordering::Relaxed);
        let head = header.head.load(Ordering::Acquire);
        if tail == head {
            return None;
        }
        let mut offset = (tail as usize) % self.capacity;
        // SAFETY: [tail, head) was published by the producer (Acquire above).
        let mut len = unsafe { self.data.add(offset).cast::<u32>().read() };
        if len == WRAP {
            tail += (self.capacity - offset) as u64;
            offset = 0;
            // SAFETY: as above; the producer wrote a frame at 0 after the marker.
            len = unsafe { self.data.cast::<u32>().read() };
        }
        let len = len as usize;
        // SAFETY: the frame body lies inside the published range.
        let body = unsafe { std::slice::from_raw_parts(self.data.add(offset + PREFIX), len) };
        let result = read(body);
        header
            .tail
            .store(tail + Self::padded(len) as u64, Ordering::Release);
        Some(result)
    }

    /// Whether a frame is waiting.
    #[must_use]
    pub fn has_frame(&self) -> bool {
        let header = self.header();
        header.head.load(Ordering::Acquire) != header.tail.load(Ordering::Acquire)
    }

    /// Producer, after writing: wakes the consumer if it sleeps.
    pub fn notify_consumer(&self) {
        let header = self.header();
        fence(Ordering::SeqCst);
        if header.consumer_waiting.load(Ordering::SeqCst) != 0 {
            header.data_seq.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(&header.data_seq);
        }
    }

    /// Consumer, after reading: wakes the producer if it waits for room.
    pub fn notify_producer(&self) {
        let header = self.header();
        fence(Ordering::SeqCst);
        if header.producer_waiting.load(Ordering::SeqCst) != 0 {
            header.space_seq.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(&header.space_seq);
        }
    }

    /// Consumer: sleeps until a frame is there, the ring is closed, or `timeout`.
    #[must_use]
    pub fn wait_for_frame(&self, timeout: Option<Duration>) -> Wait {
        let header = self.header();
        self.wait_until(
            &header.data_seq,
            &header.consumer_waiting,
            || self.has_frame(),
            timeout,
        )
    }

    /// Producer: sleeps until `len` more bytes could fit, the ring is closed, or `timeout`.
    #[must_use]
    pub fn wait_for_space(&self, len: usize, timeout: Option<Duration>) -> Wait {
        let header = self.header();
        let need = Self::padded(len) * 2;
        self.wait_until(
            &header.space_seq,
            &header.producer_waiting,
            || self.capacity - self.used() >= need.min(self.capacity),
            timeout,
        )
    }

    fn wait_until(
        &self,
        seq: &AtomicU32,
        waiting: &AtomicU32,
        ready: impl Fn() -> bool,
        timeout: Option<Duration>,
    ) -> Wait {
        if ready() {
            return Wait::Ready;
        }
        if self.is_closed() {
            return Wait::Closed;
        }
        let observed = seq.load(Ordering::SeqCst);
        waiting.store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // Re-check after announcing: the other side either sees the flag or
        // we see its write (both sides use SeqCst).
        let timed_out = !ready() && !self.is_closed() && !futex::wait(seq, observed, timeout);
        waiting.store(0, Ordering::SeqCst);
        if ready() {
            Wait::Ready
        } else if self.is_closed() {
            Wait::Closed
        } else if timed_out {
            Wait::TimedOut
        } else {
            Wait::Ready
        }
    }

    /// Marks the ring closed and wakes both sides.
    pub fn close(&self) {
        let header = self.header();
        header.closed.store(1, Ordering::SeqCst);
        header.data_seq.fetch_add(1, Ordering::SeqCst);
        header.space_seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_all(&header.data_seq);
        futex::wake_all(&header.space_seq);
    }

    /// Whether either side closed the ring.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.header().closed.load(Ordering::SeqCst) != 0
    }

    /// Empties the ring and reopens it. Only safe while neither side uses it.
    pub fn reset(&self) {
        self.header().reset();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 64-byte aligned chunk of test memory.
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    pub(crate) struct Block([u8; 64]);

    /// A ring over heap memory, for tests.
    pub(crate) struct HeapRing {
        _memory: Vec<Block>,
        pub ring: Ring,
    }

    impl HeapRing {
        pub(crate) fn new(capacity: usize) -> Self {
            let blocks = (RingHeader::SIZE + capacity).div_ceil(64);
            let mut memory = vec![Block([0; 64]); blocks];
            let blocks_start = memory.as_mut_ptr();
            let base = blocks_start.cast::<u8>();
            // SAFETY: the vector holds header + capacity bytes, 64-aligned.
            let ring = unsafe {
                Ring::from_raw(
                    blocks_start.cast::<RingHeader>(),
                    base.add(RingHeader::SIZE),
                    capacity,
                )
            };
            Self {
                _memory: memory,
                ring,
            }
        }
    }

    fn read_all(ring: &Ring) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| ring.read_frame(<[u8]>::to_vec)).collect()
    }

    #[test]
    fn frames_come_out_in_order_and_whole() {
        let heap = HeapRing::new(256);
        let ring = heap.ring;
        assert!(ring.write_frame(&[b"ab", b"cde"]));
        assert!(ring.write_frame(&[b""]));
        assert!(ring.write_frame(&[b"0123456789"]));
        assert_eq!(
            read_all(&ring),
            vec![b"abcde".to_vec(), Vec::new(), b"0123456789".to_vec()]
        );
        assert!(ring.read_frame(|_| ()).is_none());
        assert_eq!(ring.used(), 0);
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_read() {
        let heap = HeapRing::new(64);
        let ring = heap.ring;
        // 4 + 20 -> 24 bytes padded; two fit in 64, the third does not.
        assert!(ring.write_frame(&[&[1u8; 20]]));
        assert!(ring.write_frame(&[&[2u8; 20]]));
        assert!(!ring.write_frame(&[&[3u8; 20]]));
        assert_eq!(ring.read_frame(<[u8]>::to_vec), Some(vec![1u8; 20]));
        assert!(ring.write_frame(&[&[3u8; 20]]));
        assert_eq!(read_all(&ring), vec![vec![2u8; 20], vec![3u8; 20]]);
    }

    #[test]
    fn wrap_around_keeps_frames_contiguous() {
        let heap = HeapRing::new(128);
        let ring = heap.ring;
        for round in 0..200u32 {
            let len = (round as usize * 7) % 50;
            let body: Vec<u8> = (0..len).map(|i| (i as u32 + round) as u8).collect();
            assert!(ring.write_frame(&[&body]), "round {round}");
            assert_eq!(ring.read_frame(<[u8]>::to_vec), Some(body));
        }
        assert_eq!(ring.used(), 0);
    }

    #[test]
    fn largest_frame_fits_in_an_empty_ring_at_any_offset() {
        let heap = HeapRing::new(128);
        let ring = heap.ring;
        for shift in 0..17 {
            for _ in 0..shift {
                assert!(ring.write_frame(&[b"x"]));
                ring.read_frame(|_| ());
            }
            let big = vec![9u8; ring.max_frame()];
            assert!(ring.write_frame(&[&big]), "shift {shift}");
            assert_eq!(ring.read_frame(<[u8]>::to_vec), Some(big));
        }
    }

    #[test]
    fn close_wakes_a_sleeping_consumer() {
        let heap = HeapRing::new(64);
        let ring = heap.ring;
        let waiter = std::thread::spawn(move || ring.wait_for_frame(None));
        std::thread::sleep(Duration::from_millis(50));
        ring.close();
        assert_eq!(waiter.join().ok(), Some(Wait::Closed));
    }

    #[test]
    fn wait_times_out_on_an_empty_ring() {
        let heap = HeapRing::new(64);
        let outcome = heap.ring.wait_for_frame(Some(Duration::from_millis(20)));
        assert_eq!(outcome, Wait::TimedOut);
    }

    #[test]
    fn threads_pass_many_frames_without_loss() {
        let heap = HeapRing::new(1024);
        let ring = heap.ring;
        let total = 50_000u32;
        let consumer = std::thread::spawn(move || {
            let mut expected = 0u32;
            while expected < total {
                match ring
                    .read_frame(|body| u32::from_le_bytes(body[..4].try_into().unwrap_or([0; 4])))
                {
                    Some(value) => {
                        assert_eq!(value, expected);
                        expected += 1;
                        ring.notify_producer();
                    }
                    None => {
                        let _ = ring.wait_for_frame(Some(Duration::from_millis(100)));
                    }
                }
            }
        });
        for value in 0..total {
            let padding = vec![0u8; (value % 50) as usize];
            while !ring.write_frame(&[&value.to_le_bytes(), &padding]) {
                let _ = ring.wait_for_space(4 + padding.len(), Some(Duration::from_millis(100)));
            }
            ring.notify_consumer();
        }
        consumer.join().expect("consumer thread");
    }
}
