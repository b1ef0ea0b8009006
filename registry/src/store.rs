//! The registry's model over a storage driver: blobs, uploads, manifests,
//! tags and referrers, with the rules that keep repositories apart and
//! make every change atomic.
//!
//! Order of writes is what makes a crash harmless: content is written and
//! made durable first, then moved into place, then linked into the
//! repository, and a tag is written last. A crash between any two steps
//! leaves only unreferenced content, which garbage collection removes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dvcr_storage::{ByteStream, FileWriter, StorageDriver, StorageError, StoragePath};
use tokio::sync::{mpsc, oneshot};
use futures::{Stream, StreamExt};
use rand::distr::{Alphanumeric, SampleString};

use crate::error::{RegistryError, RegistryResult};
use crate::layout;
use crate::manifest::{self, ManifestSummary};
use crate::names::{Algorithm, Digest, Hasher, Reference, RepositoryName, Tag};

/// The hash of an upload's data so far, kept between requests so that
/// finishing an upload does not read it back.
struct UploadHash {
    hasher: Hasher,
    hashed_bytes: u64,
}

type UploadSlot = Arc<tokio::sync::Mutex<Option<UploadHash>>>;

/// Blobs, uploads and manifests of every repository, over one driver.
pub struct Store {
    driver: Arc<dyn StorageDriver>,
    uploads: Mutex<HashMap<String, UploadSlot>>,
    /// What the garbage collector shares with requests (see [`crate::gc`]).
    pub(crate) collector: crate::gc::CollectorState,
    /// What recent manifest reads found (guesses, always confirmed).
    recent: crate::recent::RecentManifests,
}

/// Where a body to append to an upload must start, from `Content-Range`.
#[derive(Debug, Clone, Copy)]
pub struct ChunkStart(pub u64);

impl Store {
    /// A store over `driver`.
    pub fn new(driver: Arc<dyn StorageDriver>) -> Self {
        Store {
            driver,
            uploads: Mutex::new(HashMap::new()),
            collector: crate::gc::CollectorState::default(),
            recent: crate::recent::RecentManifests::default(),
        }
    }

    /// Whether the storage answers: the repositories folder can be looked
    /// at (an empty storage, where it does not exist yet, answers too).
    pub async fn probe(&self) -> Result<(), StorageError> {
        match self.driver.stat(&layout::repositories()?).await {
            Err(error) if !error.is_not_found() => Err(error),
            _ => Ok(()),
        }
    }

    /// The driver underneath.
    pub fn driver(&self) -> &Arc<dyn StorageDriver> {
        &self.driver
    }

