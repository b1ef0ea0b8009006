//! Parsing and checking manifests: what a manifest is and what it refers to.

use std::collections::HashMap;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde_json::Value;

use crate::error::{RegistryError, RegistryResult};
use crate::names::Digest;

/// Largest manifest accepted, as the spec suggests.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// What the registry needs to know of a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestSummary {
    /// Its media type, from the body or else from `Content-Type`.
    pub media_type: String,
    /// Blobs it needs in the repository (config and layers).
    pub blobs: Vec<Digest>,
    /// Manifests it needs in the repository (an index's children).
    pub manifests: Vec<Digest>,
    /// The manifest it refers to, for the referrers API.
    pub subject: Option<Digest>,
    /// `artifactType`, or for an image manifest without one its config's
    /// media type, as the referrers API reports.
    pub artifact_type: Option<String>,
    /// Its annotations.
    pub annotations: Option<HashMap<String, String>>,
}

fn descriptor_digest(descriptor: &Descriptor) -> RegistryResult<Digest> {
    let text = descriptor.digest().to_string();
    text.parse()
        .map_err(|error| RegistryError::manifest_invalid(format!("manifest refers to {text}: {error}")))
}

fn strip_parameters(media_type: &str) -> &str {
    media_type.split(';').next().unwrap_or("").trim()
}

/// Reads a manifest body as pushed with `content_type`, checking that it is
/// one of the kinds the registry stores and that body and header agree.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> RegistryResult<ManifestSummary> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|error| RegistryError::manifest_invalid(format!("manifest is not valid JSON: {error}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| RegistryError::manifest_invalid("manifest must be a JSON object"))?;
    let body_type = object.get("mediaType").and_then(Value::as_str);
    let header_type = content_type.map(strip_parameters).filter(|text| !text.is_empty());
    if let (Some(body_type), Some(header_type)) = (body_type, header_type) {
        let header_is_manifest_type = header_type != "application/json" && header_type != "application/octet-stream";
        if header_is_manifest_type && body_type != header_type {
            return Err(RegistryError::manifest_invalid(format!(
                "Content-Type {header_type} does not match the manifest's mediaType {body_type}"
            )));
        }
    }
    let media_type = body_type
        .map(str::to_string)
        .or_else(|| header_type.filter(|text| text.contains("manifest") || text.contains("index")).map(str::to_string))
        .unwrap_or_else(|| infer_media_type(object).to_string());
    if DOCKER_SCHEMA1.contains(&media_type.as_str()) || object.get("schemaVersion") == Some(&Value::from(1)) {
        return Err(RegistryError::manifest_invalid(
            "Docker schema 1 manifests are not supported: push a schema 2 or OCI manifest",
        ));
    }
    if object.get("schemaVersion") != Some(&Value::from(2)) {
        return Err(RegistryError::manifest_invalid("schemaVersion must be 2"));
    }
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let manifest = ImageManifest::from_reader(body)
                .map_err(|error| RegistryError::manifest_invalid(format!("invalid image manifest: {error}")))?;
            let mut blobs = vec![descriptor_digest(manifest.config())?];
            for layer in manifest.layers() {
                // Foreign and non-distributable layers live elsewhere.
                let foreign = layer.urls().as_ref().is_some_and(|urls| !urls.is_empty());
                if !foreign {
                    blobs.push(descriptor_digest(layer)?);
                }
            }
            let artifact_type = manifest
                .artifact_type()
                .as_ref()
                .map(ToString::to_string)
                .or_else(|| Some(manifest.config().media_type().to_string()));
            Ok(ManifestSummary {
                media_type,
                blobs,
                manifests: Vec::new(),
                subject: manifest.subject().as_ref().map(descriptor_digest).transpose()?,
                artifact_type,
                annotations: manifest.annotations().clone(),
            })
        }
        OCI_INDEX | DOCKER_MANIFEST_LIST => {
            let index = ImageIndex::from_reader(body)
                .map_err(|error| RegistryError::manifest_invalid(format!("invalid image index: {error}")))?;
            let manifests = index.manifests().iter().map(descriptor_digest).collect::<RegistryResult<_>>()?;
            Ok(ManifestSummary {
                media_type,
                blobs: Vec::new(),
                manifests,
                subject: index.subject().as_ref().map(descriptor_digest).transpose()?,
                artifact_type: index.artifact_type().as_ref().map(ToString::to_string),
                annotations: index.annotations().clone(),
            })
        }
        other => Err(RegistryError::manifest_invalid(format!(
            "unsupported manifest media type {other:?}: use {OCI_MANIFEST}, {OCI_INDEX}, {DOCKER_MANIFEST} or {DOCKER_MANIFEST_LIST}"
        ))),
    }
}

