//! VirtualImage (`vi`, namespaced) and ClusterVirtualImage (`cvi`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Conditions, DataSource, DownloadSpeed, ImageSize, UploadUrls};

/// A namespaced VM image, stored in the registry (`vi/<ns>/<name>`) or in a
/// PVC.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualImage",
    doc = "A VM image of a namespace, imported into the registry (vi/<namespace>/<name>) or a PVC.",
    namespaced,
    shortname = "vi",
    category = "virtualization",
    status = "ImageStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"CDROM","type":"boolean","jsonPath":".status.cdrom"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"StoredSize","type":"string","jsonPath":".status.size.stored","priority":1}"#,
    printcolumn = r#"{"name":"UnpackedSize","type":"string","jsonPath":".status.size.unpacked","priority":1}"#,
    printcolumn = r#"{"name":"Registry URL","type":"string","jsonPath":".status.target.registryURL","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualImageSpec {
    /// Where the image is kept.
    #[serde(default)]
    pub storage: ImageStorage,
    /// The PVC's settings when `storage` is `PersistentVolumeClaim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ImagePersistentVolumeClaim>,
    /// Where the image comes from.
    pub data_source: DataSource,
}

/// Where a VirtualImage is kept.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImageStorage {
    /// In the registry, as `vi/<namespace>/<name>`.
    #[default]
    ContainerRegistry,
    /// In a PVC of the image's namespace.
    PersistentVolumeClaim,
}

/// Settings of an image's PVC.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePersistentVolumeClaim {
    /// The storage class; the cluster's default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// A cluster-wide VM image, stored in the registry as `cvi/<name>`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "ClusterVirtualImage",
    doc = "A VM image for the whole cluster, imported into the registry (cvi/<name>).",
    shortname = "cvi",
    category = "virtualization",
    status = "ImageStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"CDROM","type":"boolean","jsonPath":".status.cdrom"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"StoredSize","type":"string","jsonPath":".status.size.stored","priority":1}"#,
    printcolumn = r#"{"name":"UnpackedSize","type":"string","jsonPath":".status.size.unpacked","priority":1}"#,
    printcolumn = r#"{"name":"Registry URL","type":"string","jsonPath":".status.target.registryURL","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterVirtualImageSpec {
    /// Where the image comes from; an `objectRef` to a VirtualImage names
    /// its namespace.
    pub data_source: DataSource,
}

/// Observed state of a VirtualImage or ClusterVirtualImage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// Where the image is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// Share of the import done, `"47.6%"`; never `"100%"` before `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Speed of the import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_speed: Option<DownloadSpeed>,
    /// Sizes once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ImageSize>,
    /// Disk format as detected (`qcow2`, `raw`, `iso`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Whether the image is an ISO, attached as a CD-ROM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<bool>,
    /// Where the image is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ImageTarget>,
    /// Where to upload (`dataSource.type: Upload`).
    #[serde(
        default,
        rename = "imageUploadURLs",
        skip_serializing_if = "Option::is_none"
    )]
    pub image_upload_urls: Option<UploadUrls>,
    /// UID of the source object (`objectRef`).
    #[serde(default, rename = "sourceUID", skip_serializing_if = "Option::is_none")]
    pub source_uid: Option<String>,
    /// The storage class of the image's PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// `DatasourceReady`, `Ready`, `InUse`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of an image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePhase {
    /// Waiting for its source or for resources.
    Pending,
    /// Being imported.
    Provisioning,
    /// Waiting for the user's upload.
    WaitForUserUpload,
    /// Stored and usable.
    Ready,
    /// The import failed; the `Ready` condition says why.
    Failed,
    /// Being deleted.
    Terminating,
    /// Ready once, but no longer found in the registry.
    ImageLost,
    /// Its PVC is gone (`storage: PersistentVolumeClaim`).
    #[serde(rename = "PVCLost")]
    PvcLost,
}

/// Where an image is stored.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageTarget {
    /// The image in the registry, `<registry>/vi/<ns>/<name>:<tag>`.
    #[serde(
        default,
        rename = "registryURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub registry_url: Option<String>,
    /// The PVC holding it (`storage: PersistentVolumeClaim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
}
