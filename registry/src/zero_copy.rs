//! Blob downloads sent from the page cache to the socket with `sendfile(2)`.
//!
//! A blob download otherwise costs two copies of every byte on the
//! registry's cores: the file read into memory, and that memory into the
//! socket. With 64 nodes pulling one image at once those copies are most
//! of what the registry does. `sendfile` hands the file's pages to the
//! socket without either.
//!
//! hyper writes response bodies from memory only, so a body that should go
//! out by `sendfile` is made of *placeholder* chunks: slices of one static
//! region that no other code points into. The connection's socket wrapper,
//! [`ZeroCopyStream`], recognises a write of placeholder bytes by address
//! and sends that many bytes of the next queued file segment instead; the
//! body queued the segment (file, offset, length) when it yielded the
//! placeholder, and hyper writes body chunks in the order they came, so
//! the two stay in step. Placeholder bytes with no segment queued (the two
//! out of step) end the connection with an error.
//!
//! This holds only where hyper passes body chunks to the socket as they
//! are: HTTP/1 over plain TCP with vectored writes (hyper's queue strategy;
//! its flatten strategy copies chunks and is never used here). A copied
//! chunk would go out as the placeholder's zeros without this wrapper
//! noticing; the end-to-end test that compares downloaded bytes is what
//! catches a hyper that starts copying. TLS and HTTP/2 connections stream
//! blobs through the storage driver's `read` instead.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::lock;

/// Largest placeholder chunk: one segment of a file per body chunk.
const SEGMENT: usize = 1 << 20;
/// The segment while many downloads run at once. A download's turn on a
/// runtime thread ends when the body yields, after `api::TURN_BYTES`
/// (512 KiB) or after one chunk if that is larger: at 1 MiB segments a
/// turn is one 1 MiB `sendfile`. With 64 downloads at 1 MiB a turn, a
/// manifest GET waited for rounds of ~16 ms (`bench/load.sh`: p99 44-59 ms
/// during a pull herd), at 512 KiB turns 26-32 ms. A lone download goes
/// faster in larger turns (2.46-2.79 against 2.41-2.46 GB/s, one curl on
/// loopback). Smaller sends also keep BBR's pacing rate up (see
/// [`whole_tcp_segments`]): 64-client herd on loopback with `TCP_NODELAY`,
/// segments of 1, 2, 3 and 4 maximum TCP segments (65483 bytes there):
/// 6417, 6014-6101, 4909, 5179 MB/s.
const BUSY_SEGMENT: usize = 128 << 10;

/// `size` rounded down to whole TCP segments of `mss` bytes; `size` itself
/// when it is less than one segment or the MSS is unknown (0).
///
/// A `sendfile` of a length that is not a multiple of the connection's
/// maximum segment size ends in a runt segment of the remainder (with
/// `TCP_NODELAY` sent at once, without it held back by Nagle until an
/// acknowledgement). BBR measures the bandwidth it paces at from what each
/// acknowledgement delivered, and a stream of runts keeps that low: every
/// later full segment then waits for a pacing timer of its own, which in a
/// VM costs a timer reprogram each. 64-client herd on loopback (MSS 65483),
/// 256 KiB segments: 3860 MB/s, pacing rates around 36 Gbit/s per
/// connection (median), `tcp_write_xmit` arming timers 16% of all CPU;
/// four whole segments (261932 bytes): 4356 MB/s; with `TCP_NODELAY` as
/// well 5179 MB/s at 86 Gbit/s; two whole segments with `TCP_NODELAY` (what
/// is built): 5942-6093 MB/s at 94 Gbit/s, 0.165 s of registry CPU per GiB
/// against 0.31-0.35 before.
fn whole_tcp_segments(size: usize, mss: usize) -> usize {
    if mss == 0 || mss > size {
        return size;
    }
    size / mss * mss
}

/// The connection's maximum TCP segment size, or 0 when the socket does
/// not say.
fn maximum_segment_size(stream: &TcpStream) -> usize {
    let mut mss: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an integer option read into a local of the size given; the
    // socket is open while `stream` lives.
    let outcome = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut mss as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    if outcome == 0 { usize::try_from(mss).unwrap_or(0) } else { 0 }
}

