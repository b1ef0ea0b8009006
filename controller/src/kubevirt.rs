//! The hand-off to KubeVirt, without I/O: a VirtualMachine becomes a
//! `kubevirt.io/v1` VirtualMachine of the same name (reference, section 5),
//! KubeVirt's state is mirrored back, and operations become KubeVirt's
//! subresource requests. KubeVirt objects are plain JSON here: its Go types
//! have no maintained Rust crate, and only the fields below are written.

use serde_json::{json, Map, Value};

use crate::api::common::{GROUP, VERSION};
use crate::api::machine::{
    BlockDeviceKind, Bootloader, MachinePhase, OperationType, OsType, ProvisioningType, RunPolicy,
    VirtualMachineSpec,
};
use crate::import::fnv1a64;
use crate::reconcile::provision::ImageLocation;

/// Label of the KubeVirt objects naming the VirtualMachine they belong to.
pub const MACHINE_LABEL: &str = "virtualization.deckhouse.io/virtual-machine";
/// Annotation holding the hash of the spec the controller rendered, so that
/// a KubeVirt machine is applied again only when that rendering changes (its
/// stored spec has KubeVirt's defaults, and its `runStrategy` is KubeVirt's
/// to change when a user stops the machine).
pub const SPEC_HASH_ANNOTATION: &str = "virtualization.deckhouse.io/spec-hash";

/// The hash of a rendered spec, as [`SPEC_HASH_ANNOTATION`] holds it.
pub fn spec_hash(spec: &Value) -> String {
    format!("{:016x}", fnv1a64(spec.to_string().as_bytes()))
}

/// Sets [`SPEC_HASH_ANNOTATION`] of a rendered machine to its spec's hash
/// (after anything changed the spec).
pub fn rehash(machine: &mut Value) {
    let hash = spec_hash(&machine["spec"]);
    machine["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = Value::from(hash);
}

/// Annotation of KubeVirt's machine template holding the template's hash.
/// KubeVirt copies the template's annotations to every instance it starts,
/// so an instance started from an older rendering shows it: a change that
/// waits for a restart.
pub const TEMPLATE_HASH_ANNOTATION: &str = "virtualization.deckhouse.io/template-hash";

/// Stamps a fully rendered machine's template with its hash
/// ([`TEMPLATE_HASH_ANNOTATION`]), then rehashes the spec.
pub fn stamp_template(machine: &mut Value) {
    let template = &mut machine["spec"]["template"];
    if let Some(annotations) = template["metadata"]["annotations"].as_object_mut() {
        annotations.remove(TEMPLATE_HASH_ANNOTATION);
    }
    let hash = spec_hash(template);
    template["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] = Value::from(hash);
    rehash(machine);
}

/// The template hash KubeVirt's `instance` was started from, if it has one
/// (instances started before the controller stamped templates have none).
pub fn template_hash(instance_or_machine: &Value) -> Option<&str> {
    let annotations = match instance_or_machine["kind"].as_str() {
        Some("VirtualMachine") => &instance_or_machine["spec"]["template"]["metadata"]["annotations"],
        _ => &instance_or_machine["metadata"]["annotations"],
    };
    annotations[TEMPLATE_HASH_ANNOTATION].as_str()
}

/// A VirtualMachine the controller cannot hand to KubeVirt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineSpecError {
    /// `cpu.coreFraction` is not a percentage from 1 to 100.
    #[error("cpu.coreFraction {0:?} is not a percentage from 1% to 100%")]
    CoreFraction(String),
    /// `cpu.cores` is below 1.
    #[error("cpu.cores is {0}; a machine needs at least 1")]
    Cores(i32),
    /// A block device is given twice.
    #[error("blockDeviceRefs names {0} twice")]
    DuplicateDevice(String),
    /// `provisioning.type` names a field that is not filled.
    #[error("provisioning.type is {0} but provisioning.{1} is missing")]
    MissingProvisioning(&'static str, &'static str),
    /// An image kept in a PVC of another namespace.
    #[error("{0} is kept in a PVC of another namespace, which the machine cannot use")]
    ForeignClaim(String),
    /// Devices resolved do not match the references.
    #[error("{0} block devices are referenced but {1} were resolved")]
    DeviceCount(usize, usize),
}

/// What a block device reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedDevice {
    /// A Ready image: where it is, and whether it is an ISO.
    Image {
        /// `status.target`: a registry reference, or a PVC of the machine's
        /// namespace.
        location: ImageLocation,
        /// `status.cdrom`.
        cdrom: bool,
    },
    /// A Ready disk: its PVC.
    Disk {
        /// `status.target.persistentVolumeClaimName`.
        claim_name: String,
    },
}

