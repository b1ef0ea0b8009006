//! The OCI Distribution v1.1 HTTP API.
//!
//! Repository names contain `/`, so routes cannot be matched by a path
//! template; [`Route::parse`] reads a path from its end, where the API's
//! fixed words are, and checks the name before any handler runs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use oci_spec::image::{DescriptorBuilder, ImageIndexBuilder, MediaType};

use crate::error::{ErrorCode, RegistryError, RegistryResult};
use crate::manifest::{self, MAX_MANIFEST_BYTES, OCI_INDEX};
use crate::names::{Algorithm, Digest, Reference, RepositoryName, Tag};
use crate::auth::{needs, Action, Identity, Need};
use crate::store::{ChunkStart, Store};
use crate::zero_copy::ZeroCopy;
use crate::Registry;

const DOCKER_CONTENT_DIGEST: &str = "Docker-Content-Digest";
const DOCKER_UPLOAD_UUID: &str = "Docker-Upload-UUID";
const UPLOAD_DIGEST: &str = "Dvcr-Upload-Digest";
const API_VERSION: &str = "Docker-Distribution-API-Version";
const OCI_SUBJECT: &str = "OCI-Subject";
const OCI_FILTERS_APPLIED: &str = "OCI-Filters-Applied";

/// Which API endpoint a path names.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(RepositoryName),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(RepositoryName, String),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(RepositoryName),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(RepositoryName, String),
    /// `/v2/<name>/blobs/<digest>`
    Blob(RepositoryName, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(RepositoryName, String),
}

fn percent_decode(segment: &str) -> String {
    fn hex_value(byte: u8) -> Option<u8> {
        (byte as char).to_digit(16).map(|value| value as u8)
    }
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex_value(bytes[index + 1]), hex_value(bytes[index + 2])) {
                decoded.push(high << 4 | low);
                index += 3;
                continue;
            }
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

