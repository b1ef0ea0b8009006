//! The VirtualMachineIPAddress and VirtualMachineIPAddressLease controllers:
//! observe the leases (the lease controller's cache) and the machines of a
//! claim's namespace, plan with [`crate::reconcile::address`], and carry
//! the plan out. Leases are created and bound here so that no address is
//! ever leased twice: see [`lease_address`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{execute, Context, Error};
use crate::api::network::{IpAddressRef, VirtualMachineIPAddressLeaseSpec};
use crate::api::{VirtualMachine, VirtualMachineIPAddress, VirtualMachineIPAddressLease};
use crate::ipam;
use crate::reconcile::address::{self, AddressObserved, AddressView, LeaseView};
use crate::reconcile::FINALIZER;

/// Every lease in the cache: its address and the claim holding it.
fn leases(context: &Context) -> BTreeMap<Ipv4Addr, Option<IpAddressRef>> {
    context
        .leases
        .state()
        .iter()
        .filter_map(|lease| {
            let address = ipam::lease_address(&lease.name_any())?;
            Some((address, lease.spec.virtual_machine_ip_address_ref.clone()))
        })
        .collect()
}

/// Reconciles a VirtualMachineIPAddress.
pub async fn reconcile_address(claim: Arc<VirtualMachineIPAddress>, context: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = claim.namespace().ok_or(Error::Incomplete("namespace"))?;
    let reference = IpAddressRef {
        name: claim.name_any(),
        namespace: namespace.clone(),
    };
    let status = claim.status.clone().unwrap_or_default();
    // Choosing from a cache not filled yet would pick leased addresses.
    context
        .leases
        .wait_until_ready()
        .await
        .map_err(|_| Error::Incomplete("cache of leases"))?;
    let deleting = claim.metadata.deletion_timestamp.is_some();
    let machine = if deleting {
        None
    } else {
        let machines = Api::<VirtualMachine>::namespaced(context.client.clone(), &namespace)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube(format!("listing the VirtualMachines of {namespace}")))?;
        let candidates: Vec<(String, Option<String>)> = machines
            .items
            .iter()
            .filter(|machine| machine.metadata.deletion_timestamp.is_none())
            .map(|machine| (machine.name_any(), machine.spec.virtual_machine_ip_address_name.clone()))
            .collect();
        address::attached_machine(&reference.name, status.virtual_machine_name.as_deref(), &candidates)
    };
    let view = AddressView {
        claim: &reference,
        generation: claim.metadata.generation,
        deleting,
        has_finalizer: claim.finalizers().iter().any(|finalizer| finalizer == FINALIZER),
        spec: &claim.spec,
        status: &status,
    };
    let observed = AddressObserved {
        pool: context.address_pool.as_ref(),
        leases: leases(&context),
        machine,
        now: k8s_openapi::jiff::Timestamp::now(),
    };
    let plan = address::reconcile(&view, &observed);
    let api: Api<VirtualMachineIPAddress> = Api::namespaced(context.client.clone(), &namespace);
    execute::carry_out(&context, &api, claim.as_ref(), &status, plan).await
}

/// Reconciles a VirtualMachineIPAddressLease.
pub async fn reconcile_lease(
    lease: Arc<VirtualMachineIPAddressLease>,
    context: Arc<Context>,
) -> Result<Requeue, Error> {
    let holder = lease.spec.virtual_machine_ip_address_ref.as_ref();
    let holder_exists = match holder {
        None => false,
        Some(holder) => Api::<VirtualMachineIPAddress>::namespaced(context.client.clone(), &holder.namespace)
            .get_opt(&holder.name)
            .await
            .map_err(Error::kube(format!(
                "reading VirtualMachineIPAddress {}/{}",
                holder.namespace, holder.name
            )))?
            .is_some(),
    };
    let status = lease.status.clone().unwrap_or_default();
    let name = lease.name_any();
    let view = LeaseView {
        name: &name,
        resource_version: lease.metadata.resource_version.as_deref(),
        generation: lease.metadata.generation,
        holder,
        status: &status,
    };
    let plan = address::reconcile_lease(&view, holder_exists, k8s_openapi::jiff::Timestamp::now());
    let api: Api<VirtualMachineIPAddressLease> = Api::all(context.client.clone());
    execute::carry_out(&context, &api, lease.as_ref(), &status, plan).await
}

