//! A driver over an S3 bucket (AWS S3, Garage, MinIO, Ceph RGW...).
//!
//! Files are objects under an optional key prefix; directories are common
//! prefixes. Small files are single `PutObject`s, so readers see the old
//! content or the new one. Streaming writers become multipart uploads:
//!
//! - parts are cut from the stream as it arrives, one uploading while the
//!   next fills, so a writer holds at most two parts in memory, and all
//!   writers together stay within one [`MemoryBudget`];
//! - the part size doubles every 1000 parts (8 MiB, 16 MiB, ... up to 32
//!   times the first), so small blobs use small parts and a blob of well
//!   over 1 TiB still fits in S3's 10,000 parts;
//! - a writer that is closed (an upload paused between chunks) leaves a
//!   state object next to its file, `<key>.dvcr-upload`: the multipart
//!   upload's id, the parts so far and the bytes not yet a full part. Any
//!   replica, or the same one after a restart, resumes from it;
//! - commit completes the multipart upload (or puts a small file at once) and
//!   removes the state object.
//!
//! Moves are server-side copies then deletes; a file above 5 GiB is copied
//! with `UploadPartCopy` ranges, never in one request. A writer leaves its
//! state object as soon as it starts a multipart upload, and deleting a
//! file or folder aborts the uploads its state objects name, so abandoned
//! uploads (even of a replica that died) free their parts. A delete is one
//! listing and one `DeleteObjects`.
//!
//! Parts and large objects are sent with unsigned payloads
//! (`UNSIGNED-PAYLOAD`): the SDK otherwise hashes every body with SHA-256
//! for the signature, on the runtime thread that sends it, and the server
//! hashes it again to check. The SDK's CRC32 checksum of each body still
//! goes with it and is checked by the server; what the registry stores was
//! already checked against its digest before it reached this driver.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::{ByteStream, FileInfo, FileWriter, Result, StorageDriver, StorageError, StoragePath};

/// Suffix of the state object a paused writer leaves next to its file.
const WRITER_STATE_SUFFIX: &str = ".dvcr-upload";
/// Object metadata holding a paused writer's size, for `stat` and `walk`.
const SIZE_METADATA: &str = "dvcr-size";
/// S3's limit on the parts of one multipart upload.
const MAX_PARTS: usize = 10_000;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// MiB that all writers together may hold in parts, unless told otherwise
/// (`bench/load.sh` on S3, 16 pushes at 8 MiB parts: peak RSS 235-268 MiB
/// at 96, 253 MiB at 64, at the same push throughput).
pub const DEFAULT_BUFFER_MEMORY_MIB: usize = 64;
/// Parts all writers together send at once, unless told otherwise. The
/// object store serves reads in the same queue as these writes: on a local
/// Garage under 16 pushes (`STORAGE=s3 bench/load.sh`), manifest GET p99
/// was 92-118 ms with up to 8 parts sending, 35-38 ms with 2, at the same
/// push throughput (209-213 MB/s). One push sends one part at a time in any
/// case, so this caps only what many pushes together send; raise it for a
/// remote S3 whose parts are slow one by one but that scales out.
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 2;
/// S3's largest part, and its largest single-request copy.
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// The part size doubles after this many parts...
const PARTS_PER_STEP: usize = 1000;
/// ...at most this many times.
const MAX_DOUBLINGS: usize = 5;
/// Keys per `DeleteObjects` request (S3's limit).
const DELETE_BATCH: usize = 1000;

/// Where the bucket is and how the driver uses it.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// The S3 endpoint, e.g. `http://127.0.0.1:3900`; `None` for AWS itself.
    pub endpoint: Option<String>,
    /// The bucket; it must exist.
    pub bucket: String,
    /// The region the bucket is in (`garage` for a default Garage).
    pub region: String,
    /// A key prefix every object of this registry goes under (may be empty).
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
    /// Extra CA certificates (PEM) to trust for the endpoint.
    pub ca_bundle: Option<Vec<u8>>,
    /// Bucket addressing: `true` for `endpoint/bucket/key` (Garage, MinIO),
    /// `false` for `bucket.endpoint/key`.
    pub path_style: bool,
    /// Size of the first parts of a multipart upload; at least 5 MiB.
    pub part_size: u64,
    /// Bytes that all writers together may hold in parts being filled or
    /// sent.
    pub buffer_memory: usize,
    /// Parts that all writers together send at once.
    pub parts_in_flight: usize,
    /// Files above this size are copied in parts (5 GiB, S3's limit).
    pub max_single_copy: u64,
    /// Range size of a copy in parts.
    pub copy_part_size: u64,
}