impl Route {
    /// Reads a request path. `Ok(None)` is a path outside the API.
    pub fn parse(path: &str) -> RegistryResult<Option<Route>> {
        let Some(rest) = path.strip_prefix("/v2").filter(|rest| rest.is_empty() || rest.starts_with('/')) else {
            return Ok(None);
        };
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Ok(Some(Route::Base));
        }
        if rest == "_catalog" {
            return Ok(Some(Route::Catalog));
        }
        let segments: Vec<String> = rest.split('/').map(percent_decode).collect();
        let count = segments.len();
        let name = |end: usize| {
            let joined = segments[..end].join("/");
            if segments[..end].iter().any(|segment| segment.contains('/')) {
                return Err(crate::names::NameError::Repository {
                    name: joined,
                    reason: "a `/` inside a path component (percent-encoded) is not allowed",
                });
            }
            RepositoryName::parse(&joined)
        };
        let word = |index: usize| segments.get(index).map(String::as_str);
        if count >= 3 && word(count - 2) == Some("tags") && word(count - 1) == Some("list") {
            return Ok(Some(Route::Tags(name(count - 2)?)));
        }
        if count >= 4 && word(count - 3) == Some("blobs") && word(count - 2) == Some("uploads") {
            let id = &segments[count - 1];
            return Ok(Some(if id.is_empty() {
                Route::UploadStart(name(count - 3)?)
            } else {
                Route::Upload(name(count - 3)?, id.clone())
            }));
        }
        if count >= 3 && word(count - 2) == Some("blobs") && word(count - 1) == Some("uploads") {
            return Ok(Some(Route::UploadStart(name(count - 2)?)));
        }
        if count >= 3 && !segments[count - 1].is_empty() {
            let last = segments[count - 1].clone();
            match word(count - 2) {
                Some("manifests") => return Ok(Some(Route::Manifest(name(count - 2)?, last))),
                Some("blobs") => return Ok(Some(Route::Blob(name(count - 2)?, last))),
                Some("referrers") => return Ok(Some(Route::Referrers(name(count - 2)?, last))),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The query string as a multimap.
struct Query(HashMap<String, Vec<String>>);

impl Query {
    fn from_request(request: &Request) -> Self {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(query) = request.uri().query() {
            for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                map.entry(key.into_owned()).or_default().push(value.into_owned());
            }
        }
        Query(map)
    }

    fn first(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|values| values.first()).map(String::as_str)
    }

    fn all(&self, key: &str) -> &[String] {
        self.0.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn set(response: &mut Response, name: &'static str, value: impl AsRef<str>) {
    if let Ok(value) = HeaderValue::from_str(value.as_ref()) {
        response.headers_mut().insert(name, value);
    }
}

fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

/// The entry point: routes a request and turns errors into spec answers.
pub async fn handle(State(registry): State<Arc<Registry>>, request: Request) -> Response {
    let mut response = match dispatch(&registry, request).await {
        Ok(response) => response,
        Err(error) => {
            if error.status.is_server_error() {
                tracing::warn!(code = error.code.as_str(), message = %error.message, "request failed");
            } else {
                tracing::debug!(code = error.code.as_str(), message = %error.message, "request refused");
            }
            error.into_response()
        }
    };
    response
        .headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    response
}

async fn dispatch(registry: &Registry, request: Request) -> RegistryResult<Response> {
    let route = match Route::parse(request.uri().path())? {
        Some(route) => route,
        None => return Err(RegistryError::not_found_route(request.uri().path())),
    };
    let method = request.method().clone();
    let identity = match &registry.auth {
        Some(auth) => {
            let identity = auth.authorize(request.headers(), &needs(&route, &method)).await?;
            tracing::Span::current().record("who", identity.describe());
            identity
        }
        None => Identity::Anyone,
    };
    let store = &registry.store;
    let path = request.uri().path().to_string();
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => {
            let mut response = (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response();
            set(&mut response, "Content-Type", "application/json");
            Ok(response)
        }
        (Route::Catalog, Method::GET) => catalog(store, &Query::from_request(&request)).await,
        (Route::Tags(name), Method::GET) => tags_list(store, &name, &Query::from_request(&request)).await,
        (Route::Blob(name, digest), method @ (Method::GET | Method::HEAD)) => {
            // Only HTTP/1 passes body chunks to the socket as they are.
            let zero_copy = request.extensions().get::<ZeroCopy>().filter(|_| request.version() <= http::Version::HTTP_11);
            get_blob(store, &name, &digest, request.headers(), method == Method::HEAD, zero_copy).await
        }
        (Route::Blob(name, digest), Method::DELETE) => delete_blob(store, &name, &digest).await,
        (Route::UploadStart(name), Method::POST) => start_upload(store, &identity, &name, request).await,
        (Route::Upload(name, id), Method::GET) => upload_status(store, &name, &id).await,
        (Route::Upload(name, id), Method::PATCH) => patch_upload(store, &name, &id, request).await,
        (Route::Upload(name, id), Method::PUT) => finish_upload(store, &name, &id, request).await,
        (Route::Upload(name, id), Method::DELETE) => {
            store.cancel_upload(&name, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::Manifest(name, reference), method @ (Method::GET | Method::HEAD)) => {
            get_manifest(store, &name, &reference, request.headers(), method == Method::HEAD).await
        }
        (Route::Manifest(name, reference), Method::PUT) => put_manifest(store, &name, &reference, request).await,
        (Route::Manifest(name, reference), Method::DELETE) => delete_manifest(store, &name, &reference).await,
        (Route::Referrers(name, digest), Method::GET) => {
            referrers(store, &name, &digest, &Query::from_request(&request)).await
        }
        (_, method) => Err(RegistryError::unsupported(format!("method {method} is not allowed on {path}"))),
    }
}

// ----- blobs -----

/// A byte range resolved against a blob size: `start..=end`.
#[derive(Debug, PartialEq)]
enum ByteRange {
    Whole,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

fn parse_range(header: Option<&str>, size: u64) -> RegistryResult<ByteRange> {
    let Some(header) = header else { return Ok(ByteRange::Whole) };
    let invalid = || {
        RegistryError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::RangeInvalid,
            format!("unsupported Range {header:?}: use a single range, bytes=START-END, bytes=START- or bytes=-LENGTH"),
        )
        .with_header("Content-Range", format!("bytes */{size}"))
    };
    let spec = header.trim().strip_prefix("bytes=").ok_or_else(invalid)?;
    if spec.contains(',') {
        return Err(invalid());
    }
    let (first, last) = spec.split_once('-').ok_or_else(invalid)?;
    let (first, last) = (first.trim(), last.trim());
    let number = |text: &str| text.parse::<u64>().map_err(|_| invalid());
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Err(invalid()),
        (true, false) => {
            let suffix = number(last)?;
            if suffix == 0 || size == 0 {
                return Ok(ByteRange::Unsatisfiable);
            }
            (size.saturating_sub(suffix), size - 1)
        }
        (false, true) => (number(first)?, size.saturating_sub(1)),
        (false, false) => {
            let (start, end) = (number(first)?, number(last)?);
            if end < start {
                return Err(invalid());
            }
            (start, end.min(size.saturating_sub(1)))
        }
    };
    if start >= size {
        return Ok(ByteRange::Unsatisfiable);
    }
    Ok(ByteRange::Part { start, end })
}

async fn get_blob(
    store: &Store,
    name: &RepositoryName,
    digest: &str,
    headers: &HeaderMap,
    head_only: bool,
    zero_copy: Option<&ZeroCopy>,
) -> RegistryResult<Response> {
    let digest: Digest = digest.parse()?;
    let size = store
        .blob_size(name, &digest)
        .await?
        .ok_or_else(|| RegistryError::blob_unknown(format!("{digest} in repository {name}")))?;
    let range = if head_only {
        ByteRange::Whole
    } else {
        parse_range(header_str(headers, header::RANGE), size)?
    };
    let (status, start, length) = match range {
        ByteRange::Whole => (StatusCode::OK, 0, size),
        ByteRange::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        ByteRange::Unsatisfiable => {
            return Err(RegistryError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                ErrorCode::RangeInvalid,
                format!("range {:?} is outside blob {digest} of {size} bytes", header_str(headers, header::RANGE)),
            )
            .with_header("Content-Range", format!("bytes */{size}")))
        }
    };
    let body = if head_only {
        Body::empty()
    } else {
        let local_file = match zero_copy {
            Some(_) => store.open_blob_file(&digest).await?,
            None => None,
        };
        match zero_copy.zip(local_file) {
            Some((zero_copy, file)) => Body::from_stream(TakingTurns::new(zero_copy.body(file, start, length))),
            None => Body::from_stream(TakingTurns::new(store.read_blob(&digest, start, length).await?)),
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    set(&mut response, "Content-Type", "application/octet-stream");
    set(&mut response, "Content-Length", length.to_string());
    set(&mut response, "Accept-Ranges", "bytes");
    set(&mut response, DOCKER_CONTENT_DIGEST, digest.to_string());
    set(&mut response, "ETag", format!("\"{digest}\""));
    set(&mut response, "Cache-Control", "max-age=31536000");
    if status == StatusCode::PARTIAL_CONTENT {
        set(&mut response, "Content-Range", format!("bytes {start}-{}/{size}", start + length - 1));
    }
    Ok(response)
}

async fn delete_blob(store: &Store, name: &RepositoryName, digest: &str) -> RegistryResult<Response> {
    let digest: Digest = digest.parse()?;
    if !store.unlink_blob(name, &digest).await? {
        return Err(RegistryError::blob_unknown(format!("{digest} in repository {name}")));
    }
    let mut response = empty(StatusCode::ACCEPTED);
    set(&mut response, DOCKER_CONTENT_DIGEST, digest.to_string());
    Ok(response)
}

/// A blob stream that lets other tasks run after every [`TURN_BYTES`].
///
/// hyper writes as many chunks as a stream yields in one go (up to 16
/// iterations of its loop), so with many blob downloads each worker spends
/// a long turn on every download before a small request gets its next
/// turn: 64 concurrent pulls put 100+ ms between the steps of a manifest
/// GET. Yielding keeps a turn short.
struct TakingTurns<S> {
    inner: S,
    pause: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    paused: bool,
    since_pause: usize,
}

/// Bytes a blob download may send in one turn.
const TURN_BYTES: usize = 512 << 10;

impl<S> TakingTurns<S> {
    fn new(inner: S) -> Self {
        TakingTurns {
            inner,
            pause: None,
            paused: false,
            since_pause: 0,
        }
    }
}

impl<S, E> futures::Stream for TakingTurns<S>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>) -> std::task::Poll<Option<S::Item>> {
        if self.since_pause >= TURN_BYTES && !self.paused {
            let pause = self.pause.get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            if pause.as_mut().poll(context).is_pending() {
                return std::task::Poll::Pending;
            }
            self.pause = None;
            self.paused = true;
            self.since_pause = 0;
        }
        let next = std::pin::Pin::new(&mut self.inner).poll_next(context);
        if let std::task::Poll::Ready(item) = &next {
            self.paused = false;
            if let Some(Ok(chunk)) = item {
                self.since_pause += chunk.len();
            }
        }
        next
    }
}

// ----- uploads -----

fn blob_created(name: &RepositoryName, digest: &Digest) -> Response {
    let mut response = empty(StatusCode::CREATED);
    set(&mut response, "Location", format!("/v2/{name}/blobs/{digest}"));
    set(&mut response, DOCKER_CONTENT_DIGEST, digest.to_string());
    response
}

/// The answer to a started or continued upload. `digest`, when known, is
/// the digest of everything the upload holds, in `Dvcr-Upload-Digest`: a
/// client that lets the registry hash (DVCR's importer) finishes the upload
/// with it instead of hashing every byte a second time.
fn upload_accepted(status: StatusCode, name: &RepositoryName, id: &str, size: u64, digest: Option<&Digest>) -> Response {
    let mut response = empty(status);
    set(&mut response, "Location", format!("/v2/{name}/blobs/uploads/{id}"));
    set(&mut response, "Range", format!("0-{}", size.saturating_sub(1)));
    set(&mut response, DOCKER_UPLOAD_UUID, id);
    if let Some(digest) = digest {
        set(&mut response, UPLOAD_DIGEST, digest.to_string());
    }
    response
}

fn body_stream(request: Request) -> axum::body::BodyDataStream {
    request.into_body().into_data_stream()
}

/// Checks `Content-Range` (`START-END`) against `Content-Length`, and
/// returns where the chunk must start.
fn chunk_start(headers: &HeaderMap) -> RegistryResult<Option<ChunkStart>> {
    let Some(range) = header_str(headers, header::CONTENT_RANGE) else { return Ok(None) };
    let spec = range.trim().trim_start_matches("bytes").trim_start_matches([' ', '=']);
    let parsed = spec.split_once('-').and_then(|(start, end)| {
        let end = end.split('/').next().unwrap_or(end);
        Some((start.trim().parse::<u64>().ok()?, end.trim().parse::<u64>().ok()?))
    });
    let Some((start, end)) = parsed.filter(|(start, end)| end >= start) else {
        return Err(RegistryError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::BlobUploadInvalid,
            format!("invalid Content-Range {range:?}: expected START-END"),
        ));
    };
    if let Some(length) = header_str(headers, header::CONTENT_LENGTH).and_then(|text| text.parse::<u64>().ok()) {
        if length != end - start + 1 {
            return Err(RegistryError::size_invalid(format!(
                "Content-Range {range} covers {} bytes but Content-Length is {length}",
                end - start + 1
            )));
        }
    }
    Ok(Some(ChunkStart(start)))
}

async fn start_upload(store: &Store, identity: &Identity, name: &RepositoryName, request: Request) -> RegistryResult<Response> {
    let query = Query::from_request(&request);
    if let Some(mount) = query.first("mount") {
        let digest: Digest = mount.parse()?;
        if let Some(from) = query.first("from") {
            let from = RepositoryName::parse(from)?;
            // Knowing a digest is no right to another repository's blob.
            let may_read_source = identity.allows(&Need::Repository(from.to_string(), Action::Pull));
            if may_read_source && store.mount_blob(name, &from, &digest).await? {
                tracing::info!(repository = %name, from = %from, %digest, "blob mounted");
                return Ok(blob_created(name, &digest));
            }
        }
        // Not mountable: fall back to an ordinary upload, as the spec says.
        let id = store.start_upload(name, digest.algorithm()).await?;
        return Ok(upload_accepted(StatusCode::ACCEPTED, name, &id, 0, Some(&digest.algorithm().digest(b""))));
    }
    if let Some(digest) = query.first("digest") {
        let digest: Digest = digest.parse()?;
        let id = store.start_upload(name, digest.algorithm()).await?;
        let body = body_stream(request);
        store.finish_upload(name, &id, &digest, None, body).await?;
        return Ok(blob_created(name, &digest));
    }
    let id = store.start_upload(name, Algorithm::Sha256).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, name, &id, 0, Some(&Algorithm::Sha256.digest(b""))))
}

