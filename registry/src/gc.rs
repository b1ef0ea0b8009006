//! Garbage collection that runs while the registry serves.
//!
//! One run: remove repositories nobody owns any more (when a list of live
//! repositories is given), remove uploads idle for longer than a limit,
//! mark every blob a manifest in a remaining repository names, and delete
//! the blobs nobody marked.
//!
//! What keeps a push safe while this runs:
//! - a grace window: nothing written within `grace` before the run
//!   started is removed (blobs pushed whose manifest is still to come,
//!   repositories being filled, uploads);
//! - references noted by requests: a blob a client found (HEAD/GET), a
//!   mount, a finished upload, and every blob a manifest names when it is
//!   pushed are remembered for `grace`, and such blobs are kept even when
//!   their content is older;
//! - a lock: requests that look a blob up or store a manifest naming it
//!   hold the lock shared; the collector holds it exclusively only while it
//!   checks and deletes a batch of blobs (16, concurrently). So a blob is
//!   either deleted before a client looks at it (the client then uploads
//!   it again) or seen, noted and kept; it never disappears under a
//!   manifest that was accepted.
//!
//! The lock and the notes live in one process: the collector of
//! `dvcr serve --gc-interval` is protected by both. `dvcr gc` from another
//! process relies on the grace window alone.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::error::RegistryResult;
use crate::layout;
use crate::names::{Digest, RepositoryName};
use crate::Store;

/// What the collector shares with the requests of its process.
#[derive(Default)]
pub struct CollectorState {
    lock: RwLock<()>,
    references: Mutex<HashMap<Digest, Instant>>,
    tracking: AtomicBool,
    one_run: tokio::sync::Mutex<()>,
}

impl CollectorState {
    /// Held shared by requests that look blobs up or store manifests.
    pub(crate) async fn request_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    /// Remembers that a request used `digest` (only once a collector runs
    /// in this process, so a registry without one keeps no notes).
    pub(crate) fn note_reference(&self, digest: &Digest) {
        if self.tracking.load(Ordering::Relaxed) {
            let mut references = crate::lock(&self.references);
            references.insert(digest.clone(), Instant::now());
        }
    }

    fn referenced_since(&self, digest: &Digest, since: Instant) -> bool {
        let references = crate::lock(&self.references);
        references.get(digest).is_some_and(|noted| *noted >= since)
    }

    fn forget_older_than(&self, since: Instant) {
        let mut references = crate::lock(&self.references);
        references.retain(|_, noted| *noted >= since);
    }
}

/// How a collection runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Nothing written (or, in this process, referenced) this long before
    /// the run started is removed.
    pub grace: Duration,
    /// Uploads idle for longer are removed.
    pub upload_max_age: Duration,
    /// The repositories that still have an owner; others are removed. `None`
    /// removes no repository.
    pub live_repositories: Option<HashSet<String>>,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
}

/// What a collection found and freed.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    /// Repositories removed because no live repository list names them.
    pub repositories_removed: Vec<String>,
    /// Uploads removed for being idle too long.
    pub uploads_removed: u64,
    /// Blobs deleted.
    pub blobs_removed: u64,
    /// Blobs still referenced, or too young to remove.
    pub blobs_kept: u64,
    /// Bytes freed, all kinds together.
    pub bytes_freed: u64,
    /// Whether nothing was really removed.
    pub dry_run: bool,
    /// How long the run took.
    pub seconds: f64,
}

/// Reads a live-repositories file: one repository name per line, `#`
/// comments. An empty list is refused: it would remove every repository.
pub fn read_live_repositories(path: &std::path::Path) -> Result<HashSet<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read the live repositories file {}: {error}", path.display()))?;
    let names: HashSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(String::from)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "the live repositories file {} names no repository; refusing to treat every repository as garbage",
            path.display()
        ));
    }
    Ok(names)
}

/// When anything under `folder` last changed: its newest file, or the
/// folder itself when it holds no file yet (one being created right now).
async fn last_change(driver: &dyn dvcr_storage::StorageDriver, folder: &dvcr_storage::StoragePath, files: &[dvcr_storage::FileInfo]) -> SystemTime {
    match files.iter().map(|file| file.modified).max() {
        Some(newest) => newest,
        None => match driver.stat(folder).await {
            Ok(info) => info.modified,
            // Gone already, or unreadable: never a reason to delete.
            Err(_) => SystemTime::now(),
        },
    }
}

