//! The filesystem driver: a local folder, such as a PersistentVolumeClaim.
//!
//! Large reads and writes run on threads of their own so that disk I/O
//! overlaps with hashing and with the network: a writer thread takes chunks
//! from a bounded channel (memory stays bounded whatever the file size) and
//! writes them around the page cache where it can ([`crate::direct`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::direct::DirectAppender;
use crate::trash::Trash;
use crate::{ByteStream, FileInfo, FileWriter, Result, StorageDriver, StorageError, StoragePath};

/// Size of the chunks a read streams.
const READ_CHUNK: usize = 512 << 10;
/// Read data all downloads together may hold in memory (bytes).
const READ_BUFFER_BUDGET: usize = 64 << 20;

static READ_BUFFERS: std::sync::LazyLock<crate::budget::MemoryBudget> =
    std::sync::LazyLock::new(|| crate::budget::MemoryBudget::new(READ_BUFFER_BUDGET));

/// The buffers reads fill, recycled: no allocation and no zeroing per chunk
/// (a fresh zeroed buffer is one more pass over memory for every byte
/// served). Half the budget's worth stays idle at most: what a quiet
/// registry keeps is bounded by 32 MiB, not by the busiest moment.
static READ_CHUNKS: std::sync::LazyLock<std::sync::Arc<crate::budget::BufferPool>> =
    std::sync::LazyLock::new(|| crate::budget::BufferPool::new(READ_CHUNK, READ_BUFFER_BUDGET / READ_CHUNK / 2));

/// Chunks a reader may have in flight ahead of the consumer.
const READ_AHEAD_CHUNKS: usize = 2;
/// Chunks a writer may have queued behind the disk.
const WRITE_QUEUE_CHUNKS: usize = 32;
/// Prefix of temporary files; they are never listed.
const TEMP_PREFIX: &str = ".dvcr-tmp-";

/// Stores everything under one local directory.
#[derive(Debug, Clone)]
pub struct FilesystemDriver {
    root: PathBuf,
    direct_writes: bool,
    trash: Trash,
}

impl FilesystemDriver {
    /// A driver rooted at `root`, which is created when missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|error| StorageError::from_io(&root.display().to_string(), error))?;
        let trash = Trash::open(&root);
        Ok(FilesystemDriver {
            root,
            direct_writes: true,
            trash,
        })
    }

    /// Whether large writes go around the page cache (`O_DIRECT`, the
    /// default) or through it. Direct writes cost a fraction of the CPU
    /// on local disks and block devices; on a network file system such as
    /// NFS each one is a round trip to the server, and the page cache,
    /// which gathers them, is faster.
    pub fn with_direct_writes(mut self, direct_writes: bool) -> Self {
        self.direct_writes = direct_writes;
        self
    }

    /// The directory this driver stores into.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full_path(&self, path: &StoragePath) -> PathBuf {
        if path.is_root() {
            self.root.clone()
        } else {
            self.root.join(path.as_str())
        }
    }
}

async fn blocking<T, F>(path: &StoragePath, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let name = path.to_string();
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| StorageError::from_io(&name, error)),
        Err(join_error) => Err(StorageError::Io {
            path: name,
            source: io::Error::other(join_error.to_string()),
        }),
    }
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => fs::create_dir_all(parent),
        None => Ok(()),
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let suffix: u64 = rand::random();
    let name = format!("{TEMP_PREFIX}{suffix:016x}");
    match path.parent() {
        Some(parent) => parent.join(name),
        None => PathBuf::from(name),
    }
}