async fn upload_status(store: &Store, name: &RepositoryName, id: &str) -> RegistryResult<Response> {
    let size = store.upload_size(name, id).await?;
    Ok(upload_accepted(StatusCode::NO_CONTENT, name, id, size, None))
}

async fn patch_upload(store: &Store, name: &RepositoryName, id: &str, request: Request) -> RegistryResult<Response> {
    let start = chunk_start(request.headers())?;
    let (size, digest) = store.append_upload(name, id, start, body_stream(request)).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, name, id, size, digest.as_ref()))
}

async fn finish_upload(store: &Store, name: &RepositoryName, id: &str, request: Request) -> RegistryResult<Response> {
    let query = Query::from_request(&request);
    let digest: Digest = query
        .first("digest")
        .ok_or_else(|| RegistryError::digest_invalid("the PUT that finishes an upload needs ?digest=ALGORITHM:HEX"))?
        .parse()?;
    let start = chunk_start(request.headers())?;
    store.finish_upload(name, id, &digest, start, body_stream(request)).await?;
    Ok(blob_created(name, &digest))
}

// ----- manifests -----

async fn get_manifest(
    store: &Store,
    name: &RepositoryName,
    reference: &str,
    headers: &HeaderMap,
    head_only: bool,
) -> RegistryResult<Response> {
    let reference = Reference::parse(reference)?;
    let unknown = || RegistryError::manifest_unknown(format!("manifest {} is not in repository {name}", describe(&reference)));
    let (digest, content) = store.manifest(name, &reference).await?.ok_or_else(unknown)?;
    let media_type = manifest::stored_media_type(&content);
    let accept: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok().map(str::to_string))
        .collect();
    if !manifest::accepts(&accept, &media_type) {
        return Err(RegistryError::manifest_unknown(format!(
            "manifest {} is {media_type}, which the request's Accept header does not include",
            describe(&reference)
        )));
    }
    let length = content.len();
    let mut response = Response::new(if head_only { Body::empty() } else { Body::from(content) });
    set(&mut response, "Content-Type", &media_type);
    set(&mut response, "Content-Length", length.to_string());
    set(&mut response, DOCKER_CONTENT_DIGEST, digest.to_string());
    set(&mut response, "ETag", format!("\"{digest}\""));
    Ok(response)
}

