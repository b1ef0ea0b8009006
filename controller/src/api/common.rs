//! Types shared by the image and disk resources: data sources, sizes,
//! download speed, upload URLs and conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every resource here.
pub const GROUP: &str = "virtualization.deckhouse.io";
/// API version of every resource here.
pub const VERSION: &str = "v1alpha2";

/// Where the data of an image or a disk comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    /// Which of the fields below is used.
    #[serde(rename = "type")]
    pub source_type: DataSourceType,
    /// A file on an HTTP(S) server (`type: HTTP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// A container image holding the disk under `disk/` (`type: ContainerImage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<ContainerImageSource>,
    /// Another image or disk of the platform (`type: ObjectRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_ref: Option<ObjectRefSource>,
}

/// The kinds of data source; `Upload` waits for the user's `curl -T`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DataSourceType {
    /// Download from `http.url`.
    #[serde(rename = "HTTP")]
    Http,
    /// Pull `containerImage.image`.
    ContainerImage,
    /// Copy `objectRef`.
    ObjectRef,
    /// Wait for an upload to `status.imageUploadURLs`.
    Upload,
}

/// A file on an HTTP(S) server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// The URL, `http://` or `https://`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// PEM certificates (base64) that the server's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// Checksums of the file as downloaded; every one given must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<Checksum>,
}

/// Expected digests of a download, in lowercase hex.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Checksum {
    /// MD5 (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{32}$"))]
    pub md5: Option<String>,
    /// SHA-1 (40 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{40}$"))]
    pub sha1: Option<String>,
    /// SHA-256 (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    /// SHA-512 (128 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{128}$"))]
    pub sha512: Option<String>,
}

/// A container image in another registry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerImageSource {
    /// The image reference, `registry/path:tag` or `@sha256:...`.
    pub image: String,
    /// A `kubernetes.io/dockerconfigjson` Secret with credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<SecretName>,
    /// PEM certificates (base64) that the registry's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

/// A Secret by name (and, for cluster-wide resources, namespace).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretName {
    /// Name of the Secret.
    pub name: String,
    /// Its namespace; for namespaced resources, their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Another image or disk of the platform to copy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ObjectRefSource {
    /// Kind of the object.
    pub kind: ObjectRefKind,
    /// Its name.
    pub name: String,
    /// Its namespace (namespaced kinds referenced from a cluster-wide
    /// resource); for namespaced resources, their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What an `objectRef` may point at.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ObjectRefKind {
    /// A namespaced image.
    VirtualImage,
    /// A cluster-wide image.
    ClusterVirtualImage,
    /// A disk (its current content).
    VirtualDisk,
}

/// Download speed of an import in progress, or its average once done.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadSpeed {
    /// Average, human-readable (`"95.2Mi/s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg: Option<String>,
    /// Average in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avg_bytes: Option<String>,
    /// Current, human-readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Current in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_bytes: Option<String>,
}

/// Sizes of a stored image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSize {
    /// Stored size, human-readable (`"1.2Gi"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<String>,
    /// Stored size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<String>,
    /// Virtual (unpacked) size, human-readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked: Option<String>,
    /// Virtual size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_bytes: Option<String>,
}

impl ImageSize {
    /// The virtual size in bytes, when given and a number.
    pub fn virtual_bytes(&self) -> Option<u64> {
        self.unpacked_bytes.as_deref()?.parse().ok()
    }
}

/// Where an upload can be sent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadUrls {
    /// Reachable from outside the cluster (through the Ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    /// Reachable from inside the cluster (the uploader's Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_cluster: Option<String>,
}

/// Conditions, as `metav1.Condition`.
pub type Conditions = Vec<Condition>;