fn is_temporary(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

#[async_trait]
impl StorageDriver for FilesystemDriver {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    async fn get_content(&self, path: &StoragePath) -> Result<Bytes> {
        let full = self.full_path(path);
        blocking(path, move || fs::read(full).map(Bytes::from)).await
    }

    async fn put_content(&self, path: &StoragePath, content: Bytes) -> Result<()> {
        let full = self.full_path(path);
        blocking(path, move || {
            create_parent(&full)?;
            let temp = temp_sibling(&full);
            let written = (|| {
                let mut file = File::create(&temp)?;
                file.write_all(&content)?;
                file.sync_all()?;
                fs::rename(&temp, &full)
            })();
            if written.is_err() {
                let _ = fs::remove_file(&temp);
            }
            written?;
            match full.parent() {
                Some(parent) => sync_directory(parent),
                None => Ok(()),
            }
        })
        .await
    }

    async fn read(
        &self,
        path: &StoragePath,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ByteStream> {
        let full = self.full_path(path);
        let (mut file, size) = blocking(path, move || {
            let file = File::open(&full)?;
            let size = file.metadata()?.len();
            Ok((file, size))
        })
        .await?;
        if offset > size {
            return Err(StorageError::InvalidOffset {
                path: path.to_string(),
                offset,
                size,
            });
        }
        let mut remaining = match length {
            Some(length) => length.min(size - offset),
            None => size - offset,
        };
        let (sender, receiver) = mpsc::channel::<Result<Bytes>>(READ_AHEAD_CHUNKS);
        let name = path.to_string();
        // Reads stay at normal priority: a download is what a node waits
        // for, and the reader only copies from the page cache.
        tokio::task::spawn_blocking(move || {
            if let Err(error) = file.seek(SeekFrom::Start(offset)) {
                let _ = sender.blocking_send(Err(StorageError::from_io(&name, error)));
                return;
            }
            while remaining > 0 {
                let want = remaining.min(READ_CHUNK as u64) as usize;
                let chunk = READ_BUFFERS.hold_blocking(want, || {
                    let mut buffer = READ_CHUNKS.take();
                    match buffer.read_from(&mut file, want) {
                        Ok(0) => Err(StorageError::Io {
                            path: name.clone(),
                            source: io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while it was read"),
                        }),
                        Ok(_) => Ok(buffer.freeze()),
                        Err(error) => Err(StorageError::from_io(&name, error)),
                    }
                });
                if let Ok(chunk) = &chunk {
                    remaining -= chunk.len() as u64;
                }
                let failed = chunk.is_err();
                if sender.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|chunk| (chunk, receiver))
        });
        Ok(Box::pin(stream))
    }

    async fn writer(&self, path: &StoragePath, append: bool) -> Result<Box<dyn FileWriter>> {
        let full = self.full_path(path);
        let direct_writes = self.direct_writes;
        let appender = blocking(path, move || {
            create_parent(&full)?;
            let file = OpenOptions::new().write(true).create(true).truncate(!append).open(&full)?;
            let size = file.metadata()?.len();
            Ok(DirectAppender::open(&full, file, size, direct_writes))
        })
        .await?;
        let writer = FilesystemWriter::start(path.to_string(), appender).map_err(|error| StorageError::from_io(path.as_str(), error))?;
        Ok(Box::new(writer))
    }

    async fn stat(&self, path: &StoragePath) -> Result<FileInfo> {
        let full = self.full_path(path);
        let info_path = path.clone();
        blocking(path, move || {
            let metadata = fs::metadata(full)?;
            Ok(FileInfo {
                path: info_path,
                size: if metadata.is_dir() { 0 } else { metadata.len() },
                modified: metadata.modified()?,
                is_dir: metadata.is_dir(),
            })
        })
        .await
    }

    async fn list(&self, path: &StoragePath) -> Result<Vec<String>> {
        let full = self.full_path(path);
        blocking(path, move || {
            let mut names = Vec::new();
            for entry in fs::read_dir(full)? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !is_temporary(&name) {
                    names.push(name);
                }
            }
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn move_file(&self, from: &StoragePath, to: &StoragePath) -> Result<()> {
        let source = self.full_path(from);
        let target = self.full_path(to);
        let trash = self.trash.clone();
        blocking(from, move || {
            create_parent(&target)?;
            trash.keep_until_replaced(&target);
            fs::rename(&source, &target)?;
            match target.parent() {
                Some(parent) => sync_directory(parent),
                None => Ok(()),
            }
        })
        .await
    }

    async fn delete(&self, path: &StoragePath) -> Result<()> {
        let full = self.full_path(path);
        let (root, trash) = (path.is_root(), self.trash.clone());
        blocking(path, move || {
            // Freed later: see `crate::trash` (the root holds the trash).
            let removed = if root { fs::remove_dir_all(&full) } else { trash.discard(&full) };
            match removed {
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        })
        .await
    }

    async fn settle(&self) {
        let _ = tokio::task::spawn_blocking(crate::trash::wait_until_freed).await;
    }

    async fn open_local(&self, path: &StoragePath) -> Result<Option<File>> {
        let full = self.full_path(path);
        blocking(path, move || File::open(full).map(Some)).await
    }

    async fn walk(&self, path: &StoragePath) -> Result<Vec<FileInfo>> {
        let full = self.full_path(path);
        let base = path.clone();
        blocking(path, move || {
            let mut files = Vec::new();
            walk_directory(&full, &base, &mut files)?;
            files.sort_by(|left, right| left.path.cmp(&right.path));
            Ok(files)
        })
        .await
    }
}

/// Walks `directory`. Entries below it that vanish while it is walked (a
/// concurrent delete) are left out; only a missing `directory` itself is
/// an error, so a walk never reports "nothing there" for a tree that
/// exists.
fn walk_directory(directory: &Path, base: &StoragePath, files: &mut Vec<FileInfo>) -> io::Result<()> {
    walk_below(directory, base, files, true)
}

fn walk_below(directory: &Path, base: &StoragePath, files: &mut Vec<FileInfo>, is_root: bool) -> io::Result<()> {
    let vanished = |error: &io::Error| !is_root && error.kind() == io::ErrorKind::NotFound;
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if vanished(&error) => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) {
            continue;
        }
        let child = base
            .join(&name)
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        if metadata.is_dir() {
            walk_below(&entry.path(), &child, files, false)?;
        } else {
            files.push(FileInfo {
                path: child,
                size: metadata.len(),
                modified: metadata.modified()?,
                is_dir: false,
            });
        }
    }
    Ok(())
}

enum WriterCommand {
    Data(Bytes),
    Finish { durable: bool },
}

/// A writer whose disk writes run on a thread of their own.
struct FilesystemWriter {
    path: String,
    commands: mpsc::Sender<WriterCommand>,
    outcome: oneshot::Receiver<io::Result<u64>>,
    size: u64,
    chunk_size: usize,
}

impl FilesystemWriter {
    fn start(path: String, appender: DirectAppender) -> io::Result<Self> {
        let size = appender.size();
        let chunk_size = if appender.is_direct() { crate::DIRECT_CHUNK_SIZE } else { crate::DEFAULT_CHUNK_SIZE };
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE_CHUNKS);
        let (report, outcome) = oneshot::channel();
        // Normal priority, unlike the hashers (`crate::bulk`): this thread
        // mostly waits for the disk, and each write it submits late leaves
        // the disk idle. At nice +10 on busy cores every wake-up after a
        // write waited for a slice (`dd oflag=direct bs=16M` at nice 10
        // beside two busy loops: 989 MB/s; at nice 0: 1.4 GB/s).
        crate::bulk::spawn("dvcr-write", false, move || {
            let _ = report.send(run_writer(appender, receiver));
        })?;
        Ok(FilesystemWriter {
            path,
            commands,
            outcome,
            size,
            chunk_size,
        })
    }

    async fn finish(self, durable: bool) -> Result<u64> {
        let FilesystemWriter {
            path,
            commands,
            outcome,
            ..
        } = self;
        // A failed send means the thread already stopped on an error, which
        // the outcome carries.
        let _ = commands.send(WriterCommand::Finish { durable }).await;
        drop(commands);
        match outcome.await {
            Ok(result) => result.map_err(|error| StorageError::from_io(&path, error)),
            Err(_) => Err(StorageError::Io {
                path,
                source: io::Error::other("writer thread ended without a result"),
            }),
        }
    }
}

/// Most chunks taken from the queue for one batch of writes.
const WRITE_BATCH_CHUNKS: usize = 16;

fn run_writer(mut appender: DirectAppender, mut commands: mpsc::Receiver<WriterCommand>) -> io::Result<u64> {
    let mut batch = Vec::with_capacity(WRITE_BATCH_CHUNKS);
    let mut next = commands.blocking_recv();
    while let Some(command) = next.take() {
        match command {
            WriterCommand::Data(chunk) => {
                // What has queued up meanwhile is written together.
                batch.push(chunk);
                while batch.len() < WRITE_BATCH_CHUNKS {
                    match commands.try_recv() {
                        Ok(WriterCommand::Data(chunk)) => batch.push(chunk),
                        Ok(finish) => {
                            next = Some(finish);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                appender.append_all(&batch)?;
                batch.clear();
                if next.is_none() {
                    next = commands.blocking_recv();
                }
            }
            WriterCommand::Finish { durable } => {
                if durable {
                    appender.sync()?;
                } else {
                    appender.flush()?;
                }
                tracing::debug!(size = appender.size(), direct = appender.direct_bytes(), durable, "writer finished");
                return Ok(appender.size());
            }
        }
    }
    // A writer dropped without close or commit keeps what it was given.
    appender.flush()?;
    Ok(appender.size())
}

#[async_trait]
impl FileWriter for FilesystemWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let length = data.len() as u64;
        if self.commands.send(WriterCommand::Data(data)).await.is_err() {
            // The thread stopped on an error; collect it.
            let (_, placeholder) = oneshot::channel();
            let outcome = std::mem::replace(&mut self.outcome, placeholder);
            return Err(match outcome.await {
                Ok(Err(error)) => StorageError::from_io(&self.path, error),
                _ => StorageError::Io {
                    path: self.path.clone(),
                    source: io::Error::other("writer thread stopped"),
                },
            });
        }
        self.size += length;
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn preferred_chunk_size(&self) -> usize {
        self.chunk_size
    }

    async fn close(self: Box<Self>) -> Result<u64> {
        self.finish(false).await
    }

    async fn commit(self: Box<Self>) -> Result<u64> {
        self.finish(true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let directory = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new(directory.path()).unwrap();
        crate::conformance::run(&driver).await;
    }

    #[tokio::test]
    async fn removed_and_replaced_files_leave_the_tree_at_once_and_are_freed_later() {
        let directory = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new(directory.path()).unwrap();
        let path = |text: &str| StoragePath::new(text).unwrap();
        let large = vec![5u8; (40 << 20) + 1];
        driver.put_content(&path("blobs/a/data"), Bytes::from(large.clone())).await.unwrap();
        driver.put_content(&path("uploads/u/data"), Bytes::from_static(b"same blob")).await.unwrap();
        driver.put_content(&path("uploads/u/startedat"), Bytes::from_static(b"1")).await.unwrap();
        let mut reader = driver.read(&path("blobs/a/data"), 0, None).await.unwrap();

        // A blob stored again replaces the old file, which a download
        // that started before still reads whole.
        driver.move_file(&path("uploads/u/data"), &path("blobs/a/data")).await.unwrap();
        driver.delete(&path("uploads/u")).await.unwrap();
        assert_eq!(driver.get_content(&path("blobs/a/data")).await.unwrap(), Bytes::from_static(b"same blob"));
        assert!(driver.stat(&path("uploads/u")).await.unwrap_err().is_not_found());
        assert_eq!(driver.list(&StoragePath::root()).await.unwrap(), vec!["blobs", "uploads"]);
        let mut read = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut reader).await {
            read.extend_from_slice(&chunk.unwrap());
        }
        assert!(read == large, "the download of the replaced file was cut short");

        // A large unread file is freed in steps, with pauses: `settle`
        // waits for that.
        let sparse = File::create(directory.path().join("blobs/a/sparse")).unwrap();
        sparse.set_len(256 << 20).unwrap();
        drop(sparse);
        driver.delete(&path("blobs")).await.unwrap();
        assert!(driver.walk(&StoragePath::root()).await.unwrap().is_empty());
        driver.settle().await;
        assert!(driver.trash.is_empty(), "removed files stayed in the trash after settle");
    }

    #[tokio::test]
    async fn chunked_writes_and_appends_agree_around_and_through_the_page_cache() {
        for direct_writes in [true, false] {
            let directory = tempfile::tempdir().unwrap();
            let driver = FilesystemDriver::new(directory.path()).unwrap().with_direct_writes(direct_writes);
            let path = StoragePath::new("blob").unwrap();
            let data: Vec<u8> = (0..(9 << 20) + 123u32).map(|index| (index * 7 % 253) as u8).collect();
            let mut writer = driver.writer(&path, false).await.unwrap();
            for chunk in data[..5 << 20].chunks(65_537) {
                writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            writer.close().await.unwrap();
            let mut writer = driver.writer(&path, true).await.unwrap();
            for chunk in data[5 << 20..].chunks(1_000_003) {
                writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            assert_eq!(writer.commit().await.unwrap(), data.len() as u64);
            assert!(fs::read(directory.path().join("blob")).unwrap() == data, "direct writes: {direct_writes}");
        }
    }

    #[tokio::test]
    async fn put_content_leaves_no_temporary_files() {
        let directory = tempfile::tempdir().unwrap();
        let driver = FilesystemDriver::new(directory.path()).unwrap();
        let path = StoragePath::new("a/b").unwrap();
        driver.put_content(&path, Bytes::from_static(b"one")).await.unwrap();
        driver.put_content(&path, Bytes::from_static(b"two")).await.unwrap();
        let names: Vec<_> = fs::read_dir(directory.path().join("a"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["b"]);
    }
}