fn describe(reference: &Reference) -> String {
    match reference {
        Reference::Tag(tag) => format!("tagged {}", tag.as_str()),
        Reference::Digest(digest) => digest.to_string(),
    }
}

/// How much of a refused manifest body is read and dropped, so that the
/// client gets the 413 instead of a broken pipe.
const MANIFEST_DRAIN_LIMIT: u64 = 64 << 20;

async fn read_manifest_body(request: Request) -> RegistryResult<Bytes> {
    let too_large = || {
        RegistryError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ManifestInvalid,
            format!("manifest is larger than {MAX_MANIFEST_BYTES} bytes"),
        )
    };
    let declared = header_str(request.headers(), header::CONTENT_LENGTH).and_then(|text| text.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MANIFEST_DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut body = request.into_body().into_data_stream();
    let mut content = bytes::BytesMut::new();
    let mut received: u64 = 0;
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        let chunk = chunk.map_err(|error| RegistryError::manifest_invalid(format!("manifest body could not be read: {error}")))?;
        received += chunk.len() as u64;
        if received > MANIFEST_DRAIN_LIMIT {
            break;
        }
        if received <= MAX_MANIFEST_BYTES as u64 {
            content.extend_from_slice(&chunk);
        }
    }
    if received > MAX_MANIFEST_BYTES as u64 {
        return Err(too_large());
    }
    Ok(content.freeze())
}

