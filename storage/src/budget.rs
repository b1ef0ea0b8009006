//! A memory budget shared by many streams: a chunk holds its share of the
//! budget until its last clone is dropped, so what all streams together
//! keep in memory stays bounded however many there are. And a pool of
//! fixed-size buffers that come back once their last chunk is dropped.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes that streams may hold in memory together.
#[derive(Clone)]
pub struct MemoryBudget {
    room: Arc<Semaphore>,
    total: usize,
}

struct Held {
    data: Bytes,
    _share: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        MemoryBudget {
            room: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    fn share_of(&self, length: usize) -> u32 {
        u32::try_from(length.min(self.total)).unwrap_or(u32::MAX)
    }

    fn tie(chunk: Bytes, share: Option<OwnedSemaphorePermit>) -> Bytes {
        match share {
            Some(share) => Bytes::from_owner(Held { data: chunk, _share: share }),
            // Only a closed semaphore gives no permit, and this one is never
            // closed; the chunk then goes unbudgeted.
            None => chunk,
        }
    }

    /// Waits until the budget has room for `chunk`, and ties the room to it.
    pub async fn hold(&self, chunk: Bytes) -> Bytes {
        let share = self.room.clone().acquire_many_owned(self.share_of(chunk.len())).await.ok();
        Self::tie(chunk, share)
    }

    /// Waits for room for `length` bytes on a thread outside the async
    /// runtime; `fill` then makes the chunk that holds it.
    pub fn hold_blocking<E>(&self, length: usize, fill: impl FnOnce() -> Result<Bytes, E>) -> Result<Bytes, E> {
        let share = futures::executor::block_on(self.room.clone().acquire_many_owned(self.share_of(length))).ok();
        fill().map(|chunk| Self::tie(chunk, share))
    }

    /// Bytes of room left.
    pub fn available(&self) -> usize {
        self.room.available_permits()
    }
}

/// Buffers of one size, handed out again once the last chunk made from one
/// is dropped. Streams that gather data into large chunks would otherwise
/// allocate a fresh buffer per chunk; above glibc's mmap threshold that is
/// a new mapping the kernel zeroes and faults in page by page.
pub struct BufferPool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Memory>>,
}

