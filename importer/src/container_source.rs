//! A container image in another registry as a source: its manifest (an
//! index resolves to linux/amd64), then its layers in order, each
//! streamed and unpacked (gzip, zstd or plain tar), until the first regular
//! file under `disk/`. Entries that would escape `disk/` (absolute paths,
//! `..`, links under `disk/`) refuse the whole image.

use std::io::{self, Read};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::channel_io::{ChannelReader, ChannelWriter, CHANNEL_DEPTH};
use crate::import::ImportRequest;
use crate::reference::ImageReference;
use crate::registry_client::{ClientOptions, Credentials, RegistryClient};
use crate::ImportError;

/// Most layers looked through for the disk.
const MAX_LAYERS: usize = 128;

/// Opens the disk file of the image `from`: a reader of its bytes, its
/// base name and its length. The layers are read on a blocking thread.
pub async fn open_disk(from: &ImageReference, request: &ImportRequest) -> Result<(Box<dyn Read + Send>, String, u64), ImportError> {
    let credentials = match &request.source_auth {
        Some(document) => Credentials::from_docker_config(document, &from.host)
            .map_err(|reason| ImportError::Usage(format!("the auth file is unusable: {reason}")))?,
        None => None,
    };
    let options = ClientOptions {
        ca_bundle: request.source_ca_bundle.clone(),
        plain_http: request.registry.plain_http,
        credentials,
        bearer_token: None,
    };
    let mut client = RegistryClient::new(from, &options)?;
    client.authorize(&[&from.repository], "pull").await?;
    let layers = layers_of(&client, from).await?;
    let (found_sender, found) = oneshot::channel::<Result<(String, u64), ImportError>>();
    let (data_sender, data) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_DEPTH);
    let handle = tokio::runtime::Handle::current();
    let repository = from.repository.clone();
    let reference = from.to_string();
    tokio::task::spawn_blocking(move || {
        let failure_sender = data_sender.clone();
        let mut found_sender = Some(found_sender);
        let outcome = find_and_send(&handle, &client, &repository, &layers, &mut found_sender, data_sender);
        if let Err(error) = outcome {
            match found_sender.take() {
                Some(sender) => {
                    let _ = sender.send(Err(error));
                }
                None => {
                    let _ = failure_sender.blocking_send(Err(io::Error::other(error.to_string())));
                }
            }
        } else if let Some(sender) = found_sender.take() {
            let _ = sender.send(Err(ImportError::NotAnArtifact(format!(
                "{reference} has no regular file under disk/ in any of its layers"
            ))));
        }
    });
    let (name, length) = found
        .await
        .map_err(|_| ImportError::Layer(io::Error::other("the layer reader stopped")))??;
    Ok((Box::new(ChannelReader::new(data)), name, length))
}

/// The layers (digest, media type) of `from`, resolving an index to its
/// linux/amd64 manifest (or its only one).
async fn layers_of(client: &RegistryClient, from: &ImageReference) -> Result<Vec<(String, String)>, ImportError> {
    let (_, body) = client.get_manifest(&from.repository, &from.reference).await?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&body).map_err(|error| ImportError::NotAnArtifact(format!("the manifest of {from} is not JSON: {error}")))?;
    if let Some(entries) = manifest["manifests"].as_array() {
        let chosen = entries
            .iter()
            .find(|entry| entry["platform"]["os"] == "linux" && entry["platform"]["architecture"] == "amd64")
            .or_else(|| if entries.len() == 1 { entries.first() } else { None })
            .and_then(|entry| entry["digest"].as_str())
            .ok_or_else(|| ImportError::NotAnArtifact(format!("{from} is an index without a linux/amd64 image")))?
            .to_string();
        let (_, body) = client.get_manifest(&from.repository, &chosen).await?;
        manifest = serde_json::from_slice(&body)
            .map_err(|error| ImportError::NotAnArtifact(format!("the manifest {chosen} of {from} is not JSON: {error}")))?;
    }
    let layers: Vec<(String, String)> = manifest["layers"]
        .as_array()
        .map(|layers| {
            layers
                .iter()
                .filter_map(|layer| Some((layer["digest"].as_str()?.to_string(), layer["mediaType"].as_str().unwrap_or_default().to_string())))
                .collect()
        })
        .unwrap_or_default();
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(ImportError::NotAnArtifact(format!("{from} has {} layers", layers.len())));
    }
    Ok(layers)
}

