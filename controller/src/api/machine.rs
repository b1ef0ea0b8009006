//! VirtualMachine (`vm`) and what acts on it: VirtualMachineBlockDeviceAttachment
//! (`vmbda`), VirtualMachineOperation (`vmop`), VirtualMachineClass (`vmclass`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Conditions;

/// A virtual machine, handed to KubeVirt as a `kubevirt.io/v1`
/// VirtualMachine of the same name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualMachine",
    doc = "A virtual machine, run by KubeVirt.",
    namespaced,
    shortname = "vm",
    category = "virtualization",
    status = "VirtualMachineStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Cores","type":"integer","jsonPath":".spec.cpu.cores","priority":1}"#,
    printcolumn = r#"{"name":"CoreFraction","type":"string","jsonPath":".spec.cpu.coreFraction","priority":1}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".spec.memory.size","priority":1}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"IPAddress","type":"string","jsonPath":".status.ipAddress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// Who decides whether the machine runs.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// The VirtualMachineClass giving CPU model, placement and sizing rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_class_name: Option<String>,
    /// Processors.
    pub cpu: Cpu,
    /// Memory.
    pub memory: Memory,
    /// Disks and images, in boot order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_device_refs: Vec<BlockDeviceRef>,
    /// First-boot configuration (cloud-init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<Provisioning>,
    /// How changes that need a restart are applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruptions: Option<Disruptions>,
    /// Guest OS family, for device and clock defaults.
    #[serde(default)]
    pub os_type: OsType,
    /// Firmware.
    #[serde(default)]
    pub bootloader: Bootloader,
    /// Virtio devices (true) or emulated ones.
    #[serde(default = "default_true")]
    pub enable_paravirtualization: bool,
    /// A VirtualMachineIPAddress to take the address from; one is made when
    /// empty.
    #[serde(
        default,
        rename = "virtualMachineIPAddressName",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_machine_ip_address_name: Option<String>,
    /// Seconds the guest gets to shut down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    /// Nodes the machine may run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the machine tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

fn default_true() -> bool {
    true
}

/// Who decides whether the machine runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunPolicy {
    /// Always running; a shutdown from inside starts it again.
    AlwaysOn,
    /// Always stopped.
    AlwaysOff,
    /// Started and stopped by the user only (VirtualMachineOperation).
    Manual,
    /// Running unless stopped by a user (VirtualMachineOperation or guest).
    #[default]
    AlwaysOnUnlessStoppedManually,
}

/// Processors of a machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    /// Virtual cores.
    #[schemars(range(min = 1, max = 1024))]
    pub cores: i32,
    /// Guaranteed share of each core, `"5%"` to `"100%"`.
    #[serde(default = "full_core")]
    #[schemars(regex(pattern = r"^(100|[1-9][0-9]?)%$"))]
    pub core_fraction: String,
}

fn full_core() -> String {
    "100%".into()
}

/// Memory of a machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Memory {
    /// Size, `"4Gi"`.
    pub size: Quantity,
}

/// A disk or image attached to a machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct BlockDeviceRef {
    /// Kind of the device.
    pub kind: BlockDeviceKind,
    /// Its name (in the machine's namespace, unless cluster-wide).
    pub name: String,
}

/// What a machine can boot from or attach.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BlockDeviceKind {
    /// A namespaced image: a read-only container disk (an ISO: a CD-ROM).
    VirtualImage,
    /// A cluster-wide image, as above.
    ClusterVirtualImage,
    /// A disk: a PVC.
    VirtualDisk,
}

/// First-boot configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Provisioning {
    /// Which field below is used.
    #[serde(rename = "type")]
    pub provisioning_type: ProvisioningType,
    /// cloud-init user data, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// A Secret holding the user data under `userData`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_ref: Option<UserDataRef>,
}

/// How provisioning data is given.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProvisioningType {
    /// `userData` inline.
    UserData,
    /// `userDataRef` to a Secret.
    UserDataRef,
}

/// A Secret with cloud-init user data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct UserDataRef {
    /// Always `Secret`.
    pub kind: UserDataRefKind,
    /// Name of the Secret in the machine's namespace.
    pub name: String,
}

/// What holds user data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum UserDataRefKind {
    /// A core/v1 Secret.
    Secret,
}

/// How changes that need a restart are applied.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Disruptions {
    /// `Manual`: the change waits for a user's restart; `Automatic`: the
    /// machine restarts by itself.
    #[serde(default)]
    pub restart_approval_mode: RestartApprovalMode,
}

/// Approval of a restart.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartApprovalMode {
    /// Wait for a user.
    #[default]
    Manual,
    /// Restart at once.
    Automatic,
}

/// Guest OS family.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OsType {
    /// Linux and others.
    #[default]
    Generic,
    /// Windows: Hyper-V enlightenments, local-time clock.
    Windows,
}

/// Firmware of a machine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Bootloader {
    /// SeaBIOS.
    #[default]
    #[serde(rename = "BIOS")]
    Bios,
    /// OVMF.
    #[serde(rename = "EFI")]
    Efi,
    /// OVMF with Secure Boot (and SMM).
    #[serde(rename = "EFIWithSecureBoot")]
    EfiWithSecureBoot,
}

/// Observed state of a machine, mirrored from KubeVirt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Where the machine is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MachinePhase>,
    /// The node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// The VirtualMachineIPAddress it holds.
    #[serde(
        default,
        rename = "virtualMachineIPAddressName",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_machine_ip_address_name: Option<String>,
    /// Whether a change waits for a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_awaiting_changes: Option<bool>,
    /// `BlockDevicesReady`, `Running`, `AwaitingRestartToApplyConfiguration`, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of a machine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MachinePhase {
    /// Waiting for its disks, images or address.
    Pending,
    /// Being started.
    Starting,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped.
    Stopped,
    /// Moving to another node.
    Migrating,
    /// Being deleted.
    Terminating,
    /// Its KubeVirt machine reports a failure.
    Degraded,
}