    async fn read_link(&self, path: &StoragePath) -> RegistryResult<Option<Digest>> {
        match self.driver.get_content(path).await {
            Ok(content) => Ok(std::str::from_utf8(&content)
                .ok()
                .and_then(|text| text.trim().parse().ok())),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn write_link(&self, path: &StoragePath, digest: &Digest) -> RegistryResult<()> {
        Ok(self.driver.put_content(path, Bytes::from(digest.to_string())).await?)
    }

    async fn size_of(&self, path: &StoragePath) -> RegistryResult<Option<u64>> {
        match self.driver.stat(path).await {
            Ok(info) => Ok(Some(info.size)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// The size of a blob if it is visible in repository `name`. A blob
    /// found counts as referenced for the garbage collector: a client that
    /// saw it may push a manifest naming it without uploading it again.
    pub async fn blob_size(&self, name: &RepositoryName, digest: &Digest) -> RegistryResult<Option<u64>> {
        let _guard = self.collector.request_guard().await;
        self.collector.note_reference(digest);
        self.visible_blob_size(name, digest).await
    }

    async fn visible_blob_size(&self, name: &RepositoryName, digest: &Digest) -> RegistryResult<Option<u64>> {
        if self.read_link(&layout::layer_link(name, digest)?).await?.as_ref() != Some(digest) {
            return Ok(None);
        }
        self.size_of(&layout::blob_data(digest)?).await
    }

    /// Streams part of a blob; the caller checked that it is visible.
    pub async fn read_blob(&self, digest: &Digest, offset: u64, length: u64) -> RegistryResult<ByteStream> {
        Ok(self.driver.read(&layout::blob_data(digest)?, offset, Some(length)).await?)
    }

    /// The blob's file, when the storage keeps blobs in local files (see
    /// [`dvcr_storage::StorageDriver::open_local`]); the caller checked
    /// that it is visible.
    pub async fn open_blob_file(&self, digest: &Digest) -> RegistryResult<Option<std::fs::File>> {
        Ok(self.driver.open_local(&layout::blob_data(digest)?).await?)
    }

    /// Makes a stored blob visible in `name`.
    pub async fn link_blob(&self, name: &RepositoryName, digest: &Digest) -> RegistryResult<()> {
        self.write_link(&layout::layer_link(name, digest)?, digest).await
    }

    /// Mounts a blob from repository `from` into `name`, when `from` has it.
    pub async fn mount_blob(
        &self,
        name: &RepositoryName,
        from: &RepositoryName,
        digest: &Digest,
    ) -> RegistryResult<bool> {
        let _guard = self.collector.request_guard().await;
        self.collector.note_reference(digest);
        if self.visible_blob_size(from, digest).await?.is_none() {
            return Ok(false);
        }
        self.link_blob(name, digest).await?;
        Ok(true)
    }

    /// Hides a blob from `name`; the content stays until garbage collection.
    pub async fn unlink_blob(&self, name: &RepositoryName, digest: &Digest) -> RegistryResult<bool> {
        let link = layout::layer_link(name, digest)?;
        if self.read_link(&link).await?.is_none() {
            return Ok(false);
        }
        let folder = link.parent().ok_or_else(|| StorageError::NotFound(link.to_string()))?;
        self.driver.delete(&folder).await?;
        Ok(true)
    }

    // ----- uploads -----

    fn upload_slot(&self, name: &RepositoryName, id: &str) -> UploadSlot {
        let key = format!("{name}/{id}");
        let mut uploads = crate::lock(&self.uploads);
        uploads.entry(key).or_default().clone()
    }

    /// Whether a request of this process is receiving data for an upload
    /// in repository `name` (for upload `id` only, when given).
    pub(crate) fn upload_busy(&self, name: &str, id: Option<&str>) -> bool {
        let uploads = crate::lock(&self.uploads);
        uploads.iter().any(|(key, slot)| {
            let matches = match key.rsplit_once('/') {
                Some((repository, upload)) => repository == name && id.is_none_or(|id| id == upload),
                None => false,
            };
            matches && slot.try_lock().is_err()
        })
    }

    /// Drops what this process remembers of an upload the collector removed.
    pub(crate) fn forget_upload_of(&self, name: &str, id: &str) {
        let mut uploads = crate::lock(&self.uploads);
        uploads.remove(&format!("{name}/{id}"));
    }

    fn forget_upload(&self, name: &RepositoryName, id: &str) {
        let key = format!("{name}/{id}");
        let mut uploads = crate::lock(&self.uploads);
        uploads.remove(&key);
    }

    /// Starts an upload and returns its id. `algorithm` is the hash to keep
    /// while data arrives (the one the final digest will most likely use).
    pub async fn start_upload(&self, name: &RepositoryName, algorithm: Algorithm) -> RegistryResult<String> {
        let id = Alphanumeric.sample_string(&mut rand::rng(), 32).to_ascii_lowercase();
        let started_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        self.driver
            .put_content(&layout::upload_started_at(name, &id)?, Bytes::from(started_at.to_string()))
            .await?;
        let writer = self.driver.writer(&layout::upload_data(name, &id)?, false).await?;
        writer.close().await?;
        *self.upload_slot(name, &id).lock().await = Some(UploadHash {
            hasher: algorithm.hasher(),
            hashed_bytes: 0,
        });
        Ok(id)
    }

    /// Bytes received so far by an upload.
    pub async fn upload_size(&self, name: &RepositoryName, id: &str) -> RegistryResult<u64> {
        if !is_upload_id(id) {
            return Err(RegistryError::upload_unknown(id));
        }
        match self.size_of(&layout::upload_data(name, id)?).await? {
            Some(size) => Ok(size),
            None => Err(RegistryError::upload_unknown(id)),
        }
    }

    /// Takes an existing upload for one request; a second request on the
    /// same upload meanwhile gets 409.
    async fn claim_upload(
        &self,
        name: &RepositoryName,
        id: &str,
    ) -> RegistryResult<tokio::sync::OwnedMutexGuard<Option<UploadHash>>> {
        self.upload_size(name, id).await?;
        self.upload_slot(name, id).try_lock_owned().map_err(|_| {
            RegistryError::new(
                http::StatusCode::CONFLICT,
                crate::error::ErrorCode::BlobUploadInvalid,
                format!("upload {id} is busy with another request: send its chunks one after another"),
            )
        })
    }

    /// Appends a body to an upload and returns the upload's new size, with
    /// the digest of everything it holds when this process hashed all of
    /// it. With `start`, the body must begin exactly where the upload ends
    /// (416 with the current `Range` otherwise).
    pub async fn append_upload<S, E>(
        &self,
        name: &RepositoryName,
        id: &str,
        start: Option<ChunkStart>,
        body: S,
    ) -> RegistryResult<(u64, Option<Digest>)>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut hash = self.claim_upload(name, id).await?;
        let size = self.append_locked(name, id, start, body, &mut hash, false).await?;
        let digest = hash
            .as_ref()
            .filter(|state| state.hashed_bytes == size)
            .map(|state| state.hasher.clone().finish());
        Ok((size, digest))
    }

    async fn append_locked<S, E>(
        &self,
        name: &RepositoryName,
        id: &str,
        start: Option<ChunkStart>,
        mut body: S,
        hash: &mut Option<UploadHash>,
        durable: bool,
    ) -> RegistryResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut writer = self.driver.writer(&layout::upload_data(name, id)?, true).await?;
        let current = writer.size();
        if let Some(ChunkStart(offset)) = start {
            if offset != current {
                writer.close().await?;
                return Err(out_of_order(name, id, offset, current));
            }
        }
        let hashing = hash
            .take()
            .filter(|state| state.hashed_bytes == current)
            .map(BackgroundHasher::start);
        let streamed = stream_body(&mut body, writer.as_mut(), hashing.as_ref()).await;
        // The hash covers exactly the chunks handed to the writer.
        if let Some(hashing) = hashing {
            *hash = hashing.finish().await;
        }
        match streamed {
            Ok(()) => {}
            Err(StreamError::Body(message)) => {
                // Keep what arrived: the client can resume from it.
                let kept = writer.close().await;
                if kept.is_err() {
                    *hash = None;
                }
                return Err(RegistryError::upload_invalid(format!(
                    "upload body ended early after {} bytes: {message}",
                    kept.unwrap_or(current)
                )));
            }
            Err(StreamError::Storage(error)) => {
                *hash = None;
                return Err(error.into());
            }
        }
        let finished = if durable { writer.commit().await } else { writer.close().await };
        match finished {
            Ok(size) => Ok(size),
            Err(error) => {
                *hash = None;
                Err(error.into())
            }
        }
    }

    /// Appends the final body, checks the digest and moves the data into the
    /// blob store, linked into `name`. On a digest mismatch the upload is
    /// removed and nothing is stored.
    pub async fn finish_upload<S, E>(
        &self,
        name: &RepositoryName,
        id: &str,
        digest: &Digest,
        start: Option<ChunkStart>,
        body: S,
    ) -> RegistryResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut hash = self.claim_upload(name, id).await?;
        let size = self.append_locked(name, id, start, body, &mut hash, true).await?;
        let data = layout::upload_data(name, id)?;
        let actual = match hash.take() {
            Some(state) if state.hashed_bytes == size && state.hasher.algorithm() == digest.algorithm() => {
                state.hasher.finish()
            }
            _ => self.hash_file(&data, digest.algorithm()).await?,
        };
        if &actual != digest {
            drop(hash);
            self.cancel_upload(name, id).await?;
            return Err(RegistryError::digest_invalid(format!(
                "the uploaded content has digest {actual}, not {digest}: nothing was stored; upload it again"
            )));
        }
        {
            let _guard = self.collector.request_guard().await;
            self.collector.note_reference(digest);
            self.driver.move_file(&data, &layout::blob_data(digest)?).await?;
            self.link_blob(name, digest).await?;
        }
        drop(hash);
        self.driver.delete(&layout::upload(name, id)?).await?;
        self.forget_upload(name, id);
        Ok(size)
    }

    async fn hash_file(&self, path: &StoragePath, algorithm: Algorithm) -> RegistryResult<Digest> {
        let mut hasher = algorithm.hasher();
        let mut content = self.driver.read(path, 0, None).await?;
        while let Some(chunk) = content.next().await {
            hasher.update(&chunk?);
        }
        Ok(hasher.finish())
    }

    /// Removes an upload and what it received.
    pub async fn cancel_upload(&self, name: &RepositoryName, id: &str) -> RegistryResult<()> {
        self.upload_size(name, id).await?;
        self.driver.delete(&layout::upload(name, id)?).await?;
        self.forget_upload(name, id);
        Ok(())
    }

    // ----- manifests and tags -----

    /// The digest itself, or the one a tag points to (not yet checked
    /// against the repository's revisions).
    async fn named_digest(&self, name: &RepositoryName, reference: &Reference) -> RegistryResult<Option<Digest>> {
        match reference {
            Reference::Digest(digest) => Ok(Some(digest.clone())),
            Reference::Tag(tag) => self.read_link(&layout::tag_current_link(name, tag)?).await,
        }
    }

    /// The digest a reference names in `name`, if the repository has it.
    pub async fn resolve(&self, name: &RepositoryName, reference: &Reference) -> RegistryResult<Option<Digest>> {
        let Some(digest) = self.named_digest(name, reference).await? else { return Ok(None) };
        match self.read_link(&layout::revision_link(name, &digest)?).await? {
            Some(linked) if linked == digest => Ok(Some(digest)),
            _ => Ok(None),
        }
    }

    /// The digest and bytes of the manifest a reference names in `name`.
    /// On S3 each read is a round trip, and a manifest GET under load waits
    /// for every one: reads that do not depend on each other go at once, and
    /// a tag is read together with the manifest it named last time (see
    /// [`crate::recent`]).
    pub async fn manifest(
        &self,
        name: &RepositoryName,
        reference: &Reference,
    ) -> RegistryResult<Option<(Digest, Bytes)>> {
        let tag = match reference {
            Reference::Digest(digest) => return self.manifest_at(name, digest).await,
            Reference::Tag(tag) => tag,
        };
        let tag_link = layout::tag_current_link(name, tag)?;
        let named = match self.recent.tag(name, tag) {
            Some(guess) => {
                let (named, guessed) = tokio::join!(self.read_link(&tag_link), self.manifest_at(name, &guess));
                let named = named?;
                // A failed guess only costs the round trip it was to save.
                if let (Some(digest), Ok(found)) = (&named, guessed) {
                    if *digest == guess {
                        return Ok(found);
                    }
                }
                named
            }
            None => self.read_link(&tag_link).await?,
        };
        self.recent.note_tag(name, tag, named.as_ref());
        match named {
            Some(digest) => self.manifest_at(name, &digest).await,
            None => Ok(None),
        }
    }

    /// The bytes of manifest `digest` if `name` has it: its revision link
    /// is always read; its content, which never changes, only when not
    /// read lately.
    async fn manifest_at(&self, name: &RepositoryName, digest: &Digest) -> RegistryResult<Option<(Digest, Bytes)>> {
        let revision = layout::revision_link(name, digest)?;
        let kept = self.recent.content(digest);
        let (linked, content) = match &kept {
            Some(content) => (self.read_link(&revision).await?, Some(content.clone())),
            None => tokio::try_join!(self.read_link(&revision), self.manifest_content(digest))?,
        };
        match (linked, content) {
            (Some(linked), Some(content)) if linked == *digest => {
                if kept.is_none() {
                    self.recent.note_content(digest, &content);
                }
                Ok(Some((linked, content)))
            }
            _ => Ok(None),
        }
    }

    /// The bytes of a manifest known to be in a repository.
    pub async fn manifest_content(&self, digest: &Digest) -> RegistryResult<Option<Bytes>> {
        match self.driver.get_content(&layout::blob_data(digest)?).await {
            Ok(content) => Ok(Some(content)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Stores a checked manifest: content, revision link, referrer link,
    /// then the tag, in that order.
    pub async fn put_manifest(
        &self,
        name: &RepositoryName,
        tags: &[Tag],
        digest: &Digest,
        summary: &ManifestSummary,
        content: Bytes,
    ) -> RegistryResult<()> {
        // Under the guard, the blobs checked here cannot be collected
        // before the manifest naming them is written.
        let _guard = self.collector.request_guard().await;
        self.collector.note_reference(digest);
        for blob in summary.blobs.iter().chain(&summary.manifests).chain(&summary.subject) {
            self.collector.note_reference(blob);
        }
        for blob in &summary.blobs {
            if self.visible_blob_size(name, blob).await?.is_none() {
                return Err(RegistryError::new(
                    http::StatusCode::BAD_REQUEST,
                    crate::error::ErrorCode::ManifestBlobUnknown,
                    format!("manifest refers to blob {blob}, which is not in repository {name}: push it first"),
                ));
            }
        }
        for child in &summary.manifests {
            if self.resolve(name, &Reference::Digest(child.clone())).await?.is_none() {
                return Err(RegistryError::new(
                    http::StatusCode::BAD_REQUEST,
                    crate::error::ErrorCode::ManifestBlobUnknown,
                    format!("index refers to manifest {child}, which is not in repository {name}: push it first"),
                ));
            }
        }
        let data = layout::blob_data(digest)?;
        if self.size_of(&data).await? != Some(content.len() as u64) {
            self.driver.put_content(&data, content).await?;
        }
        self.write_link(&layout::revision_link(name, digest)?, digest).await?;
        if let Some(subject) = &summary.subject {
            self.write_link(&layout::referrer_link(name, subject, digest)?, digest).await?;
        }
        for tag in tags {
            self.write_link(&layout::tag_index_link(name, tag, digest)?, digest).await?;
            self.write_link(&layout::tag_current_link(name, tag)?, digest).await?;
        }
        Ok(())
    }

    /// Removes a manifest from a repository, with every tag pointing to it.
    pub async fn delete_manifest(&self, name: &RepositoryName, digest: &Digest) -> RegistryResult<bool> {
        if self.resolve(name, &Reference::Digest(digest.clone())).await?.is_none() {
            return Ok(false);
        }
        for tag in self.tags(name).await? {
            let Ok(tag) = Tag::parse(&tag) else { continue };
            if self.read_link(&layout::tag_current_link(name, &tag)?).await?.as_ref() == Some(digest) {
                self.driver.delete(&layout::tag(name, &tag)?).await?;
            }
        }
        if let Some(content) = self.manifest_content(digest).await? {
            if let Ok(ManifestSummary { subject: Some(subject), .. }) =
                manifest::parse(None, &content)
            {
                let link = layout::referrer_link(name, &subject, digest)?;
                if let Some(folder) = link.parent() {
                    self.driver.delete(&folder).await?;
                }
            }
        }
        let link = layout::revision_link(name, digest)?;
        if let Some(folder) = link.parent() {
            self.driver.delete(&folder).await?;
        }
        Ok(true)
    }

    /// Removes a tag, leaving the manifest it named.
    pub async fn delete_tag(&self, name: &RepositoryName, tag: &Tag) -> RegistryResult<bool> {
        if self.read_link(&layout::tag_current_link(name, tag)?).await?.is_none() {
            return Ok(false);
        }
        self.driver.delete(&layout::tag(name, tag)?).await?;
        Ok(true)
    }

    /// Whether anything is stored at `path`.
    pub(crate) async fn exists(&self, path: &StoragePath) -> RegistryResult<bool> {
        Ok(self.size_of(path).await?.is_some())
    }

    /// Whether anything was ever pushed to `name`.
    pub async fn repository_exists(&self, name: &RepositoryName) -> RegistryResult<bool> {
        self.exists(&layout::repository(name)?).await
    }

    /// The tags of a repository, sorted; a tag whose link is gone is left out.
    pub async fn tags(&self, name: &RepositoryName) -> RegistryResult<Vec<String>> {
        match self.driver.list(&layout::tags(name)?).await {
            Ok(names) => {
                let mut tags = Vec::with_capacity(names.len());
                for tag in names {
                    let Ok(parsed) = Tag::parse(&tag) else { continue };
                    if self.driver.stat(&layout::tag_current_link(name, &parsed)?).await.is_ok() {
                        tags.push(tag);
                    }
                }
                Ok(tags)
            }
            Err(error) if error.is_not_found() => Ok(Vec::new()),
            Err(error) => Err(error.into()),
        }
    }

    /// Every repository name, sorted.
    pub async fn catalog(&self) -> RegistryResult<Vec<String>> {
        self.repositories(&["_manifests", "_layers"]).await
    }

    /// Names of repositories whose folder has any of `markers`, sorted.
    pub(crate) async fn repositories(&self, markers: &[&str]) -> RegistryResult<Vec<String>> {
        let mut found = Vec::new();
        let mut pending = vec![String::new()];
        let root = layout::repositories()?;
        while let Some(prefix) = pending.pop() {
            let folder = if prefix.is_empty() { root.clone() } else { root.join(&prefix)? };
            let children = match self.driver.list(&folder).await {
                Ok(children) => children,
                Err(error) if error.is_not_found() => continue,
                Err(error) => return Err(error.into()),
            };
            if children.iter().any(|child| markers.contains(&child.as_str())) && !prefix.is_empty() {
                found.push(prefix.clone());
            }
            for child in children.into_iter().filter(|child| !child.starts_with('_')) {
                pending.push(if prefix.is_empty() { child } else { format!("{prefix}/{child}") });
            }
        }
        found.sort();
        Ok(found)
    }

    /// The manifests in `name` whose subject is `subject`, with their
    /// summaries and sizes.
    pub async fn referrers(
        &self,
        name: &RepositoryName,
        subject: &Digest,
    ) -> RegistryResult<Vec<(Digest, u64, ManifestSummary)>> {
        let folder = layout::referrers(name, subject)?;
        let mut found = Vec::new();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let listed = match self.driver.list(&folder.join(algorithm.name())?).await {
                Ok(listed) => listed,
                Err(error) if error.is_not_found() => continue,
                Err(error) => return Err(error.into()),
            };
            for hex in listed {
                let Ok(digest) = format!("{}:{hex}", algorithm.name()).parse::<Digest>() else { continue };
                if self.resolve(name, &Reference::Digest(digest.clone())).await?.is_none() {
                    continue;
                }
                let Some(content) = self.manifest_content(&digest).await? else { continue };
                if let Ok(summary) = manifest::parse(None, &content) {
                    found.push((digest, content.len() as u64, summary));
                }
            }
        }
        Ok(found)
    }
}

/// Why streaming a body into an upload stopped.
enum StreamError {
    /// The client's body failed (disconnect, bad chunking).
    Body(String),
    /// Storage refused a write.
    Storage(StorageError),
}

/// Copies a request body into a writer, feeding each chunk to the hasher too.
async fn stream_body<S, E>(
    body: &mut S,
    writer: &mut dyn FileWriter,
    hashing: Option<&BackgroundHasher>,
) -> Result<(), StreamError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    // Bodies arrive in frames of a few KiB; handing each to the hasher and
    // writer threads costs two wake-ups per frame. Gather them into chunks
    // of the size the writer prefers first (one copy, into a recycled
    // buffer), shared by both threads.
    let chunks = upload_chunks(writer.preferred_chunk_size());
    let chunk_size = chunks.buffer_size();
    let mut pending = chunks.take();
    while let Some(frame) = body.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                // Keep what arrived before the failure.
                if !pending.is_empty() {
                    send_chunk(pending.freeze(), writer, hashing).await?;
                }
                return Err(StreamError::Body(error.to_string()));
            }
        };
        if pending.is_empty() && frame.len() >= chunk_size {
            send_chunk(frame, writer, hashing).await?;
            continue;
        }
        let mut rest = &frame[..];
        while !rest.is_empty() {
            rest = pending.fill(rest);
            if pending.is_full() {
                let full = std::mem::replace(&mut pending, chunks.take());
                send_chunk(full.freeze(), writer, hashing).await?;
                // While the client keeps sending, this loop never waits; let
                // other requests run between chunks (as downloads do).
                tokio::task::yield_now().await;
            }
        }
    }
    if !pending.is_empty() {
        send_chunk(pending.freeze(), writer, hashing).await?;
    }
    Ok(())
}

