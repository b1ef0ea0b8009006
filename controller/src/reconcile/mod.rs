//! Reconcile logic without I/O: from a resource and what was observed about
//! it (its worker Pod, the referenced source, the registry) to the status
//! it should have and the actions that get it there. The I/O layer gathers
//! the observations and carries out the actions, in order; when an action
//! fails it stops there and does not write the status.

pub mod address;
pub mod attachment;
pub mod disk;
pub mod image;
pub mod import_worker;
pub mod machine;
pub mod operation;
pub mod provision;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use k8s_openapi::api::networking::v1::Ingress;

use crate::workload::{SecretKey, WorkerPod, WorkerSecret};

/// A spec or an outcome the controller cannot go on with: the resource
/// fails with this reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The `Ready` condition's reason.
    pub reason: &'static str,
    /// What went wrong and what to do.
    pub message: String,
}

impl From<crate::import::ImportSpecError> for Refusal {
    fn from(error: crate::import::ImportSpecError) -> Self {
        Refusal {
            reason: "InvalidDataSource",
            message: error.to_string(),
        }
    }
}

/// The finalizer that keeps a resource until its registry image is deleted.
pub const FINALIZER: &str = "virtualization.deckhouse.io/dvcr-cleanup";

/// How often a Ready image is checked for in the registry (DVP: 5 minutes).
pub const IMAGE_CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// How often a running worker's progress is read.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);
/// How soon a resource waiting for another object looks again (the I/O
/// layer also wakes it when that object changes).
pub const WAIT_INTERVAL: Duration = Duration::from_secs(30);

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Add [`FINALIZER`] to the resource.
    AddFinalizer,
    /// Remove [`FINALIZER`]: the resource may go.
    RemoveFinalizer,
    /// Create the worker's Secret (already existing is fine).
    CreateSecret(WorkerSecret),
    /// Create a worker Pod (already existing is fine).
    CreatePod(WorkerPod),
    /// Create an uploader's Service (already existing is fine).
    CreateService(Box<Service>),
    /// Create an uploader's Ingress (already existing is fine).
    CreateIngress(Box<Ingress>),
    /// Create a disk's PVC (already existing is fine).
    CreateClaim(Box<PersistentVolumeClaim>),
    /// Delete a PVC (absent is fine).
    DeleteClaim {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Grow a disk's PVC to `bytes`.
    ResizeClaim {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The new request.
        bytes: u64,
    },
    /// Apply KubeVirt's VirtualMachine (server-side).
    ApplyKubevirtMachine(Box<serde_json::Value>),
    /// Send a request to KubeVirt's subresource API (start, stop, ...).
    KubevirtSubresource(crate::kubevirt::SubresourceRequest),
    /// Delete the worker Pods, Service, Ingress and Secret of an owner
    /// (absent ones are fine).
    DeleteWorker {
        /// Where they run.
        namespace: String,
        /// The owner's UID, which names them.
        owner_uid: String,
    },
    /// Store the image `from` (a full reference in the registry) under `to`
    /// by cross-repository mount: no data moves.
    CopyImage {
        /// `host/repository:tag` of the source.
        from: String,
        /// `host/repository:tag` of the copy.
        to: String,
    },
    /// Delete the tag `tag` of `repository`; its blobs are left for the
    /// garbage collector (absent is fine).
    DeleteImage {
        /// `vi/<ns>/<name>`.
        repository: String,
        /// The resource's UID.
        tag: String,
    },
    /// Lease `address` to `claim`: create its lease, or bind it when
    /// released. Fails when another claim got it first.
    LeaseAddress {
        /// The address.
        address: std::net::Ipv4Addr,
        /// The VirtualMachineIPAddress.
        claim: crate::api::network::IpAddressRef,
    },
    /// Release the lease of `address` if `claim` holds it.
    ReleaseAddress {
        /// The address.
        address: std::net::Ipv4Addr,
        /// The VirtualMachineIPAddress that held it.
        claim: crate::api::network::IpAddressRef,
    },
    /// Delete a released lease, unless it changed since it was read.
    DeleteLease {
        /// The lease's name.
        name: String,
        /// Its `resourceVersion` when it was read.
        resource_version: Option<String>,
    },
    /// Create a machine's own VirtualMachineIPAddress (already existing is fine).
    CreateAddressClaim(Box<crate::api::VirtualMachineIPAddress>),
}

impl Action {
    /// The worker objects an action creates, by kind and key, for logs.
    pub fn describe(&self) -> String {
        let key = |key: &SecretKey| format!("{}/{}", key.namespace, key.name);
        match self {
            Action::AddFinalizer => "add the finalizer".into(),
            Action::RemoveFinalizer => "remove the finalizer".into(),
            Action::CreateSecret(secret) => format!("create Secret {}", key(&secret.key)),
            Action::CreatePod(pod) => format!("create Pod {}", key(&pod.key)),
            Action::CreateService(_) => "create the uploader's Service".into(),
            Action::CreateIngress(_) => "create the uploader's Ingress".into(),
            Action::CreateClaim(claim) => format!(
                "create PVC {}",
                claim.metadata.name.as_deref().unwrap_or_default()
            ),
            Action::ApplyKubevirtMachine(machine) => format!(
                "apply KubeVirt's VirtualMachine {}",
                machine["metadata"]["name"].as_str().unwrap_or_default()
            ),
            Action::KubevirtSubresource(request) => format!("PUT {}", request.path),
            Action::DeleteClaim { namespace, name } => format!("delete PVC {namespace}/{name}"),
            Action::ResizeClaim { namespace, name, bytes } => {
                format!("grow PVC {namespace}/{name} to {bytes} bytes")
            }
            Action::DeleteWorker { namespace, owner_uid } => {
                format!("delete the workers of {owner_uid} in {namespace}")
            }
            Action::CopyImage { from, to } => format!("copy {from} to {to}"),
            Action::DeleteImage { repository, tag } => format!("delete {repository}:{tag}"),
            Action::LeaseAddress { address, claim } => {
                format!("lease {address} to VirtualMachineIPAddress {}/{}", claim.namespace, claim.name)
            }
            Action::ReleaseAddress { address, claim } => {
                format!("release {address} from VirtualMachineIPAddress {}/{}", claim.namespace, claim.name)
            }
            Action::DeleteLease { name, .. } => format!("delete the released lease {name}"),
            Action::CreateAddressClaim(claim) => format!(
                "create VirtualMachineIPAddress {}",
                claim.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// What a reconcile decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<Status> {
    /// The status to write once the actions are done.
    pub status: Status,
    /// The actions, in order.
    pub actions: Vec<Action>,
    /// When to look again without any change being observed.
    pub requeue_after: Option<Duration>,
}

/// The state of a resource's worker Pod (importer or uploader).
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerState {
    /// No Pod.
    Absent,
    /// Created, not running yet; why it waits (`ImagePullBackOff: ...`), if
    /// a container says.
    Pending {
        /// The waiting container's reason and message.
        waiting: Option<String>,
    },
    /// Running; its progress page, if it could be read.
    Running {
        /// The Prometheus text of its `/metrics`.
        metrics: Option<String>,
    },
    /// Exited 0; its termination message.
    Succeeded {
        /// The final report.
        report: String,
    },
    /// Failed; its termination message, if it left one, and the Pod's or
    /// container's reason (`Evicted`, `OOMKilled`, ...).
    Failed {
        /// The final report, if written.
        report: Option<String>,
        /// Why Kubernetes says it failed.
        reason: String,
    },
}
