//! VirtualDisk (`vd`): a PVC provisioned blank or from an image.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Conditions, DataSource, DownloadSpeed, UploadUrls};

/// A VM disk: a PVC, blank or filled from an image, a URL, a container
/// image or an upload.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualDisk",
    doc = "A VM disk: a PVC, blank or provisioned from an image, a URL, a container image or an upload.",
    namespaced,
    shortname = "vd",
    category = "virtualization",
    status = "VirtualDiskStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"StorageClass","type":"string","jsonPath":".status.storageClassName","priority":1}"#,
    printcolumn = r#"{"name":"TargetPVC","type":"string","jsonPath":".status.target.persistentVolumeClaimName","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualDiskSpec {
    /// The disk's PVC.
    #[serde(default)]
    pub persistent_volume_claim: DiskPersistentVolumeClaim,
    /// Where the content comes from; none for a blank disk. An `objectRef`
    /// names a VirtualImage or ClusterVirtualImage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source: Option<DataSource>,
}

/// Settings of a disk's PVC.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskPersistentVolumeClaim {
    /// Requested size; may only grow. Without it, the image's virtual size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// The storage class; the cluster's default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Observed state of a VirtualDisk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualDiskStatus {
    /// Where the disk is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DiskPhase>,
    /// Size of the PVC as bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Share of the provisioning done, `"47.6%"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Speed of an import into the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_speed: Option<DownloadSpeed>,
    /// The PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<DiskTarget>,
    /// Where to upload (`dataSource.type: Upload`).
    #[serde(
        default,
        rename = "imageUploadURLs",
        skip_serializing_if = "Option::is_none"
    )]
    pub image_upload_urls: Option<UploadUrls>,
    /// The storage class of the PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// `DatasourceReady`, `Ready`, `Resized`, `InUse`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of a disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DiskPhase {
    /// Waiting for its source or for resources.
    Pending,
    /// Being filled.
    Provisioning,
    /// Waiting for the user's upload.
    WaitForUserUpload,
    /// The storage class binds volumes only for a consuming Pod.
    WaitForFirstConsumer,
    /// Usable.
    Ready,
    /// Its PVC is growing.
    Resizing,
    /// Provisioning failed; the `Ready` condition says why.
    Failed,
    /// Its PVC is gone.
    #[serde(rename = "PVCLost")]
    PvcLost,
    /// Being deleted.
    Terminating,
}

/// Where a disk is.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskTarget {
    /// Name of the PVC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
}