async fn send_chunk(chunk: Bytes, writer: &mut dyn FileWriter, hashing: Option<&BackgroundHasher>) -> Result<(), StreamError> {
    let chunk = UPLOAD_BUFFERS.hold(chunk).await;
    if let Some(hashing) = hashing {
        hashing.feed(chunk.clone()).await;
    }
    writer.write(chunk).await.map_err(StreamError::Storage)
}

/// Upload data all uploads together may hold in memory, queued for the
/// hasher and writer threads (bytes). Per-upload queues alone would let
/// memory grow with the number of concurrent uploads.
const UPLOAD_BUFFER_BUDGET: usize = 64 << 20;

static UPLOAD_BUFFERS: std::sync::LazyLock<dvcr_storage::budget::MemoryBudget> =
    std::sync::LazyLock::new(|| dvcr_storage::budget::MemoryBudget::new(UPLOAD_BUFFER_BUDGET));

type ChunkPool = std::sync::LazyLock<Arc<dvcr_storage::budget::BufferPool>>;

/// The buffers uploads gather into, one pool per chunk size writers prefer
/// (4 MiB for direct writes to a local disk, 1 MiB otherwise: on S3, 16
/// concurrent pushes with 4 MiB chunks peaked at 278 MiB RSS). At most
/// half the budget's worth stays idle in a pool, so a quiet registry does
/// not keep its busiest moment's memory.
static SMALL_UPLOAD_CHUNKS: ChunkPool = ChunkPool::new(|| chunk_pool(dvcr_storage::DEFAULT_CHUNK_SIZE));
static LARGE_UPLOAD_CHUNKS: ChunkPool = ChunkPool::new(|| chunk_pool(dvcr_storage::DIRECT_CHUNK_SIZE));

