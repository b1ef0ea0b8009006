//! The stored artifact: a Docker image config carrying the image facts as
//! labels, and a Docker schema 2 manifest with one layer (an OCI manifest
//! for a zstd layer, which Docker's schema has no media type for).

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::pipeline::{ImageFacts, LayerCompression, LayerFacts};

/// Label: bytes of the image as stored.
pub const LABEL_SIZE: &str = "source-image-size";
/// Label: virtual size.
pub const LABEL_VIRTUAL_SIZE: &str = "source-image-virtual-size";
/// Label: format.
pub const LABEL_FORMAT: &str = "source-image-format";

/// A blob ready to push.
pub struct Blob {
    /// `sha256:...`
    pub digest: String,
    /// The bytes.
    pub content: Bytes,
}

impl Blob {
    fn new(content: Vec<u8>) -> Self {
        Blob {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&content))),
            content: Bytes::from(content),
        }
    }
}

/// The format name stored in the label.
pub fn format_label(facts: &ImageFacts) -> String {
    facts.format.to_string()
}

/// The config blob.
pub fn config(facts: &ImageFacts, layer: &LayerFacts) -> Blob {
    let document = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Labels": {
                LABEL_SIZE: facts.stored_size.to_string(),
                LABEL_VIRTUAL_SIZE: facts.virtual_size.to_string(),
                LABEL_FORMAT: format_label(facts),
            }
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id] },
    });
    Blob::new(serde_json::to_vec(&document).unwrap_or_default())
}

/// The manifest and its media type.
pub fn manifest(config: &Blob, layer: &LayerFacts, compression: LayerCompression) -> (&'static str, Blob) {
    let (media_type, config_type, layer_type) = match compression {
        LayerCompression::None => (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar",
        ),
        LayerCompression::Gzip => (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        LayerCompression::Zstd => (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    };
    let document = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": { "mediaType": config_type, "size": config.content.len(), "digest": config.digest },
        "layers": [ { "mediaType": layer_type, "size": layer.size, "digest": layer.digest } ],
    });
    (media_type, Blob::new(serde_json::to_vec(&document).unwrap_or_default()))
}