/// File bodies sending at once above which segments are [`BUSY_SEGMENT`].
const BUSY_DOWNLOADS: usize = 8;

/// File bodies being sent now, in all connections.
static SENDING: AtomicUsize = AtomicUsize::new(0);

/// How much of a file is brought into the page cache ahead, on a blocking
/// thread, so that `sendfile` on a runtime thread seldom waits for a disk.
const READ_AHEAD: u64 = 8 << 20;

/// The placeholder region. Never written and never read: only its
/// addresses matter, and its pages are never touched.
static PLACEHOLDER: [u8; SEGMENT] = [0; SEGMENT];

fn is_placeholder(bytes: &[u8]) -> bool {
    let start = PLACEHOLDER.as_ptr() as usize;
    let address = bytes.as_ptr() as usize;
    !bytes.is_empty() && address >= start && address < start + SEGMENT
}

/// A part of a file that placeholder bytes stand for.
struct Segment {
    file: Arc<File>,
    offset: u64,
    remaining: usize,
}

type Segments = Arc<Mutex<VecDeque<Segment>>>;

/// A connection's way to send files: handed to request handlers as a
/// request extension by connections that can take it.
#[derive(Clone)]
pub struct ZeroCopy {
    segments: Segments,
    /// The socket's maximum segment size as of its last `sendfile` (0:
    /// unknown); file segments are whole multiples of it. It grows early in
    /// a connection (the kernel keeps it under half the largest window the
    /// peer has offered), so the socket wrapper reads it again after every
    /// send.
    mss: Arc<AtomicUsize>,
}

impl ZeroCopy {
    /// A handle and the socket wrapper that honours it.
    pub fn connection(stream: TcpStream) -> (ZeroCopy, ZeroCopyStream) {
        let zero_copy = ZeroCopy {
            segments: Segments::default(),
            mss: Arc::new(AtomicUsize::new(maximum_segment_size(&stream))),
        };
        let stream = ZeroCopyStream {
            stream,
            segments: zero_copy.segments.clone(),
            mss: zero_copy.mss.clone(),
        };
        (zero_copy, stream)
    }

    /// A response body of `length` bytes of `file` from `offset`, sent by
    /// this connection's socket straight from the page cache.
    pub fn body(&self, file: File, offset: u64, length: u64) -> FileBody {
        SENDING.fetch_add(1, Ordering::Relaxed);
        FileBody {
            segments: self.segments.clone(),
            file: Arc::new(file),
            offset,
            end: offset.saturating_add(length),
            read_ahead_until: offset,
            reading_ahead: None,
            mss: self.mss.clone(),
        }
    }
}

type ReadingAhead = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// The body [`ZeroCopy::body`] makes: placeholder chunks, each with its
/// file segment queued.
pub struct FileBody {
    segments: Segments,
    file: Arc<File>,
    offset: u64,
    end: u64,
    read_ahead_until: u64,
    reading_ahead: Option<ReadingAhead>,
    mss: Arc<AtomicUsize>,
}

