//! Copies of contiguous data runs (read from the source, written at their
//! guest offset) on several threads, so that reads, page-cache copies and
//! writeback stalls of one run overlap with the others, as `qemu-img
//! convert` keeps several requests in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use crate::aligned::PageAlignedBuffer;
use crate::output::RawOutput;
use crate::source::ReadAt;
use crate::ConverterError;

/// Threads copying runs; each holds one run buffer.
const COPY_THREADS: usize = 4;

/// A run of guest bytes stored contiguously on the host.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    /// Offset in the guest disk (and the raw output).
    pub guest: u64,
    /// Offset in the source.
    pub host: u64,
    /// Bytes in the run, at most the copier's run size.
    pub length: u64,
}

/// Hands runs to the copying threads; see [`copy_runs`].
pub(crate) struct RunQueue<'a> {
    sender: SyncSender<Run>,
    shared: &'a Shared,
}

struct Shared {
    /// One run written at a time: copying threads writing one file contend
    /// for its inode lock, on which the kernel spins (a third of the CPU of
    /// a plain conversion with four writers on tmpfs); waiting here sleeps.
    /// (Decompressing threads write without it: their writes are small
    /// beside their work, and the lock made a zlib conversion 20-40% slower.)
    writing: Mutex<()>,
    failed: AtomicBool,
    first_error: Mutex<Option<ConverterError>>,
}

impl Shared {
    fn fail(&self, error: ConverterError) {
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        first.get_or_insert(error);
        self.failed.store(true, Ordering::Release);
    }

    fn take_error(&self) -> Option<ConverterError> {
        self.first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl RunQueue<'_> {
    /// Queues a run (waiting while every thread is busy and the queue is
    /// full); an error once any copy failed, so that the caller stops early.
    pub fn push(&self, run: Run) -> Result<(), ConverterError> {
        if self.shared.failed.load(Ordering::Acquire) || self.sender.send(run).is_err() {
            return Err(self.shared.take_error().unwrap_or_else(copier_gone));
        }
        Ok(())
    }
}

fn copier_gone() -> ConverterError {
    ConverterError::Read(std::io::Error::other("the copying threads stopped"))
}

/// Runs `produce` with a queue whose runs (each at most `max_run` bytes) are
/// copied from `source` to `output` on [`COPY_THREADS`] threads. Returns once
/// every queued run is written, with the first error of either side.
pub(crate) fn copy_runs<T>(
    source: &dyn ReadAt,
    output: &RawOutput,
    output_error: impl Fn(std::io::Error) -> ConverterError + Copy + Send + Sync,
    max_run: u64,
    produce: impl FnOnce(&RunQueue<'_>) -> Result<T, ConverterError>,
) -> Result<T, ConverterError> {
    let shared = Shared {
        writing: Mutex::new(()),
        failed: AtomicBool::new(false),
        first_error: Mutex::new(None),
    };
    let (sender, receiver) = sync_channel::<Run>(COPY_THREADS);
    let receiver = Mutex::new(receiver);
    let (receiver, shared) = (&receiver, &shared);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..COPY_THREADS)
            .map(|_| {
                scope.spawn(move || {
                    copy_worker(source, output, output_error, max_run, receiver, shared)
                })
            })
            .collect();
        let produced = produce(&RunQueue { sender, shared });
        // The queue (and with it the sender) is gone: the workers drain what
        // is queued and stop.
        for worker in workers {
            if worker.join().is_err() {
                shared.fail(ConverterError::Read(std::io::Error::other(
                    "a copying thread panicked",
                )));
            }
        }
        match (produced, shared.take_error()) {
            (_, Some(error)) => Err(error),
            (produced, None) => produced,
        }
    })
}

fn copy_worker(
    source: &dyn ReadAt,
    output: &RawOutput,
    output_error: impl Fn(std::io::Error) -> ConverterError + Copy,
    max_run: u64,
    receiver: &Mutex<Receiver<Run>>,
    shared: &Shared,
) {
    let mut buffer = PageAlignedBuffer::new(max_run as usize);
    loop {
        let next = receiver
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .recv();
        let Ok(run) = next else { return };
        if shared.failed.load(Ordering::Acquire) {
            continue; // drain, so that the producer never waits on a full queue
        }
        let Some(data) = usize::try_from(run.length)
            .ok()
            .and_then(|length| buffer.as_mut().get_mut(..length))
        else {
            shared.fail(ConverterError::Read(std::io::Error::other(format!(
                "a run of {} bytes is larger than the copy buffer",
                run.length
            ))));
            continue;
        };
        let copied = source
            .read_exact_at(data, run.host)
            .map_err(ConverterError::Read)
            .and_then(|()| {
                let _writing = shared
                    .writing
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                output.write_data(run.guest, data).map_err(output_error)
            });
        if let Err(error) = copied {
            shared.fail(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_land_at_their_guest_offsets_in_any_order() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("out.raw");
        let source: Vec<u8> = (0..64u32 * 1024)
            .map(|index| (index % 251) as u8 + 1)
            .collect();
        let output = RawOutput::create(&path, Some(source.len() as u64)).unwrap();
        let error = |error| ConverterError::Output("out".into(), error);
        copy_runs(&source, &output, error, 4096, |queue| {
            for index in (0..16u64).rev() {
                queue.push(Run {
                    guest: index * 4096,
                    host: index * 4096,
                    length: 4096,
                })?;
            }
            Ok(())
        })
        .unwrap();
        output.finish(None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), source);
    }

    #[test]
    fn a_failed_read_stops_the_producer_and_is_returned() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("out.raw");
        let source = vec![7u8; 8192];
        let output = RawOutput::create(&path, Some(1 << 20)).unwrap();
        let error = |error| ConverterError::Output("out".into(), error);
        let mut pushed = 0;
        let result = copy_runs(&source, &output, error, 4096, |queue| {
            // Runs past the end of the source fail to read; the queue must
            // refuse further runs once a failure is seen.
            for index in 0..256u64 {
                queue.push(Run {
                    guest: index * 4096,
                    host: 16384 + index * 4096,
                    length: 4096,
                })?;
                pushed += 1;
            }
            Ok(())
        });
        assert!(matches!(result, Err(ConverterError::Read(_))), "{result:?}");
        assert!(
            pushed < 256,
            "the producer was not stopped: {pushed} runs queued"
        );
    }
}
