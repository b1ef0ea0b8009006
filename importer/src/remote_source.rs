//! Random access to images that are not local files, for the converter:
//! HTTP `Range` reads of a URL, and the disk file inside an uncompressed
//! layer of an image in a registry, found by reading the tar headers
//! through ranges. So a disk can be provisioned from the registry without
//! first copying the image to scratch space.
//!
//! [`HttpRangeSource`] is a blocking [`ReadAt`]: call it from ordinary
//! threads (the converter's), never from inside an async task.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;

use dvcr_converter::source::{ReadAt, SubRange};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use crate::reference::ImageReference;
use crate::registry_client::{ClientOptions, RegistryClient};
use crate::ImportError;

/// Reads are served from aligned blocks of this size.
const BLOCK: u64 = 4 << 20;
/// Blocks kept (32 MiB).
const CACHED_BLOCKS: usize = 8;

/// A URL read with HTTP `Range` requests, through a small block cache.
pub struct HttpRangeSource {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    url: String,
    authorization: Option<HeaderValue>,
    size: u64,
    cache: Mutex<VecDeque<(u64, Vec<u8>)>>,
}

impl HttpRangeSource {
    /// Opens `url`, learning its size from a one-byte range; a server
    /// without range support is refused with a message saying so.
    pub fn open(client: reqwest::Client, url: &str, authorization: Option<HeaderValue>) -> Result<Self, ImportError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|error| ImportError::Layer(io::Error::other(format!("cannot start an async runtime: {error}"))))?;
        let mut source = HttpRangeSource {
            runtime,
            client,
            url: url.to_string(),
            authorization,
            size: 0,
            cache: Mutex::new(VecDeque::new()),
        };
        let (_, total) = source.fetch(0, 1).map_err(|error| ImportError::Http(url.to_string(), error.to_string()))?;
        source.size = total;
        Ok(source)
    }

    /// GETs `length` bytes at `offset`; returns them and the total size.
    fn fetch(&self, offset: u64, length: u64) -> io::Result<(Vec<u8>, u64)> {
        let mut request = self
            .client
            .get(&self.url)
            .header(RANGE, format!("bytes={offset}-{}", offset + length - 1));
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let url = self.url.clone();
        self.runtime.block_on(async move {
            let response = request
                .send()
                .await
                .map_err(|error| io::Error::other(crate::http_source::error_chain(&error)))?;
            match response.status() {
                StatusCode::PARTIAL_CONTENT => {}
                StatusCode::OK => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("{url} does not support Range requests (it answered 200 to one): download it, or import it with `dvcr import`"),
                    ))
                }
                status => return Err(io::Error::other(format!("{url} answered HTTP {status} to a Range request"))),
            }
            let total = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.rsplit('/').next())
                .and_then(|value| value.parse::<u64>().ok())
                .ok_or_else(|| io::Error::other(format!("{url} sent no usable Content-Range")))?;
            let body = response
                .bytes()
                .await
                .map_err(|error| io::Error::other(crate::http_source::error_chain(&error)))?;
            if body.len() as u64 != length.min(total.saturating_sub(offset)) {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{url} sent {} bytes for a range of {length} at {offset}", body.len()),
                ));
            }
            Ok((body.to_vec(), total))
        })
    }

    fn block(&self, index: u64) -> io::Result<Vec<u8>> {
        {
            let cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((_, data)) = cache.iter().find(|(cached, _)| *cached == index) {
                return Ok(data.clone());
            }
        }
        let start = index * BLOCK;
        let (data, _) = self.fetch(start, BLOCK.min(self.size - start))?;
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cache.len() == CACHED_BLOCKS {
            cache.pop_front();
        }
        cache.push_back((index, data.clone()));
        Ok(data)
    }
}

impl ReadAt for HttpRangeSource {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buffer.len() as u64)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if buffer.is_empty() {
            return Ok(());
        }
        if buffer.len() as u64 >= BLOCK {
            let (data, _) = self.fetch(offset, buffer.len() as u64)?;
            buffer.copy_from_slice(&data);
            return Ok(());
        }
        let mut position = offset;
        while position < end {
            let index = position / BLOCK;
            let block = self.block(index)?;
            let within = (position - index * BLOCK) as usize;
            let take = ((end - position) as usize).min(block.len() - within);
            let at = (position - offset) as usize;
            buffer[at..at + take].copy_from_slice(&block[within..within + take]);
            position += take as u64;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// The disk file of an image in a registry, read through ranges of its
/// (uncompressed) layer blob. Blocking: call it from an ordinary thread.
pub fn registry_disk(reference: &ImageReference, options: &ClientOptions) -> Result<SubRange<HttpRangeSource>, ImportError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| ImportError::Layer(io::Error::other(format!("cannot start an async runtime: {error}"))))?;
    let (client, layer) = runtime.block_on(async {
        let mut client = RegistryClient::new(reference, options)?;
        client.authorize(&[&reference.repository], "pull").await?;
        let (_, manifest) = client.get_manifest(&reference.repository, &reference.reference).await?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest)
            .map_err(|error| ImportError::NotAnArtifact(format!("the manifest of {reference} is not JSON: {error}")))?;
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        let [layer] = layers.as_slice() else {
            return Err(ImportError::NotAnArtifact(format!(
                "{reference} has {} layers; a disk image artifact has one",
                layers.len()
            )));
        };
        Ok::<_, ImportError>((client, layer.clone()))
    })?;
    let media_type = layer["mediaType"].as_str().unwrap_or_default();
    if !(media_type.ends_with(".tar") || media_type.ends_with("tar")) || media_type.contains("gzip") || media_type.contains("zstd") {
        return Err(ImportError::NotAnArtifact(format!(
            "the layer of {reference} is {media_type}: only an uncompressed layer can be read in place; import it with --layer-compression none"
        )));
    }
    let digest = layer["digest"].as_str().unwrap_or_default();
    let url = client.blob_url(&reference.repository, digest);
    let blob = HttpRangeSource::open(crate::registry_client::http_client(options.ca_bundle.as_deref())?, &url, client.authorization())?;
    let (start, size) = find_disk(&blob).map_err(|reason| ImportError::NotAnArtifact(format!("{reference}: {reason}")))?;
    SubRange::new(blob, start, size).map_err(ImportError::SourceRead)
}

/// Offset and size of the first regular file under `disk/` in a tar
/// read through `source`.
fn find_disk(source: &dyn ReadAt) -> Result<(u64, u64), String> {
    let mut offset = 0u64;
    let mut long_name: Option<String> = None;
    for _ in 0..64 {
        if offset + 512 > source.size() {
            break;
        }
        let mut block = [0u8; 512];
        source.read_exact_at(&mut block, offset).map_err(|error| error.to_string())?;
        if block.iter().all(|byte| *byte == 0) {
            break;
        }
        let header = tar::Header::from_byte_slice(&block);
        let size = header.entry_size().map_err(|error| format!("a tar header is corrupt: {error}"))?;
        let data = offset + 512;
        let kind = header.entry_type();
        if kind.is_gnu_longname() {
            let mut name = vec![0u8; size.min(4096) as usize];
            source.read_exact_at(&mut name, data).map_err(|error| error.to_string())?;
            long_name = Some(String::from_utf8_lossy(&name).trim_end_matches('\0').to_string());
        } else {
            let name = long_name
                .take()
                .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
            if kind.is_file() && name.starts_with("disk/") && !name[5..].contains('/') && !name.contains("..") {
                return Ok((data, size));
            }
        }
        offset = data + size.div_ceil(512) * 512;
    }
    Err("no regular file under disk/ in its layer".into())
}