impl futures::Stream for FileBody {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let body = &mut *self;
        if body.offset >= body.end {
            return Poll::Ready(None);
        }
        if body.offset >= body.read_ahead_until && body.reading_ahead.is_none() {
            let until = body.end.min(body.offset.saturating_add(READ_AHEAD));
            if !is_cached(&body.file, body.offset) || !is_cached(&body.file, until - 1) {
                body.reading_ahead = Some(read_ahead(body.file.clone(), body.offset, until - body.offset));
            }
            body.read_ahead_until = until;
        }
        if let Some(reading) = &mut body.reading_ahead {
            let outcome = ready!(reading.as_mut().poll(context));
            body.reading_ahead = None;
            if let Err(error) = outcome {
                body.offset = body.end;
                return Poll::Ready(Some(Err(error)));
            }
        }
        let segment = if SENDING.load(Ordering::Relaxed) > BUSY_DOWNLOADS { BUSY_SEGMENT } else { SEGMENT };
        let segment = whole_tcp_segments(segment, body.mss.load(Ordering::Relaxed));
        let length = (body.end - body.offset).min(segment as u64) as usize;
        lock(&body.segments).push_back(Segment {
            file: body.file.clone(),
            offset: body.offset,
            remaining: length,
        });
        body.offset += length as u64;
        Poll::Ready(Some(Ok(Bytes::from_static(&PLACEHOLDER[..length]))))
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        SENDING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the byte of `file` at `offset` is in the page cache: a
/// one-byte read that may not wait for a disk (`RWF_NOWAIT`). On a miss
/// the kernel may start reading that page ahead; it does not wait for it.
/// A file system without `RWF_NOWAIT` answers "not cached" every time,
/// which only costs a warm-up per window.
fn is_cached(file: &File, offset: u64) -> bool {
    let mut byte = 0u8;
    let slice = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    // SAFETY: the iovec points at a live local byte; the descriptor is
    // open while `file` lives.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &slice, 1, offset as libc::off64_t, libc::RWF_NOWAIT) };
    read == 1
}

/// `/dev/null`, opened once: where [`read_ahead`] sends what it reads.
fn dev_null() -> Option<&'static File> {
    static DEV_NULL: std::sync::OnceLock<Option<File>> = std::sync::OnceLock::new();
    DEV_NULL
        .get_or_init(|| std::fs::OpenOptions::new().write(true).open("/dev/null").ok())
        .as_ref()
}

/// Brings a range of `file` into the page cache on a blocking thread.
///
/// It reads the range the way `sendfile` to a socket will, by splicing it
/// to `/dev/null` (which takes page references and copies nothing), so the
/// kernel's ordinary sequential read-ahead fills the cache, in large
/// folios where the file system has them. `readahead(2)`, used before,
/// fills it one 4 KiB page at a time (`force_page_cache_ra`), and every
/// later `sendfile` of those pages paid for that: in a 64-client herd
/// `filemap_get_read_batch` took 7.6% of all CPU, against 0.6% from pages
/// the ordinary read-ahead brought in.
fn read_ahead(file: Arc<File>, offset: u64, length: u64) -> ReadingAhead {
    Box::pin(async move {
        let reading = tokio::task::spawn_blocking(move || {
            // Results are not looked at: a failing read is reported by the
            // `sendfile` to the socket itself, and without `/dev/null`
            // that `sendfile` reads the file alone.
            let Some(null) = dev_null() else { return };
            let mut at = offset as libc::off64_t;
            let end = offset.saturating_add(length) as libc::off64_t;
            while at < end {
                // SAFETY: both descriptors are open for the call (`null` is
                // static, `file` lives in this closure), and `at` is a
                // valid pointer to a local.
                let sent = unsafe { libc::sendfile64(null.as_raw_fd(), file.as_raw_fd(), &mut at, (end - at) as usize) };
                if sent <= 0 {
                    break;
                }
            }
        });
        reading.await.map_err(|error| io::Error::other(error.to_string()))
    })
}

/// A TCP connection whose writes of placeholder bytes send file segments.
pub struct ZeroCopyStream {
    stream: TcpStream,
    segments: Segments,
    mss: Arc<AtomicUsize>,
}