/// Hot-plugs a disk into a running machine.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualMachineBlockDeviceAttachment",
    doc = "A disk hot-plugged into a running virtual machine.",
    namespaced,
    shortname = "vmbda",
    category = "virtualization",
    status = "AttachmentStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"VirtualMachineName","type":"string","jsonPath":".spec.virtualMachineName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineBlockDeviceAttachmentSpec {
    /// The machine, in the same namespace.
    pub virtual_machine_name: String,
    /// What to attach.
    pub block_device_ref: BlockDeviceRef,
}

/// Observed state of an attachment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentStatus {
    /// `Pending`, `InProgress`, `Attached`, `Failed`, `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AttachmentPhase>,
    /// The machine the device is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_name: Option<String>,
    /// `Attached`, `BlockDeviceReady`, `VirtualMachineReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of an attachment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AttachmentPhase {
    /// Waiting for the machine or the device.
    Pending,
    /// Being attached.
    InProgress,
    /// Attached.
    Attached,
    /// Could not be attached; the conditions say why.
    Failed,
    /// Being detached and deleted.
    Terminating,
}

/// An action on a machine: start, stop, restart, migrate, evict.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualMachineOperation",
    doc = "An action on a virtual machine: Start, Stop, Restart, Migrate or Evict.",
    namespaced,
    shortname = "vmop",
    category = "virtualization",
    status = "OperationStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"VirtualMachine","type":"string","jsonPath":".spec.virtualMachineName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineOperationSpec {
    /// The action.
    #[serde(rename = "type")]
    pub operation_type: OperationType,
    /// The machine, in the same namespace.
    pub virtual_machine_name: String,
    /// Stop or restart without waiting for the guest (power off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// Actions on a machine.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OperationType {
    /// Start a stopped machine.
    Start,
    /// Stop a running machine.
    Stop,
    /// Stop and start.
    Restart,
    /// Live-migrate to another node.
    Migrate,
    /// Migrate away from its node (as a drain does).
    Evict,
}

/// Observed state of an operation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    /// `Pending`, `InProgress`, `Completed`, `Failed`, `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<OperationPhase>,
    /// `Completed`, `SignalSent`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of an operation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OperationPhase {
    /// Waiting for an earlier operation on the same machine.
    Pending,
    /// Under way.
    InProgress,
    /// Done.
    Completed,
    /// Could not be done; the conditions say why.
    Failed,
    /// Being deleted.
    Terminating,
}

/// CPU model, placement and sizing rules shared by machines.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualMachineClass",
    doc = "CPU model, node placement and sizing rules for virtual machines.",
    shortname = "vmclass",
    category = "virtualization",
    status = "VirtualMachineClassStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineClassSpec {
    /// The virtual CPU.
    pub cpu: ClassCpu,
    /// Nodes machines of this class may run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<ClassNodeSelector>,
    /// Taints machines of this class tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Allowed cores, memory and core fractions, by core count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sizing_policies: Vec<SizingPolicy>,
}

/// The virtual CPU of a class.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCpu {
    /// How the model is chosen.
    #[serde(rename = "type")]
    pub cpu_type: ClassCpuType,
    /// The model (`type: Model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Required features (`type: Features`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The nodes whose common CPU features make the model (`type:
    /// Discovery`); every node when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<CpuDiscovery>,
}

/// Where a `Discovery` class looks for its CPU features.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuDiscovery {
    /// The nodes to intersect; every node when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<ClassNodeSelector>,
}

/// How the CPU model of a class is chosen.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ClassCpuType {
    /// The host's model (machines cannot migrate between CPU generations).
    Host,
    /// The host's CPU passed through.
    HostPassthrough,
    /// The features common to the class's nodes.
    Discovery,
    /// A named model.
    Model,
    /// A list of features.
    Features,
}

/// Nodes for a class.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassNodeSelector {
    /// Labels the nodes must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Sizing rules for machines whose core count is in `cores`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SizingPolicy {
    /// The core counts this policy applies to.
    pub cores: CoreRange,
    /// Allowed memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryRange>,
    /// Allowed core fractions, `"25%"` etc.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub core_fractions: Vec<String>,
    /// Whether cores must be dedicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedicated_cores: Vec<bool>,
}

/// A range of core counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct CoreRange {
    /// Fewest cores.
    #[schemars(range(min = 1))]
    pub min: i32,
    /// Most cores.
    #[schemars(range(min = 1))]
    pub max: i32,
    /// Step between allowed counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i32>,
}

/// A range of memory sizes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryRange {
    /// Least memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Quantity>,
    /// Most memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Quantity>,
    /// Step between allowed sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Quantity>,
}

/// Observed state of a class.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineClassStatus {
    /// `Pending`, `Ready`, `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Nodes machines of this class can run on: those its `nodeSelector`
    /// selects whose `NoSchedule` and `NoExecute` taints it tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub available_nodes: Vec<String>,
    /// The CPU features of a `Discovery` class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<ClassCpuFeatures>,
    /// `Discovered`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// CPU features a `Discovery` class found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCpuFeatures {
    /// The features every discovery node has (KubeVirt's node labels
    /// `cpu-feature.node.kubevirt.io/<feature>`), required of its machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enabled: Vec<String>,
}
