//! The VirtualMachine controller: resolve the block devices, plan with
//! [`crate::reconcile::machine`], apply KubeVirt's VirtualMachine, mirror
//! its state.

use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource, ResourceExt};
use serde_json::Value;

use super::{execute, Context, Error};
use crate::api::disk::DiskPhase;
use super::images::observe_source;
use crate::api::common::ObjectRefKind;
use crate::api::machine::BlockDeviceKind;
use crate::api::{VirtualDisk, VirtualMachine};
use crate::reconcile::image::SourceImage;
use crate::kubevirt::ResolvedDevice;
use crate::api::{VirtualMachineClass, VirtualMachineIPAddress};
use crate::reconcile::machine::{reconcile, AddressState, ClassState, DeviceState, MachineObserved, MachineView};
use kube::runtime::reflector::ObjectRef;

/// KubeVirt's VirtualMachine.
pub fn kubevirt_machines() -> ApiResource {
    kubevirt_resource("VirtualMachine", "virtualmachines")
}

/// KubeVirt's VirtualMachineInstance.
pub fn kubevirt_instances() -> ApiResource {
    kubevirt_resource("VirtualMachineInstance", "virtualmachineinstances")
}

fn kubevirt_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// KubeVirt's object `name` of kind `resource`, as JSON; `None` when absent.
pub async fn read_kubevirt(
    context: &Context,
    resource: ApiResource,
    namespace: &str,
    name: &str,
) -> Result<Option<Value>, Error> {
    Api::<DynamicObject>::namespaced_with(context.client.clone(), namespace, &resource)
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading KubeVirt's {} {namespace}/{name}", resource.kind)))
        .map(|object| object.and_then(|object| serde_json::to_value(object).ok()))
}

/// Reconciles a VirtualMachine.
pub async fn reconcile_virtual_machine(machine: Arc<VirtualMachine>, context: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = machine.namespace().ok_or(Error::Incomplete("namespace"))?;
    let uid = machine.uid().ok_or(Error::Incomplete("uid"))?;
    let name = machine.name_any();
    let status = machine.status.clone().unwrap_or_default();
    let view = MachineView {
        namespace: &namespace,
        name: &name,
        uid: &uid,
        generation: machine.meta().generation,
        deleting: machine.meta().deletion_timestamp.is_some(),
        spec: &machine.spec,
        status: &status,
    };
    let observed = if view.deleting {
        MachineObserved {
            devices: Vec::new(),
            address: AddressState::Unmanaged,
            class: ClassState::Unnamed,
            kubevirt_machine: None,
            instance: None,
            now: k8s_openapi::jiff::Timestamp::now(),
        }
    } else {
        observe(&context, &view).await?
    };
    let plan = reconcile(&view, &observed);
    let api: Api<VirtualMachine> = Api::namespaced(context.client.clone(), &namespace);
    execute::carry_out(&context, &api, machine.as_ref(), &status, plan).await
}

async fn observe(context: &Context, view: &MachineView<'_>) -> Result<MachineObserved, Error> {
    let client = &context.client;
    let namespace = view.namespace;
    let mut devices = Vec::new();
    for reference in &view.spec.block_device_refs {
        let name = reference.name.as_str();
        let state = match reference.kind {
            BlockDeviceKind::VirtualImage | BlockDeviceKind::ClusterVirtualImage => {
                // Read as an objectRef source is: the same lookup, the same readiness.
                let (kind, scope) = match reference.kind {
                    BlockDeviceKind::VirtualImage => (ObjectRefKind::VirtualImage, Some(namespace)),
                    _ => (ObjectRefKind::ClusterVirtualImage, None),
                };
                match observe_source(context, kind, scope, name).await? {
                    SourceImage::Missing => DeviceState::Missing,
                    SourceImage::NotReady(phase) => DeviceState::NotReady(phase),
                    SourceImage::Ready { location, cdrom, .. } => DeviceState::Ready(ResolvedDevice::Image {
                        location,
                        cdrom: cdrom.unwrap_or(false),
                    }),
                }
            }
            BlockDeviceKind::VirtualDisk => observe_disk(context, namespace, name).await?,
        };
        devices.push(state);
    }
    let kubevirt_machine = read_kubevirt(context, kubevirt_machines(), namespace, view.name).await?;
    let instance = match &kubevirt_machine {
        Some(_) => read_kubevirt(context, kubevirt_instances(), namespace, view.name).await?,
        None => None,
    };
    let address = observe_address(context, view).await?;
    let class = match &view.spec.virtual_machine_class_name {
        None => ClassState::Unnamed,
        Some(name) => Api::<VirtualMachineClass>::all(client.clone())
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("reading VirtualMachineClass {name}")))?
            .map_or_else(
                || ClassState::Missing(name.clone()),
                |class| ClassState::Found {
                    name: name.clone(),
                    spec: Box::new(class.spec),
                    discovered: class.status.and_then(|status| status.cpu_features).map(|features| features.enabled),
                },
            ),
    };
    Ok(MachineObserved {
        devices,
        address,
        class,
        kubevirt_machine,
        instance,
        now: k8s_openapi::jiff::Timestamp::now(),
    })
}