impl ZeroCopyStream {
    /// Sends up to `most` bytes of the next queued segment.
    fn poll_send_file(&mut self, context: &mut Context<'_>, most: usize) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(context))?;
            let segments = &self.segments;
            let socket = self.stream.as_raw_fd();
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                let mut queue = lock(segments);
                let Some(segment) = queue.front_mut() else {
                    return Err(io::Error::other("a blob chunk reached the socket without its file segment"));
                };
                let want = most.min(segment.remaining);
                let mut offset = segment.offset as libc::off64_t;
                // SAFETY: both descriptors are open for the duration of the
                // call (the socket by `self.stream`, the file by `segment`),
                // and `offset` is a valid pointer to a local.
                let sent = unsafe { libc::sendfile64(socket, segment.file.as_raw_fd(), &mut offset, want) };
                if sent < 0 {
                    return Err(io::Error::last_os_error());
                }
                let sent = sent as usize;
                if sent == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the blob's file is shorter than its size"));
                }
                segment.offset += sent as u64;
                segment.remaining -= sent;
                if segment.remaining == 0 {
                    queue.pop_front();
                }
                Ok(sent)
            });
            match sent {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(sent) => {
                    self.mss.store(maximum_segment_size(&self.stream), Ordering::Relaxed);
                    return Poll::Ready(Ok(sent));
                }
                other => return Poll::Ready(other),
            }
        }
    }
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(mut self: Pin<&mut Self>, context: &mut Context<'_>, buffer: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(mut self: Pin<&mut Self>, context: &mut Context<'_>, buffer: &[u8]) -> Poll<io::Result<usize>> {
        if is_placeholder(buffer) {
            return self.poll_send_file(context, buffer.len());
        }
        Pin::new(&mut self.stream).poll_write(context, buffer)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, context: &mut Context<'_>, buffers: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let Some(first) = buffers.iter().position(|buffer| !buffer.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if is_placeholder(&buffers[first]) {
            return self.poll_send_file(context, buffers[first].len());
        }
        // Memory up to the first placeholder goes out as it is.
        let until = buffers[first..]
            .iter()
            .position(|buffer| is_placeholder(buffer))
            .map_or(buffers.len(), |index| first + index);
        Pin::new(&mut self.stream).poll_write_vectored(context, &buffers[first..until])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn connected() -> (ZeroCopy, ZeroCopyStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (zero_copy, stream) = ZeroCopy::connection(server);
        (zero_copy, stream, client)
    }

    fn file_with(data: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, data).unwrap();
        file
    }

    #[tokio::test]
    async fn placeholder_chunks_and_memory_go_out_in_order() {
        let data: Vec<u8> = (0..(3 * SEGMENT + 777) as u32).map(|index| (index % 249) as u8).collect();
        let (zero_copy, mut stream, mut client) = connected().await;
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.unwrap();
            received
        });
        let mut body = zero_copy.body(file_with(&data), 1000, (2 * SEGMENT + 5) as u64);
        let mut chunks = Vec::new();
        while let Some(chunk) = body.next().await {
            chunks.push(chunk.unwrap());
        }
        assert!(chunks.len() >= 3, "the body is cut into segments");
        assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), 2 * SEGMENT + 5);
        assert!(chunks.iter().all(|chunk| is_placeholder(chunk)));
        let head = Bytes::from_static(b"HEAD\r\n");
        // One vectored write of memory and placeholders, as hyper makes.
        let mut pending: VecDeque<Bytes> = std::iter::once(head.clone()).chain(chunks).chain([Bytes::from_static(b"TAIL")]).collect();
        while !pending.is_empty() {
            let slices: Vec<IoSlice<'_>> = pending.iter().map(|chunk| IoSlice::new(chunk)).collect();
            let mut written = std::future::poll_fn(|context| Pin::new(&mut stream).poll_write_vectored(context, &slices)).await.unwrap();
            drop(slices);
            while written > 0 {
                let Some(front) = pending.front_mut() else { break };
                let step = written.min(front.len());
                let _ = front.split_to(step);
                written -= step;
                if front.is_empty() {
                    pending.pop_front();
                }
            }
        }
        stream.shutdown().await.unwrap();
        drop(stream);
        let received = reader.await.unwrap();
        let mut expected = head.to_vec();
        expected.extend_from_slice(&data[1000..1000 + 2 * SEGMENT + 5]);
        expected.extend_from_slice(b"TAIL");
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "the socket carried the file's bytes, not the placeholder's");
    }

    #[tokio::test]
    async fn segments_shrink_while_many_downloads_are_sent() {
        let (zero_copy, _stream, _client) = connected().await;
        // What the socket wrapper learns after a send once the window has
        // grown (loopback's MSS is 65483): neither size divides by it.
        let mss = 65483;
        zero_copy.mss.store(mss, Ordering::Relaxed);
        let data = vec![7u8; 2 * SEGMENT];
        let others: Vec<FileBody> = (0..BUSY_DOWNLOADS).map(|_| zero_copy.body(file_with(b""), 0, 0)).collect();
        let mut body = zero_copy.body(file_with(&data), 0, data.len() as u64);
        assert_eq!(body.next().await.unwrap().unwrap().len(), BUSY_SEGMENT / mss * mss);
        drop(others);
        assert_eq!(body.next().await.unwrap().unwrap().len(), SEGMENT / mss * mss);
    }

    #[tokio::test]
    async fn segments_follow_the_maximum_segment_size_as_it_grows() {
        let (zero_copy, mut stream, mut client) = connected().await;
        let at_start = zero_copy.mss.load(Ordering::Relaxed);
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.unwrap();
            received.len()
        });
        let data = vec![5u8; 4 * SEGMENT];
        let mut body = zero_copy.body(file_with(&data), 0, data.len() as u64);
        while let Some(chunk) = body.next().await {
            stream.write_all(&chunk.unwrap()).await.unwrap();
        }
        let now = maximum_segment_size(&stream.stream);
        assert_eq!(zero_copy.mss.load(Ordering::Relaxed), now);
        // The kernel keeps the MSS under half the peer's largest window,
        // which grows as the client reads (32768 -> 65483 on loopback).
        assert!(now > at_start, "MSS {at_start} at the start, {now} after 4 MiB");
        stream.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), data.len());
    }

    #[test]
    fn segments_are_whole_tcp_segments() {
        assert_eq!(whole_tcp_segments(128 << 10, 65483), 130966);
        assert_eq!(whole_tcp_segments(1 << 20, 1448), 724 * 1448);
        assert_eq!(whole_tcp_segments(128 << 10, 0), 128 << 10);
        assert_eq!(whole_tcp_segments(1000, 1448), 1000);
    }

    #[tokio::test]
    async fn placeholder_bytes_without_a_segment_are_refused() {
        let (_zero_copy, mut stream, _client) = connected().await;
        let error = stream.write(&PLACEHOLDER[..10]).await.unwrap_err();
        assert!(error.to_string().contains("without its file segment"), "{error}");
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_size_ends_the_connection() {
        let (zero_copy, mut stream, _client) = connected().await;
        let mut body = zero_copy.body(file_with(b"short"), 0, 100);
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(stream.write(&chunk).await.unwrap(), 5);
        let error = stream.write(&chunk[5..]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Pages of `file` in the page cache, counted with `mincore(2)` on a
    /// mapping of it, which (unlike a read) brings nothing in.
    fn cached_pages(file: &File, length: usize) -> usize {
        // SAFETY: a fresh shared read-only mapping of an open file, looked
        // at with mincore only and unmapped before returning.
        unsafe {
            let mapping = libc::mmap(std::ptr::null_mut(), length, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(mapping, libc::MAP_FAILED);
            let pages = length.div_ceil(4096);
            let mut resident = vec![0u8; pages];
            assert_eq!(libc::mincore(mapping, length, resident.as_mut_ptr()), 0);
            libc::munmap(mapping, length);
            resident.iter().filter(|page| *page & 1 == 1).count()
        }
    }

    #[tokio::test]
    async fn reading_ahead_brings_an_uncached_range_into_the_page_cache() {
        const LENGTH: usize = 4 << 20;
        // Beside the sources rather than in a temporary folder, which may be
        // a tmpfs whose pages cannot leave the cache.
        let mut file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        std::io::Write::write_all(&mut file, &vec![7u8; LENGTH]).unwrap();
        file.sync_all().unwrap();
        // SAFETY: advice on an open descriptor.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        assert_eq!(cached_pages(&file, LENGTH), 0, "the test file could not be dropped from the page cache");

        read_ahead(Arc::new(file.try_clone().unwrap()), 0, LENGTH as u64).await.unwrap();
        assert_eq!(cached_pages(&file, LENGTH), LENGTH / 4096);
        assert!(is_cached(&file, 0) && is_cached(&file, LENGTH as u64 - 1));
    }
}