fn chunk_pool(size: usize) -> Arc<dvcr_storage::budget::BufferPool> {
    dvcr_storage::budget::BufferPool::new(size, UPLOAD_BUFFER_BUDGET / size / 2)
}

fn upload_chunks(preferred_size: usize) -> &'static Arc<dvcr_storage::budget::BufferPool> {
    if preferred_size >= LARGE_UPLOAD_CHUNKS.buffer_size() {
        &LARGE_UPLOAD_CHUNKS
    } else {
        &SMALL_UPLOAD_CHUNKS
    }
}

/// Chunks a hasher thread may have queued.
const HASH_QUEUE_CHUNKS: usize = 16;

/// Hasher threads running in this process.
static HASHERS_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Hashes an upload on a thread of its own, so that hashing, receiving and
/// writing use different cores.
struct BackgroundHasher {
    chunks: mpsc::Sender<Bytes>,
    done: oneshot::Receiver<UploadHash>,
}

impl BackgroundHasher {
    fn start(mut state: UploadHash) -> Self {
        let (chunks, mut receiver) = mpsc::channel::<Bytes>(HASH_QUEUE_CHUNKS);
        let (report, done) = oneshot::channel();
        // The only upload being hashed keeps the process's priority: at the
        // bulk one, the importer and web server beside it on two cores left
        // it behind and the upload waited for it (`bench/import.sh 2048`:
        // 1017-1151 MB/s against 937-1106). Beside other hashers it takes
        // the bulk priority, so that many uploads cannot crowd out requests
        // (a thread cannot raise its priority later).
        let alone = HASHERS_RUNNING.fetch_add(1, Ordering::Relaxed) == 0;
        let spawned = dvcr_storage::bulk::spawn("dvcr-hash", !alone, move || {
            while let Some(chunk) = receiver.blocking_recv() {
                state.hasher.update(&chunk);
                state.hashed_bytes += chunk.len() as u64;
            }
            HASHERS_RUNNING.fetch_sub(1, Ordering::Relaxed);
            let _ = report.send(state);
        });
        // Without a thread the hash is missing at the end and the upload is
        // hashed again from storage.
        if spawned.is_err() {
            HASHERS_RUNNING.fetch_sub(1, Ordering::Relaxed);
        }
        BackgroundHasher { chunks, done }
    }

    async fn feed(&self, chunk: Bytes) {
        // A send fails only if the thread is gone; `finish` then yields no
        // hash and the upload is hashed again from storage.
        let _ = self.chunks.send(chunk).await;
    }

    async fn finish(self) -> Option<UploadHash> {
        drop(self.chunks);
        self.done.await.ok()
    }
}

/// Upload ids are 32 lowercase alphanumerics; anything else is unknown
/// before it reaches storage.
fn is_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
}

fn out_of_order(name: &RepositoryName, id: &str, offset: u64, current: u64) -> RegistryError {
    let error = RegistryError::new(
        http::StatusCode::RANGE_NOT_SATISFIABLE,
        crate::error::ErrorCode::BlobUploadInvalid,
        format!("chunk starts at byte {offset} but the upload has {current} bytes: send the chunk starting at {current}"),
    )
    .with_header("Location", format!("/v2/{name}/blobs/uploads/{id}"));
    if current == 0 {
        error.with_header("Range", "0-0".to_string())
    } else {
        error.with_header("Range", format!("0-{}", current - 1))
    }
}