/// KubeVirt's `runStrategy` for a run policy: KubeVirt keeps
/// `AlwaysOnUnlessStoppedManually` machines running itself (a stop through
/// its subresource halts them); the others are `Manual`, started and
/// stopped by the controller ([`power_action`]).
pub fn run_strategy(policy: RunPolicy) -> &'static str {
    match policy {
        RunPolicy::AlwaysOnUnlessStoppedManually => "Always",
        RunPolicy::AlwaysOn | RunPolicy::AlwaysOff | RunPolicy::Manual => "Manual",
    }
}

/// The CPU request of `cores` at `fraction` (`"25%"`), in millicores.
pub fn cpu_request(cores: i32, fraction: &str) -> Result<String, MachineSpecError> {
    if cores < 1 {
        return Err(MachineSpecError::Cores(cores));
    }
    let percent: i64 = fraction
        .strip_suffix('%')
        .and_then(|number| number.parse().ok())
        .filter(|percent| (1..=100).contains(percent))
        .ok_or_else(|| MachineSpecError::CoreFraction(fraction.to_string()))?;
    Ok(format!("{}m", i64::from(cores) * 1000 * percent / 100))
}

/// A KubeVirt volume name (a DNS label) for a device: `vi-`, `cvi-` or
/// `vd-` and the name, or the name's hash when that is too long.
pub fn volume_name(kind: BlockDeviceKind, name: &str) -> String {
    let prefix = match kind {
        BlockDeviceKind::VirtualImage => "vi",
        BlockDeviceKind::ClusterVirtualImage => "cvi",
        BlockDeviceKind::VirtualDisk => "vd",
    };
    let full = format!("{prefix}-{name}");
    if full.len() <= 63 && !full.contains('.') {
        full
    } else {
        format!("{prefix}-{:016x}", fnv1a64(name.as_bytes()))
    }
}

