//! Raw output: a sparse regular file, or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;
use std::path::Path;

/// Granularity of zero detection: all-zero blocks of this size are left as
/// holes in a regular file, as `qemu-img convert` does by default.
const ZERO_BLOCK: usize = 4096;
const ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];

/// How much is written before the kernel is asked to start writeback, so
/// that the final fsync overlaps with the conversion instead of following it.
const WRITEBACK_WINDOW: u64 = 16 << 20;

/// Where raw guest data is written.
pub struct RawOutput {
    file: File,
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
                holes_are_zero: false,
                writeback: Mutex::new((0, 0)),
            });
        }
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        file.set_len(size)?;
        Ok(RawOutput {
            file,
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
        while position < data.len() {
            let end = (position + ZERO_BLOCK).min(data.len());
            let zero = data[position..end].iter().all(|byte| *byte == 0);
            match (zero, run_start) {
                (false, None) => run_start = Some(position),
                (true, Some(start)) => {
                    self.file.write_all_at(&data[start..position], offset + start as u64)?;
                    run_start = None;
                }
                _ => {}
            }
            position = end;
        }
        if let Some(start) = run_start {
            self.file.write_all_at(&data[start..], offset + start as u64)?;
        }
        Ok(())
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
