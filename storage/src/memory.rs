//! An in-process driver for unit tests: a sorted map from path to content.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::{ByteStream, FileInfo, FileWriter, Result, StorageDriver, StorageError, StoragePath};

#[derive(Debug, Clone)]
struct StoredFile {
    content: Bytes,
    modified: SystemTime,
}

type Files = Arc<Mutex<BTreeMap<String, StoredFile>>>;

/// Keeps every file in memory. Directories exist implicitly, as prefixes.
#[derive(Debug, Clone, Default)]
pub struct MemoryDriver {
    files: Files,
}

impl MemoryDriver {
    /// An empty store.
    pub fn new() -> Self {
        MemoryDriver::default()
    }
}

fn lock(files: &Files) -> MutexGuard<'_, BTreeMap<String, StoredFile>> {
    // A panic while the lock was held cannot leave the map half-updated:
    // every critical section is a single insert, remove or read.
    files.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn prefix_of(path: &StoragePath) -> String {
    if path.is_root() {
        String::new()
    } else {
        format!("{}/", path.as_str())
    }
}

#[async_trait]
impl StorageDriver for MemoryDriver {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get_content(&self, path: &StoragePath) -> Result<Bytes> {
        lock(&self.files)
            .get(path.as_str())
            .map(|file| file.content.clone())
            .ok_or_else(|| StorageError::NotFound(path.to_string()))
    }

    async fn put_content(&self, path: &StoragePath, content: Bytes) -> Result<()> {
        let file = StoredFile {
            content,
            modified: SystemTime::now(),
        };
        lock(&self.files).insert(path.as_str().to_string(), file);
        Ok(())
    }

    async fn read(
        &self,
        path: &StoragePath,
        offset: u64,
        length: Option<u64>,
    ) -> Result<ByteStream> {
        let content = self.get_content(path).await?;
        let size = content.len() as u64;
        if offset > size {
            return Err(StorageError::InvalidOffset {
                path: path.to_string(),
                offset,
                size,
            });
        }
        let end = match length {
            Some(length) => size.min(offset.saturating_add(length)),
            None => size,
        };
        let chunk = content.slice(offset as usize..end as usize);
        Ok(Box::pin(futures::stream::iter([Ok(chunk)])))
    }

    async fn writer(&self, path: &StoragePath, append: bool) -> Result<Box<dyn FileWriter>> {
        let mut buffer = BytesMut::new();
        if append {
            if let Some(file) = lock(&self.files).get(path.as_str()) {
                buffer.extend_from_slice(&file.content);
            }
        }
        Ok(Box::new(MemoryWriter {
            files: self.files.clone(),
            path: path.as_str().to_string(),
            buffer,
        }))
    }

    async fn stat(&self, path: &StoragePath) -> Result<FileInfo> {
        let files = lock(&self.files);
        if let Some(file) = files.get(path.as_str()) {
            return Ok(FileInfo {
                path: path.clone(),
                size: file.content.len() as u64,
                modified: file.modified,
                is_dir: false,
            });
        }
        let prefix = prefix_of(path);
        match files.range(prefix.clone()..).next() {
            Some((key, file)) if key.starts_with(&prefix) => Ok(FileInfo {
                path: path.clone(),
                size: 0,
                modified: file.modified,
                is_dir: true,
            }),
            _ => Err(StorageError::NotFound(path.to_string())),
        }
    }

    async fn list(&self, path: &StoragePath) -> Result<Vec<String>> {
        let prefix = prefix_of(path);
        let files = lock(&self.files);
        let mut names: Vec<String> = files
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .filter_map(|(key, _)| key[prefix.len()..].split('/').next().map(str::to_string))
            .collect();
        names.dedup();
        if names.is_empty() && !path.is_root() {
            return Err(StorageError::NotFound(path.to_string()));
        }
        Ok(names)
    }

    async fn move_file(&self, from: &StoragePath, to: &StoragePath) -> Result<()> {
        let mut files = lock(&self.files);
        let file = files
            .remove(from.as_str())
            .ok_or_else(|| StorageError::NotFound(from.to_string()))?;
        files.insert(to.as_str().to_string(), file);
        Ok(())
    }

    async fn delete(&self, path: &StoragePath) -> Result<()> {
        let prefix = prefix_of(path);
        let mut files = lock(&self.files);
        files.remove(path.as_str());
        files.retain(|key, _| !key.starts_with(&prefix));
        Ok(())
    }

    async fn walk(&self, path: &StoragePath) -> Result<Vec<FileInfo>> {
        let prefix = prefix_of(path);
        let files = lock(&self.files);
        let mut found = Vec::new();
        for (key, file) in files.range(prefix.clone()..) {
            if !key.starts_with(&prefix) {
                break;
            }
            found.push(FileInfo {
                path: StoragePath::new(key)?,
                size: file.content.len() as u64,
                modified: file.modified,
                is_dir: false,
            });
        }
        if found.is_empty() {
            return Err(StorageError::NotFound(path.to_string()));
        }
        Ok(found)
    }
}

struct MemoryWriter {
    files: Files,
    path: String,
    buffer: BytesMut,
}

impl MemoryWriter {
    fn store(self) -> u64 {
        let size = self.buffer.len() as u64;
        let file = StoredFile {
            content: self.buffer.freeze(),
            modified: SystemTime::now(),
        };
        lock(&self.files).insert(self.path, file);
        size
    }
}

#[async_trait]
impl FileWriter for MemoryWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.buffer.extend_from_slice(&data);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.buffer.len() as u64
    }

    async fn close(self: Box<Self>) -> Result<u64> {
        Ok(self.store())
    }

    async fn commit(self: Box<Self>) -> Result<u64> {
        Ok(self.store())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        crate::conformance::run(&super::MemoryDriver::new()).await;
    }
}
