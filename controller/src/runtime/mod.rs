//! The controller's I/O: kube-rs controllers that watch the resources and
//! the worker Pods they own, observe what the pure reconcilers need, carry
//! out their actions against the Kubernetes API and the registry, and write
//! the status.

pub mod addresses;
pub mod attachments;
pub mod classes;
pub mod disks;
pub mod execute;
pub mod images;
pub mod leader;
pub mod machines;
pub mod observe;
pub mod operations;
pub mod referrers;

use std::sync::Arc;
use std::time::Duration;

use dvcr_importer::reference::ImageReference;
use dvcr_importer::registry_client::{ClientOptions, RegistryClient};
use dvcr_registry::auth::token::{AccessEntry, TokenIssuer};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{predicates, watcher, Controller, WatchStreamExt};
use kube::api::DynamicObject;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Client, Resource};

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;

use crate::api::{
    ClusterVirtualImage, VirtualDisk, VirtualImage, VirtualMachine, VirtualMachineBlockDeviceAttachment,
    VirtualMachineClass, VirtualMachineIPAddress, VirtualMachineIPAddressLease, VirtualMachineOperation,
};
use crate::ipam::AddressPool;
use referrers::Target;
use crate::workload::{WorkerConfig, MANAGED_BY, MANAGED_BY_LABEL};

/// Issuer and audience of registry tokens (reference, section 6).
pub const TOKEN_ISSUER: &str = "virtualization-controller";
/// Audience of registry tokens.
pub const TOKEN_AUDIENCE: &str = "dvcr";
/// The controller named in the Events it publishes.
const EVENT_REPORTER: &str = "dvcr-controller";
/// The API server's limit of an Event's note (1 kB).
const EVENT_NOTE_LIMIT: usize = 1000;
/// Subject of the tokens the controller mints.
const TOKEN_SUBJECT: &str = "dvcr-controller";
/// Lifetime of the controller's own registry tokens (one copy or check).
const OWN_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Failures of a reconcile's I/O; the resource is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API request failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The API's answer.
        #[source]
        source: kube::Error,
    },
    /// A registry request failed.
    #[error("{action}: {reason}")]
    Registry {
        /// What was being done.
        action: String,
        /// Why it failed.
        reason: String,
    },
    /// A registry token could not be minted.
    #[error("cannot mint a registry token: {0}")]
    Token(String),
    /// The resource lacks something the API server always sets.
    #[error("the object has no {0}")]
    Incomplete(&'static str),
    /// A pull secret named by a data source is missing or unusable.
    #[error("{0}")]
    PullSecret(String),
    /// This replica no longer leads; it stops.
    #[error("no longer leading: {0}")]
    LeadershipLost(String),
    /// Another claim leased the address first; the claim chooses again.
    #[error("{address} was leased to {holder} first; choosing again")]
    AddressTaken {
        /// The address.
        address: std::net::Ipv4Addr,
        /// Who holds it.
        holder: String,
    },
}

impl Error {
    /// The reason of the Warning Event a failure becomes (`kubectl describe`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubernetesRequestFailed",
            Error::Registry { .. } => "RegistryRequestFailed",
            Error::Token(_) => "TokenSigningFailed",
            Error::Incomplete(_) => "IncompleteObject",
            Error::PullSecret(_) => "PullSecretUnusable",
            Error::AddressTaken { .. } => "AddressTaken",
            Error::LeadershipLost(_) => "LeadershipLost",
        }
    }

    /// Wraps a kube error with what was being done.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}

/// How the controller runs, from its command line.
pub struct Settings {
    /// What its workers are given.
    pub workers: WorkerConfig,
    /// PEM PKCS#8 EC P-256 key that signs registry tokens.
    pub token_private_key: Vec<u8>,
    /// Lifetime of a worker's registry token.
    pub worker_token_lifetime: Duration,
    /// The `virtualMachineCIDRs` machines get addresses from; none: machines
    /// keep the pod network's address.
    pub address_pool: Option<AddressPool>,
    /// The controller's Pod: its identity in leader election and in the
    /// Events it publishes.
    pub instance: Option<String>,
}

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// What workers are given.
    pub workers: WorkerConfig,
    tokens: TokenIssuer,
    worker_token_lifetime: Duration,
    /// Reads workers' progress pages.
    pub http: reqwest::Client,
    /// The `virtualMachineCIDRs`.
    pub address_pool: Option<AddressPool>,
    /// Every VirtualMachineIPAddressLease (the lease controller's cache).
    pub leases: Store<VirtualMachineIPAddressLease>,
    events: Recorder,
}

