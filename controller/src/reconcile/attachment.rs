//! VirtualMachineBlockDeviceAttachment: hot-plugs a Ready VirtualDisk into
//! a running machine through KubeVirt's `addvolume` on its instance, and
//! unplugs it with `removevolume` before the attachment is deleted (a
//! finalizer holds it until then). The instance, not KubeVirt's machine, is
//! changed, so the machine controller's rendering never undoes a hot-plug;
//! when the machine restarts, its new instance lacks the volume and the
//! attachment plugs it in again: an attachment lasts until it is deleted.
//!
//! A disk is used by one machine at a time: one named in a machine's
//! `blockDeviceRefs`, or attached (or being attached) by an older
//! attachment, is not attached again.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::machine::DeviceState;
use super::{Action, Plan, PROGRESS_INTERVAL, WAIT_INTERVAL};
use crate::api::machine::{
    AttachmentPhase, AttachmentStatus, BlockDeviceKind, VirtualMachineBlockDeviceAttachmentSpec,
};
use crate::conditions::Setter;
use crate::kubevirt::{
    add_volume_request, hotplug_state, instance_running, remove_volume_request, volume_name, HotplugState,
    ResolvedDevice,
};

/// Condition: the disk is attached to the machine.
pub const ATTACHED: &str = "Attached";
/// Condition: the disk exists, is Ready and is free to attach.
pub const BLOCK_DEVICE_READY: &str = "BlockDeviceReady";
/// Condition: the machine exists and runs.
pub const VIRTUAL_MACHINE_READY: &str = "VirtualMachineReady";

/// How long a refused hot-plug waits before it is tried again (KubeVirt
/// refuses, for example, while its `HotplugVolumes` feature gate is off).
pub const REFUSAL_RETRY: Duration = Duration::from_secs(60);

/// What the reconciler reads of an attachment.
#[derive(Debug, Clone, Copy)]
pub struct AttachmentView<'a> {
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `metadata.finalizers` holds [`super::FINALIZER`].
    pub has_finalizer: bool,
    /// `spec`.
    pub spec: &'a VirtualMachineBlockDeviceAttachmentSpec,
    /// `status`, as last written.
    pub status: &'a AttachmentStatus,
}

/// The machine an attachment names, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachedMachine {
    /// No such VirtualMachine.
    Missing,
    /// It exists.
    Found {
        /// Its `spec.blockDeviceRefs` names the disk already.
        names_disk: bool,
    },
}

/// What the I/O layer observed. While the attachment is deleted only
/// `instance` is read.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentObserved {
    /// The disk ([`DeviceState::Ready`] holds its PVC).
    pub disk: DeviceState,
    /// The machine.
    pub machine: AttachedMachine,
    /// Who else uses the disk ("VirtualMachine db", "VirtualMachineBlockDeviceAttachment
    /// extra"), if anyone.
    pub other_user: Option<String>,
    /// KubeVirt's instance of the machine.
    pub instance: Option<Value>,
    /// The time now.
    pub now: Timestamp,
}

/// The KubeVirt volume an attachment plugs in.
pub fn attachment_volume(spec: &VirtualMachineBlockDeviceAttachmentSpec) -> String {
    volume_name(spec.block_device_ref.kind, &spec.block_device_ref.name)
}