/// The `kubevirt.io/v1` VirtualMachine for `spec`, owned by the
/// VirtualMachine `name` (`uid`); `devices` are the resolutions of
/// `spec.blockDeviceRefs`, in the same order (the boot order).
pub fn virtual_machine(
    name: &str,
    namespace: &str,
    uid: &str,
    spec: &VirtualMachineSpec,
    devices: &[ResolvedDevice],
) -> Result<Value, MachineSpecError> {
    if devices.len() != spec.block_device_refs.len() {
        return Err(MachineSpecError::DeviceCount(spec.block_device_refs.len(), devices.len()));
    }
    let cpu = cpu_request(spec.cpu.cores, &spec.cpu.core_fraction)?;
    let bus = if spec.enable_paravirtualization { "virtio" } else { "sata" };
    let mut disks = Vec::new();
    let mut volumes = Vec::new();
    for (index, (reference, device)) in spec.block_device_refs.iter().zip(devices).enumerate() {
        let volume = volume_name(reference.kind, &reference.name);
        if volumes.iter().any(|existing: &Value| existing["name"] == volume) {
            return Err(MachineSpecError::DuplicateDevice(format!("{:?} {}", reference.kind, reference.name)));
        }
        let boot_order = index + 1;
        match device {
            ResolvedDevice::Image { location, cdrom } => {
                disks.push(if *cdrom {
                    json!({"name": volume, "bootOrder": boot_order, "cdrom": {"bus": "sata"}})
                } else {
                    json!({"name": volume, "bootOrder": boot_order, "disk": {"bus": bus}})
                });
                volumes.push(match location {
                    ImageLocation::Registry(registry_url) => json!({"name": volume, "containerDisk": {
                        "image": registry_url, "imagePullPolicy": "IfNotPresent"}}),
                    // The image's PVC is shared and stays as it is: the
                    // machine writes to a copy-on-write overlay that goes
                    // with it, as it does over a containerDisk.
                    ImageLocation::Claim { namespace: claim_namespace, name } => {
                        if claim_namespace != namespace {
                            return Err(MachineSpecError::ForeignClaim(format!(
                                "{:?} {}",
                                reference.kind, reference.name
                            )));
                        }
                        json!({"name": volume, "ephemeral": {"persistentVolumeClaim": {
                            "claimName": name, "readOnly": true}}})
                    }
                });
            }
            ResolvedDevice::Disk { claim_name } => {
                disks.push(json!({"name": volume, "bootOrder": boot_order, "disk": {"bus": bus}}));
                volumes.push(json!({"name": volume, "persistentVolumeClaim": {"claimName": claim_name}}));
            }
        }
    }
    if let Some(provisioning) = &spec.provisioning {
        let source = match provisioning.provisioning_type {
            ProvisioningType::UserData => {
                let data = provisioning
                    .user_data
                    .as_ref()
                    .ok_or(MachineSpecError::MissingProvisioning("UserData", "userData"))?;
                json!({"userData": data})
            }
            ProvisioningType::UserDataRef => {
                let secret = provisioning
                    .user_data_ref
                    .as_ref()
                    .ok_or(MachineSpecError::MissingProvisioning("UserDataRef", "userDataRef"))?;
                json!({"userDataSecretRef": {"name": secret.name}})
            }
        };
        disks.push(json!({"name": "cloudinit", "disk": {"bus": bus}}));
        volumes.push(json!({"name": "cloudinit", "cloudInitNoCloud": source}));
    }

    let mut domain = Map::new();
    domain.insert(
        "cpu".into(),
        json!({"cores": spec.cpu.cores, "sockets": 1, "threads": 1}),
    );
    domain.insert("memory".into(), json!({"guest": spec.memory.size}));
    domain.insert(
        "resources".into(),
        json!({
            "requests": {"cpu": cpu, "memory": spec.memory.size},
            "limits": {"cpu": spec.cpu.cores.to_string(), "memory": spec.memory.size},
        }),
    );
    let (bootloader, secure_boot) = match spec.bootloader {
        Bootloader::Bios => (json!({"bios": {}}), false),
        Bootloader::Efi => (json!({"efi": {"secureBoot": false}}), false),
        Bootloader::EfiWithSecureBoot => (json!({"efi": {"secureBoot": true}}), true),
    };
    domain.insert("firmware".into(), json!({"bootloader": bootloader}));
    let mut features = Map::new();
    if secure_boot {
        // OVMF's Secure Boot needs SMM.
        features.insert("smm".into(), json!({"enabled": true}));
    }
    if spec.os_type == OsType::Windows {
        features.insert(
            "hyperv".into(),
            json!({"relaxed": {}, "vapic": {}, "spinlocks": {"spinlocks": 8191}}),
        );
        domain.insert("clock".into(), json!({"utc": {}, "timer": {"hyperv": {}}}));
    }
    if !features.is_empty() {
        domain.insert("features".into(), Value::Object(features));
    }
    let model = if spec.enable_paravirtualization { "virtio" } else { "e1000" };
    domain.insert(
        "devices".into(),
        json!({
            "disks": disks,
            "interfaces": [{"name": "default", "masquerade": {}, "model": model}],
        }),
    );

    let mut template_spec = Map::new();
    template_spec.insert("domain".into(), Value::Object(domain));
    template_spec.insert("networks".into(), json!([{"name": "default", "pod": {}}]));
    template_spec.insert("volumes".into(), Value::Array(volumes));
    if let Some(seconds) = spec.termination_grace_period_seconds {
        template_spec.insert("terminationGracePeriodSeconds".into(), json!(seconds));
    }
    if !spec.node_selector.is_empty() {
        template_spec.insert("nodeSelector".into(), json!(spec.node_selector));
    }
    if !spec.tolerations.is_empty() {
        template_spec.insert("tolerations".into(), json!(spec.tolerations));
    }
    let spec = json!({
        "runStrategy": run_strategy(spec.run_policy),
        "template": {
            "metadata": {"labels": {MACHINE_LABEL: name}},
            "spec": template_spec,
        },
    });
    Ok(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MACHINE_LABEL: name},
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(&spec)},
            "ownerReferences": [{
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "VirtualMachine",
                "name": name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
    }))
}