impl Context {
    /// A context over `client`; `leases` is a cache of every lease.
    pub fn new(
        client: Client,
        settings: Settings,
        leases: Store<VirtualMachineIPAddressLease>,
    ) -> Result<Context, Error> {
        let tokens = TokenIssuer::new(&settings.token_private_key, TOKEN_ISSUER, TOKEN_AUDIENCE)
            .map_err(|error| Error::Token(error.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|error| Error::Registry {
                action: "building the HTTP client".into(),
                reason: error.to_string(),
            })?;
        Ok(Context {
            client: client.clone(),
            workers: settings.workers,
            tokens,
            worker_token_lifetime: settings.worker_token_lifetime,
            http,
            address_pool: settings.address_pool,
            leases,
            events: Recorder::new(
                client,
                Reporter {
                    controller: EVENT_REPORTER.into(),
                    instance: settings.instance,
                },
            ),
        })
    }

    /// Publishes a failed reconcile of `object` as a Warning Event, so that
    /// `kubectl describe` shows what the controller could not do. Lost races
    /// for an address, retried at once, are not worth one.
    pub async fn report_failure<K: Resource<DynamicType = ()>>(&self, object: &K, error: &Error) {
        if matches!(error, Error::AddressTaken { .. }) {
            return;
        }
        let mut note = error.to_string();
        if note.len() > EVENT_NOTE_LIMIT {
            let mut end = EVENT_NOTE_LIMIT - 3;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: error.reason().into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(publish_error) = self.events.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %publish_error, "cannot publish an Event");
        }
    }

    /// A token for a worker.
    pub fn worker_token(&self, access: &[crate::workload::RepositoryAccess]) -> Result<String, Error> {
        let entries = access
            .iter()
            .map(|access| AccessEntry::repository(&access.repository, &access.actions))
            .collect();
        self.tokens
            .issue(Some(TOKEN_SUBJECT), entries, self.worker_token_lifetime)
            .map_err(|error| Error::Token(error.to_string()))
    }

    /// A registry client with a short token for `access` (repository, actions).
    pub fn registry(&self, access: &[(&str, &[&str])]) -> Result<RegistryClient, Error> {
        let entries = access
            .iter()
            .map(|(repository, actions)| AccessEntry::repository(repository, actions))
            .collect();
        let token = self
            .tokens
            .issue(Some(TOKEN_SUBJECT), entries, OWN_TOKEN_LIFETIME)
            .map_err(|error| Error::Token(error.to_string()))?;
        let host = ImageReference {
            host: self.workers.registry_host.clone(),
            repository: "dvcr".into(),
            reference: "latest".into(),
        };
        let options = ClientOptions {
            ca_bundle: self.workers.registry_ca_bundle.as_ref().map(|pem| pem.as_bytes().to_vec()),
            plain_http: self.workers.registry_plain_http,
            credentials: None,
            bearer_token: Some(token),
        };
        RegistryClient::new(&host, &options).map_err(|error| Error::Registry {
            action: format!("reaching the registry {}", self.workers.registry_host),
            reason: error.to_string(),
        })
    }
}

/// Runs `reconcile` and publishes its failure as an Event.
pub async fn reported<K, F, Fut>(object: Arc<K>, context: Arc<Context>, reconcile: F) -> Result<Requeue, Error>
where
    K: Resource<DynamicType = ()>,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Requeue, Error>>,
{
    let outcome = reconcile(object.clone(), context.clone()).await;
    if let Err(error) = &outcome {
        context.report_failure(object.as_ref(), error).await;
    }
    outcome
}

type Outcome<K> = Result<
    (ObjectRef<K>, kube::runtime::controller::Action),
    kube::runtime::controller::Error<Error, watcher::Error>,
>;

