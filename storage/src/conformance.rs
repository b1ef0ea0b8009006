//! Behaviour every driver must show, run against each driver's tests.

use bytes::Bytes;
use futures::TryStreamExt;

use crate::{StorageDriver, StorageError, StoragePath};

fn path(text: &str) -> StoragePath {
    StoragePath::new(text).unwrap()
}

/// The bytes `read` streams, gathered.
pub(crate) async fn read_all(driver: &dyn StorageDriver, at: &str, offset: u64, length: Option<u64>) -> Vec<u8> {
    let chunks: Vec<Bytes> = driver
        .read(&path(at), offset, length)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

pub(crate) async fn run(driver: &dyn StorageDriver) {
    // Small files.
    assert!(driver.get_content(&path("missing")).await.unwrap_err().is_not_found());
    driver.put_content(&path("a/b/c"), Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(driver.get_content(&path("a/b/c")).await.unwrap(), "hello");
    driver.put_content(&path("a/b/c"), Bytes::from_static(b"world!")).await.unwrap();
    assert_eq!(driver.stat(&path("a/b/c")).await.unwrap().size, 6);
    assert!(driver.stat(&path("a/b")).await.unwrap().is_dir);

    // Ranged reads, including an empty read at the end and one past it.
    assert_eq!(read_all(driver, "a/b/c", 0, None).await, b"world!");
    assert_eq!(read_all(driver, "a/b/c", 2, Some(3)).await, b"rld");
    assert_eq!(read_all(driver, "a/b/c", 6, None).await, b"");
    assert!(matches!(
        driver.read(&path("a/b/c"), 7, None).await,
        Err(StorageError::InvalidOffset { size: 6, .. })
    ));

    // Streaming writes, closed and resumed, then committed.
    let big: Vec<u8> = (0..3_000_000u32).map(|index| (index % 251) as u8).collect();
    let mut writer = driver.writer(&path("uploads/x/data"), false).await.unwrap();
    writer.write(Bytes::copy_from_slice(&big[..1_000_000])).await.unwrap();
    assert_eq!(writer.close().await.unwrap(), 1_000_000);
    let mut writer = driver.writer(&path("uploads/x/data"), true).await.unwrap();
    assert_eq!(writer.size(), 1_000_000);
    writer.write(Bytes::copy_from_slice(&big[1_000_000..])).await.unwrap();
    assert_eq!(writer.commit().await.unwrap(), 3_000_000);
    assert_eq!(read_all(driver, "uploads/x/data", 0, None).await, big);

    // Move replaces the target.
    driver.move_file(&path("uploads/x/data"), &path("blobs/y")).await.unwrap();
    assert!(driver.stat(&path("uploads/x/data")).await.unwrap_err().is_not_found());
    assert_eq!(driver.stat(&path("blobs/y")).await.unwrap().size, 3_000_000);

    // Listing and walking.
    driver.put_content(&path("a/d"), Bytes::new()).await.unwrap();
    assert_eq!(driver.list(&path("a")).await.unwrap(), vec!["b", "d"]);
    let walked: Vec<String> = driver
        .walk(&path("a"))
        .await
        .unwrap()
        .into_iter()
        .map(|info| info.path.as_str().to_string())
        .collect();
    assert_eq!(walked, vec!["a/b/c", "a/d"]);

    // Delete is recursive and idempotent.
    driver.delete(&path("a")).await.unwrap();
    driver.delete(&path("a")).await.unwrap();
    assert!(driver.stat(&path("a/b/c")).await.unwrap_err().is_not_found());
    assert!(driver.list(&path("a")).await.unwrap_err().is_not_found());
}