/// Annotation of a machine's Pod asking the CNI (Cilium, as DVP patches
/// it) for the machine's leased address.
pub const IP_ADDRESS_ANNOTATION: &str = "cni.cilium.io/ipAddress";

/// Gives the rendered KubeVirt machine its leased `address` (an annotation
/// of its Pod template), updating the spec hash.
pub fn assign_address(machine: &mut Value, address: &str) {
    machine["spec"]["template"]["metadata"]["annotations"] = json!({IP_ADDRESS_ANNOTATION: address});
    rehash(machine);
}

/// What KubeVirt says about a machine: the phase, node and address to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredStatus {
    /// The phase.
    pub phase: MachinePhase,
    /// The node of the running instance.
    pub node_name: Option<String>,
    /// The first interface's address.
    pub ip_address: Option<String>,
}

/// Mirrors KubeVirt's VirtualMachine (`printableStatus`) and its
/// VirtualMachineInstance (node, address) into our status.
pub fn mirror_status(kubevirt_machine: Option<&Value>, instance: Option<&Value>) -> MirroredStatus {
    let printable = kubevirt_machine
        .and_then(|machine| machine["status"]["printableStatus"].as_str())
        .unwrap_or_default();
    let phase = match printable {
        "" => MachinePhase::Pending,
        "Stopped" | "Paused" => MachinePhase::Stopped,
        "Provisioning" | "Starting" | "WaitingForVolumeBinding" => MachinePhase::Starting,
        "Running" => MachinePhase::Running,
        "Stopping" | "Terminating" => MachinePhase::Stopping,
        "Migrating" => MachinePhase::Migrating,
        _ => MachinePhase::Degraded,
    };
    let text = |value: &Value| value.as_str().filter(|text| !text.is_empty()).map(str::to_string);
    let node_name = instance.and_then(|instance| text(&instance["status"]["nodeName"]));
    let ip_address = instance.and_then(|instance| text(&instance["status"]["interfaces"][0]["ipAddress"]));
    MirroredStatus {
        phase,
        node_name,
        ip_address,
    }
}

/// Start or stop, through KubeVirt's subresources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// `.../start`.
    Start,
    /// `.../stop`.
    Stop,
}

/// What the controller does for the run policies KubeVirt does not enforce
/// (its `runStrategy` is `Manual` for them): `AlwaysOn` starts a stopped
/// machine, `AlwaysOff` stops a running one; `Manual` leaves it to users.
pub fn power_action(policy: RunPolicy, phase: MachinePhase) -> Option<PowerAction> {
    match (policy, phase) {
        (RunPolicy::AlwaysOn, MachinePhase::Stopped) => Some(PowerAction::Start),
        (RunPolicy::AlwaysOff, MachinePhase::Running | MachinePhase::Starting | MachinePhase::Migrating) => {
            Some(PowerAction::Stop)
        }
        _ => None,
    }
}

/// A request to KubeVirt's subresource API for an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubresourceRequest {
    /// `PUT` path under the API server.
    pub path: String,
    /// JSON body.
    pub body: Value,
}

