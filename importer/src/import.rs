//! One import: open the source, run the pipeline on a blocking thread while
//! the layer streams into a registry upload, then push the config and the
//! manifest, tag last. A failure tags nothing; blobs already pushed are
//! left for garbage collection.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::artifact;
use crate::channel_io::{ChannelReader, ChannelWriter, CHANNEL_DEPTH};
use crate::destination::Destination;
use crate::http_source::{HttpSource, RetryPolicy};
use crate::pipeline::{build_layer, ImageFacts, PipelineOptions};
use crate::progress::{Progress, Report};
use crate::reference::ImageReference;
use crate::registry_client::{ClientOptions, RegistryClient};
use crate::ImportError;

/// Bytes read from the end of a source to find an xz index (which lists
/// the unpacked size, so that an xz source streams instead of being
/// unpacked to scratch first).
const XZ_TAIL: u64 = 1 << 20;

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An `http://` or `https://` URL.
    Http(String),
    /// A local file.
    File(PathBuf),
    /// Standard input.
    Stdin,
    /// An image in a registry: copied by mounting when it is the
    /// destination's registry, else pulled (the first regular file under
    /// `disk/` of its layers).
    Registry(ImageReference),
}

impl Source {
    /// Parses a command-line source: a URL, `docker://REF`, `-`, or a path.
    pub fn parse(text: &str) -> Result<Source, ImportError> {
        if text.starts_with("http://") || text.starts_with("https://") {
            return Ok(Source::Http(text.to_string()));
        }
        if let Some(reference) = text.strip_prefix("docker://") {
            let reference = ImageReference::parse(reference).map_err(|error| ImportError::Usage(error.to_string()))?;
            return Ok(Source::Registry(reference));
        }
        if text == "-" {
            return Ok(Source::Stdin);
        }
        Ok(Source::File(PathBuf::from(text)))
    }
}

/// Everything one import needs.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// The source.
    pub source: Source,
    /// The destination reference (with its tag).
    pub destination: ImageReference,
    /// Pipeline settings; its `file_name` is filled from the source.
    pub pipeline: PipelineOptions,
    /// CA bundle for an HTTPS source.
    pub source_ca_bundle: Option<Vec<u8>>,
    /// How the destination registry is reached.
    pub registry: ClientOptions,
    /// Retries of the source.
    pub retry: RetryPolicy,
    /// A dockerconfigjson document with credentials for a source registry.
    pub source_auth: Option<Vec<u8>>,
    /// Read only this many bytes of a file source (an image on a block
    /// device larger than the image).
    pub source_length: Option<u64>,
}

