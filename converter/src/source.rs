//! Random-access sources an image is read from.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positioned reads from something of known size: a file now, HTTP `Range`
/// reads from a URL or a registry blob later.
pub trait ReadAt: Send + Sync {
    /// Fills `buffer` from `offset`; an error if the source ends first.
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()>;
    /// Size of the source in bytes.
    fn size(&self) -> u64;
}

impl<S: ReadAt + ?Sized> ReadAt for Box<S> {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buffer, offset)
    }

    fn size(&self) -> u64 {
        (**self).size()
    }
}

/// A local file (or block device) as a [`ReadAt`].
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Wraps an open file; its size is read once.
    pub fn new(file: File) -> io::Result<Self> {
        let mut size = file.metadata()?.len();
        if size == 0 {
            // Block devices report 0 in their metadata: seek to the end.
            use std::io::Seek;
            size = (&file).seek(io::SeekFrom::End(0))?;
            (&file).seek(io::SeekFrom::Start(0))?;
        }
        Ok(FileSource { file, size })
    }

    /// The file, to read it as a stream from its current position.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl ReadAt for FileSource {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buffer, offset)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let end = start
            .checked_add(buffer.len())
            .filter(|end| *end <= self.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buffer.copy_from_slice(&self[start..end]);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.len() as u64
    }
}

/// What is known of an unpacked stream without keeping it: its first bytes,
/// its last bytes and its length. Reads elsewhere fail.
pub struct StreamSummary {
    /// The first bytes.
    pub head: Vec<u8>,
    /// The last bytes.
    pub tail: Vec<u8>,
    /// Total length.
    pub size: u64,
}

impl ReadAt for StreamSummary {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buffer.len() as u64);
        if end <= self.head.len() as u64 {
            buffer.copy_from_slice(&self.head[offset as usize..end as usize]);
            return Ok(());
        }
        let tail_start = self.size - self.tail.len() as u64;
        if offset >= tail_start && end <= self.size {
            let at = (offset - tail_start) as usize;
            buffer.copy_from_slice(&self.tail[at..at + buffer.len()]);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("offset {offset:#x} of a compressed image is past the part read for inspection"),
        ))
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// Reads a [`ReadAt`] front to back, for the decoders of wrapped images.
pub struct SequentialReader<'a> {
    source: &'a dyn ReadAt,
    offset: u64,
}

impl<'a> SequentialReader<'a> {
    /// Starts at offset 0.
    pub fn new(source: &'a dyn ReadAt) -> Self {
        SequentialReader { source, offset: 0 }
    }
}

impl io::Read for SequentialReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let left = self.source.size().saturating_sub(self.offset);
        let length = (buffer.len() as u64).min(left).min(4 << 20) as usize;
        if length == 0 {
            return Ok(0);
        }
        self.source.read_exact_at(&mut buffer[..length], self.offset)?;
        self.offset += length as u64;
        Ok(length)
    }
}

/// A window of another source: `size` bytes from `start` (a file inside
/// an uncompressed tar layer, say).
pub struct SubRange<S> {
    inner: S,
    start: u64,
    size: u64,
}

impl<S: ReadAt> SubRange<S> {
    /// The window; an error if it reaches past the end of `inner`.
    pub fn new(inner: S, start: u64, size: u64) -> io::Result<Self> {
        if start.checked_add(size).is_none_or(|end| end > inner.size()) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("a window of {size} bytes at {start} reaches past the end ({} bytes)", inner.size()),
            ));
        }
        Ok(SubRange { inner, start, size })
    }
}

impl<S: ReadAt> ReadAt for SubRange<S> {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(buffer.len() as u64) > self.size {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        self.inner.read_exact_at(buffer, self.start + offset)
    }

    fn size(&self) -> u64 {
        self.size
    }
}