/// Every digest-looking value under a `digest` key of a JSON document:
/// config, layers, child manifests and subject of any manifest kind.
fn referenced_digests(content: &[u8]) -> Vec<Digest> {
    fn visit(value: &serde_json::Value, found: &mut Vec<Digest>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map {
                    if key == "digest" {
                        if let Some(digest) = child.as_str().and_then(|text| text.parse().ok()) {
                            found.push(digest);
                        }
                    }
                    visit(child, found);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| visit(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(content) {
        visit(&value, &mut found);
    }
    found
}

impl Store {
    /// Starts noting blob references for a collector in this process.
    pub fn track_references(&self) {
        self.collector.tracking.store(true, Ordering::Relaxed);
    }

    /// Runs one collection (one at a time per process).
    pub async fn collect_garbage(&self, options: &GcOptions) -> RegistryResult<GcReport> {
        let _one_run = self.collector.one_run.lock().await;
        let started = Instant::now();
        let started_at = SystemTime::now();
        let cutoff = started_at.checked_sub(options.grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let noted_cutoff = started.checked_sub(options.grace).unwrap_or(started);
        self.collector.forget_older_than(noted_cutoff);
        let mut report = GcReport {
            dry_run: options.dry_run,
            ..GcReport::default()
        };
        let driver = self.driver().clone();

        let mut repositories = Vec::new();
        for name in self.repositories(&["_manifests", "_layers", "_uploads"]).await? {
            match RepositoryName::parse(&name) {
                Ok(parsed) => repositories.push(parsed),
                Err(error) => tracing::warn!(repository = %name, %error, "garbage collection skips a folder that is no repository"),
            }
        }

        // Uploads idle for too long.
        let upload_cutoff = started_at.checked_sub(options.upload_max_age).unwrap_or(SystemTime::UNIX_EPOCH);
        for name in &repositories {
            let folder = layout::uploads(name)?;
            let ids = match driver.list(&folder).await {
                Ok(ids) => ids,
                Err(error) if error.is_not_found() => continue,
                Err(error) => return Err(error.into()),
            };
            for id in ids {
                let upload = layout::upload(name, &id)?;
                let files = driver.walk(&upload).await?;
                let idle = last_change(driver.as_ref(), &upload, &files).await < upload_cutoff;
                if !idle || self.upload_busy(name.as_str(), Some(&id)) {
                    continue;
                }
                report.uploads_removed += 1;
                report.bytes_freed += files.iter().map(|file| file.size).sum::<u64>();
                if !options.dry_run {
                    driver.delete(&upload).await?;
                    self.forget_upload_of(name.as_str(), &id);
                }
            }
        }

        // Repositories without an owner.
        if let Some(live) = &options.live_repositories {
            let mut kept = Vec::with_capacity(repositories.len());
            for name in repositories {
                if live.contains(name.as_str()) {
                    kept.push(name);
                    continue;
                }
                let folder = layout::repository(&name)?;
                let _exclusive = self.collector.lock.write().await;
                let files = driver.walk(&folder).await?;
                let fresh = last_change(driver.as_ref(), &folder, &files).await >= cutoff;
                if fresh || self.upload_busy(name.as_str(), None) {
                    kept.push(name);
                    continue;
                }
                report.bytes_freed += files.iter().map(|file| file.size).sum::<u64>();
                if !options.dry_run {
                    // Tags first, then manifests, then the rest: a crash
                    // halfway leaves a repository with fewer images, never
                    // a tag whose manifest or layers are half gone.
                    driver.delete(&layout::tags(&name)?).await?;
                    driver.delete(&layout::revisions(&name)?).await?;
                    driver.delete(&folder).await?;
                }
                tracing::info!(repository = %name, dry_run = options.dry_run, "repository without an owner removed");
                report.repositories_removed.push(name.to_string());
            }
            repositories = kept;
        }

        // Mark. The digest is read from the link's path, so no read that
        // fails can leave a manifest unmarked; a repository whose revisions
        // cannot be walked stops the run before anything is swept.
        let mut marked: HashSet<Digest> = HashSet::new();
        for name in &repositories {
            let revisions = layout::revisions(name)?;
            let links = match driver.walk(&revisions).await {
                Ok(links) => links,
                Err(error) if error.is_not_found() && !self.exists(&revisions).await? => continue,
                Err(error) => return Err(error.into()),
            };
            for link in links {
                let Some(digest) = layout::digest_of_link(&link.path) else { continue };
                if let Some(manifest) = self.manifest_content(&digest).await? {
                    marked.extend(referenced_digests(&manifest));
                }
                marked.insert(digest);
            }
        }

        // Sweep, a batch of blobs per hold of the exclusive lock, deleted
        // concurrently: on S3 each blob costs a few requests, and one at a
        // time a collection of thousands would take minutes.
        let blobs = match driver.walk(&layout::blobs()?).await {
            Ok(blobs) => blobs,
            Err(error) if error.is_not_found() => Vec::new(),
            Err(error) => return Err(error.into()),
        };
        let mut unmarked = Vec::new();
        for blob in blobs {
            let Some(digest) = layout::digest_of_blob_data(&blob.path) else { continue };
            if marked.contains(&digest) || blob.modified >= cutoff {
                report.blobs_kept += 1;
            } else {
                unmarked.push(digest);
            }
        }
        for batch in unmarked.chunks(SWEEP_BATCH) {
            let _exclusive = self.collector.lock.write().await;
            let sweeps = batch.iter().map(|digest| self.sweep_blob(digest, cutoff, noted_cutoff, options.dry_run));
            let outcomes = futures::future::join_all(sweeps).await;
            for outcome in outcomes {
                match outcome? {
                    Swept::Kept => report.blobs_kept += 1,
                    Swept::Removed { size } => {
                        report.blobs_removed += 1;
                        report.bytes_freed += size;
                    }
                    Swept::AlreadyGone => {}
                }
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        if !options.dry_run {
            crate::observe::GC_RUNS.inc();
            crate::observe::GC_BYTES_FREED.inc_by(report.bytes_freed);
        }
        tracing::info!(
            repositories_removed = report.repositories_removed.len(),
            uploads_removed = report.uploads_removed,
            blobs_removed = report.blobs_removed,
            blobs_kept = report.blobs_kept,
            bytes_freed = report.bytes_freed,
            dry_run = options.dry_run,
            seconds = report.seconds,
            "garbage collection finished"
        );
        Ok(report)
    }
}

/// Blobs checked and deleted together under one hold of the exclusive
/// lock (and in flight at once).
const SWEEP_BATCH: usize = 16;

/// What the sweep did with one unmarked blob.
enum Swept {
    /// Referenced or rewritten since the collection started.
    Kept,
    /// Deleted (or, in a dry run, would be).
    Removed { size: u64 },
    /// Deleted by someone else meanwhile.
    AlreadyGone,
}

impl Store {
    /// Deletes one unmarked blob unless a request noted it or it was
    /// written since `cutoff`; the caller holds the exclusive lock.
    async fn sweep_blob(
        &self,
        digest: &Digest,
        cutoff: SystemTime,
        noted_cutoff: Instant,
        dry_run: bool,
    ) -> RegistryResult<Swept> {
        if self.collector.referenced_since(digest, noted_cutoff) {
            return Ok(Swept::Kept);
        }
        let data = layout::blob_data(digest)?;
        let info = match self.driver().stat(&data).await {
            Ok(info) => info,
            Err(error) if error.is_not_found() => return Ok(Swept::AlreadyGone),
            Err(error) => return Err(error.into()),
        };
        if info.modified >= cutoff {
            return Ok(Swept::Kept);
        }
        if !dry_run {
            if let Some(folder) = data.parent() {
                self.driver().delete(&folder).await?;
            }
        }
        Ok(Swept::Removed { size: info.size })
    }
}

/// Runs a collection every `interval` until the process ends. The live
/// repositories file, when given, is read again for every run; when it
/// cannot be read, or is empty, that run removes no repository.
pub async fn run_periodically(store: std::sync::Arc<Store>, interval: Duration, options: GcOptions, live_repositories: Option<std::path::PathBuf>) {
    store.track_references();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut options = options.clone();
        if let Some(path) = &live_repositories {
            match read_live_repositories(path) {
                Ok(live) => options.live_repositories = Some(live),
                Err(error) => {
                    tracing::error!(%error, "this garbage collection removes no repository");
                    options.live_repositories = None;
                }
            }
        }
        if let Err(error) = store.collect_garbage(&options).await {
            tracing::error!(%error, "garbage collection failed; the next run tries again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_digest_a_manifest_names_is_found() {
        let digest = |byte: char| format!("sha256:{}", byte.to_string().repeat(64));
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": digest('a'), "size": 1},
            "layers": [{"digest": digest('b')}, {"digest": digest('c'), "annotations": {"digest": "not one"}}],
            "subject": {"digest": digest('d')},
            "manifests": [{"digest": digest('e')}],
        });
        let mut found: Vec<String> = referenced_digests(manifest.to_string().as_bytes()).iter().map(ToString::to_string).collect();
        found.sort();
        assert_eq!(found, ["a", "b", "c", "d", "e"].iter().map(|c| digest(c.chars().next().unwrap())).collect::<Vec<_>>());
        assert!(referenced_digests(b"not json").is_empty());
    }

    #[test]
    fn an_empty_live_list_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("live");
        std::fs::write(&path, "# nothing\n\n").unwrap();
        assert!(read_live_repositories(&path).unwrap_err().contains("names no repository"));
        std::fs::write(&path, "vi/a/x\n cvi/y \n").unwrap();
        assert_eq!(read_live_repositories(&path).unwrap(), HashSet::from(["vi/a/x".to_string(), "cvi/y".to_string()]));
    }
}