fn infer_media_type(object: &serde_json::Map<String, Value>) -> &'static str {
    if object.contains_key("manifests") {
        OCI_INDEX
    } else {
        OCI_MANIFEST
    }
}

/// The media type of a stored manifest, for `Content-Type` on reads.
pub fn stored_media_type(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => match object.get("mediaType").and_then(Value::as_str) {
            Some(media_type) => media_type.to_string(),
            None => infer_media_type(&object).to_string(),
        },
        _ => OCI_MANIFEST.to_string(),
    }
}

/// Whether an `Accept` header (all its values joined) lets a client take a
/// manifest of `media_type`. Headers that name no manifest type at all
/// (absent, `*/*`, `application/json`) accept anything.
pub fn accepts(accept_values: &[String], media_type: &str) -> bool {
    let offered: Vec<&str> = accept_values
        .iter()
        .flat_map(|value| value.split(','))
        .map(strip_parameters)
        .filter(|item| !item.is_empty())
        .collect();
    let names_manifest_types = offered
        .iter()
        .any(|item| item.contains("manifest") || item.contains("image.index"));
    if !names_manifest_types {
        return true;
    }
    offered
        .iter()
        .any(|item| *item == media_type || *item == "*/*" || *item == "application/*")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Algorithm;

    fn digest(data: &[u8]) -> String {
        Algorithm::Sha256.digest(data).to_string()
    }

    #[test]
    fn image_manifest_lists_config_and_layers_and_subject() {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/x.test",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(b"a"), "size": 1},
                {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": digest(b"f"), "size": 1, "urls": ["https://example.invalid/f"]}
            ],
            "subject": {"mediaType": OCI_MANIFEST, "digest": digest(b"s"), "size": 1}
        });
        let summary = parse(Some(OCI_MANIFEST), body.to_string().as_bytes()).unwrap();
        assert_eq!(summary.blobs.len(), 2, "foreign layer must not be required");
        assert_eq!(summary.subject.unwrap().to_string(), digest(b"s"));
        assert_eq!(summary.artifact_type.as_deref(), Some("application/x.test"));
    }

    #[test]
    fn refuses_mismatches_and_schema1_and_garbage() {
        let body = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).to_string();
        assert!(parse(Some(OCI_MANIFEST), body.as_bytes()).is_err());
        assert_eq!(parse(Some(OCI_INDEX), body.as_bytes()).unwrap().media_type, OCI_INDEX);
        let schema1 = serde_json::json!({"schemaVersion": 1, "name": "x"}).to_string();
        assert!(parse(None, schema1.as_bytes()).unwrap_err().message.contains("schema 1"));
        for garbage in [&b"[]"[..], b"{", b"", b"\xff\xfe", b"{\"schemaVersion\":2,\"config\":5}"] {
            assert!(parse(Some(OCI_MANIFEST), garbage).is_err());
        }
        let bad_digest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": "sha256:nothex", "size": 2}, "layers": []
        })
        .to_string();
        assert!(parse(None, bad_digest.as_bytes()).is_err());
    }

    #[test]
    fn accept_negotiation() {
        let list = vec![format!("{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}")];
        assert!(accepts(&list, DOCKER_MANIFEST));
        assert!(!accepts(&list, OCI_MANIFEST));
        assert!(accepts(&[], OCI_MANIFEST));
        assert!(accepts(&["*/*".to_string()], OCI_MANIFEST));
        assert!(accepts(&["application/json".to_string()], OCI_INDEX));
        assert!(accepts(&[format!("{OCI_MANIFEST};q=0.9"), "*/*".into()], OCI_INDEX));
    }
}