/// Decides the status and actions of an attachment.
pub fn reconcile(view: &AttachmentView<'_>, observed: &AttachmentObserved) -> Plan<AttachmentStatus> {
    let mut plan = Plan {
        status: view.status.clone(),
        actions: Vec::new(),
        requeue_after: None,
    };
    plan.status.observed_generation = view.generation;
    let conditions = Setter {
        generation: view.generation,
        now: observed.now,
    };
    let machine = view.spec.virtual_machine_name.as_str();
    let disk = view.spec.block_device_ref.name.as_str();
    let volume = attachment_volume(view.spec);
    let plugged = observed
        .instance
        .as_ref()
        .filter(|instance| instance_running(instance))
        .map(|instance| hotplug_state(instance, &volume))
        .filter(|state| *state != HotplugState::Absent);

    if view.deleting {
        plan.status.phase = Some(AttachmentPhase::Terminating);
        if plugged.is_some() {
            plan.actions.push(Action::KubevirtSubresource(remove_volume_request(view.namespace, machine, &volume)));
            let message = format!("unplugging VirtualDisk {disk} from VirtualMachine {machine}");
            conditions.set(&mut plan.status.conditions, ATTACHED, false, "Detaching", message);
            plan.requeue_after = Some(PROGRESS_INTERVAL);
        } else if view.has_finalizer {
            plan.actions.push(Action::RemoveFinalizer);
        }
        return plan;
    }
    if !view.has_finalizer {
        plan.actions.push(Action::AddFinalizer);
    }
    plan.status.virtual_machine_name = Some(machine.to_string());

    let wait = |plan: &mut Plan<AttachmentStatus>,
                phase: AttachmentPhase,
                condition: &'static str,
                reason: &'static str,
                message: String| {
        plan.status.phase = Some(phase);
        conditions.set(&mut plan.status.conditions, condition, false, reason, message.clone());
        if condition != ATTACHED {
            conditions.set(&mut plan.status.conditions, ATTACHED, false, reason, message);
        }
        plan.requeue_after = Some(WAIT_INTERVAL);
    };

    let kind = view.spec.block_device_ref.kind;
    if kind != BlockDeviceKind::VirtualDisk {
        let message = format!(
            "{kind:?} {disk} cannot be hot-plugged: images are container disks, which KubeVirt attaches only \
             at start; hot-plug a VirtualDisk (one made from the image with dataSource objectRef), or add the \
             image to the machine's blockDeviceRefs"
        );
        wait(&mut plan, AttachmentPhase::Failed, BLOCK_DEVICE_READY, "NotHotpluggable", message);
        plan.requeue_after = None;
        return plan;
    }
    let claim_name = match &observed.disk {
        DeviceState::Ready(ResolvedDevice::Disk { claim_name }) => claim_name.clone(),
        DeviceState::Ready(ResolvedDevice::Image { .. }) | DeviceState::Missing => {
            let message = format!("VirtualDisk {disk} does not exist");
            wait(&mut plan, AttachmentPhase::Pending, BLOCK_DEVICE_READY, "NotFound", message);
            return plan;
        }
        DeviceState::NotReady(phase) => {
            let message = format!("VirtualDisk {disk} is {}", phase.as_deref().unwrap_or("not Ready yet"));
            wait(&mut plan, AttachmentPhase::Pending, BLOCK_DEVICE_READY, "NotReady", message);
            return plan;
        }
    };
    let names_disk = match observed.machine {
        AttachedMachine::Missing => {
            let message = format!("VirtualMachine {machine} does not exist");
            wait(&mut plan, AttachmentPhase::Pending, VIRTUAL_MACHINE_READY, "NotFound", message);
            return plan;
        }
        AttachedMachine::Found { names_disk } => names_disk,
    };
    if names_disk {
        let message =
            format!("VirtualDisk {disk} is in VirtualMachine {machine}'s blockDeviceRefs: it is attached already");
        wait(&mut plan, AttachmentPhase::Failed, BLOCK_DEVICE_READY, "AlreadyAttached", message);
        return plan;
    }
    // An attachment that holds the disk keeps it: others wait for it.
    let holding = matches!(view.status.phase, Some(AttachmentPhase::Attached | AttachmentPhase::InProgress));
    if let (Some(user), false) = (&observed.other_user, holding) {
        let message = format!("VirtualDisk {disk} is used by {user}; it is attached once that lets it go");
        wait(&mut plan, AttachmentPhase::Pending, BLOCK_DEVICE_READY, "InUse", message);
        return plan;
    }
    conditions.set(
        &mut plan.status.conditions,
        BLOCK_DEVICE_READY,
        true,
        "Ready",
        format!("VirtualDisk {disk} is Ready (PVC {claim_name})"),
    );

    let Some(instance) = observed.instance.as_ref().filter(|instance| instance_running(instance)) else {
        let state = match &observed.instance {
            None => "not running".to_string(),
            Some(instance) => format!("{} in KubeVirt", instance["status"]["phase"].as_str().unwrap_or("starting")),
        };
        let message = format!("VirtualMachine {machine} is {state}; the disk is plugged in once it runs");
        wait(&mut plan, AttachmentPhase::Pending, VIRTUAL_MACHINE_READY, "NotRunning", message);
        return plan;
    };
    conditions.set(
        &mut plan.status.conditions,
        VIRTUAL_MACHINE_READY,
        true,
        "Running",
        format!("VirtualMachine {machine} runs"),
    );
    match hotplug_state(instance, &volume) {
        HotplugState::Absent => {
            plan.actions.push(Action::KubevirtSubresource(add_volume_request(
                view.namespace,
                machine,
                &volume,
                &claim_name,
            )));
            plan.status.phase = Some(AttachmentPhase::InProgress);
            let message = format!("plugging VirtualDisk {disk} into VirtualMachine {machine}");
            conditions.set(&mut plan.status.conditions, ATTACHED, false, "Attaching", message);
            plan.requeue_after = Some(PROGRESS_INTERVAL);
        }
        HotplugState::Attaching { phase, message } => {
            plan.status.phase = Some(AttachmentPhase::InProgress);
            let mut described = format!(
                "KubeVirt is plugging VirtualDisk {disk} into VirtualMachine {machine}: volume {volume} is {}",
                phase.as_deref().unwrap_or("requested")
            );
            if let Some(message) = message {
                described.push_str(&format!(" ({message})"));
            }
            conditions.set(&mut plan.status.conditions, ATTACHED, false, "Attaching", described);
            plan.requeue_after = Some(PROGRESS_INTERVAL);
        }
        HotplugState::Ready { target } => {
            plan.status.phase = Some(AttachmentPhase::Attached);
            let mut message = format!("VirtualDisk {disk} is attached to VirtualMachine {machine}");
            if let Some(target) = target {
                message.push_str(&format!(" as {target}"));
            }
            conditions.set(&mut plan.status.conditions, ATTACHED, true, "Attached", message);
            // Looks again for a new instance (a restart), which needs it plugged in again.
            plan.requeue_after = Some(WAIT_INTERVAL);
        }
    }
    plan
}

/// The status after KubeVirt refused the hot-plug with `message`: `Failed`,
/// tried again after [`REFUSAL_RETRY`].
pub fn refused(
    view: &AttachmentView<'_>,
    planned: &AttachmentStatus,
    message: &str,
    now: Timestamp,
) -> AttachmentStatus {
    let mut status = planned.clone();
    status.phase = Some(AttachmentPhase::Failed);
    let setter = Setter {
        generation: view.generation,
        now,
    };
    let message = format!(
        "KubeVirt refused to plug VirtualDisk {} into VirtualMachine {}: {message} (tried again every {} s)",
        view.spec.block_device_ref.name,
        view.spec.virtual_machine_name,
        REFUSAL_RETRY.as_secs()
    );
    setter.set(&mut status.conditions, ATTACHED, false, "HotplugRefused", message);
    status
}

#[cfg(test)]
mod tests;
