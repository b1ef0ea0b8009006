//! Blocking `Read`/`Write` ends of bounded async channels, so that the
//! synchronous pipeline sits between an async download and an async upload
//! with bounded memory (a few 1 MiB chunks in flight).

use std::io::{self, Read, Write};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use dvcr_storage::budget::{BufferPool, PooledBuffer};
use tokio::sync::mpsc;

/// Chunks in flight per channel.
pub const CHANNEL_DEPTH: usize = 8;
const CHUNK: usize = 1 << 20;

/// The chunks writers fill, recycled: inside `dvcr serve` (an upload
/// session) a fresh 1 MiB allocation is a new mapping, zeroed page by page.
static CHUNKS: LazyLock<Arc<BufferPool>> = LazyLock::new(|| BufferPool::new(CHUNK, 2 * CHANNEL_DEPTH + 2));

/// Reads chunks sent by an async producer; an `Err` chunk is the
/// producer's failure.
pub struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChannelReader {
    /// Wraps the receiving end.
    pub fn new(receiver: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChannelReader {
            receiver,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => return Err(error),
                None => return Ok(0),
            }
        }
        let length = buffer.len().min(self.current.len());
        buffer[..length].copy_from_slice(&self.current.split_to(length));
        Ok(length)
    }
}

/// Sends what is written, in chunks of 1 MiB, to an async consumer.
pub struct ChannelWriter {
    sender: mpsc::Sender<io::Result<Bytes>>,
    buffer: PooledBuffer,
}

impl ChannelWriter {
    /// Wraps the sending end.
    pub fn new(sender: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChannelWriter {
            sender,
            buffer: CHUNKS.take(),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, CHUNKS.take()).freeze();
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the registry upload stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let length = data.len() - self.buffer.fill(data).len();
        if self.buffer.is_full() {
            self.send()?;
        }
        Ok(length)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Sends an HTTP response body into `sender`, ending with an `Err` item if
/// the transfer breaks.
pub async fn pump_response(mut response: reqwest::Response, sender: mpsc::Sender<io::Result<Bytes>>) {
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if sender.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(error) => {
                let message = crate::http_source::error_chain(&error);
                let _ = sender.send(Err(io::Error::other(format!("the blob transfer broke: {message}")))).await;
                return;
            }
        }
    }
}