impl S3Options {
    /// Options with the defaults: path-style addressing, 8 MiB first parts,
    /// 64 MiB of part buffers, two parts sent at once, copies in 1 GiB
    /// parts above 5 GiB.
    pub fn new(
        bucket: impl Into<String>,
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        S3Options {
            endpoint: None,
            bucket: bucket.into(),
            region: region.into(),
            prefix: String::new(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
            ca_bundle: None,
            path_style: true,
            part_size: 8 * 1024 * 1024,
            buffer_memory: DEFAULT_BUFFER_MEMORY_MIB << 20,
            parts_in_flight: DEFAULT_PARTS_IN_FLIGHT,
            max_single_copy: MAX_PART_SIZE,
            copy_part_size: 1024 * 1024 * 1024,
        }
    }

    /// The largest file a writer can produce with these part sizes.
    pub fn max_file_size(&self) -> u64 {
        (0..MAX_PARTS).map(|index| part_size_at(self.part_size, index)).sum()
    }
}

/// Size of the part with 0-based `index`.
fn part_size_at(first: u64, index: usize) -> u64 {
    let doublings = (index / PARTS_PER_STEP).min(MAX_DOUBLINGS) as u32;
    first.saturating_mul(1 << doublings).min(MAX_PART_SIZE)
}

/// Why the driver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum S3SetupError {
    /// An option is out of range.
    #[error("invalid S3 option: {0}")]
    Option(String),
    /// The CA bundle could not be used.
    #[error("the S3 CA bundle cannot be used: {0}")]
    CaBundle(String),
}

struct Shared {
    client: Client,
    bucket: String,
    prefix: String,
    options: S3Options,
    /// Room for part buffers, in bytes.
    buffers: Arc<Semaphore>,
    /// Turns to send a part.
    sending: Arc<Semaphore>,
    /// Parts being sent now, counted apart from the semaphore.
    parts_sending_now: AtomicUsize,
    /// The most parts ever sent at once.
    parts_sending_peak: AtomicUsize,
}

/// The S3 driver.
#[derive(Clone)]
pub struct S3Driver {
    shared: Arc<Shared>,
}

impl S3Driver {
    /// Builds the driver; it does not contact the bucket (see
    /// [`S3Driver::check_bucket`]).
    pub fn new(options: S3Options) -> std::result::Result<Self, S3SetupError> {
        if options.part_size < MIN_PART_SIZE || options.part_size > MAX_PART_SIZE {
            return Err(S3SetupError::Option(format!(
                "the part size must be between 5 MiB and 5 GiB, not {} bytes",
                options.part_size
            )));
        }
        if options.copy_part_size < MIN_PART_SIZE || options.copy_part_size > MAX_PART_SIZE {
            return Err(S3SetupError::Option(
                "the copy part size must be between 5 MiB and 5 GiB".into(),
            ));
        }
        if options.bucket.is_empty() {
            return Err(S3SetupError::Option("the bucket name is empty".into()));
        }
        let mut trust = aws_smithy_http_client::tls::TrustStore::default();
        if let Some(pem) = &options.ca_bundle {
            trust = trust.with_pem_certificate(pem.clone());
        }
        let tls = aws_smithy_http_client::tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|error| S3SetupError::CaBundle(error.to_string()))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(tls)
            .build_https();
        let credentials = Credentials::new(
            options.access_key_id.clone(),
            options.secret_access_key.clone(),
            options.session_token.clone(),
            None,
            "dvcr",
        );
        let mut config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(options.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(options.path_style)
            .http_client(http)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint.clone());
        }
        let prefix = match options.prefix.trim_matches('/') {
            "" => String::new(),
            trimmed => format!("{trimmed}/"),
        };
        Ok(S3Driver {
            shared: Arc::new(Shared {
                client: Client::from_conf(config.build()),
                bucket: options.bucket.clone(),
                prefix,
                buffers: Arc::new(Semaphore::new(options.buffer_memory.max(1))),
                sending: Arc::new(Semaphore::new(options.parts_in_flight.max(1))),
                parts_sending_now: AtomicUsize::new(0),
                parts_sending_peak: AtomicUsize::new(0),
                options,
            }),
        })
    }

    /// Checks that the bucket answers and the credentials may use it.
    pub async fn check_bucket(&self) -> Result<()> {
        let shared = &self.shared;
        shared
            .client
            .list_objects_v2()
            .bucket(&shared.bucket)
            .prefix(&shared.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|error| remote(&format!("bucket {}", shared.bucket), error))?;
        Ok(())
    }
}

impl S3Driver {
    /// Keys of the multipart uploads open under the prefix: uploads being
    /// written now, or abandoned ones that no state object names.
    pub async fn incomplete_uploads(&self) -> Result<Vec<String>> {
        let shared = &self.shared;
        let root = StoragePath::root();
        let mut keys = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let page = shared
                .client
                .list_multipart_uploads()
                .bucket(&shared.bucket)
                .prefix(&shared.prefix)
                .set_key_marker(markers.0.clone())
                .set_upload_id_marker(markers.1.clone())
                .send()
                .await
                .map_err(|error| remote(root.as_str(), error))?;
            keys.extend(
                page.uploads()
                    .iter()
                    .filter_map(|upload| upload.key().map(str::to_string)),
            );
            match (page.is_truncated(), page.next_key_marker()) {
                (Some(true), Some(key_marker)) => {
                    markers = (
                        Some(key_marker.to_string()),
                        page.next_upload_id_marker().map(str::to_string),
                    );
                }
                _ => break,
            }
        }
        Ok(keys)
    }
}