/// Why an entry path is refused, if it is.
fn escapes(path: &[u8]) -> Option<&'static str> {
    if path.starts_with(b"/") {
        return Some("an absolute path");
    }
    if path.split(|byte| *byte == b'/').any(|part| part == b"..") {
        return Some("a `..` component");
    }
    None
}

/// `disk/<name>` (also `./disk/<name>`): the name, for a file directly
/// under `disk/`.
fn disk_file(path: &[u8]) -> Option<String> {
    let path = path.strip_prefix(b"./").unwrap_or(path);
    let name = path.strip_prefix(b"disk/")?;
    if name.is_empty() || name.contains(&b'/') {
        return None;
    }
    Some(String::from_utf8_lossy(name).into_owned())
}

fn find_and_send(
    handle: &tokio::runtime::Handle,
    client: &RegistryClient,
    repository: &str,
    layers: &[(String, String)],
    found: &mut Option<oneshot::Sender<Result<(String, u64), ImportError>>>,
    data: mpsc::Sender<io::Result<Bytes>>,
) -> Result<(), ImportError> {
    for (digest, media_type) in layers {
        let response = handle.block_on(client.get_blob(repository, digest))?;
        let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
        handle.spawn(crate::channel_io::pump_response(response, sender));
        let blob = ChannelReader::new(receiver);
        let unpacked: Box<dyn Read> = if media_type.contains("gzip") {
            Box::new(flate2::read::MultiGzDecoder::new(blob))
        } else if media_type.contains("zstd") {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(ImportError::SourceRead)?)
        } else {
            Box::new(blob)
        };
        let mut archive = tar::Archive::new(unpacked);
        let entries = archive.entries().map_err(ImportError::SourceRead)?;
        for entry in entries {
            let mut entry = entry.map_err(|error| ImportError::NotAnArtifact(format!("layer {digest} is not a tar: {error}")))?;
            let path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&path).into_owned();
            if let Some(reason) = escapes(&path) {
                return Err(ImportError::NotAnArtifact(format!(
                    "layer {digest} has an entry {shown:?} with {reason}: refused, it could escape disk/"
                )));
            }
            let kind = entry.header().entry_type();
            let under_disk = disk_file(&path).is_some();
            if under_disk && (kind.is_symlink() || kind.is_hard_link()) {
                return Err(ImportError::NotAnArtifact(format!(
                    "layer {digest} has a link {shown:?} under disk/: refused, it could point outside the image"
                )));
            }
            if !(under_disk && kind.is_file()) {
                continue;
            }
            let name = disk_file(&path).unwrap_or_default();
            let size = entry.size();
            if let Some(sender) = found.take() {
                let _ = sender.send(Ok((name, size)));
            }
            let mut writer = ChannelWriter::new(data);
            std::io::copy(&mut entry, &mut writer).map_err(ImportError::SourceRead)?;
            std::io::Write::flush(&mut writer).map_err(ImportError::SourceRead)?;
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(escapes(b"/etc/passwd"), Some("an absolute path"));
        assert_eq!(escapes(b"disk/../../etc"), Some("a `..` component"));
        assert_eq!(escapes(b"disk/a..b"), None);
        assert_eq!(disk_file(b"disk/ubuntu.qcow2").as_deref(), Some("ubuntu.qcow2"));
        assert_eq!(disk_file(b"./disk/x.img").as_deref(), Some("x.img"));
        assert_eq!(disk_file(b"disk/"), None);
        assert_eq!(disk_file(b"disk/sub/x"), None);
        assert_eq!(disk_file(b"etc/disk/x"), None);
    }
}
