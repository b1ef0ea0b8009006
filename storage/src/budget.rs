//! A memory budget shared by many streams: a chunk holds its share of the
//! budget until its last clone is dropped, so what all streams together
//! keep in memory stays bounded however many there are.

use std::sync::Arc;

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
}