/// Runs one import.
pub async fn import(request: ImportRequest, progress: Arc<Progress>) -> Result<Report, ImportError> {
    if request.source_length.is_some() && !matches!(request.source, Source::File(_)) {
        return Err(ImportError::Usage("--source-length reads a file or a device only".into()));
    }
    if request.pipeline.forced_format.is_some() && matches!(request.source, Source::Registry(_)) {
        return Err(ImportError::Usage("--source-format is for a file, a device, a URL or standard input".into()));
    }
    let mut client = RegistryClient::new(&request.destination, &request.registry)?;
    let destination = &request.destination;
    if let Source::Registry(from) = &request.source {
        if from.host == destination.host {
            return copy_within_registry(&mut client, from, destination, &progress).await;
        }
    }
    client.authorize(&[&destination.repository], "pull,push").await?;

    let mut options = request.pipeline.clone();
    let (reader, length): (Box<dyn Read + Send>, Option<u64>) = match &request.source {
        Source::Http(url) => {
            let http = crate::registry_client::http_client(request.source_ca_bundle.as_deref())?;
            let source = HttpSource::open(http, url, request.retry).await?;
            let length = source.length;
            if let (Some(tail), Some(length)) = (source.tail(XZ_TAIL).await, length) {
                options.xz_unpacked_size = dvcr_converter::unwrap::xz_unpacked_size(&tail, length);
            }
            options.file_name = url_file_name(url);
            let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
            tokio::spawn(source.pump(sender));
            (Box::new(ChannelReader::new(receiver)), length)
        }
        Source::File(path) => {
            let file = std::fs::File::open(path).map_err(ImportError::SourceRead)?;
            // A block device's metadata says 0: its size is where it ends.
            use dvcr_converter::source::ReadAt;
            let size = dvcr_converter::source::FileSource::new(file.try_clone().map_err(ImportError::SourceRead)?)
                .map_err(ImportError::SourceRead)?
                .size();
            let length = match request.source_length {
                Some(length) if length > size => {
                    return Err(ImportError::Usage(format!(
                        "--source-length {length} is longer than {} ({size} bytes)",
                        path.display()
                    )))
                }
                Some(length) => length,
                None => size,
            };
            let tail_start = length - XZ_TAIL.min(length);
            let mut tail = vec![0u8; (length - tail_start) as usize];
            if std::os::unix::fs::FileExt::read_exact_at(&file, &mut tail, tail_start).is_ok() {
                options.xz_unpacked_size = dvcr_converter::unwrap::xz_unpacked_size(&tail, length);
            }
            options.file_name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            (Box::new(file.take(length)), Some(length))
        }
        Source::Stdin => {
            options.file_name = "disk.img".into();
            (Box::new(io::stdin()), None)
        }
        Source::Registry(from) => {
            let (reader, name, length) = crate::container_source::open_disk(from, &request).await?;
            options.file_name = name;
            (reader, Some(length))
        }
    };
    progress.set_total(length);
    let facts = push_stream(&client, destination, reader, length, options, &progress).await?;
    progress.finish();
    Ok(report(&facts, destination, &progress))
}

/// Streams `reader` through the pipeline into the registry and tags the
/// result: the part shared by imports and uploads.
pub async fn push_stream(
    client: &dyn Destination,
    destination: &ImageReference,
    reader: Box<dyn Read + Send>,
    length: Option<u64>,
    options: PipelineOptions,
    progress: &Arc<Progress>,
) -> Result<ImageFacts, ImportError> {
    let repository = destination.repository.clone();
    let (location, registry_hashes) = client.begin_layer(&repository).await?;
    let mut options = options;
    // Without the registry's report, the digest can only come from here.
    options.hash_layer |= !registry_hashes;
    let (layer_sender, layer_receiver) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_DEPTH);
    let compression = options.layer_compression;
    let pipeline_progress = progress.clone();
    let pipeline = tokio::task::spawn_blocking(move || {
        let failure_sender = layer_sender.clone();
        let result = build_layer(reader, length, &options, &pipeline_progress, ChannelWriter::new(layer_sender));
        if let Err(error) = &result {
            // Abort the upload's body so the registry never completes it.
            let _ = failure_sender.blocking_send(Err(io::Error::other(error.to_string())));
        }
        result
    });
    let body = futures::stream::unfold(layer_receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let (built, sent) = tokio::join!(pipeline, client.send_layer(&location, Box::pin(body)));
    let built = built.map_err(|error| ImportError::Layer(io::Error::other(format!("the pipeline thread failed: {error}"))))?;
    let (facts, layer) = match (built, sent) {
        (Err(error), _) => {
            cancel(client, &location).await;
            return Err(error);
        }
        (Ok(_), Err(error)) => {
            cancel(client, &location).await;
            return Err(error.into());
        }
        (Ok((facts, mut layer)), Ok((location, reported))) => {
            if let Err(reason) = layer.settle(reported.as_deref()) {
                cancel(client, &location).await;
                return Err(ImportError::LayerDigest(reason));
            }
            client.complete_layer(&location, &layer.digest).await?;
            (facts, layer)
        }
    };
    let config = artifact::config(&facts, &layer);
    client.store_blob(&repository, &config.digest, config.content.clone()).await?;
    let (media_type, manifest) = artifact::manifest(&config, &layer, compression);
    client.store_manifest(&repository, &destination.reference, media_type, manifest.content).await?;
    tracing::info!(
        destination = %destination,
        format = %facts.format,
        stored_size = facts.stored_size,
        virtual_size = facts.virtual_size,
        layer = %layer.digest,
        "image stored"
    );
    Ok(facts)
}

