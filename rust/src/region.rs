//! The shared-memory region between one engine's supervisor, its dispatcher
//! and its actor processes.
//!
//! The supervisor creates the region (an anonymous `MAP_SHARED` mapping plus two
//! eventfds) *before* it forks anything, so every child inherits the same pages
//! and descriptors; nothing lives in the file system and nothing leaks when a
//! process is killed.
//!
//! Layout: a control block, then one slot per actor. A slot is a small header
//! (state, pid, what the actor is running), the task ring (dispatcher → actor)
//! and the result ring (actor → dispatcher).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::ring::{Ring, RingHeader};

/// The actor of a slot is being started; tasks may already be queued for it.
pub const SLOT_STARTING: u32 = 0;
/// The actor runs and reads its ring.
pub const SLOT_RUNNING: u32 = 1;
/// The supervisor saw the actor exit; the dispatcher must take its tasks back.
pub const SLOT_LOST: u32 = 2;
/// The dispatcher took the tasks back and emptied the rings; a new actor may start.
pub const SLOT_RECLAIMED: u32 = 3;

/// Number of engine counts kept in the region (`dispatcher::Report::NAMES`).
pub const COUNTS: usize = 10;

/// Queues (by their index in the engine's list) whose pause the actors see
/// themselves; a pause of a later queue holds its tasks in the dispatcher only.
pub const PAUSABLE_IN_ACTORS: usize = 256;

/// Cancels of tasks handed to one actor that it has not taken in yet.
pub const CANCEL_BOX: usize = 16;

/// Engine-wide flags, and the counts of every dispatcher life so far (a
/// dispatcher adds to them as it goes, so a killed one's work still counts).
#[repr(C, align(64))]
struct ControlBlock {
    stop: AtomicU32,
    closing: AtomicU32,
    /// Bit `i`: queue `i` is paused (set by the dispatcher, read by actors
    /// before each task starts).
    paused: [AtomicU64; PAUSABLE_IN_ACTORS / 64],
    _pad: [u32; 6],
    counts: [AtomicU64; COUNTS],
}

/// What the supervisor and the dispatcher know about one actor.
#[repr(C, align(64))]
pub struct SlotHeader {
    /// One of the `SLOT_*` constants.
    pub state: AtomicU32,
    /// Pid of the current actor process.
    pub pid: AtomicU32,
    /// Raw wait status of the last actor that exited (set by the supervisor).
    pub exit_status: AtomicI32,
    /// Bumped each time an actor is started in this slot.
    pub generation: AtomicU32,
    /// Batch the actor is working on, and index of the task inside it.
    pub running_batch: AtomicU64,
    /// Index + 1 of the running task in `running_batch`; 0 when idle.
    pub running_index: AtomicU32,
    /// How many tasks the actor runs at once (1, or its async concurrency
    /// when it has async handlers), set when it starts.
    pub parallel: AtomicU32,
    /// When the running task started (`monotonic_ms`).
    pub running_since_ms: AtomicU64,
    /// When the running task must be stopped (`monotonic_ms`), 0 = never.
    pub running_deadline_ms: AtomicU64,
    _pad1: [u64; 2],
    /// The cancel box: tasks `(batch, index)` the dispatcher cancelled
    /// (`cancel_index` holds index + 1, 0 = a free place), taken in by the
    /// actor when it is signalled and at each batch.
    cancel_batch: [AtomicU64; CANCEL_BOX],
    cancel_index: [AtomicU32; CANCEL_BOX],
}

/// Milliseconds of `CLOCK_MONOTONIC`: one clock for every process of the
/// host, so an actor's task start and the dispatcher's timeout check agree,
/// and wall-clock jumps never fire or hold back a timeout.
#[must_use]
pub fn monotonic_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now);
    }
    (now.tv_sec as u64) * 1000 + (now.tv_nsec as u64) / 1_000_000
}