/// Turns an SDK error into a storage error about `path`.
fn remote<E>(path: &str, error: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|response| response.status().as_u16());
    match (status, error.code()) {
        (Some(404), _) | (_, Some("NoSuchKey")) | (_, Some("NoSuchUpload")) => StorageError::NotFound(path.to_string()),
        (_, Some("QuotaExceeded")) | (_, Some("StorageFull")) => StorageError::OutOfSpace(path.to_string()),
        _ => StorageError::ObjectStore {
            path: path.to_string(),
            message: DisplayErrorContext(&error).to_string(),
        },
    }
}

fn is_invalid_range<E: ProvideErrorMetadata>(error: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> bool {
    error.raw_response().map(|response| response.status().as_u16()) == Some(416) || error.code() == Some("InvalidRange")
}

fn time_of(value: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    value
        .and_then(|time| SystemTime::try_from(*time).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Percent-encodes a key for `x-amz-copy-source`, keeping `/`.
fn encode_copy_source(bucket: &str, key: &str) -> String {
    let mut encoded = format!("{bucket}/");
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'/' | b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// One finished part of a multipart upload.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Part {
    number: i32,
    etag: String,
    size: u64,
}

/// What a paused writer leaves in its state object, before the bytes that
/// are not a full part yet.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WriterState {
    upload_id: Option<String>,
    parts: Vec<Part>,
}

impl Shared {
    /// The object key of `path`, refusing paths that collide with the
    /// driver's own state objects.
    fn key(&self, path: &StoragePath) -> Result<String> {
        if path.as_str().ends_with(WRITER_STATE_SUFFIX) {
            return Err(StorageError::InvalidPath {
                path: path.as_str().to_string(),
                reason: "names ending in .dvcr-upload are reserved by the S3 driver",
            });
        }
        Ok(format!("{}{}", self.prefix, path.as_str()))
    }

    /// The prefix of everything below `path` (a folder).
    fn folder_prefix(&self, path: &StoragePath) -> Result<String> {
        if path.is_root() {
            return Ok(self.prefix.clone());
        }
        Ok(format!("{}/", self.key(path)?))
    }

    async fn head(
        &self,
        key: &str,
        path: &StoragePath,
    ) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput> {
        self.client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|error| remote(path.as_str(), error))
    }

    async fn get_whole(&self, key: &str, path: &StoragePath) -> Result<Bytes> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|error| remote(path.as_str(), error))?;
        let collected = output.body.collect().await.map_err(|error| StorageError::ObjectStore {
            path: path.as_str().to_string(),
            message: format!("reading the object failed: {error}"),
        })?;
        Ok(collected.into_bytes())
    }

    /// Lists keys (and, with a delimiter, common prefixes) under `prefix`.
    async fn list_keys(
        &self,
        prefix: &str,
        delimiter: bool,
        path: &StoragePath,
    ) -> Result<(Vec<aws_sdk_s3::types::Object>, Vec<String>)> {
        let mut objects = Vec::new();
        let mut folders = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut request = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix);
            if delimiter {
                request = request.delimiter("/");
            }
            if let Some(token) = &token {
                request = request.continuation_token(token);
            }
            let page = request.send().await.map_err(|error| remote(path.as_str(), error))?;
            objects.extend(page.contents().iter().cloned());
            folders.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|common| common.prefix().map(str::to_string)),
            );
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_string()),
                _ => break,
            }
        }
        Ok((objects, folders))
    }

    /// Aborts the multipart upload a writer's state object names.
    async fn abort_upload_of(&self, state_key: &str, path: &StoragePath) -> Result<()> {
        let Some(file_key) = state_key.strip_suffix(WRITER_STATE_SUFFIX) else {
            return Ok(());
        };
        let Some((state, _)) = self.writer_state(file_key, path).await? else {
            return Ok(());
        };
        let Some(upload_id) = state.upload_id else {
            return Ok(());
        };
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(file_key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(error) => match remote(path.as_str(), error) {
                StorageError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn delete_keys(&self, keys: Vec<String>, path: &StoragePath) -> Result<()> {
        for batch in keys.chunks(DELETE_BATCH) {
            let objects = batch
                .iter()
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|error| StorageError::ObjectStore {
                    path: path.as_str().to_string(),
                    message: error.to_string(),
                })?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|error| StorageError::ObjectStore {
                    path: path.as_str().to_string(),
                    message: error.to_string(),
                })?;
            let output = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|error| remote(path.as_str(), error))?;
            if let Some(failed) = output.errors().first() {
                return Err(StorageError::ObjectStore {
                    path: path.as_str().to_string(),
                    message: format!(
                        "deleting {} failed: {} {}",
                        failed.key().unwrap_or("?"),
                        failed.code().unwrap_or(""),
                        failed.message().unwrap_or("")
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads a paused writer's state: what it recorded and its tail bytes.
    async fn writer_state(&self, key: &str, path: &StoragePath) -> Result<Option<(WriterState, Bytes)>> {
        let content = match self.get_whole(&format!("{key}{WRITER_STATE_SUFFIX}"), path).await {
            Ok(content) => content,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(error) => return Err(error),
        };
        let corrupt = |reason: String| StorageError::ObjectStore {
            path: path.as_str().to_string(),
            message: format!("the state of the paused upload is unreadable: {reason}"),
        };
        let end = content
            .iter()
            .position(|&byte| byte == b'\n')
            .ok_or_else(|| corrupt("no header line".into()))?;
        let state: WriterState = serde_json::from_slice(&content[..end]).map_err(|error| corrupt(error.to_string()))?;
        Ok(Some((state, content.slice(end + 1..))))
    }

    /// Copies `from` to `to` server-side, in parts above the single-copy
    /// limit.
    async fn copy(&self, from: &str, to: &str, size: u64, path: &StoragePath) -> Result<()> {
        let source = encode_copy_source(&self.bucket, from);
        if size <= self.options.max_single_copy {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(to)
                .copy_source(&source)
                .send()
                .await
                .map_err(|error| remote(path.as_str(), error))?;
            return Ok(());
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(to)
            .send()
            .await
            .map_err(|error| remote(path.as_str(), error))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let copied = self.copy_parts(&source, to, &upload_id, size, path).await;
        if copied.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        copied
    }

    async fn copy_parts(&self, source: &str, to: &str, upload_id: &str, size: u64, path: &StoragePath) -> Result<()> {
        let mut parts = Vec::new();
        let mut start = 0u64;
        let mut number = 1i32;
        while start < size {
            let end = (start + self.options.copy_part_size).min(size) - 1;
            let output = self
                .client
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(to)
                .upload_id(upload_id)
                .part_number(number)
                .copy_source(source)
                .copy_source_range(format!("bytes={start}-{end}"))
                .send()
                .await
                .map_err(|error| remote(path.as_str(), error))?;
            let etag = output
                .copy_part_result()
                .and_then(|result| result.e_tag())
                .unwrap_or_default()
                .to_string();
            parts.push(Part {
                number,
                etag,
                size: end + 1 - start,
            });
            start = end + 1;
            number += 1;
        }
        self.complete(to, upload_id, &parts, path).await
    }

    async fn complete(&self, key: &str, upload_id: &str, parts: &[Part], path: &StoragePath) -> Result<()> {
        let completed = parts
            .iter()
            .map(|part| {
                CompletedPart::builder()
                    .part_number(part.number)
                    .e_tag(&part.etag)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build())
            .send()
            .await
            .map_err(|error| remote(path.as_str(), error))?;
        Ok(())
    }

    /// Waits for room for a part buffer of `length` bytes.
    async fn reserve(&self, length: u64) -> Option<OwnedSemaphorePermit> {
        let total = self.options.buffer_memory.max(1) as u64;
        let share = u32::try_from(length.min(total)).unwrap_or(u32::MAX);
        self.buffers.clone().acquire_many_owned(share).await.ok()
    }
}

#[async_trait]
impl StorageDriver for S3Driver {
    fn name(&self) -> &'static str {
        "s3"
    }

    async fn get_content(&self, path: &StoragePath) -> Result<Bytes> {
        let key = self.shared.key(path)?;
        self.shared.get_whole(&key, path).await
    }

    async fn put_content(&self, path: &StoragePath, content: Bytes) -> Result<()> {
        let shared = &self.shared;
        let key = shared.key(path)?;
        shared
            .client
            .put_object()
            .bucket(&shared.bucket)
            .key(&key)
            .body(S3Body::from(content))
            .send()
            .await
            .map_err(|error| remote(path.as_str(), error))?;
        Ok(())
    }

    async fn read(&self, path: &StoragePath, offset: u64, length: Option<u64>) -> Result<ByteStream> {
        let shared = &self.shared;
        let key = shared.key(path)?;
        let empty = || -> ByteStream { Box::pin(futures::stream::empty()) };
        if length == Some(0) {
            let size = shared.head(&key, path).await?.content_length().unwrap_or(0) as u64;
            if offset > size {
                return Err(StorageError::InvalidOffset {
                    path: path.as_str().to_string(),
                    offset,
                    size,
                });
            }
            return Ok(empty());
        }
        let range = match length {
            Some(length) => format!("bytes={offset}-{}", offset.saturating_add(length) - 1),
            None => format!("bytes={offset}-"),
        };
        let output = match shared
            .client
            .get_object()
            .bucket(&shared.bucket)
            .key(&key)
            .range(range)
            .send()
            .await
        {
            Ok(output) => output,
            Err(error) if is_invalid_range(&error) => {
                // Past the end, or exactly at it (an empty read).
                let size = shared.head(&key, path).await?.content_length().unwrap_or(0) as u64;
                if offset == size {
                    return Ok(empty());
                }
                return Err(StorageError::InvalidOffset {
                    path: path.as_str().to_string(),
                    offset,
                    size,
                });
            }
            Err(error) => return Err(remote(path.as_str(), error)),
        };
        let name = path.as_str().to_string();
        let body = futures::stream::unfold(Some(output.body), move |body| {
            let name = name.clone();
            async move {
                let mut body = body?;
                match body.next().await {
                    Some(Ok(chunk)) => Some((Ok(chunk), Some(body))),
                    Some(Err(error)) => Some((
                        Err(StorageError::ObjectStore {
                            path: name,
                            message: format!("the object stream broke: {error}"),
                        }),
                        None,
                    )),
                    None => None,
                }
            }
        });
        Ok(Box::pin(body))
    }

    async fn writer(&self, path: &StoragePath, append: bool) -> Result<Box<dyn FileWriter>> {
        let shared = self.shared.clone();
        let key = shared.key(path)?;
        let mut writer = S3Writer {
            shared: shared.clone(),
            path: path.clone(),
            key,
            upload_id: None,
            parts: Vec::new(),
            flushed: 0,
            buffer: BytesMut::new(),
            buffer_room: None,
            sending: None,
            has_state: false,
        };
        if append {
            if let Some((state, tail)) = shared.writer_state(&writer.key, path).await? {
                writer.flushed = state.parts.iter().map(|part| part.size).sum();
                writer.upload_id = state.upload_id;
                writer.parts = state.parts;
                writer.has_state = true;
                if !tail.is_empty() {
                    writer.buffer_room = shared.reserve(writer.current_part_size()).await;
                    writer.buffer.extend_from_slice(&tail);
                }
            } else if shared.head(&writer.key, path).await.is_ok() {
                return Err(StorageError::ObjectStore {
                    path: path.as_str().to_string(),
                    message: "cannot append to a finished object".into(),
                });
            }
        }
        Ok(Box::new(writer))
    }

    async fn stat(&self, path: &StoragePath) -> Result<FileInfo> {
        let shared = &self.shared;
        if path.is_root() {
            return Ok(FileInfo {
                path: path.clone(),
                size: 0,
                modified: SystemTime::now(),
                is_dir: true,
            });
        }
        let key = shared.key(path)?;
        match shared.head(&key, path).await {
            Ok(head) => {
                return Ok(FileInfo {
                    path: path.clone(),
                    size: head.content_length().unwrap_or(0) as u64,
                    modified: time_of(head.last_modified()),
                    is_dir: false,
                })
            }
            Err(StorageError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
        match shared.head(&format!("{key}{WRITER_STATE_SUFFIX}"), path).await {
            Ok(head) => return Ok(paused_writer_info(path.clone(), &head)),
            Err(StorageError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
        let page = shared
            .client
            .list_objects_v2()
            .bucket(&shared.bucket)
            .prefix(format!("{key}/"))
            .max_keys(1)
            .send()
            .await
            .map_err(|error| remote(path.as_str(), error))?;
        match page.contents().first() {
            Some(object) => Ok(FileInfo {
                path: path.clone(),
                size: 0,
                modified: time_of(object.last_modified()),
                is_dir: true,
            }),
            None => Err(StorageError::NotFound(path.as_str().to_string())),
        }
    }

    async fn list(&self, path: &StoragePath) -> Result<Vec<String>> {
        let shared = &self.shared;
        let prefix = shared.folder_prefix(path)?;
        let (objects, folders) = shared.list_keys(&prefix, true, path).await?;
        let mut names = BTreeSet::new();
        for key in objects.iter().filter_map(|object| object.key()) {
            let name = &key[prefix.len()..];
            let name = name.strip_suffix(WRITER_STATE_SUFFIX).unwrap_or(name);
            if !name.is_empty() {
                names.insert(name.to_string());
            }
        }
        for folder in &folders {
            let name = folder[prefix.len()..].trim_end_matches('/');
            if !name.is_empty() {
                names.insert(name.to_string());
            }
        }
        if names.is_empty() {
            return Err(StorageError::NotFound(path.as_str().to_string()));
        }
        Ok(names.into_iter().collect())
    }

    async fn move_file(&self, from: &StoragePath, to: &StoragePath) -> Result<()> {
        let shared = &self.shared;
        let (from_key, to_key) = (shared.key(from)?, shared.key(to)?);
        let size = shared.head(&from_key, from).await?.content_length().unwrap_or(0) as u64;
        shared.copy(&from_key, &to_key, size, from).await?;
        shared
            .client
            .delete_object()
            .bucket(&shared.bucket)
            .key(&from_key)
            .send()
            .await
            .map_err(|error| remote(from.as_str(), error))?;
        Ok(())
    }

    async fn delete(&self, path: &StoragePath) -> Result<()> {
        let shared = &self.shared;
        // One listing finds the file, its writer state and all below it
        // (and siblings sharing the prefix, which are left alone).
        let (listing, exact) = if path.is_root() {
            (shared.prefix.clone(), None)
        } else {
            let key = shared.key(path)?;
            (key.clone(), Some(key))
        };
        let (objects, _) = shared.list_keys(&listing, false, path).await?;
        let mut keys = Vec::new();
        for key in objects.iter().filter_map(|object| object.key()) {
            let belongs = match &exact {
                None => true,
                Some(exact) => {
                    let rest = &key[exact.len()..];
                    rest.is_empty() || rest == WRITER_STATE_SUFFIX || rest.starts_with('/')
                }
            };
            if !belongs {
                continue;
            }
            if key.ends_with(WRITER_STATE_SUFFIX) {
                shared.abort_upload_of(key, path).await?;
            }
            keys.push(key.to_string());
        }
        shared.delete_keys(keys, path).await
    }

    async fn walk(&self, path: &StoragePath) -> Result<Vec<FileInfo>> {
        let shared = &self.shared;
        let prefix = shared.folder_prefix(path)?;
        let (objects, _) = shared.list_keys(&prefix, false, path).await?;
        if objects.is_empty() && !path.is_root() {
            return Err(StorageError::NotFound(path.as_str().to_string()));
        }
        let mut files = Vec::with_capacity(objects.len());
        for object in &objects {
            let Some(key) = object.key() else { continue };
            let relative = &key[shared.prefix.len()..];
            if let Some(paused) = relative.strip_suffix(WRITER_STATE_SUFFIX) {
                let logical = StoragePath::new(paused)?;
                match shared.head(key, &logical).await {
                    Ok(head) => files.push(paused_writer_info(logical, &head)),
                    // Finished or removed while we walked.
                    Err(StorageError::NotFound(_)) => {}
                    Err(error) => return Err(error),
                }
                continue;
            }
            files.push(FileInfo {
                path: StoragePath::new(relative)?,
                size: object.size().unwrap_or(0).max(0) as u64,
                modified: time_of(object.last_modified()),
                is_dir: false,
            });
        }
        files.sort_by(|left, right| left.path.cmp(&right.path));
        files.dedup_by(|later, earlier| later.path == earlier.path);
        Ok(files)
    }
}

fn paused_writer_info(path: StoragePath, head: &aws_sdk_s3::operation::head_object::HeadObjectOutput) -> FileInfo {
    let size = head
        .metadata()
        .and_then(|metadata| metadata.get(SIZE_METADATA))
        .and_then(|size| size.parse().ok())
        .unwrap_or(0);
    FileInfo {
        path,
        size,
        modified: time_of(head.last_modified()),
        is_dir: false,
    }
}

/// A part on its way to the bucket, with the room its bytes hold.
type Sending = JoinHandle<Result<Part>>;

/// A streaming writer: a multipart upload fed part by part.
struct S3Writer {
    shared: Arc<Shared>,
    path: StoragePath,
    key: String,
    upload_id: Option<String>,
    /// Parts already in the bucket.
    parts: Vec<Part>,
    /// Bytes in `parts`.
    flushed: u64,
    /// Bytes not yet a full part.
    buffer: BytesMut,
    /// The budget room `buffer` holds.
    buffer_room: Option<OwnedSemaphorePermit>,
    /// The part being uploaded, and its size.
    sending: Option<(Sending, u64)>,
    /// Whether a state object exists for this file.
    has_state: bool,
}

impl S3Writer {
    fn next_part_index(&self) -> usize {
        self.parts.len() + usize::from(self.sending.is_some())
    }

    fn current_part_size(&self) -> u64 {
        part_size_at(self.shared.options.part_size, self.next_part_index())
    }

    async fn ensure_upload(&mut self) -> Result<String> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let created = self
            .shared
            .client
            .create_multipart_upload()
            .bucket(&self.shared.bucket)
            .key(&self.key)
            .send()
            .await
            .map_err(|error| remote(self.path.as_str(), error))?;
        let id = created.upload_id().unwrap_or_default().to_string();
        if id.is_empty() {
            return Err(StorageError::ObjectStore {
                path: self.path.as_str().to_string(),
                message: "the object store started a multipart upload without an id".into(),
            });
        }
        self.upload_id = Some(id.clone());
        // From now on a state object names the upload, so that deleting the
        // file (an abandoned upload, even one whose server died) aborts it.
        self.save_state().await?;
        Ok(id)
    }

    /// Waits for the part in flight, if any, and records it.
    async fn finish_sending(&mut self) -> Result<()> {
        if let Some((task, _)) = self.sending.take() {
            let part = task.await.map_err(|error| StorageError::ObjectStore {
                path: self.path.as_str().to_string(),
                message: format!("a part upload task failed: {error}"),
            })??;
            self.flushed += part.size;
            self.parts.push(part);
        }
        Ok(())
    }

    /// Sends `data` as the next part, in the background.
    async fn send_part(&mut self, data: Bytes, room: Option<OwnedSemaphorePermit>) -> Result<()> {
        self.finish_sending().await?;
        let index = self.parts.len();
        if index >= MAX_PARTS {
            return Err(StorageError::ObjectStore {
                path: self.path.as_str().to_string(),
                message: format!(
                    "the file is larger than the S3 driver can store ({} bytes with this part size)",
                    self.shared.options.max_file_size()
                ),
            });
        }
        let upload_id = self.ensure_upload().await?;
        let number = (index + 1) as i32;
        let shared = self.shared.clone();
        let (key, path) = (self.key.clone(), self.path.as_str().to_string());
        let size = data.len() as u64;
        let task = tokio::spawn(async move {
            let _room = room;
            // The semaphore is never closed; without a permit the part goes anyway.
            let _turn = shared.sending.clone().acquire_owned().await.ok();
            let now = shared.parts_sending_now.fetch_add(1, Ordering::Relaxed) + 1;
            shared.parts_sending_peak.fetch_max(now, Ordering::Relaxed);
            let sent = shared
                .client
                .upload_part()
                .bucket(&shared.bucket)
                .key(&key)
                .upload_id(upload_id)
                .part_number(number)
                .body(S3Body::from(data))
                .customize()
                .disable_payload_signing()
                .send()
                .await;
            shared.parts_sending_now.fetch_sub(1, Ordering::Relaxed);
            let output = sent.map_err(|error| remote(&path, error))?;
            Ok(Part {
                number,
                etag: output.e_tag().unwrap_or_default().to_string(),
                size,
            })
        });
        self.sending = Some((task, size));
        Ok(())
    }

    /// Leaves the state object that lets any replica resume this file.
    async fn save_state(&mut self) -> Result<()> {
        let state = WriterState {
            upload_id: self.upload_id.clone(),
            parts: self.parts.clone(),
        };
        let recorded: u64 = state.parts.iter().map(|part| part.size).sum();
        let mut content = serde_json::to_vec(&state).map_err(|error| StorageError::ObjectStore {
            path: self.path.as_str().to_string(),
            message: error.to_string(),
        })?;
        content.push(b'\n');
        content.extend_from_slice(&self.buffer);
        let shared = &self.shared;
        shared
            .client
            .put_object()
            .bucket(&shared.bucket)
            .key(format!("{}{WRITER_STATE_SUFFIX}", self.key))
            .metadata(SIZE_METADATA, (recorded + self.buffer.len() as u64).to_string())
            .body(S3Body::from(content))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|error| remote(self.path.as_str(), error))?;
        self.has_state = true;
        Ok(())
    }
}

#[async_trait]
impl FileWriter for S3Writer {
    async fn write(&mut self, mut data: Bytes) -> Result<()> {
        while !data.is_empty() {
            let part_size = self.current_part_size();
            if self.buffer_room.is_none() {
                self.buffer_room = self.shared.reserve(part_size).await;
                self.buffer.reserve(part_size as usize);
            }
            let wanted = (part_size as usize).saturating_sub(self.buffer.len());
            let taken = data.split_to(wanted.min(data.len()));
            self.buffer.extend_from_slice(&taken);
            if self.buffer.len() as u64 >= part_size {
                let part = self.buffer.split().freeze();
                let room = self.buffer_room.take();
                self.send_part(part, room).await?;
            }
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.flushed + self.sending.as_ref().map_or(0, |(_, size)| *size) + self.buffer.len() as u64
    }

    async fn close(mut self: Box<Self>) -> Result<u64> {
        self.finish_sending().await?;
        self.save_state().await?;
        Ok(self.size())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64> {
        self.finish_sending().await?;
        let size = self.size();
        let shared = self.shared.clone();
        match self.upload_id.clone() {
            None => {
                let content = self.buffer.split().freeze();
                shared
                    .client
                    .put_object()
                    .bucket(&shared.bucket)
                    .key(&self.key)
                    .body(S3Body::from(content))
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
                    .map_err(|error| remote(self.path.as_str(), error))?;
            }
            Some(upload_id) => {
                if !self.buffer.is_empty() {
                    let tail = self.buffer.split().freeze();
                    let room = self.buffer_room.take();
                    self.send_part(tail, room).await?;
                    self.finish_sending().await?;
                }
                shared.complete(&self.key, &upload_id, &self.parts, &self.path).await?;
            }
        }
        if self.has_state {
            shared
                .client
                .delete_object()
                .bucket(&shared.bucket)
                .key(format!("{}{WRITER_STATE_SUFFIX}", self.key))
                .send()
                .await
                .map_err(|error| remote(self.path.as_str(), error))?;
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::read_all;

    #[test]
    fn parts_grow_so_that_a_terabyte_fits() {
        let options = S3Options::new("b", "r", "k", "s");
        assert_eq!(part_size_at(options.part_size, 0), 8 << 20);
        assert_eq!(part_size_at(options.part_size, 999), 8 << 20);
        assert_eq!(part_size_at(options.part_size, 1000), 16 << 20);
        assert_eq!(part_size_at(options.part_size, 9999), 256 << 20);
        assert!(options.max_file_size() > 1 << 40, "{}", options.max_file_size());
        assert_eq!(part_size_at(4 << 30, 5000), MAX_PART_SIZE);
    }

    #[test]
    fn copy_sources_are_percent_encoded() {
        assert_eq!(encode_copy_source("b", "a/sha256:x y"), "b/a/sha256%3Ax%20y");
    }

    #[test]
    fn reserved_names_are_refused() {
        let driver = S3Driver::new(S3Options::new("b", "r", "k", "s")).unwrap();
        let reserved = StoragePath::new("uploads/x/data.dvcr-upload").unwrap();
        assert!(matches!(
            driver.shared.key(&reserved),
            Err(StorageError::InvalidPath { .. })
        ));
        assert!(S3Driver::new(S3Options {
            part_size: 1 << 20,
            ..S3Options::new("b", "r", "k", "s")
        })
        .is_err());
    }

    fn path(text: &str) -> StoragePath {
        StoragePath::new(text).unwrap()
    }

    async fn open_uploads(driver: &S3Driver) -> usize {
        driver.incomplete_uploads().await.unwrap().len()
    }

    /// Small parts and a small copy limit, so that a few MiB exercise
    /// multipart writes and copies.
    fn small_parts(garage: &crate::testing::Garage, bucket: &str) -> S3Driver {
        let mut options = garage.options(bucket);
        options.prefix = "registry".into();
        options.part_size = MIN_PART_SIZE;
        options.copy_part_size = MIN_PART_SIZE;
        options.max_single_copy = MIN_PART_SIZE;
        options.buffer_memory = 16 * 1024 * 1024;
        S3Driver::new(options).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn behaves_like_every_driver_on_garage() {
        let garage = crate::testing::Garage::start();
        garage.create_bucket("conformance");
        let driver = S3Driver::new(garage.options("conformance")).unwrap();
        driver.check_bucket().await.unwrap();
        crate::conformance::run(&driver).await;
        assert_eq!(open_uploads(&driver).await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_send_no_more_parts_at_once_than_allowed() {
        let garage = crate::testing::Garage::start();
        garage.create_bucket("turns");
        let part = vec![7u8; MIN_PART_SIZE as usize];
        for allowed in [1, 4] {
            let mut options = garage.options("turns");
            options.part_size = MIN_PART_SIZE;
            options.buffer_memory = 64 << 20;
            options.parts_in_flight = allowed;
            let driver = S3Driver::new(options).unwrap();
            let writes = (0..4).map(|writer| {
                let (driver, part) = (driver.clone(), part.clone());
                async move {
                    let mut file = driver.writer(&path(&format!("turns/{allowed}/{writer}")), false).await.unwrap();
                    for _ in 0..3 {
                        file.write(Bytes::from(part.clone())).await.unwrap();
                    }
                    assert_eq!(file.commit().await.unwrap(), 3 * MIN_PART_SIZE);
                }
            });
            futures::future::join_all(writes).await;
            let peak = driver.shared.parts_sending_peak.load(Ordering::Relaxed);
            assert_eq!(driver.shared.parts_sending_now.load(Ordering::Relaxed), 0);
            if allowed == 1 {
                assert_eq!(peak, 1, "one part at a time");
            } else {
                // Four writers do overlap when allowed to, so the single
                // turn above was the limit at work.
                assert!((2..=allowed).contains(&peak), "{peak} parts at once, {allowed} allowed");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn multipart_writes_resume_on_another_replica_and_copy_in_parts() {
        let garage = crate::testing::Garage::start();
        garage.create_bucket("multipart");
        let (first, second) = (small_parts(&garage, "multipart"), small_parts(&garage, "multipart"));
        let content: Vec<u8> = (0..23_000_017u32)
            .map(|index| (index.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();

        // 9 MB through the first replica, in odd chunks, then a pause.
        let mut writer = first.writer(&path("uploads/u/data"), false).await.unwrap();
        for chunk in content[..9_000_000].chunks(777_777) {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(writer.close().await.unwrap(), 9_000_000);
        let paused = second.stat(&path("uploads/u/data")).await.unwrap();
        assert_eq!((paused.size, paused.is_dir), (9_000_000, false));
        assert_eq!(second.list(&path("uploads/u")).await.unwrap(), vec!["data"]);
        assert_eq!(second.walk(&path("uploads")).await.unwrap()[0].size, 9_000_000);
        assert_eq!(open_uploads(&first).await, 1, "one part went up already");

        // The rest through the second replica, then committed there.
        let mut writer = second.writer(&path("uploads/u/data"), true).await.unwrap();
        assert_eq!(writer.size(), 9_000_000);
        for chunk in content[9_000_000..].chunks(1_048_576) {
            writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        assert_eq!(writer.commit().await.unwrap(), content.len() as u64);
        assert_eq!(open_uploads(&first).await, 0);
        assert_eq!(
            first.list(&path("uploads/u")).await.unwrap(),
            vec!["data"],
            "no state object is left"
        );
        assert_eq!(read_all(&first, "uploads/u/data", 0, None).await, content);
        assert_eq!(
            read_all(&first, "uploads/u/data", 5_242_870, Some(20)).await,
            &content[5_242_870..5_242_890]
        );

        // A move above the single-copy limit goes in parts.
        first
            .move_file(&path("uploads/u/data"), &path("blobs/b/data"))
            .await
            .unwrap();
        assert!(first.stat(&path("uploads/u/data")).await.unwrap_err().is_not_found());
        assert_eq!(read_all(&second, "blobs/b/data", 0, None).await, content);

        // Deleting a folder aborts the multipart uploads under it.
        let mut writer = first.writer(&path("uploads/v/data"), false).await.unwrap();
        writer
            .write(Bytes::copy_from_slice(&content[..6_000_000]))
            .await
            .unwrap();
        writer.close().await.unwrap();
        assert_eq!(open_uploads(&first).await, 1);
        // A writer whose server died before pausing it is found too.
        let mut writer = second.writer(&path("uploads/w/data"), false).await.unwrap();
        writer
            .write(Bytes::copy_from_slice(&content[..6_000_000]))
            .await
            .unwrap();
        drop(writer);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(open_uploads(&first).await, 2);
        first.delete(&path("uploads")).await.unwrap();
        assert_eq!(open_uploads(&first).await, 0);
        assert!(first.list(&path("uploads")).await.unwrap_err().is_not_found());
        assert!(first.stat(&path("uploads/v/data")).await.unwrap_err().is_not_found());
    }
}