async fn log_outcome<K: Resource>(kind: &'static str, outcome: Outcome<K>)
where
    ObjectRef<K>: std::fmt::Display,
{
    match outcome {
        Ok((object, _)) => tracing::debug!(kind, object = %object, "reconciled"),
        Err(error) => tracing::warn!(kind, error = %error, "reconcile failed"),
    }
}

/// The image of the `controller` container of Pod `name` (the controller's
/// own), which its workers run too.
pub async fn own_image(client: &Client, namespace: &str, name: &str) -> Result<String, Error> {
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(Error::kube(format!("reading the controller's Pod {namespace}/{name}")))?;
    let containers = pod.spec.map(|spec| spec.containers).unwrap_or_default();
    containers
        .iter()
        .find(|container| container.name == "controller")
        .or(containers.first())
        .and_then(|container| container.image.clone())
        .ok_or(Error::Incomplete("container image"))
}

/// Every request the controller makes, as RBAC rules: (API group,
/// resource, verbs). `deploy/base/controller.yaml` grants exactly these (a
/// test compares them), and the recorded-API tests check every request
/// against them.
pub const PERMISSIONS: &[(&str, &str, &[&str])] = &[
    (crate::api::common::GROUP, "virtualimages", &["get", "list", "watch", "patch"]),
    (crate::api::common::GROUP, "clustervirtualimages", &["get", "list", "watch", "patch"]),
    (crate::api::common::GROUP, "virtualdisks", &["get", "list", "watch", "patch"]),
    (crate::api::common::GROUP, "virtualimages/status", &["patch"]),
    (crate::api::common::GROUP, "clustervirtualimages/status", &["patch"]),
    (crate::api::common::GROUP, "virtualdisks/status", &["patch"]),
    ("", "pods", &["get", "list", "watch", "create", "delete"]),
    ("", "persistentvolumeclaims", &["get", "list", "watch", "create", "patch", "delete"]),
    (crate::api::common::GROUP, "virtualmachines", &["get", "list", "watch"]),
    (crate::api::common::GROUP, "virtualmachines/status", &["patch"]),
    ("kubevirt.io", "virtualmachines", &["get", "list", "watch", "create", "patch"]),
    ("kubevirt.io", "virtualmachineinstances", &["get", "list", "watch"]),
    (crate::api::common::GROUP, "virtualmachineoperations", &["get", "list", "watch"]),
    (crate::api::common::GROUP, "virtualmachineoperations/status", &["patch"]),
    ("subresources.kubevirt.io", "virtualmachines/start", &["update"]),
    ("subresources.kubevirt.io", "virtualmachines/stop", &["update"]),
    ("subresources.kubevirt.io", "virtualmachines/restart", &["update"]),
    ("subresources.kubevirt.io", "virtualmachines/migrate", &["update"]),
    ("subresources.kubevirt.io", "virtualmachineinstances/addvolume", &["update"]),
    ("subresources.kubevirt.io", "virtualmachineinstances/removevolume", &["update"]),
    (crate::api::common::GROUP, "virtualmachineblockdeviceattachments", &["get", "list", "watch", "patch"]),
    (crate::api::common::GROUP, "virtualmachineblockdeviceattachments/status", &["patch"]),
    ("storage.k8s.io", "storageclasses", &["get"]),
    (crate::api::common::GROUP, "virtualmachineclasses", &["get", "list", "watch"]),
    (crate::api::common::GROUP, "virtualmachineclasses/status", &["patch"]),
    ("", "nodes", &["list", "watch"]),
    (crate::api::common::GROUP, "virtualmachineipaddresses", &["get", "list", "watch", "create", "patch"]),
    (crate::api::common::GROUP, "virtualmachineipaddresses/status", &["patch"]),
    (
        crate::api::common::GROUP,
        "virtualmachineipaddressleases",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    (crate::api::common::GROUP, "virtualmachineipaddressleases/status", &["patch"]),
    ("", "secrets", &["get", "create", "patch", "delete"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    ("coordination.k8s.io", "leases", &["get", "create", "update"]),
    ("", "services", &["create", "patch", "delete"]),
    ("networking.k8s.io", "ingresses", &["create", "patch", "delete"]),
];

/// Runs the controllers until SIGTERM or SIGINT, once this replica leads
/// (see [`leader`]); returns an error when it stops leading.
pub async fn run(client: Client, settings: Settings) -> Result<(), Error> {
    let namespace = settings.workers.controller_namespace.clone();
    let identity = settings.instance.clone().unwrap_or_else(|| format!("dvcr-controller-{}", std::process::id()));
    tokio::select! {
        () = leader::acquire(&client, &namespace, &identity) => {}
        () = stop_signal() => return Ok(()),
    }
    let outcome = tokio::select! {
        outcome = run_controllers(client.clone(), settings) => outcome,
        lost = leader::keep(&client, &namespace, &identity) => Err(lost),
    };
    if outcome.is_ok() {
        leader::release(&client, &namespace, &identity).await;
    }
    outcome
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// `controller` also woken when a VirtualImage or ClusterVirtualImage turns
/// Ready, for the objects of its cache that `waiting` finds waiting on it.
fn woken_by_images<K>(
    controller: Controller<K>,
    client: &Client,
    waiting: fn(&Store<K>, Option<Target>) -> Vec<ObjectRef<K>>,
) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (for_images, for_cluster_images) = (controller.store(), controller.store());
    controller
        .watches(Api::<VirtualImage>::all(client.clone()), watcher::Config::default(), move |image| {
            waiting(&for_images, Target::ready_image(&image))
        })
        .watches(Api::<ClusterVirtualImage>::all(client.clone()), watcher::Config::default(), move |image| {
            waiting(&for_cluster_images, Target::ready_cluster_image(&image))
        })
}

async fn run_controllers(client: Client, settings: Settings) -> Result<(), Error> {
    let lease_controller =
        Controller::new(Api::<VirtualMachineIPAddressLease>::all(client.clone()), watcher::Config::default());
    let context = Arc::new(Context::new(client.clone(), settings, lease_controller.store())?);
    let workers = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let disk_claims = workers.clone();
    // Resources made from or booting from others are woken when those become
    // usable (`referrers`), instead of waiting for their next periodic look.
    let image_controller = woken_by_images(
        Controller::new(Api::<VirtualImage>::all(client.clone()), watcher::Config::default()),
        &client,
        referrers::images_waiting_on,
    );
    let cluster_image_controller = woken_by_images(
        Controller::new(Api::<ClusterVirtualImage>::all(client.clone()), watcher::Config::default()),
        &client,
        referrers::cluster_images_waiting_on,
    );
    let disk_controller = woken_by_images(
        Controller::new(Api::<VirtualDisk>::all(client.clone()), watcher::Config::default()),
        &client,
        referrers::disks_waiting_on,
    );
    let machine_controller = woken_by_images(
        Controller::new(Api::<VirtualMachine>::all(client.clone()), watcher::Config::default()),
        &client,
        referrers::machines_waiting_on,
    );
    let machine_store = machine_controller.store();
    let virtual_images = image_controller
        .owns(Api::<Pod>::all(client.clone()), workers.clone())
        .owns(Api::<PersistentVolumeClaim>::all(client.clone()), workers.clone())
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, images::reconcile_virtual_image),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualImage", result));
    let cluster_images = cluster_image_controller
        .owns(Api::<Pod>::all(client.clone()), workers.clone())
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, images::reconcile_cluster_virtual_image),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("ClusterVirtualImage", result));
    let disks = disk_controller
        .owns(Api::<Pod>::all(client.clone()), workers)
        .owns(Api::<PersistentVolumeClaim>::all(client.clone()), disk_claims)
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, disks::reconcile_virtual_disk),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualDisk", result));
    let kubevirt = machines::kubevirt_machines();
    let machines = machine_controller
        .watches(Api::<VirtualDisk>::all(client.clone()), watcher::Config::default(), move |disk| {
            referrers::machines_waiting_on(&machine_store, Target::usable_disk(&disk))
        })
        .owns_with(Api::<DynamicObject>::all_with(client.clone(), &kubevirt), kubevirt, watcher::Config::default())
        .watches(
            Api::<VirtualMachineIPAddress>::all(client.clone()),
            watcher::Config::default(),
            machines::machines_of_claim,
        )
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, machines::reconcile_virtual_machine),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualMachine", result));
    let ip_addresses = Controller::new(Api::<VirtualMachineIPAddress>::all(client.clone()), watcher::Config::default())
        .watches(Api::<VirtualMachine>::all(client), watcher::Config::default(), machines::claims_of_machine)
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, addresses::reconcile_address),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualMachineIPAddress", result));
    let leases = lease_controller
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, addresses::reconcile_lease),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualMachineIPAddressLease", result));
    let operations = Controller::new(Api::<VirtualMachineOperation>::all(context.client.clone()), Default::default())
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, operations::reconcile_operation),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualMachineOperation", result));
    // Every class looks again when a node's labels change (KubeVirt's node
    // labeller marks CPU features there); taints are read every few minutes.
    let node_labels = watcher::watcher(Api::<Node>::all(context.client.clone()), watcher::Config::default())
        .touched_objects()
        .predicate_filter(predicates::labels, Default::default())
        .map(|_| ());
    let classes = Controller::new(Api::<VirtualMachineClass>::all(context.client.clone()), Default::default())
        .reconcile_all_on(node_labels)
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, classes::reconcile_class),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualMachineClass", result));
    // An attachment looks again when its machine's instance changes (it
    // started or restarted, or KubeVirt moved the hot-plug on).
    let attachment_controller = Controller::new(
        Api::<VirtualMachineBlockDeviceAttachment>::all(context.client.clone()),
        Default::default(),
    );
    let attachment_store = attachment_controller.store();
    let instances = machines::kubevirt_instances();
    let attachments = attachment_controller
        .watches_with(
            Api::<DynamicObject>::all_with(context.client.clone(), &instances),
            instances,
            watcher::Config::default(),
            move |instance| attachments::attachments_of_instance(&attachment_store, &instance),
        )
        .shutdown_on_signal()
        .run(
            |object, context| reported(object, context, attachments::reconcile_attachment),
            images::error_policy,
            context.clone(),
        )
        .for_each(|result| log_outcome("VirtualMachineBlockDeviceAttachment", result));
    tracing::info!(
        "controller running: VirtualImage, ClusterVirtualImage, VirtualDisk, VirtualMachine, \
         VirtualMachineBlockDeviceAttachment, VirtualMachineClass, VirtualMachineIPAddress, \
         VirtualMachineIPAddressLease, VirtualMachineOperation"
    );
    futures::join!(
        virtual_images,
        cluster_images,
        disks,
        machines,
        attachments,
        classes,
        ip_addresses,
        leases,
        operations
    );
    Ok(())
}