/// VirtualDisk `name`: Ready with its PVC when a machine can use it (also
/// while it waits for its first consumer, which the machine is, or grows).
pub async fn observe_disk(context: &Context, namespace: &str, name: &str) -> Result<DeviceState, Error> {
    let disk = Api::<VirtualDisk>::namespaced(context.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading VirtualDisk {namespace}/{name}")))?;
    Ok(disk.map_or(DeviceState::Missing, |disk| {
        let status = disk.status.unwrap_or_default();
        let claim = status.target.and_then(|target| target.persistent_volume_claim_name);
        let usable = matches!(
            status.phase,
            Some(DiskPhase::Ready | DiskPhase::Resizing | DiskPhase::WaitForFirstConsumer)
        );
        match (usable, claim) {
            (true, Some(claim)) => DeviceState::Ready(ResolvedDevice::Disk { claim_name: claim }),
            _ => DeviceState::NotReady(status.phase.map(|phase| format!("{phase:?}"))),
        }
    }))
}

/// The machine's VirtualMachineIPAddress: the one its spec names, else its
/// own (named after it).
async fn observe_address(context: &Context, view: &MachineView<'_>) -> Result<AddressState, Error> {
    if context.address_pool.is_none() {
        return Ok(AddressState::Unmanaged);
    }
    let named = view.spec.virtual_machine_ip_address_name.as_deref();
    let claim_name = named.unwrap_or(view.name).to_string();
    let claim = Api::<VirtualMachineIPAddress>::namespaced(context.client.clone(), view.namespace)
        .get_opt(&claim_name)
        .await
        .map_err(Error::kube(format!("reading VirtualMachineIPAddress {}/{claim_name}", view.namespace)))?;
    let Some(claim) = claim else {
        return Ok(AddressState::Missing {
            claim: claim_name,
            own: named.is_none(),
        });
    };
    let status = claim.status.unwrap_or_default();
    Ok(match (status.virtual_machine_name, status.address) {
        (Some(machine), _) if machine != view.name => AddressState::Taken {
            claim: claim_name,
            machine,
        },
        (Some(_), Some(address)) => AddressState::Bound {
            claim: claim_name,
            address,
        },
        (_, address) => {
            let bound = crate::conditions::find(&status.conditions, crate::reconcile::address::BOUND)
                .filter(|condition| condition.status == "False")
                .map(|condition| condition.message.clone());
            AddressState::Pending {
                claim: claim_name,
                message: bound.unwrap_or_else(|| match address {
                    Some(address) => format!("{address} is leased, not yet attached to this machine"),
                    None => "no lease yet".into(),
                }),
            }
        }
    })
}

/// The machines to look at again when a VirtualMachineIPAddress changes:
/// the one it is attached to, its owner, and the one of its name.
pub fn machines_of_claim(claim: VirtualMachineIPAddress) -> Vec<ObjectRef<VirtualMachine>> {
    let Some(namespace) = claim.namespace() else {
        return Vec::new();
    };
    let mut names = vec![claim.name_any()];
    names.extend(claim.status.and_then(|status| status.virtual_machine_name));
    names.extend(
        claim
            .metadata
            .owner_references
            .unwrap_or_default()
            .into_iter()
            .filter(|owner| owner.kind == "VirtualMachine")
            .map(|owner| owner.name),
    );
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| ObjectRef::new(&name).within(&namespace))
        .collect()
}

/// The VirtualMachineIPAddresses to look at again when a machine changes:
/// the one it wants and the one it held (which a change of
/// `spec.virtualMachineIPAddressName` or a deletion lets go).
pub fn claims_of_machine(machine: VirtualMachine) -> Vec<ObjectRef<VirtualMachineIPAddress>> {
    let Some(namespace) = machine.namespace() else {
        return Vec::new();
    };
    let mut names = vec![machine.spec.virtual_machine_ip_address_name.clone().unwrap_or_else(|| machine.name_any())];
    names.extend(machine.status.and_then(|status| status.virtual_machine_ip_address_name));
    names.dedup();
    names
        .into_iter()
        .map(|name| ObjectRef::new(&name).within(&namespace))
        .collect()
}
