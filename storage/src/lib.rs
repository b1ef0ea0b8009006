//! The storage-driver interface of DVCR and its drivers.
//!
//! The registry never touches a disk or a bucket directly: everything it
//! stores goes through [`StorageDriver`], a deliberately small interface in
//! the spirit of CNCF Distribution's driver (read at an offset, streaming
//! write/append, stat, list, move, delete, walk). Paths are `/`-separated,
//! relative to the driver's root, and checked by [`StoragePath`] before any
//! driver sees them.
//!
//! Drivers:
//! - [`filesystem::FilesystemDriver`]: a local folder (a PVC in a cluster);
//! - [`memory::MemoryDriver`]: an in-process map, for unit tests;
//! - [`s3::S3Driver`]: an S3 bucket (AWS, Garage, MinIO...), for replicas.
//!
//! The interface is shaped so that an object store fits behind it: a
//! [`FileWriter`] maps to a multipart upload (`commit` completes it), `read`
//! maps to a ranged GET, `move_file` to copy+delete, and `list` to a
//! delimiter listing.

pub mod budget;
pub mod bulk;
mod direct;
pub mod filesystem;
pub mod memory;
mod path;
pub mod s3;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod trash;

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use path::StoragePath;

/// A stream of file content, in chunks.
pub type ByteStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// What can go wrong in a storage driver.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Nothing is stored at this path.
    #[error("nothing is stored at {0}")]
    NotFound(String),
    /// The path was refused before it reached the driver.
    #[error("invalid storage path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A read asked for bytes past the end of a file.
    #[error("offset {offset} is beyond the end of {path} ({size} bytes)")]
    InvalidOffset {
        /// The file read.
        path: String,
        /// The offset asked for.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// The volume or bucket has no room left.
    #[error("storage is out of space while writing {0}: free space on the registry's volume or grow it")]
    OutOfSpace(String),
    /// The object store refused or failed a request.
    #[error("object store error on {path}: {message}")]
    ObjectStore {
        /// The file the operation was on.
        path: String,
        /// What the object store said.
        message: String,
    },
    /// Any other I/O failure.
    #[error("storage I/O error on {path}: {source}")]
    Io {
        /// The file the operation was on.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Classifies an I/O error that happened on `path`.
    pub fn from_io(path: &str, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::NotFound => StorageError::NotFound(path.to_string()),
            std::io::ErrorKind::StorageFull => StorageError::OutOfSpace(path.to_string()),
            _ if source.raw_os_error() == Some(libc::ENOSPC)
                || source.raw_os_error() == Some(libc::EDQUOT) =>
            {
                StorageError::OutOfSpace(path.to_string())
            }
            _ => StorageError::Io {
                path: path.to_string(),
                source,
            },
        }
    }

    /// Whether this error means "nothing there".
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound(_))
    }
}

/// Result type of the storage layer.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What [`StorageDriver::stat`] and [`StorageDriver::walk`] report of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The path, as given to the driver.
    pub path: StoragePath,
    /// Size in bytes (0 for a directory).
    pub size: u64,
    /// Last modification time.
    pub modified: SystemTime,
    /// Whether the path is a directory (a common prefix on object stores).
    pub is_dir: bool,
}

/// The chunk size writers prefer unless they say otherwise
/// ([`FileWriter::preferred_chunk_size`]).
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;

/// The chunk size writers that write around the page cache prefer (the
/// filesystem driver's writer with `O_DIRECT`): the disk took one 16 MiB
/// buffer per `pwritev` at 1.9-2.0 GB/s and sixteen 1 MiB ones at 1.3-1.9
/// GB/s (one writer, ext4 on the test VM). With 4 MiB chunks two runs of
/// `bench/import.sh` reached 0.61x and 0.62x of its ceiling, against
/// 0.52-0.59x in four runs with 1 MiB.
pub const DIRECT_CHUNK_SIZE: usize = 4 << 20;

/// A streaming writer to one file.
///
/// Data written is not visible at the path until [`FileWriter::commit`] or
/// [`FileWriter::close`] returns; a writer dropped without either leaves what
/// was written so far, as an upload that can be resumed with `append`.
#[async_trait]
pub trait FileWriter: Send {
    /// Appends a chunk.
    async fn write(&mut self, data: Bytes) -> Result<()>;
    /// Bytes in the file so far, including what was there before an append.
    fn size(&self) -> u64;
    /// The size of the chunks this writer is best given; the registry
    /// gathers upload bodies into chunks of this size.
    fn preferred_chunk_size(&self) -> usize {
        DEFAULT_CHUNK_SIZE
    }
    /// Stops writing for now; the file stays, and can be appended to later.
    async fn close(self: Box<Self>) -> Result<u64>;
    /// Finishes the file and makes it durable (fsync, or the end of a
    /// multipart upload). Returns the final size.
    async fn commit(self: Box<Self>) -> Result<u64>;
}

/// The storage interface the registry is written against.
#[async_trait]
pub trait StorageDriver: Send + Sync + 'static {
    /// A short name for logs ("filesystem", "memory", "s3").
    fn name(&self) -> &'static str;

    /// Reads a whole small file (a link, a manifest).
    async fn get_content(&self, path: &StoragePath) -> Result<Bytes>;

    /// Writes a whole small file atomically and durably: readers see the old
    /// content or the new one, never a part.
    async fn put_content(&self, path: &StoragePath, content: Bytes) -> Result<()>;

    /// Streams `length` bytes (or all to the end) of a file from `offset`.
    async fn read(&self, path: &StoragePath, offset: u64, length: Option<u64>)
        -> Result<ByteStream>;

    /// Opens a streaming writer; with `append` it continues an existing file
    /// (an upload resumed), otherwise it starts a new one.
    async fn writer(&self, path: &StoragePath, append: bool) -> Result<Box<dyn FileWriter>>;

    /// Size and kind of a path.
    async fn stat(&self, path: &StoragePath) -> Result<FileInfo>;

    /// Names of the direct children of a directory, sorted.
    async fn list(&self, path: &StoragePath) -> Result<Vec<String>>;

    /// Moves a file to a new path atomically, replacing what was there.
    async fn move_file(&self, from: &StoragePath, to: &StoragePath) -> Result<()>;

    /// Deletes a file or a whole directory tree. Deleting nothing is not an
    /// error.
    async fn delete(&self, path: &StoragePath) -> Result<()>;

    /// Every file (not directory) under `path`, recursively, sorted by path.
    async fn walk(&self, path: &StoragePath) -> Result<Vec<FileInfo>>;

    /// Waits until what was deleted is freed, for drivers that free it in
    /// the background (the filesystem driver); a process about to exit
    /// calls it.
    async fn settle(&self) {}

    /// The file at `path` opened for reading, when this driver keeps files
    /// on a local file system: the registry can then hand its pages to a
    /// socket with `sendfile` instead of copying them through memory.
    /// `None` for drivers that do not (the default).
    async fn open_local(&self, path: &StoragePath) -> Result<Option<std::fs::File>> {
        let _ = path;
        Ok(None)
    }
}

#[cfg(test)]
mod conformance;