async fn put_manifest(store: &Store, name: &RepositoryName, reference: &str, request: Request) -> RegistryResult<Response> {
    let reference = Reference::parse(reference)?;
    let query = Query::from_request(&request);
    let tags: Vec<Tag> = query.all("tag").iter().map(|tag| Tag::parse(tag)).collect::<Result<_, _>>()?;
    let content_type = header_str(request.headers(), header::CONTENT_TYPE).map(str::to_string);
    let content = read_manifest_body(request).await?;
    let (digest, summary) = store_manifest(store, name, &reference, tags, content_type.as_deref(), content).await?;
    let mut response = empty(StatusCode::CREATED);
    set(&mut response, "Location", format!("/v2/{name}/manifests/{digest}"));
    set(&mut response, DOCKER_CONTENT_DIGEST, digest.to_string());
    if let Some(subject) = &summary.subject {
        set(&mut response, OCI_SUBJECT, subject.to_string());
    }
    Ok(response)
}

/// What a manifest PUT does once the body is read: checks the manifest
/// (and its digest, when the reference is one), then stores it under the
/// reference's tag and `tags`. For the HTTP handler and for callers in the
/// same process.
pub async fn store_manifest(
    store: &Store,
    name: &RepositoryName,
    reference: &Reference,
    mut tags: Vec<Tag>,
    content_type: Option<&str>,
    content: Bytes,
) -> RegistryResult<(Digest, manifest::ManifestSummary)> {
    let summary = manifest::parse(content_type, &content)?;
    let digest = match reference {
        Reference::Digest(expected) => {
            let actual = expected.algorithm().digest(&content);
            if &actual != expected {
                return Err(RegistryError::digest_invalid(format!(
                    "the manifest's digest is {actual}, not {expected} as the URL says"
                )));
            }
            actual
        }
        Reference::Tag(tag) => {
            tags.insert(0, tag.clone());
            Algorithm::Sha256.digest(&content)
        }
    };
    store.put_manifest(name, &tags, &digest, &summary, content).await?;
    Ok((digest, summary))
}

