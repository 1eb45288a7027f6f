//! Shared-memory rings for large frames: a frame of at least [`MIN_FRAME`] bytes is copied
//! into a ring the farm and one worker both map, and the pipe carries only a small frame
//! naming where it is. That saves the kernel's two copies of every byte through the pipe,
//! its page allocations and the many small reads a large frame takes.
//!
//! Each worker has two rings, one per direction, each a shared memory file of [`RING_SIZE`]
//! bytes created by the farm and sealed at that size (memory is used only as pages are
//! touched, at most the ring's size; it stays until the worker goes). One side writes a ring, the other reads it:
//!
//! - The writer ([`Producer`]) copies a frame into a free region, in ring order, and sends
//!   its place. What it has handed out it tracks on its own side, so nothing the reader
//!   writes can steer it; the ring full, or the frame too big, the frame takes the pipe.
//! - The reader ([`Ring::take`]) turns a place into [`Bytes`] that point into the ring (no
//!   copy) and mark the region free when the last of them is dropped. The worker decodes
//!   its arguments in place (it trusts the farm); the farm copies a result out at once (it
//!   does not trust a worker not to write to a region it already handed over).
//!
//! Each region starts with a flag word (in use / free) in a header of its own cache line;
//! regions are reclaimed by the writer in order, so one held for long holds back the space
//! after it (bounded by the ring: the pipe takes over meanwhile). Places from the other side
//! are checked against the ring before use: a bad one is a protocol error, never a read out
//! of bounds. Linux only; elsewhere every frame takes the pipe.

use crate::sys::SharedMap;
use bytes::Bytes;
use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Frames at least this big go through a ring, when there is room.
pub(crate) const MIN_FRAME: usize = 64 * 1024;
/// Bytes in each ring.
pub(crate) const RING_SIZE: usize = 32 * 1024 * 1024;
/// A region's header: its flag word, alone on a cache line.
const HEADER: usize = 64;
/// Once past this point, the writer goes back to the start of the ring as soon as the
/// start is free: the part in use stays small and its pages stay warm (every page touched
/// for the first time costs a fault), while a burst may still use the whole ring.
const WARM: u64 = 8 * 1024 * 1024;

const FREE: u32 = 0;
const IN_USE: u32 = 1;

/// One ring, as mapped by either side.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    map: Arc<SharedMap>,
}

impl Ring {
    /// A new ring, for the farm to share with one worker.
    pub(crate) fn create(name: &std::ffi::CStr) -> std::io::Result<Self> {
        Ok(Ring {
            map: Arc::new(SharedMap::create(name, RING_SIZE)?),
        })
    }

    /// The ring the farm passed as descriptor `fd`.
    pub(crate) fn open(fd: OwnedFd) -> std::io::Result<Self> {
        Ok(Ring {
            map: Arc::new(SharedMap::open(fd)?),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.map.raw_fd()
    }

    /// The frame payload the other side placed at `offset`, `len` bytes; it frees the region
    /// when the last `Bytes` pointing into it is dropped.
    pub(crate) fn take(&self, offset: u64, len: u32) -> Result<Bytes, String> {
        let bad = || format!("bad shared-memory place {offset}+{len}");
        let offset = usize::try_from(offset).map_err(|_| bad())?;
        let len = len as usize;
        let data = offset.checked_add(HEADER).ok_or_else(bad)?;
        if offset % HEADER != 0 || self.map.bytes(data, len).is_none() {
            return Err(bad());
        }
        Ok(Bytes::from_owner(Region {
            map: self.map.clone(),
            offset,
            len,
        }))
    }
}

/// A region handed over by the other side; freed when dropped.
struct Region {
    map: Arc<SharedMap>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        // Checked when the region was taken.
        self.map
            .bytes(self.offset + HEADER, self.len)
            .unwrap_or_default()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Some(flag) = self.map.flag(self.offset) {
            flag.store(FREE, Ordering::Release);
        }
    }
}

/// The writing side of a ring.
#[derive(Debug)]
pub(crate) struct Producer {
    ring: Ring,
    /// Where the next region goes, counted from the start, never wrapped.
    head: u64,
    /// Regions handed out and not yet reclaimed, oldest first: (start, size).
    regions: VecDeque<(u64, u64)>,
}

impl Producer {
    pub(crate) fn new(ring: Ring) -> Self {
        Producer {
            ring,
            head: 0,
            regions: VecDeque::new(),
        }
    }

