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
        }
        Ok(FileSource { file, size })
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