/// A lease's holder, as the API answers it.
fn holder_of(lease: &VirtualMachineIPAddressLease) -> Option<&IpAddressRef> {
    lease.spec.virtual_machine_ip_address_ref.as_ref()
}

/// Leases `address` to `claim`. The lease's name is the address, so a
/// create fails when any other claim holds or held it; a released lease is
/// bound with its `resourceVersion`, so of two claims binding it at once
/// one fails. The failing claim is reconciled again and chooses anew.
pub async fn lease_address(context: &Context, address: Ipv4Addr, claim: &IpAddressRef) -> Result<(), Error> {
    let name = ipam::lease_name(address);
    let action = format!("leasing {address} to {}/{}", claim.namespace, claim.name);
    let api: Api<VirtualMachineIPAddressLease> = Api::all(context.client.clone());
    let taken = |holder: &IpAddressRef| Error::AddressTaken {
        address,
        holder: format!("{}/{}", holder.namespace, holder.name),
    };
    match api.get_opt(&name).await.map_err(Error::kube(action.clone()))? {
        None => {
            let lease = VirtualMachineIPAddressLease::new(
                &name,
                VirtualMachineIPAddressLeaseSpec {
                    virtual_machine_ip_address_ref: Some(claim.clone()),
                },
            );
            api.create(&PostParams::default(), &lease)
                .await
                .map(drop)
                .map_err(|error| match &error {
                    kube::Error::Api(answer) if answer.is_already_exists() => Error::AddressTaken {
                        address,
                        holder: "another VirtualMachineIPAddress (created at the same time)".into(),
                    },
                    _ => Error::Kube { action, source: error },
                })
        }
        Some(lease) => match holder_of(&lease) {
            Some(holder) if holder == claim => Ok(()),
            Some(holder) => Err(taken(holder)),
            None => {
                let patch = json!({
                    "metadata": {"resourceVersion": lease.resource_version()},
                    "spec": {"virtualMachineIPAddressRef": claim},
                });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
                    .map_err(Error::kube(action))
            }
        },
    }
}

/// Releases the lease of `address` if `claim` still holds it.
pub async fn release_address(context: &Context, address: Ipv4Addr, claim: &IpAddressRef) -> Result<(), Error> {
    let name = ipam::lease_name(address);
    let action = format!("releasing {address} from {}/{}", claim.namespace, claim.name);
    let api: Api<VirtualMachineIPAddressLease> = Api::all(context.client.clone());
    let Some(lease) = api.get_opt(&name).await.map_err(Error::kube(action.clone()))? else {
        return Ok(());
    };
    if holder_of(&lease) != Some(claim) {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"resourceVersion": lease.resource_version()},
        "spec": {"virtualMachineIPAddressRef": null},
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)
        .map_err(Error::kube(action))
}

/// Deletes a released lease unless it changed since `resource_version`.
pub async fn delete_lease(context: &Context, name: &str, resource_version: Option<&str>) -> Result<(), Error> {
    let parameters = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: resource_version.map(str::to_string),
            uid: None,
        }),
        ..DeleteParams::default()
    };
    Api::<VirtualMachineIPAddressLease>::all(context.client.clone())
        .delete(name, &parameters)
        .await
        .map(drop)
        .or_else(|error| match &error {
            kube::Error::Api(answer) if answer.is_not_found() => Ok(()),
            _ => Err(error),
        })
        .map_err(Error::kube(format!("deleting the released lease {name}")))
}

/// Creates a machine's own VirtualMachineIPAddress; existing is fine.
pub async fn create_claim(context: &Context, claim: &VirtualMachineIPAddress) -> Result<(), Error> {
    let namespace = claim.namespace().ok_or(Error::Incomplete("namespace"))?;
    Api::<VirtualMachineIPAddress>::namespaced(context.client.clone(), &namespace)
        .create(&PostParams::default(), claim)
        .await
        .map(drop)
        .or_else(|error| match &error {
            kube::Error::Api(answer) if answer.is_already_exists() => Ok(()),
            _ => Err(error),
        })
        .map_err(Error::kube(format!(
            "creating VirtualMachineIPAddress {namespace}/{}",
            claim.name_any()
        )))
}