    /// Copies `payload` into the ring; its place `(offset, len)`, or `None` if the ring has
    /// no room for it now (the caller sends it through the pipe instead).
    pub(crate) fn put(&mut self, payload: &[u8]) -> Option<(u64, u32)> {
        let len = u32::try_from(payload.len()).ok()?;
        let size = self.ring.map.len() as u64;
        let need = (HEADER + payload.len()).next_multiple_of(HEADER) as u64;
        if need > size / 2 {
            return None;
        }
        self.reclaim();
        let tail = self.regions.front().map_or(self.head, |&(start, _)| start);
        let mut free = size - (self.head - tail);
        let mut at = self.head % size;
        // Back to the start when what is in use lies in one piece before `at` and the
        // start has room for as much again: the writer then cannot catch up with the
        // regions still held before they are freed.
        let tail_at = tail % size;
        let in_use = self.head - tail;
        let back_to_warm =
            at >= WARM && tail_at <= at && in_use == at - tail_at && tail_at >= in_use + need;
        if at + need > size || back_to_warm {
            // Skip to the start, leaving the rest as padding (a region nobody reads,
            // already free).
            let pad = size - at;
            if free < pad + need {
                return None;
            }
            self.ring
                .map
                .flag(at as usize)?
                .store(FREE, Ordering::Relaxed);
            self.regions.push_back((self.head, pad));
            self.head += pad;
            free -= pad;
            at = 0;
        }
        if free < need {
            return None;
        }
        let offset = at as usize;
        self.ring.map.flag(offset)?.store(IN_USE, Ordering::Relaxed);
        if !self.ring.map.write(offset + HEADER, payload) {
            return None;
        }
        // The reader sees the data once it learns the place (through the pipe, a system
        // call on each side); the fence keeps the flag and data ahead of that anyway.
        std::sync::atomic::fence(Ordering::Release);
        self.regions.push_back((self.head, need));
        self.head += need;
        Some((at, len))
    }

    /// Takes back the oldest regions the reader has freed.
    fn reclaim(&mut self) {
        let size = self.ring.map.len() as u64;
        while let Some(&(start, _)) = self.regions.front() {
            let freed = self
                .ring
                .map
                .flag((start % size) as usize)
                .is_some_and(|f| f.load(Ordering::Acquire) == FREE);
            if !freed {
                break;
            }
            self.regions.pop_front();
        }
    }
}

/// Places for calls that wait inside a worker, one flag word each, shared with the worker,
/// so the farm can take a waiting call back at once and for sure, without a round trip
/// and while the worker is busy in a handler: whoever moves a word from *waiting* first
/// wins, the farm to *withdrawn* or the worker to *started*. Each use of a place has a new
/// generation, so a late look at a place reused since sees a stranger and backs off.
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    map: Arc<SharedMap>,
}

/// How many calls of one worker may wait with a place at once.
pub(crate) const SLOTS: usize = 1024;

const WAITING: u32 = 1;
const STARTED: u32 = 2;
const WITHDRAWN: u32 = 3;

fn word(generation: u32, state: u32) -> u32 {
    (generation << 2) | state
}

impl Slots {
    pub(crate) fn create(name: &std::ffi::CStr) -> std::io::Result<Self> {
        Ok(Slots {
            map: Arc::new(SharedMap::create(name, SLOTS * 4)?),
        })
    }

    pub(crate) fn open(fd: OwnedFd) -> std::io::Result<Self> {
        let map = SharedMap::open(fd)?;
        if map.len() < SLOTS * 4 {
            return Err(std::io::Error::other("slot table too small"));
        }
        Ok(Slots { map: Arc::new(map) })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.map.raw_fd()
    }

    fn flag(&self, slot: u16) -> Option<&std::sync::atomic::AtomicU32> {
        self.map.flag(usize::from(slot) * 4)
    }

    /// The farm: place `slot`, generation `generation`, now holds a waiting call.
    pub(crate) fn arm(&self, slot: u16, generation: u32) {
        if let Some(flag) = self.flag(slot) {
            flag.store(word(generation, WAITING), Ordering::Release);
        }
    }

    fn claim(&self, slot: u16, generation: u32, to: u32) -> bool {
        self.flag(slot).is_some_and(|flag| {
            flag.compare_exchange(
                word(generation, WAITING),
                word(generation, to),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        })
    }

    /// The farm takes the call back; `false` if the worker has started it.
    pub(crate) fn withdraw(&self, slot: u16, generation: u32) -> bool {
        self.claim(slot, generation, WITHDRAWN)
    }

    /// The worker starts the call; `false` if the farm took it back.
    pub(crate) fn start(&self, slot: u16, generation: u32) -> bool {
        self.claim(slot, generation, STARTED)
    }
}

/// The farm's side of one worker's [`Slots`]: which places are free, and the generation
/// each is at.
#[derive(Debug)]
pub(crate) struct SlotAlloc {
    slots: Slots,
    free: Vec<u16>,
    generations: Vec<u32>,
}

impl SlotAlloc {
    pub(crate) fn new(slots: Slots) -> Self {
        SlotAlloc {
            slots,
            free: (0..SLOTS as u16).rev().collect(),
            generations: vec![0; SLOTS],
        }
    }