/// Sizes chosen at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    /// Number of actor slots.
    pub slots: usize,
    /// Data bytes of each task ring.
    pub task_ring_bytes: usize,
    /// Data bytes of each result ring.
    pub result_ring_bytes: usize,
}

impl RegionLayout {
    fn control_size() -> usize {
        std::mem::size_of::<ControlBlock>()
    }

    fn slot_size(&self) -> usize {
        std::mem::size_of::<SlotHeader>()
            + 2 * RingHeader::SIZE
            + self.task_ring_bytes
            + self.result_ring_bytes
    }

    fn total(&self) -> usize {
        Self::control_size() + self.slots * self.slot_size()
    }
}

/// Errors creating a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// A size was out of range.
    #[error("{0}")]
    Invalid(String),
    /// The kernel refused the mapping or an eventfd.
    #[error("could not set up shared memory: {0}")]
    Os(#[from] io::Error),
}

/// One engine's shared region. Cloned into children by `fork`.
pub struct Region {
    base: *mut u8,
    layout: RegionLayout,
    results_event: OwnedFd,
    control_event: OwnedFd,
}

// SAFETY: the mapping is only accessed through atomics and SPSC rings.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

fn ring_size_ok(bytes: usize) -> bool {
    bytes >= 4096 && bytes.is_multiple_of(4096)
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor is owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd counter, waking whoever polls it.
pub fn signal_event(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) still
    // leaves the fd readable, which is all a wake-up needs.
    unsafe {
        libc::write(fd, std::ptr::from_ref(&one).cast(), 8);
    }
}

/// Resets an eventfd counter to zero; returns whether it was signalled.
#[expect(
    clippy::must_use_candidate,
    reason = "callers often only want the reset"
)]
pub fn drain_event(fd: RawFd) -> bool {
    let mut value: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; the fd is non-blocking.
    let read = unsafe { libc::read(fd, std::ptr::from_mut(&mut value).cast(), 8) };
    read == 8
}

impl Region {
    /// Maps a new region with `layout.slots` actor slots.
    pub fn new(layout: RegionLayout) -> Result<Self, RegionError> {
        if layout.slots == 0 || layout.slots > 1024 {
            return Err(RegionError::Invalid(format!(
                "processes must be between 1 and 1024, got {}",
                layout.slots
            )));
        }
        if !ring_size_ok(layout.task_ring_bytes) || !ring_size_ok(layout.result_ring_bytes) {
            return Err(RegionError::Invalid(format!(
                "ring sizes must be multiples of 4096 bytes, got {} and {}",
                layout.task_ring_bytes, layout.result_ring_bytes
            )));
        }
        let total = layout.total();
        // SAFETY: anonymous shared mapping; checked for MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        // Anonymous memory starts zeroed: every header is in its empty state,
        // every slot SLOT_STARTING.
        Ok(Self {
            base: base.cast(),
            layout,
            results_event: new_eventfd()?,
            control_event: new_eventfd()?,
        })
    }

    /// The sizes this region was made with.
    #[must_use]
    pub fn layout(&self) -> RegionLayout {
        self.layout
    }