/// The KubeVirt request carrying out an operation on machine `name`.
/// `Evict` is a migration away from the node, as a drain does it.
pub fn operation_request(namespace: &str, name: &str, operation: OperationType, force: bool) -> SubresourceRequest {
    let (verb, body) = match operation {
        OperationType::Start => ("start", json!({})),
        OperationType::Stop if force => ("stop", json!({"gracePeriod": 0})),
        OperationType::Stop => ("stop", json!({})),
        OperationType::Restart if force => ("restart", json!({"gracePeriodSeconds": 0})),
        OperationType::Restart => ("restart", json!({})),
        OperationType::Migrate | OperationType::Evict => ("migrate", json!({})),
    };
    SubresourceRequest {
        path: format!("/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/{verb}"),
        body,
    }
}

/// The bus hot-plugged disks are attached on: KubeVirt hot-plugs onto
/// SCSI (a virtio disk needs a free PCI slot, which a running machine may
/// not have).
pub const HOTPLUG_BUS: &str = "scsi";

/// The KubeVirt request hot-plugging PVC `claim_name` as volume `volume`
/// into the running instance of machine `machine`. The instance, not the
/// machine, is changed: KubeVirt's machine stays as the controller renders
/// it, and a new instance gets the disk again from its attachment.
pub fn add_volume_request(namespace: &str, machine: &str, volume: &str, claim_name: &str) -> SubresourceRequest {
    SubresourceRequest {
        path: instance_subresource(namespace, machine, "addvolume"),
        body: json!({
            "name": volume,
            "disk": {"name": volume, "disk": {"bus": HOTPLUG_BUS}},
            "volumeSource": {"persistentVolumeClaim": {"claimName": claim_name, "hotpluggable": true}},
        }),
    }
}

/// The KubeVirt request unplugging volume `volume` from the running
/// instance of machine `machine`.
pub fn remove_volume_request(namespace: &str, machine: &str, volume: &str) -> SubresourceRequest {
    SubresourceRequest {
        path: instance_subresource(namespace, machine, "removevolume"),
        body: json!({"name": volume}),
    }
}

fn instance_subresource(namespace: &str, machine: &str, verb: &str) -> String {
    format!("/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{machine}/{verb}")
}

/// A hot-plugged volume as a KubeVirt instance shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotplugState {
    /// Not in the instance's `spec.volumes`.
    Absent,
    /// In its `spec.volumes`, not yet `Ready` in `status.volumeStatus`:
    /// KubeVirt's phase and message so far.
    Attaching {
        /// `status.volumeStatus[].phase` (`Pending`, `Bound`,
        /// `AttachedToNode`, `MountedToPod`, ...), if any yet.
        phase: Option<String>,
        /// Its `message` or `reason`.
        message: Option<String>,
    },
    /// Attached: the guest sees it as `target` (`sda`, ...).
    Ready {
        /// `status.volumeStatus[].target`.
        target: Option<String>,
    },
}

/// What KubeVirt's `instance` shows of volume `volume`.
pub fn hotplug_state(instance: &Value, volume: &str) -> HotplugState {
    let named = |list: &Value| {
        list.as_array()
            .and_then(|entries| entries.iter().find(|entry| entry["name"] == volume))
            .cloned()
    };
    if named(&instance["spec"]["volumes"]).is_none() {
        return HotplugState::Absent;
    }
    let status = named(&instance["status"]["volumeStatus"]).unwrap_or_default();
    let text = |value: &Value| value.as_str().filter(|text| !text.is_empty()).map(str::to_string);
    match text(&status["phase"]) {
        Some(phase) if phase == "Ready" => HotplugState::Ready {
            target: text(&status["target"]),
        },
        phase => HotplugState::Attaching {
            phase,
            message: text(&status["message"]).or_else(|| text(&status["reason"])),
        },
    }
}

/// Whether KubeVirt's `instance` runs (phase `Running`, not being deleted).
pub fn instance_running(instance: &Value) -> bool {
    instance["status"]["phase"] == "Running" && instance["metadata"]["deletionTimestamp"].is_null()
}

#[cfg(test)]
mod tests;
