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
    free: Mutex<Vec<Vec<u8>>>,
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
            data: Vec::new(),
            pool: self.clone(),
        }
    }

    /// Memory for one buffer: its first [`page_start`] bytes are padding up
    /// to a page boundary, where the data begins.
    fn memory(&self) -> Vec<u8> {
        let recycled = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        recycled.unwrap_or_else(|| {
            let mut data = Vec::with_capacity(self.size + PAGE);
            let padding = page_start(&data);
            data.resize(padding, 0);
            data
        })
    }

    fn give_back(&self, mut data: Vec<u8>) {
        if data.capacity() < self.size + PAGE {
            return;
        }
        data.truncate(page_start(&data));
        let mut free = self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if free.len() < self.keep {
            free.push(data);
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
/// `malloc` puts large blocks, against 8-9 GB/s page-aligned).
const PAGE: usize = 4096;

/// Where the page-aligned data of a pool's memory begins.
fn page_start(data: &[u8]) -> usize {
    data.as_ptr().align_offset(PAGE).min(PAGE)
}

/// The data of a pool's memory, past its padding.
fn held(data: &[u8]) -> &[u8] {
    data.get(page_start(data)..).unwrap_or_default()
}

/// A buffer from a [`BufferPool`], filled up to the pool's size.
pub struct PooledBuffer {
    data: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl PooledBuffer {
    /// Appends as much of `bytes` as fits; returns what did not.
    pub fn fill<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        if self.data.capacity() == 0 && !bytes.is_empty() {
            self.data = self.pool.memory();
        }
        let room = self.pool.size.saturating_sub(self.len());
        let (now, later) = bytes.split_at(room.min(bytes.len()));
        self.data.extend_from_slice(now);
        later
    }

    /// Reads up to `want` bytes (no more than the pool's size) from
    /// `reader` after what the buffer holds, into memory that is not
    /// zeroed first; returns how many came (0 at the end of `reader`).
    pub fn read_from(&mut self, reader: &mut impl Read, want: usize) -> io::Result<usize> {
        if self.data.capacity() == 0 {
            self.data = self.pool.memory();
        }
        let want = want.min(self.pool.size.saturating_sub(self.len()));
        // `read_to_end` reads into the spare capacity without initializing
        // it; `take` keeps it from growing the buffer.
        reader.by_ref().take(want as u64).read_to_end(&mut self.data)
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    /// Whether it holds the pool's size.
    pub fn is_full(&self) -> bool {
        self.len() >= self.pool.size
    }

    /// The bytes held; they start on a page boundary.
    pub fn bytes(&self) -> &[u8] {
        held(&self.data)
    }

    /// Forgets the bytes held, keeping the memory for the next fill.
    pub fn clear(&mut self) {
        let start = page_start(&self.data);
        self.data.truncate(start);
    }

    /// The bytes as a chunk; the buffer goes back to the pool when the
    /// chunk's last clone is dropped. Less than a quarter of the size is
    /// copied out instead, and the buffer goes back at once: a short tail
    /// would otherwise hold a whole buffer for a few bytes.
    pub fn freeze(mut self) -> Bytes {
        if self.len() < self.pool.size / 4 {
            return Bytes::copy_from_slice(self.bytes());
        }
        let data = std::mem::take(&mut self.data);
        Bytes::from_owner(Recycled { data, pool: self.pool.clone() })
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if self.data.capacity() > 0 {
            self.pool.give_back(std::mem::take(&mut self.data));
        }
    }
}

struct Recycled {
    data: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        held(&self.data)
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.data));
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

    #[test]
    fn pooled_buffers_read_no_more_than_asked_or_than_fits() {
        let pool = BufferPool::new(8, 2);
        let mut source: &[u8] = b"0123456789abcdef";
        let mut buffer = pool.take();
        assert_eq!(buffer.read_from(&mut source, 3).unwrap(), 3);
        assert_eq!(buffer.read_from(&mut source, 100).unwrap(), 5, "only the room left");
        assert!(buffer.is_full());
        assert_eq!(buffer.data.capacity(), 8 + PAGE, "the buffer never grows");
        assert_eq!(&buffer.freeze()[..], b"01234567");
        let mut rest = pool.take();
        assert_eq!(rest.read_from(&mut source, 8).unwrap(), 8);
        assert_eq!(rest.read_from(&mut source, 8).unwrap(), 0);
        assert_eq!(&rest.freeze()[..], b"89abcdef");
    }
}