    #[expect(
        clippy::cast_ptr_alignment,
        reason = "mmap returns page-aligned memory"
    )]
    fn control(&self) -> &ControlBlock {
        // SAFETY: the control block sits at the (page-aligned) start.
        unsafe { &*self.base.cast::<ControlBlock>() }
    }

    fn slot_base(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.layout.slots, "slot {slot} out of range");
        // SAFETY: in bounds of the mapping by construction of the layout.
        unsafe {
            self.base
                .add(RegionLayout::control_size() + slot * self.layout.slot_size())
        }
    }

    /// Header of actor slot `slot`.
    #[must_use]
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "slots start at multiples of 64 bytes from a page-aligned base"
    )]
    pub fn slot(&self, slot: usize) -> &SlotHeader {
        // SAFETY: slot_base is 64-aligned (all sizes are multiples of 64).
        unsafe { &*self.slot_base(slot).cast::<SlotHeader>() }
    }

    /// The ring carrying task batches to actor `slot`.
    #[must_use]
    pub fn task_ring(&self, slot: usize) -> Ring {
        let header = self
            .slot_base(slot)
            .wrapping_add(std::mem::size_of::<SlotHeader>());
        // SAFETY: header + data lie inside the mapping, which outlives the ring
        // for as long as the Region does (callers keep the Region alive).
        unsafe {
            Ring::from_raw(
                header.cast(),
                header.add(RingHeader::SIZE),
                self.layout.task_ring_bytes,
            )
        }
    }

    /// The ring carrying results back from actor `slot`.
    #[must_use]
    pub fn result_ring(&self, slot: usize) -> Ring {
        let header = self.slot_base(slot).wrapping_add(
            std::mem::size_of::<SlotHeader>() + RingHeader::SIZE + self.layout.task_ring_bytes,
        );
        // SAFETY: as for `task_ring`.
        unsafe {
            Ring::from_raw(
                header.cast(),
                header.add(RingHeader::SIZE),
                self.layout.result_ring_bytes,
            )
        }
    }

    /// Eventfd the actors signal after writing results.
    #[must_use]
    pub fn results_event(&self) -> RawFd {
        self.results_event.as_raw_fd()
    }

    /// Eventfd the supervisor signals after changing a flag or a slot state.
    #[must_use]
    pub fn control_event(&self) -> RawFd {
        self.control_event.as_raw_fd()
    }

    /// Asks the dispatcher to stop taking new tasks and finish.
    pub fn request_stop(&self) {
        self.control().stop.store(1, Ordering::SeqCst);
        signal_event(self.control_event());
    }

    /// Whether a stop was requested.
    #[must_use]
    pub fn stop_requested(&self) -> bool {
        self.control().stop.load(Ordering::SeqCst) != 0
    }

    /// Dispatcher: which queues are paused (by index; those past
    /// `PAUSABLE_IN_ACTORS` are not marked).
    pub fn set_paused(&self, paused: &[bool]) {
        for (word, bits) in self.control().paused.iter().enumerate() {
            let mut value = 0_u64;
            for (bit, _) in paused
                .iter()
                .skip(word * 64)
                .take(64)
                .enumerate()
                .filter(|(_, paused)| **paused)
            {
                value |= 1 << bit;
            }
            bits.store(value, Ordering::SeqCst);
        }
    }

    /// Whether queue `index` is paused (always `false` past
    /// `PAUSABLE_IN_ACTORS`).
    #[must_use]
    pub fn is_paused(&self, index: usize) -> bool {
        self.control()
            .paused
            .get(index / 64)
            .is_some_and(|bits| bits.load(Ordering::Relaxed) & (1 << (index % 64)) != 0)
    }

    /// Whether any queue is marked paused (one load per word: what an
    /// actor checks first).
    #[must_use]
    pub fn any_paused(&self) -> bool {
        self.control()
            .paused
            .iter()
            .any(|bits| bits.load(Ordering::Relaxed) != 0)
    }

    /// Whether the dispatcher has finished and released the actors (their
    /// exits from then on are expected).
    #[must_use]
    pub fn closing(&self) -> bool {
        self.control().closing.load(Ordering::SeqCst) != 0
    }

    /// Supervisor: actor `slot` exited with `status`; hand its tasks back.
    pub fn mark_lost(&self, slot: usize, status: i32) {
        let header = self.slot(slot);
        header.exit_status.store(status, Ordering::SeqCst);
        header.state.store(SLOT_LOST, Ordering::SeqCst);
        self.task_ring(slot).close();
        signal_event(self.control_event());
    }

    /// Supervisor: a new actor is about to start in a reclaimed slot.
    pub fn mark_starting(&self, slot: usize) {
        let header = self.slot(slot);
        header.generation.fetch_add(1, Ordering::SeqCst);
        header.running_index.store(0, Ordering::SeqCst);
        header.running_deadline_ms.store(0, Ordering::SeqCst);
        self.clear_cancels(slot);
        header.state.store(SLOT_STARTING, Ordering::SeqCst);
    }

    /// Dispatcher: empties both rings of a lost slot and lets the supervisor
    /// restart it.
    pub fn reclaim(&self, slot: usize) {
        self.task_ring(slot).reset();
        self.result_ring(slot).reset();
        self.slot(slot)
            .state
            .store(SLOT_RECLAIMED, Ordering::SeqCst);
    }

    /// Dispatcher: asks the actor of `slot` to cancel task `index` of
    /// `batch` (it looks when signalled, and at each batch). Returns false
    /// when the box is full (ask again later).
    #[must_use]
    pub fn post_cancel(&self, slot: usize, batch: u64, index: u32) -> bool {
        let header = self.slot(slot);
        for (batch_at, index_at) in header.cancel_batch.iter().zip(&header.cancel_index) {
            if index_at.load(Ordering::Acquire) == 0 {
                batch_at.store(batch, Ordering::Relaxed);
                index_at.store(index + 1, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Actor: takes the cancels posted to `slot`, emptying the box (one
    /// load when it is empty).
    #[must_use]
    pub fn take_cancels(&self, slot: usize) -> Vec<(u64, u32)> {
        let header = self.slot(slot);
        let mut taken = Vec::new();
        for (batch_at, index_at) in header.cancel_batch.iter().zip(&header.cancel_index) {
            let index = index_at.load(Ordering::Acquire);
            if index != 0 {
                taken.push((batch_at.load(Ordering::Relaxed), index - 1));
                index_at.store(0, Ordering::Release);
            }
        }
        taken
    }

    fn clear_cancels(&self, slot: usize) {
        for index in &self.slot(slot).cancel_index {
            index.store(0, Ordering::SeqCst);
        }
    }

    /// Dispatcher: adds `counts` to the engine's counts.
    pub fn add_counts(&self, counts: &[u64; COUNTS]) {
        for (total, count) in self.control().counts.iter().zip(counts) {
            if *count > 0 {
                total.fetch_add(*count, Ordering::Relaxed);
            }
        }
    }

    /// The engine's counts over every dispatcher life.
    #[must_use]
    pub fn counts(&self) -> [u64; COUNTS] {
        std::array::from_fn(|at| self.control().counts[at].load(Ordering::Relaxed))
    }

    /// Supervisor, after its dispatcher died and every actor was killed:
    /// empties every slot for the next dispatcher and its new actors. The
    /// stop flag and the counts stay.
    pub fn reset_slots(&self) {
        self.control().closing.store(0, Ordering::SeqCst);
        for slot in 0..self.layout.slots {
            self.task_ring(slot).reset();
            self.result_ring(slot).reset();
            let header = self.slot(slot);
            header.running_index.store(0, Ordering::SeqCst);
            header.running_deadline_ms.store(0, Ordering::SeqCst);
            header.pid.store(0, Ordering::SeqCst);
            self.clear_cancels(slot);
            header.state.store(SLOT_RECLAIMED, Ordering::SeqCst);
        }
        drain_event(self.results_event());
        drain_event(self.control_event());
    }

    /// Dispatcher, at the end: tells every actor there is no more work.
    pub fn close_all(&self) {
        self.control().closing.store(1, Ordering::SeqCst);
        for slot in 0..self.layout.slots {
            self.task_ring(slot).close();
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no Ring outlives the Region.
        unsafe {
            libc::munmap(self.base.cast(), self.layout.total());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RegionLayout {
        RegionLayout {
            slots: 3,
            task_ring_bytes: 8192,
            result_ring_bytes: 4096,
        }
    }

    #[test]
    fn rings_of_different_slots_do_not_overlap() {
        let region = Region::new(layout()).expect("region");
        for slot in 0..3 {
            let body = vec![slot as u8; 1000];
            assert!(region.task_ring(slot).write_frame(&[&body]));
            assert!(region.result_ring(slot).write_frame(&[&body[..10]]));
        }
        for slot in 0..3 {
            let task = region.task_ring(slot).read_frame(<[u8]>::to_vec);
            let result = region.result_ring(slot).read_frame(<[u8]>::to_vec);
            assert_eq!(task, Some(vec![slot as u8; 1000]));
            assert_eq!(result, Some(vec![slot as u8; 10]));
        }
    }

    #[test]
    fn paused_queues_are_marked_by_index_up_to_the_actor_limit() {
        let region = Region::new(layout()).expect("region");
        assert!(!region.any_paused());
        let mut paused = vec![false; PAUSABLE_IN_ACTORS + 10];
        paused[1] = true;
        paused[130] = true;
        paused[PAUSABLE_IN_ACTORS + 3] = true;
        region.set_paused(&paused);
        assert!(region.any_paused());
        let marked: Vec<usize> = (0..paused.len())
            .filter(|at| region.is_paused(*at))
            .collect();
        assert_eq!(marked, [1, 130]);
        region.set_paused(&[false; 3]);
        assert!(!region.any_paused() && !region.is_paused(1));
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        let mut bad = layout();
        bad.slots = 0;
        let message = Region::new(bad).err().map(|error| error.to_string());
        assert_eq!(
            message.as_deref(),
            Some("processes must be between 1 and 1024, got 0")
        );
        let mut bad = layout();
        bad.task_ring_bytes = 1000;
        assert!(Region::new(bad).is_err());
    }

    #[test]
    fn lost_then_reclaimed_slot_is_empty_and_open() {
        let region = Region::new(layout()).expect("region");
        assert!(region.task_ring(1).write_frame(&[b"pending"]));
        region.mark_lost(1, 9);
        assert!(region.task_ring(1).is_closed());
        assert_eq!(region.slot(1).state.load(Ordering::SeqCst), SLOT_LOST);
        region.reclaim(1);
        assert!(!region.task_ring(1).is_closed());
        assert!(!region.task_ring(1).has_frame());
        region.mark_starting(1);
        assert_eq!(region.slot(1).generation.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn counts_add_up_across_dispatcher_lives_and_survive_a_reset() {
        let region = Region::new(layout()).expect("region");
        region.add_counts(&[1, 0, 0, 0, 0, 0, 0, 2, 1, 0]);
        assert!(region.task_ring(0).write_frame(&[b"left over"]));
        region.reset_slots();
        region.add_counts(&[3, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(region.counts(), [4, 1, 0, 0, 0, 0, 0, 2, 1, 0]);
        assert!(!region.task_ring(0).has_frame());
        assert_eq!(region.slot(0).state.load(Ordering::SeqCst), SLOT_RECLAIMED);
    }

    #[test]
    fn the_cancel_box_holds_what_was_posted_until_taken_and_refuses_when_full() {
        let region = Region::new(layout()).expect("region");
        assert!(region.take_cancels(0).is_empty());
        assert!(region.post_cancel(0, 7, 0));
        assert!(region.post_cancel(0, 9, 3));
        assert!(region.take_cancels(1).is_empty(), "boxes are per slot");
        assert_eq!(region.take_cancels(0), [(7, 0), (9, 3)]);
        assert!(region.take_cancels(0).is_empty());
        for at in 0..CANCEL_BOX {
            assert!(region.post_cancel(0, 1, at as u32));
        }
        assert!(!region.post_cancel(0, 1, 99), "a full box says so");
        region.mark_starting(0);
        assert!(
            region.take_cancels(0).is_empty(),
            "a new actor starts empty"
        );
    }

    #[test]
    fn events_signal_and_drain() {
        let region = Region::new(layout()).expect("region");
        assert!(!drain_event(region.results_event()));
        signal_event(region.results_event());
        signal_event(region.results_event());
        assert!(drain_event(region.results_event()));
        assert!(!drain_event(region.results_event()));
    }
}