async fn delete_manifest(store: &Store, name: &RepositoryName, reference: &str) -> RegistryResult<Response> {
    let reference = Reference::parse(reference)?;
    let deleted = match &reference {
        Reference::Digest(digest) => store.delete_manifest(name, digest).await?,
        Reference::Tag(tag) => store.delete_tag(name, tag).await?,
    };
    if !deleted {
        return Err(RegistryError::manifest_unknown(format!(
            "manifest {} is not in repository {name}",
            describe(&reference)
        )));
    }
    Ok(empty(StatusCode::ACCEPTED))
}

// ----- listings -----

/// Applies `n` and `last` to a sorted list; returns the page and whether
/// more follow.
fn paginate(items: Vec<String>, query: &Query) -> RegistryResult<(Vec<String>, bool)> {
    let limit = match query.first("n") {
        Some(text) => Some(text.parse::<usize>().map_err(|_| {
            RegistryError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::Unsupported,
                format!("n={text:?} is not a number"),
            )
        })?),
        None => None,
    };
    let mut page: Vec<String> = match query.first("last") {
        Some(last) => items.into_iter().filter(|item| item.as_str() > last).collect(),
        None => items,
    };
    let more = limit.is_some_and(|limit| page.len() > limit);
    if let Some(limit) = limit {
        page.truncate(limit);
    }
    Ok((page, more))
}

fn next_link(response: &mut Response, path: &str, page: &[String], query: &Query) {
    if let (Some(last), Some(n)) = (page.last(), query.first("n")) {
        let encoded: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("n", n)
            .append_pair("last", last)
            .finish();
        set(response, "Link", format!("<{path}?{encoded}>; rel=\"next\""));
    }
}

async fn tags_list(store: &Store, name: &RepositoryName, query: &Query) -> RegistryResult<Response> {
    let tags = store.tags(name).await?;
    if tags.is_empty() && !store.repository_exists(name).await? {
        return Err(RegistryError::name_unknown(name));
    }
    let (page, more) = paginate(tags, query)?;
    let mut response = axum::Json(serde_json::json!({ "name": name.as_str(), "tags": page })).into_response();
    if more {
        next_link(&mut response, &format!("/v2/{name}/tags/list"), &page, query);
    }
    Ok(response)
}

async fn catalog(store: &Store, query: &Query) -> RegistryResult<Response> {
    let (page, more) = paginate(store.catalog().await?, query)?;
    let mut response = axum::Json(serde_json::json!({ "repositories": page })).into_response();
    if more {
        next_link(&mut response, "/v2/_catalog", &page, query);
    }
    Ok(response)
}

