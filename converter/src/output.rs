//! Raw output: a sparse regular file, or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::path::Path;

/// Granularity of zero detection: all-zero blocks of this size are left as
/// holes in a regular file, as `qemu-img convert` does by default.
const ZERO_BLOCK: usize = 4096;
const ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];

/// How much is written before the kernel is asked to start writeback, so
/// that the final fsync overlaps with the conversion instead of following it.
const WRITEBACK_WINDOW: u64 = 16 << 20;

/// Alignment of writes through the `O_DIRECT` descriptor: offset, length
/// and memory (4 KiB covers every logical block size in use).
const DIRECT_ALIGNMENT: usize = 4096;

/// Where raw guest data is written.
pub struct RawOutput {
    file: File,
    /// The same regular file opened with `O_DIRECT`: whole aligned blocks
    /// go through it, straight from the copy buffer to the device, without
    /// a copy into the page cache or the page cache's own reclaim and
    /// writeback (a plain qcow2 conversion: 0.4 s of system time instead
    /// of 1.4-5.5 s). `None` where the file system refuses `O_DIRECT`.
    direct: Option<File>,
    /// A direct write was refused (`EINVAL`): the rest go buffered.
    direct_refused: AtomicBool,
    /// Holes read as zeros (a new regular file); otherwise zeros are written.
    holes_are_zero: bool,
    /// Start of the range not yet handed to writeback, and the end of what
    /// was written; writes arrive in rising guest order, give or take a
    /// batch.
    writeback: Mutex<(u64, u64)>,
}

impl RawOutput {
    /// Creates (or truncates) a regular file of `size` bytes, all holes, or
    /// opens a block device of at least `size` bytes. With no size (a stream
    /// of unknown length) the file starts empty and [`RawOutput::finish`]
    /// sets its length.
    pub fn create(path: &Path, size: Option<u64>) -> io::Result<Self> {
        let size_known = size.is_some();
        let size = size.unwrap_or(0);
        let is_block_device = std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_block_device());
        if is_block_device {
            let file = OpenOptions::new().write(true).open(path)?;
            let device_size = {
                use std::io::Seek;
                (&file).seek(io::SeekFrom::End(0))?
            };
            if size_known && device_size < size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block device {} has {device_size} bytes, the image needs {size}", path.display()),
                ));
            }
            return Ok(RawOutput {
                file,
                direct: None,
                direct_refused: AtomicBool::new(false),
                holes_are_zero: false,
                writeback: Mutex::new((0, 0)),
            });
        }
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
        };
        Ok(RawOutput {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            holes_are_zero: true,
            writeback: Mutex::new((0, 0)),
        })
    }

    /// Writes guest data at `offset`, leaving all-zero blocks as holes where
    /// holes read as zeros.
    pub fn write_data(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_data_sparse(offset, data)?;
        self.note_written(offset + data.len() as u64);
        Ok(())
    }

    fn note_written(&self, end: u64) {
        let mut range = self.writeback.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        range.1 = range.1.max(end);
        if range.1 - range.0 >= WRITEBACK_WINDOW {
            // SAFETY: sync_file_range reads only its integer arguments; the
            // descriptor lives as long as `self.file`. A hint: errors show
            // up at the final fsync.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    range.0 as libc::off64_t,
                    (range.1 - range.0) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            range.0 = range.1;
        }
    }

    fn write_data_sparse(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if !self.holes_are_zero {
            return self.file.write_all_at(data, offset);
        }
        let mut run_start: Option<usize> = None;
        let mut position = 0;
        let write = |bytes: &[u8], at: u64| self.write_at(bytes, at);
        while position < data.len() {
            let end = (position + ZERO_BLOCK).min(data.len());
            let zero = data[position..end].iter().all(|byte| *byte == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(position),
                (true, Some(start)) => {
                    write(&data[start..position], offset + start as u64)?;
                    run_start = None;
                }
                _ => {}
            }
            position = end;
        }
        if let Some(start) = run_start {
            write(&data[start..], offset + start as u64)?;
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`: through the `O_DIRECT` descriptor when
    /// offset, length and memory are aligned, else (and once the file
    /// system refused a direct write) through the page cache.
    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let aligned = offset.is_multiple_of(DIRECT_ALIGNMENT as u64)
            && bytes.len().is_multiple_of(DIRECT_ALIGNMENT)
            && (bytes.as_ptr() as usize).is_multiple_of(DIRECT_ALIGNMENT);
        if let (Some(direct), true) = (&self.direct, aligned) {
            if !self.direct_refused.load(Ordering::Relaxed) {
                match direct.write_all_at(bytes, offset) {
                    Ok(()) => return Ok(()),
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        self.file.write_all_at(bytes, offset)
    }

    /// Makes `length` bytes at `offset` read as zeros.
    pub fn write_zeros(&self, offset: u64, length: u64) -> io::Result<()> {
        if self.holes_are_zero {
            return Ok(());
        }
        let mut done = 0;
        while done < length {
            let step = (length - done).min(ZERO_BLOCK as u64) as usize;
            self.file.write_all_at(&ZEROS[..step], offset + done)?;
            done += step as u64;
        }
        self.note_written(offset + length);
        Ok(())
    }

    /// Sets the final length of a regular file (when it was unknown at
    /// creation) and flushes the output to disk.
    pub fn finish(self, final_size: Option<u64>) -> io::Result<()> {
        if let (true, Some(size)) = (self.holes_are_zero, final_size) {
            self.file.set_len(size)?;
        }
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aligned::PageAlignedBuffer;

    /// Aligned blocks (through `O_DIRECT` where the file system takes it),
    /// unaligned pieces (through the page cache) and zero blocks (holes)
    /// of one file read back as written.
    #[test]
    fn aligned_unaligned_and_zero_writes_read_back_as_written() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("out.raw");
        let size: u64 = 3 << 20;
        let output = RawOutput::create(&path, Some(size)).unwrap();
        let mut expected = vec![0u8; size as usize];
        let mut aligned = PageAlignedBuffer::new(1 << 20);
        for (index, byte) in aligned.as_mut().iter_mut().enumerate() {
            *byte = (index % 251) as u8 + 1;
        }
        // A zero block inside the aligned run: a hole.
        aligned.as_mut()[8192..12288].fill(0);
        output.write_data(1 << 20, aligned.as_mut()).unwrap();
        expected[1 << 20..2 << 20].copy_from_slice(aligned.as_mut());
        // Unaligned offset and length, from unaligned memory.
        let odd: Vec<u8> = (0..7000u32).map(|index| (index % 13) as u8 + 7).collect();
        output.write_data(512, &odd[1..]).unwrap();
        expected[512..512 + odd.len() - 1].copy_from_slice(&odd[1..]);
        // The partial last block.
        output.write_data(size - 100, &[9u8; 100]).unwrap();
        expected[size as usize - 100..].fill(9);
        output.finish(None).unwrap();
        assert!(std::fs::read(&path).unwrap() == expected, "the file differs from what was written");
    }
}
