//! The VirtualMachineBlockDeviceAttachment controller: observe the disk,
//! the machine, who else uses the disk and KubeVirt's instance, plan with
//! [`crate::reconcile::attachment`], send KubeVirt's `addvolume` /
//! `removevolume`, write the status.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, ListParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};

use super::{execute, machines, Context, Error};
use crate::api::machine::{AttachmentPhase, BlockDeviceKind};
use crate::api::{VirtualMachine, VirtualMachineBlockDeviceAttachment};
use crate::reconcile::attachment::{
    reconcile, refused, AttachedMachine, AttachmentObserved, AttachmentView, REFUSAL_RETRY,
};
use crate::reconcile::machine::DeviceState;
use crate::reconcile::{Action, Plan, FINALIZER};

/// Reconciles a VirtualMachineBlockDeviceAttachment.
pub async fn reconcile_attachment(
    attachment: Arc<VirtualMachineBlockDeviceAttachment>,
    context: Arc<Context>,
) -> Result<Requeue, Error> {
    let namespace = attachment.namespace().ok_or(Error::Incomplete("namespace"))?;
    let status = attachment.status.clone().unwrap_or_default();
    let view = AttachmentView {
        namespace: &namespace,
        generation: attachment.metadata.generation,
        deleting: attachment.metadata.deletion_timestamp.is_some(),
        has_finalizer: attachment.finalizers().iter().any(|finalizer| finalizer == FINALIZER),
        spec: &attachment.spec,
        status: &status,
    };
    let observed = observe(&context, &attachment, &view).await?;
    let plan = reconcile(&view, &observed);
    let api: Api<VirtualMachineBlockDeviceAttachment> = Api::namespaced(context.client.clone(), &namespace);
    let adding = !view.deleting
        && plan.actions.iter().any(
            |action| matches!(action, Action::KubevirtSubresource(request) if request.path.ends_with("/addvolume")),
        );
    let planned_status = plan.status.clone();
    match execute::carry_out(&context, &api, attachment.as_ref(), &status, plan).await {
        // KubeVirt's refusal (hot-plug switched off, a volume of that name
        // already there, ...) is the attachment's state, not a retried
        // failure; conflicts and throttling are retried.
        Err(Error::Kube {
            source: kube::Error::Api(refusal),
            ..
        }) if adding && (400..500).contains(&refusal.code) && ![409, 429].contains(&refusal.code) => {
            let failed = Plan {
                status: refused(&view, &planned_status, &refusal.message, Timestamp::now()),
                actions: Vec::new(),
                requeue_after: Some(REFUSAL_RETRY),
            };
            execute::carry_out(&context, &api, attachment.as_ref(), &status, failed).await
        }
        outcome => outcome,
    }
}

async fn observe(
    context: &Context,
    attachment: &VirtualMachineBlockDeviceAttachment,
    view: &AttachmentView<'_>,
) -> Result<AttachmentObserved, Error> {
    let namespace = view.namespace;
    let machine_name = view.spec.virtual_machine_name.as_str();
    let instance = machines::read_kubevirt(context, machines::kubevirt_instances(), namespace, machine_name).await?;
    let now = Timestamp::now();
    let reference = &view.spec.block_device_ref;
    if view.deleting || reference.kind != BlockDeviceKind::VirtualDisk {
        return Ok(AttachmentObserved {
            disk: DeviceState::Missing,
            machine: AttachedMachine::Missing,
            other_user: None,
            instance,
            now,
        });
    }
    let disk = machines::observe_disk(context, namespace, &reference.name).await?;
    let names_disk = |machine: &VirtualMachine| {
        machine
            .spec
            .block_device_refs
            .iter()
            .any(|device| device.kind == BlockDeviceKind::VirtualDisk && device.name == reference.name)
    };
    let machines = Api::<VirtualMachine>::namespaced(context.client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(Error::kube(format!("listing VirtualMachines in {namespace}")))?;
    let machine = machines
        .items
        .iter()
        .find(|machine| machine.name_any() == machine_name)
        .map_or(AttachedMachine::Missing, |machine| AttachedMachine::Found {
            names_disk: names_disk(machine),
        });
    let mut other_user = machines
        .items
        .iter()
        .find(|machine| machine.name_any() != machine_name && names_disk(machine))
        .map(|machine| format!("VirtualMachine {}", machine.name_any()));
    if other_user.is_none() {
        let attachments = Api::<VirtualMachineBlockDeviceAttachment>::namespaced(context.client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube(format!(
                "listing VirtualMachineBlockDeviceAttachments in {namespace}"
            )))?;
        other_user = attachments
            .items
            .iter()
            .find(|other| other.spec.block_device_ref == *reference && precedes(other, attachment))
            .map(|other| format!("VirtualMachineBlockDeviceAttachment {}", other.name_any()));
    }
    Ok(AttachmentObserved {
        disk,
        machine,
        other_user,
        instance,
        now,
    })
}

/// Whether attachment `other` has the disk before `attachment`: it holds it
/// (attached or attaching), or both wait and `other` is older (then by name).
fn precedes(other: &VirtualMachineBlockDeviceAttachment, attachment: &VirtualMachineBlockDeviceAttachment) -> bool {
    if other.uid() == attachment.uid() || other.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let phase = other.status.as_ref().and_then(|status| status.phase);
    match phase {
        Some(AttachmentPhase::Attached | AttachmentPhase::InProgress) => true,
        Some(AttachmentPhase::Failed | AttachmentPhase::Terminating) => false,
        Some(AttachmentPhase::Pending) | None => {
            let age = |object: &VirtualMachineBlockDeviceAttachment| {
                (
                    object.metadata.creation_timestamp.clone().map(|time| time.0),
                    object.name_any(),
                )
            };
            age(other) < age(attachment)
        }
    }
}

/// The attachments to look at again when KubeVirt's instance of a machine
/// changes (it started, restarted, or a volume's hot-plug moved on).
pub fn attachments_of_instance(
    attachments: &Store<VirtualMachineBlockDeviceAttachment>,
    instance: &DynamicObject,
) -> Vec<ObjectRef<VirtualMachineBlockDeviceAttachment>> {
    let (Some(namespace), machine) = (instance.namespace(), instance.name_any()) else {
        return Vec::new();
    };
    attachments
        .state()
        .iter()
        .filter(|attachment| {
            attachment.namespace().as_deref() == Some(namespace.as_str())
                && attachment.spec.virtual_machine_name == machine
        })
        .map(|attachment| ObjectRef::from_obj(attachment.as_ref()))
        .collect()
}
