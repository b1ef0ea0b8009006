//! Image fixtures built at test time: tar layers, configs and manifests, and
//! OCI image layouts for skopeo.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use super::sha256_digest;

/// An image: config, layers and manifest, all as bytes.
pub struct Image {
    /// The config blob.
    pub config: Vec<u8>,
    /// The layer blobs with their media types.
    pub layers: Vec<(String, Vec<u8>)>,
    /// The manifest.
    pub manifest: Vec<u8>,
    /// The manifest's media type.
    pub manifest_media_type: String,
}

impl Image {
    /// Config then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.config.as_slice()).chain(self.layers.iter().map(|(_, data)| data.as_slice()))
    }

    /// The manifest's digest.
    pub fn digest(&self) -> String {
        sha256_digest(&self.manifest)
    }
}

/// A tar holding `entries` (path, mode, content; `None` content is a folder).
pub fn tar(entries: &[(&str, u32, Option<&[u8]>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, content) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match content {
            Some(content) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(content.len() as u64);
                builder.append_data(&mut header, path, *content).expect("tar entry");
            }
            None => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .expect("tar folder");
            }
        }
    }
    builder.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
    json!({ "mediaType": media_type, "digest": sha256_digest(data), "size": data.len() })
}

/// Builds an image from uncompressed layer tars; `gzip_layers` compresses
/// them. `docker` picks Docker schema 2 media types instead of OCI ones.
pub fn image(layer_tars: Vec<Vec<u8>>, gzip_layers: bool, docker: bool, labels: serde_json::Value) -> Image {
    let diff_ids: Vec<String> = layer_tars.iter().map(|layer| sha256_digest(layer)).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": labels },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("config");
    let (manifest_type, config_type, layer_type) = match (docker, gzip_layers) {
        (true, true) => (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
        (true, false) => (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar",
        ),
        (false, true) => (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (false, false) => (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar",
        ),
    };
    let layers: Vec<(String, Vec<u8>)> = layer_tars
        .into_iter()
        .map(|layer| (layer_type.to_string(), if gzip_layers { gzip(&layer) } else { layer }))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": descriptor(config_type, &config),
        "layers": layers.iter().map(|(media_type, data)| descriptor(media_type, data)).collect::<Vec<_>>(),
    }))
    .expect("manifest");
    Image {
        config,
        layers,
        manifest,
        manifest_media_type: manifest_type.to_string(),
    }
}

/// A DVCR VM-image artifact: Docker schema 2, one uncompressed layer with
/// `disk/` and `disk/<file_name>`, and the size/format labels.
pub fn disk_image(file_name: &str, disk: &[u8]) -> Image {
    let layer = tar(&[("disk", 0o755, None), (&format!("disk/{file_name}"), 0o644, Some(disk))]);
    image(
        vec![layer],
        false,
        true,
        json!({
            "source-image-size": disk.len().to_string(),
            "source-image-virtual-size": disk.len().to_string(),
            "source-image-format": "raw",
        }),
    )
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut data = Vec::with_capacity(length);
    while data.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    data.truncate(length);
    data
}

/// A three-layer OCI image (two gzip layers would need the same
/// compression everywhere; one plain and two gzip layers exercise both).
pub fn multi_layer_image(seed: u64) -> Image {
    let layers = vec![
        tar(&[("etc", 0o755, None), ("etc/hostname", 0o644, Some(b"dvcr-test\n"))]),
        tar(&[
            ("data", 0o755, None),
            ("data/random.bin", 0o644, Some(&pseudo_random(3 << 20, seed))),
        ]),
        tar(&[("data/more.bin", 0o644, Some(&pseudo_random(700_000, seed + 1)))]),
    ];
    image(layers, true, false, json!({ "test": "multi-layer" }))
}

/// Writes `image` as an OCI image layout at `directory`, tagged `tag`.
pub fn write_oci_layout(directory: &Path, tag: &str, image: &Image) {
    let blobs = directory.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout folder");
    for blob in image.blobs().chain(std::iter::once(image.manifest.as_slice())) {
        let digest = sha256_digest(blob);
        std::fs::write(blobs.join(&digest["sha256:".len()..]), blob).expect("layout blob");
    }
    std::fs::write(directory.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": image.manifest_media_type,
            "digest": image.digest(),
            "size": image.manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(directory.join("index.json"), serde_json::to_vec(&index).expect("index")).expect("index.json");
}