impl BufferPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` idle ones.
    pub fn new(size: usize, keep: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            size,
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    /// The size of this pool's buffers.
    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// An empty buffer; it takes its memory from the pool when first filled.
    pub fn take(self: &Arc<Self>) -> PooledBuffer {
        PooledBuffer {
            memory: None,
            length: 0,
            pool: self.clone(),
        }
    }

    fn memory(&self) -> Memory {
        let recycled = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        recycled.unwrap_or_else(|| Memory::new(self.size))
    }

    fn give_back(&self, memory: Memory) {
        let mut free = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if free.len() < self.keep {
            free.push(memory);
        }
    }

    /// Idle buffers kept.
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// Pooled buffers start on a page boundary: the kernel copies file data
/// into a misaligned buffer several times slower (measured here: `pread` of
/// a tmpfs file, 2.2 GB/s into memory 16 bytes past a page boundary, where
/// `malloc` puts large blocks, against 8-9 GB/s page-aligned), and direct
/// writes need it.
const PAGE: usize = 4096;

/// A transparent huge page on x86-64 and on arm64 with 4 KiB pages.
const HUGE_PAGE: usize = 2 << 20;

/// A buffer's memory: an anonymous mapping of its own, so it starts on a
/// page and reads as zeros until written. Buffers of whole huge pages start
/// on a huge page and ask the kernel to back them with huge pages
/// (`MADV_HUGEPAGE`, which matters where transparent huge pages are in
/// `madvise` mode): a direct write from 4 KiB pages reaches the disk as
/// ~0.6-1 MiB requests (a request holds at most `max_segments` pieces of
/// physically contiguous memory, 254 on this VM's virtio disk), from 2 MiB
/// pages as whole 4 MiB ones. Measured with one writer of 4 MiB
/// `O_DIRECT` writes here: 1517-1569 MB/s from 4 KiB pages, 2077-2206 MB/s
/// from huge pages.
struct Memory {
    start: std::ptr::NonNull<u8>,
    length: usize,
    /// The whole mapping, which `start` lies in.
    mapping: (std::ptr::NonNull<u8>, usize),
}

// The mapping is owned by this value alone, like a `Vec`'s allocation.
unsafe impl Send for Memory {}
unsafe impl Sync for Memory {}

impl Memory {
    fn new(length: usize) -> Memory {
        let length = length.max(1);
        let huge = length.is_multiple_of(HUGE_PAGE);
        // Room to move the start to a huge page boundary.
        let mapped = if huge { length + HUGE_PAGE } else { length };
        // SAFETY: a fresh private anonymous mapping, which nothing else uses.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let Some(base) = std::ptr::NonNull::new(address.cast::<u8>()).filter(|_| address != libc::MAP_FAILED) else {
            // As a `Vec` would on allocation failure.
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(length, PAGE).unwrap_or(std::alloc::Layout::new::<u8>()));
        };
        let offset = if huge { base.as_ptr().align_offset(HUGE_PAGE) } else { 0 };
        // SAFETY: `offset + length <= mapped`: the aligned start lies within
        // the mapping's first huge page.
        let start = unsafe { base.add(offset) };
        if huge {
            // SAFETY: advice on memory of this mapping; it cannot fail in a
            // way that matters (without huge pages, 4 KiB pages serve).
            unsafe { libc::madvise(start.as_ptr().cast(), length, libc::MADV_HUGEPAGE) };
        }
        Memory {
            start,
            length,
            mapping: (base, mapped),
        }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `length` mapped, readable bytes (zero until written), owned
        // by `self`.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.length) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.length) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.mapping.0.as_ptr().cast(), self.mapping.1) };
    }
}

/// A buffer from a [`BufferPool`], filled up to the pool's size.
pub struct PooledBuffer {
    memory: Option<Memory>,
    length: usize,
    pool: Arc<BufferPool>,
}

impl PooledBuffer {
    /// The memory, taken from the pool at the first use, and the room left
    /// in it (no more than the pool's size).
    fn room(&mut self) -> &mut [u8] {
        let pool = &self.pool;
        let memory = self.memory.get_or_insert_with(|| pool.memory());
        let end = pool.size.min(memory.length);
        memory.as_mut_slice().get_mut(self.length..end).unwrap_or_default()
    }

    /// Appends as much of `bytes` as fits; returns what did not.
    pub fn fill<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if bytes.is_empty() {
            return bytes;
        }
        let room = self.room();
        let (now, later) = bytes.split_at(room.len().min(bytes.len()));
        room[..now.len()].copy_from_slice(now);
        self.length += now.len();
        later
    }

    /// Reads up to `want` bytes (no more than the pool's size) from
    /// `reader` after what the buffer holds; returns how many came (fewer
    /// only at the end of `reader`, 0 there).
    pub fn read_from(&mut self, reader: &mut impl Read, want: usize) -> io::Result<usize> {
        let room = self.room();
        let want = want.min(room.len());
        let mut read = 0;
        while read < want {
            match reader.read(&mut room[read..want]) {
                Ok(0) => break,
                Ok(count) => read += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // What arrived before the error stays, as with `read_to_end`.
                    self.length += read;
                    return Err(error);
                }
            }
        }
        self.length += read;
        Ok(read)
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.length
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Whether it holds the pool's size.
    pub fn is_full(&self) -> bool {
        self.length >= self.pool.size
    }

    /// The bytes held; they start on a page boundary.
    pub fn bytes(&self) -> &[u8] {
        match &self.memory {
            Some(memory) => memory.as_slice().get(..self.length).unwrap_or_default(),
            None => &[],
        }
    }

    /// Forgets the bytes held, keeping the memory for the next fill.
    pub fn clear(&mut self) {
        self.length = 0;
    }

    /// The bytes as a chunk; the buffer goes back to the pool when the
    /// chunk's last clone is dropped. Less than a quarter of the size is
    /// copied out instead, and the buffer goes back at once: a short tail
    /// would otherwise hold a whole buffer for a few bytes.
    pub fn freeze(self) -> Bytes {
        if self.length < self.pool.size / 4 {
            return Bytes::copy_from_slice(self.bytes());
        }
        // The buffer itself owns the chunk's bytes; dropped, it goes back.
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(memory) = self.memory.take() {
            self.pool.give_back(memory);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_returns_when_the_last_clone_is_dropped() {
        let budget = MemoryBudget::new(1000);
        let held = budget.hold(Bytes::from(vec![1u8; 600])).await;
        let clone = held.clone();
        assert_eq!(budget.available(), 400);
        assert_eq!(&held[..3], &[1, 1, 1]);
        drop(held);
        assert_eq!(budget.available(), 400, "a clone still holds the room");
        drop(clone);
        assert_eq!(budget.available(), 1000);
        let big = budget.hold(Bytes::from(vec![0u8; 5000])).await;
        assert_eq!(budget.available(), 0, "a chunk larger than the budget takes all of it");
        drop(big);
        let blocking = budget
            .hold_blocking(300, || Ok::<_, ()>(Bytes::from(vec![2u8; 300])))
            .unwrap();
        assert_eq!(budget.available(), 700);
        drop(blocking);
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_budget_makes_the_next_chunk_wait() {
        let budget = MemoryBudget::new(100);
        let first = budget.hold(Bytes::from(vec![0u8; 100])).await;
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.hold(Bytes::from(vec![0u8; 10])).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the budget was full");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!(second.len(), 10);
    }

    #[test]
    fn pooled_buffers_come_back_when_their_last_chunk_is_dropped() {
        let pool = BufferPool::new(8, 2);
        let mut buffer = pool.take();
        assert_eq!(buffer.fill(b"abcde"), b"");
        assert_eq!(buffer.fill(b"fghij"), b"ij", "only what fits is taken");
        assert!(buffer.is_full());
        let address = buffer.bytes().as_ptr();
        assert_eq!(address as usize % PAGE, 0, "the data starts on a page");
        let chunk = buffer.freeze();
        assert_eq!(&chunk[..], b"abcdefgh");
        let clone = chunk.slice(2..4);
        drop(chunk);
        assert_eq!(pool.idle(), 0, "a clone still uses the buffer");
        assert_eq!(&clone[..], b"cd");
        drop(clone);
        assert_eq!(pool.idle(), 1);
        let mut again = pool.take();
        assert!(again.is_empty());
        assert_eq!(pool.idle(), 1, "memory is taken at the first fill");
        again.fill(b"x");
        assert_eq!(again.bytes().as_ptr(), address, "the same memory is handed out again");
        let tail = again.freeze();
        assert_eq!(&tail[..], b"x");
        assert_eq!(pool.idle(), 1, "a short tail is copied out and its buffer comes back at once");
        let mut taken: Vec<PooledBuffer> = (0..3).map(|_| pool.take()).collect();
        taken.iter_mut().for_each(|buffer| assert!(buffer.fill(b"abcdefgh").is_empty()));
        drop(taken);
        assert_eq!(pool.idle(), 2, "no more idle buffers than asked are kept");
    }

    /// The `VmFlags` line of the mapping of this process that holds `address`.
    fn mapping_flags(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(range, _)| range.contains('-') && !range.ends_with(':')) {
                let (low, high) = range.split_once('-').unwrap();
                inside = (usize::from_str_radix(low, 16).unwrap()..usize::from_str_radix(high, 16).unwrap()).contains(&address);
            } else if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn buffers_of_whole_huge_pages_start_on_one_and_ask_for_huge_pages() {
        let pool = BufferPool::new(4 << 20, 1);
        let mut buffer = pool.take();
        assert!(buffer.fill(&[9u8; 100]).is_empty());
        let address = buffer.bytes().as_ptr() as usize;
        assert_eq!(address % HUGE_PAGE, 0);
        assert!(mapping_flags(address).split_whitespace().any(|flag| flag == "hg"), "MADV_HUGEPAGE given");
        assert_eq!(buffer.bytes(), &[9u8; 100][..]);
        let mut small = BufferPool::new(1 << 20, 1).take();
        small.fill(b"x");
        let address = small.bytes().as_ptr() as usize;
        assert_eq!(address % PAGE, 0);
        assert!(!mapping_flags(address).split_whitespace().any(|flag| flag == "hg"), "not for smaller buffers");
    }

    #[test]
    fn pooled_buffers_read_no_more_than_asked_or_than_fits() {
        let pool = BufferPool::new(8, 2);
        let mut source: &[u8] = b"0123456789abcdef";
        let mut buffer = pool.take();
        assert_eq!(buffer.read_from(&mut source, 3).unwrap(), 3);
        assert_eq!(buffer.read_from(&mut source, 100).unwrap(), 5, "only the room left");
        assert!(buffer.is_full());
        assert_eq!(buffer.memory.as_ref().map(|memory| memory.length), Some(8), "the buffer never grows");
        assert_eq!(&buffer.freeze()[..], b"01234567");
        let mut rest = pool.take();
        assert_eq!(rest.read_from(&mut source, 8).unwrap(), 8);
        assert_eq!(rest.read_from(&mut source, 8).unwrap(), 0);
        assert_eq!(&rest.freeze()[..], b"89abcdef");
    }
}