    /// A free place, armed for a new waiting call: `(slot, generation)`.
    pub(crate) fn take(&mut self) -> Option<(u16, u32)> {
        let slot = self.free.pop()?;
        let generation = self.generations.get_mut(usize::from(slot))?;
        *generation = (*generation + 1) & (u32::MAX >> 2);
        self.slots.arm(slot, *generation);
        Some((slot, *generation))
    }

    /// Gives back a place whose call started, left, or was withdrawn.
    pub(crate) fn give_back(&mut self, slot: u16) {
        self.free.push(slot);
    }

    pub(crate) fn withdraw(&self, slot: u16, generation: u32) -> bool {
        self.slots.withdraw(slot, generation)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn ring() -> (Producer, Ring) {
        let ring = Ring::create(c"workfarm-test").unwrap();
        (Producer::new(ring.clone()), ring)
    }

    #[test]
    fn frames_go_round_and_come_back_intact() {
        let (mut producer, reader) = ring();
        let mut held = VecDeque::new();
        for i in 0..200u32 {
            let payload: Vec<u8> = (0..(1 << 20) + i).map(|b| (b ^ i) as u8).collect();
            let (offset, len) = producer.put(&payload).expect("room: old regions are freed");
            let bytes = reader.take(offset, len).unwrap();
            assert_eq!(&bytes[..], &payload[..]);
            held.push_back(bytes);
            if held.len() > 8 {
                held.pop_front();
            }
        }
    }

    #[test]
    fn a_full_ring_says_so_and_recovers_when_freed() {
        let (mut producer, reader) = ring();
        let payload = vec![7u8; 4 << 20];
        let mut held = Vec::new();
        while let Some((offset, len)) = producer.put(&payload) {
            held.push(reader.take(offset, len).unwrap());
        }
        assert_eq!(held.len(), RING_SIZE / (4 << 20) - 1);
        assert!(producer.put(&payload).is_none(), "full");
        // Freed out of order: the oldest holds the space back until it goes too.
        let oldest = held.remove(0);
        held.clear();
        assert!(producer.put(&payload).is_none());
        drop(oldest);
        assert!(producer.put(&payload).is_some());
        assert!(
            producer.put(&vec![0; RING_SIZE]).is_none(),
            "over half the ring"
        );
    }

    #[test]
    fn a_ring_in_steady_use_stays_near_its_start() {
        let (mut producer, reader) = ring();
        let payload = vec![3u8; 1 << 20];
        let mut held = VecDeque::new();
        for _ in 0..100 {
            let (offset, len) = producer.put(&payload).unwrap();
            assert!(offset < WARM + (2 << 20), "at {offset}");
            held.push_back(reader.take(offset, len).unwrap());
            if held.len() > 2 {
                held.pop_front();
            }
        }
    }

    #[test]
    fn a_waiting_call_is_either_started_or_withdrawn_never_both() {
        let slots = Slots::create(c"workfarm-test-slots").unwrap();
        let worker = Slots {
            map: slots.map.clone(),
        };
        let mut alloc = SlotAlloc::new(slots);
        let (a, ga) = alloc.take().unwrap();
        assert!(worker.start(a, ga));
        assert!(!alloc.withdraw(a, ga), "too late: it started");
        alloc.give_back(a);
        let (b, gb) = alloc.take().unwrap();
        assert_eq!(b, a, "the place is reused");
        assert!(alloc.withdraw(b, gb));
        assert!(!worker.start(b, gb), "withdrawn first");
        alloc.give_back(b);
        // The place is reused while the worker has yet to look at its old call: the old
        // generation no longer matches, so the old call is not started.
        let (c, gc) = alloc.take().unwrap();
        assert_eq!(c, b);
        assert!(!worker.start(b, gb));
        assert!(worker.start(c, gc));
        assert!(!worker.start(SLOTS as u16, 1), "out of range");
    }

    #[test]
    fn bad_places_are_errors() {
        let (_, reader) = ring();
        for (offset, len) in [
            (1, 10),
            (RING_SIZE as u64, 0),
            (RING_SIZE as u64 - 64, 1),
            (0, u32::MAX),
            (u64::MAX - 63, 1),
        ] {
            assert!(reader.take(offset, len).is_err(), "{offset}+{len}");
        }
    }
}