async fn referrers(store: &Store, name: &RepositoryName, subject: &str, query: &Query) -> RegistryResult<Response> {
    let subject: Digest = subject.parse()?;
    let filter = query.first("artifactType");
    let internal = |error: oci_spec::OciSpecError| {
        RegistryError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, error.to_string())
    };
    let mut descriptors = Vec::new();
    for (digest, size, summary) in store.referrers(name, &subject).await? {
        if filter.is_some_and(|wanted| summary.artifact_type.as_deref() != Some(wanted)) {
            continue;
        }
        let oci_digest: oci_spec::image::Digest = digest.to_string().parse().map_err(internal)?;
        let mut builder = DescriptorBuilder::default()
            .media_type(MediaType::from(summary.media_type.as_str()))
            .digest(oci_digest)
            .size(size);
        if let Some(artifact_type) = &summary.artifact_type {
            builder = builder.artifact_type(MediaType::from(artifact_type.as_str()));
        }
        if let Some(annotations) = summary.annotations {
            builder = builder.annotations(annotations);
        }
        descriptors.push(builder.build().map_err(internal)?);
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(descriptors)
        .build()
        .map_err(internal)?;
    let body = index.to_string().map_err(internal)?;
    let mut response = Response::new(Body::from(body));
    set(&mut response, "Content-Type", OCI_INDEX);
    if filter.is_some() {
        set(&mut response, OCI_FILTERS_APPLIED, "artifactType");
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> RepositoryName {
        RepositoryName::parse(text).unwrap()
    }

    #[test]
    fn routes_are_read_from_the_end() {
        let cases = [
            ("/v2/", Route::Base),
            ("/v2", Route::Base),
            ("/v2/_catalog", Route::Catalog),
            ("/v2/vi/ns/x/tags/list", Route::Tags(name("vi/ns/x"))),
            ("/v2/a/manifests/latest", Route::Manifest(name("a"), "latest".into())),
            ("/v2/a/blobs/uploads/", Route::UploadStart(name("a"))),
            ("/v2/a/blobs/uploads", Route::UploadStart(name("a"))),
            ("/v2/a/b/blobs/uploads/xyz", Route::Upload(name("a/b"), "xyz".into())),
            ("/v2/blobs/blobs/sha256:1", Route::Blob(name("blobs"), "sha256:1".into())),
            ("/v2/a/blobs/sha256%3A1", Route::Blob(name("a"), "sha256:1".into())),
            ("/v2/a/referrers/sha256:1", Route::Referrers(name("a"), "sha256:1".into())),
            ("/v2/manifests/manifests/x", Route::Manifest(name("manifests"), "x".into())),
        ];
        for (path, expected) in cases {
            assert_eq!(Route::parse(path).unwrap(), Some(expected), "{path}");
        }
        assert_eq!(Route::parse("/metrics").unwrap(), None);
        assert_eq!(Route::parse("/v2x/a").unwrap(), None);
        assert_eq!(Route::parse("/v2/a/unknown/x").unwrap(), None);
        for bad in ["/v2/A/manifests/x", "/v2/a/../b/manifests/x", "/v2//a/manifests/x", "/v2/a%2Fb/manifests/x"] {
            let error = Route::parse(bad).unwrap_err();
            assert_eq!(error.code, ErrorCode::NameInvalid, "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), ByteRange::Whole);
        assert_eq!(parse_range(Some("bytes=0-4"), 10).unwrap(), ByteRange::Part { start: 0, end: 4 });
        assert_eq!(parse_range(Some("bytes=5-"), 10).unwrap(), ByteRange::Part { start: 5, end: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), ByteRange::Part { start: 7, end: 9 });
        assert_eq!(parse_range(Some("bytes=8-100"), 10).unwrap(), ByteRange::Part { start: 8, end: 9 });
        assert_eq!(parse_range(Some("bytes=10-"), 10).unwrap(), ByteRange::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10).unwrap(), ByteRange::Unsatisfiable);
        for bad in ["bytes=5-2", "bytes=a-b", "items=0-1", "bytes=0-1,3-4", "bytes=-"] {
            assert!(parse_range(Some(bad), 10).is_err(), "{bad}");
        }
    }
}