async fn cancel(client: &dyn Destination, location: &str) {
    client.abandon_layer(location).await;
}

/// The final report of a successful import.
pub fn report(facts: &ImageFacts, destination: &ImageReference, progress: &Progress) -> Report {
    Report {
        source_image_size: facts.stored_size,
        source_image_virtual_size: facts.virtual_size,
        source_image_format: artifact::format_label(facts),
        cdrom: facts.format == dvcr_converter::detect::ImageFormat::Iso,
        duration: progress.elapsed().as_nanos() as u64,
        average_speed: progress.average_speed() as u64,
        registry_url: Some(destination.to_string()),
        error_message: None,
        reason: None,
    }
}

/// The base name of a URL's path, without query or fragment.
fn url_file_name(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let path = without_query.splitn(4, '/').nth(3).unwrap_or_default();
    path.rsplit('/').next().unwrap_or_default().to_string()
}

/// Copies an image already in the destination's registry: every blob is
/// mounted (no data moves) and the manifest is stored under the new tag.
pub async fn copy_within_registry(
    client: &mut RegistryClient,
    from: &ImageReference,
    destination: &ImageReference,
    progress: &Progress,
) -> Result<Report, ImportError> {
    client.authorize(&[&from.repository, &destination.repository], "pull,push").await?;
    let (media_type, manifest) = client.get_manifest(&from.repository, &from.reference).await?;
    let document: serde_json::Value = serde_json::from_slice(&manifest)
        .map_err(|error| ImportError::NotAnArtifact(format!("the manifest of {from} is not JSON: {error}")))?;
    let config_digest = document["config"]["digest"]
        .as_str()
        .ok_or_else(|| ImportError::NotAnArtifact(format!("{from} is not an image manifest (no config)")))?
        .to_string();
    let mut digests = vec![config_digest.clone()];
    for layer in document["layers"].as_array().into_iter().flatten() {
        if let Some(digest) = layer["digest"].as_str() {
            digests.push(digest.to_string());
        }
    }
    for digest in &digests {
        if !client.mount_blob(&destination.repository, &from.repository, digest).await? {
            return Err(ImportError::NotAnArtifact(format!(
                "the registry did not mount {digest} from {}: is it there?",
                from.repository
            )));
        }
    }
    client.put_manifest(&destination.repository, &destination.reference, &media_type, manifest).await?;
    let config = client.get_blob(&destination.repository, &config_digest).await?;
    let config: serde_json::Value = config.json().await.map_err(|error| ImportError::NotAnArtifact(format!("the config of {from} is not JSON: {error}")))?;
    let labels = &config["config"]["Labels"];
    let number = |key: &str| labels[key].as_str().and_then(|value| value.parse().ok()).unwrap_or(0u64);
    let format = labels[artifact::LABEL_FORMAT].as_str().unwrap_or_default().to_string();
    progress.finish();
    tracing::info!(from = %from, destination = %destination, "image copied by mounting its blobs");
    Ok(Report {
        source_image_size: number(artifact::LABEL_SIZE),
        source_image_virtual_size: number(artifact::LABEL_VIRTUAL_SIZE),
        cdrom: format == "iso",
        source_image_format: format,
        duration: progress.elapsed().as_nanos() as u64,
        average_speed: 0,
        registry_url: Some(destination.to_string()),
        error_message: None,
        reason: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_come_from_the_url_path() {
        assert_eq!(url_file_name("https://h.example/a/b/jammy.img?x=1#y"), "jammy.img");
        assert_eq!(url_file_name("http://h.example"), "");
        assert_eq!(url_file_name("http://h.example/"), "");
    }
}
