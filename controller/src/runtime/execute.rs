//! Carrying out the reconcilers' [`Action`]s: Kubernetes requests (objects
//! the controller owns are applied server-side, so a retried reconcile
//! repeats them harmlessly) and registry requests.

use std::fmt::Debug;

use dvcr_importer::progress::Progress;
use dvcr_importer::reference::ImageReference;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use super::observe::merge_patch;
use super::{Context, Error};
use crate::reconcile::{Action, Plan, FINALIZER};
use crate::workload::{importer_name, provisioner_name, uploader_name, worker_secret_name, WorkerSecret};

/// Field manager of server-side applies.
const FIELD_MANAGER: &str = "dvcr-controller";

fn ignore(status: fn(&kube::core::Status) -> bool) -> impl FnOnce(kube::Error) -> Result<(), kube::Error> {
    move |error| match &error {
        kube::Error::Api(answer) if status(answer) => Ok(()),
        _ => Err(error),
    }
}

/// Carries out a plan for `object`: its actions in order (stopping at the
/// first failure, status unwritten), then the status as a merge patch of
/// what changed (not after the finalizer is released: the object may be
/// gone), and says when to look again.
pub async fn carry_out<K, S>(
    context: &Context,
    api: &Api<K>,
    object: &K,
    old_status: &S,
    plan: Plan<S>,
) -> Result<Requeue, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    for action in &plan.actions {
        run(context, api, object, action).await?;
    }
    let released = plan.actions.contains(&Action::RemoveFinalizer);
    if !released && plan.status != *old_status {
        let old = serde_json::to_value(old_status).unwrap_or_default();
        let new = serde_json::to_value(&plan.status).unwrap_or_default();
        let patch = json!({ "status": merge_patch(&old, &new) });
        api.patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Error::kube("writing the status"))?;
    }
    Ok(match plan.requeue_after {
        Some(after) => Requeue::requeue(after),
        None => Requeue::await_change(),
    })
}

/// Carries out `action` for `object`, whose API is `api`.
pub async fn run<K>(context: &Context, api: &Api<K>, object: &K, action: &Action) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    tracing::info!(object = %object.name_any(), action = %action.describe(), "acting");
    match action {
        Action::AddFinalizer | Action::RemoveFinalizer => {
            let mut finalizers: Vec<String> = object.finalizers().to_vec();
            finalizers.retain(|finalizer| finalizer != FINALIZER);
            if *action == Action::AddFinalizer {
                finalizers.push(FINALIZER.to_string());
            }
            // The resourceVersion makes this fail on a concurrent change
            // instead of overwriting someone else's finalizer.
            let patch = json!({"metadata": {
                "finalizers": finalizers,
                "resourceVersion": object.resource_version(),
            }});
            api.patch(&object.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(Error::kube(action.describe()))
        }
        Action::CreateSecret(plan) => create_secret(context, plan).await,
        Action::CreatePod(worker) => {
            let pods: Api<Pod> = Api::namespaced(context.client.clone(), &worker.key.namespace);
            pods.create(&PostParams::default(), &worker.pod(&context.workers))
                .await
                .map(drop)
                .or_else(ignore(kube::core::Status::is_already_exists))
                .map_err(Error::kube(action.describe()))
        }
        Action::CreateClaim(claim) => {
            let namespace = claim.metadata.namespace.clone().ok_or(Error::Incomplete("namespace"))?;
            Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), &namespace)
                .create(&PostParams::default(), claim)
                .await
                .map(drop)
                .or_else(ignore(kube::core::Status::is_already_exists))
                .map_err(Error::kube(action.describe()))
        }
        Action::DeleteClaim { namespace, name } => Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), namespace)
            .delete(name, &DeleteParams::default())
            .await
            .map(drop)
            .or_else(ignore(kube::core::Status::is_not_found))
            .map_err(Error::kube(action.describe())),
        Action::ResizeClaim { namespace, name, bytes } => {
            let patch = json!({"spec": {"resources": {"requests": {"storage": bytes.to_string()}}}});
            Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), namespace)
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
                .map_err(Error::kube(action.describe()))
        }
        Action::ApplyKubevirtMachine(machine) => {
            let namespace = machine["metadata"]["namespace"].as_str().ok_or(Error::Incomplete("namespace"))?;
            let name = machine["metadata"]["name"].as_str().ok_or(Error::Incomplete("name"))?;
            let resource = super::machines::kubevirt_machines();
            Api::<DynamicObject>::namespaced_with(context.client.clone(), namespace, &resource)
                .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(machine.as_ref()))
                .await
                .map(drop)
                .map_err(Error::kube(action.describe()))
        }
        Action::KubevirtSubresource(request) => {
            put_subresource(context, request).await.map_err(Error::kube(action.describe()))
        }
        Action::CreateService(service) => apply(context, service.as_ref()).await,
        Action::CreateIngress(ingress) => apply(context, ingress.as_ref()).await,
        Action::DeleteWorker { namespace, owner_uid } => delete_worker(context, namespace, owner_uid).await,
        Action::CopyImage { from, to } => copy_image(context, from, to).await,
        Action::LeaseAddress { address, claim } => super::addresses::lease_address(context, *address, claim).await,
        Action::ReleaseAddress { address, claim } => {
            super::addresses::release_address(context, *address, claim).await
        }
        Action::DeleteLease { name, resource_version } => {
            super::addresses::delete_lease(context, name, resource_version.as_deref()).await
        }
        Action::CreateAddressClaim(claim) => super::addresses::create_claim(context, claim).await,
        Action::DeleteImage { repository, tag } => {
            let client = context.registry(&[(repository, &["*"])])?;
            client
                .delete_manifest(repository, tag)
                .await
                .map(drop)
                .map_err(|error| Error::Registry {
                    action: action.describe(),
                    reason: error.to_string(),
                })
        }
    }
}

/// Sends a request to KubeVirt's subresource API.
pub async fn put_subresource(
    context: &Context,
    request: &crate::kubevirt::SubresourceRequest,
) -> Result<(), kube::Error> {
    let body = serde_json::to_vec(&request.body).unwrap_or_default();
    let request = http::Request::put(&request.path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(kube::Error::HttpError)?;
    context.client.request_text(request).await.map(drop)
}

/// Applies a namespaced object server-side.
async fn apply<K>(context: &Context, object: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let namespace = object.namespace().ok_or(Error::Incomplete("namespace"))?;
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(context.client.clone(), &namespace);
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map(drop)
        .map_err(Error::kube(format!("applying {} {namespace}/{name}", K::kind(&()))))
}

/// Mints the worker's token, copies the pull secret's dockerconfigjson,
/// and applies the Secret.
async fn create_secret(context: &Context, plan: &WorkerSecret) -> Result<(), Error> {
    let token = context.worker_token(&plan.access)?;
    let docker_config = match &plan.pull_secret {
        None => None,
        Some(key) => {
            let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &key.namespace);
            let secret = secrets
                .get_opt(&key.name)
                .await
                .map_err(Error::kube(format!("reading the pull secret {}/{}", key.namespace, key.name)))?
                .ok_or_else(|| {
                    Error::PullSecret(format!("the pull secret {}/{} does not exist", key.namespace, key.name))
                })?;
            let config = secret
                .data
                .and_then(|mut data| data.remove(".dockerconfigjson"))
                .ok_or_else(|| {
                    Error::PullSecret(format!(
                        "the pull secret {}/{} has no .dockerconfigjson (type kubernetes.io/dockerconfigjson)",
                        key.namespace, key.name
                    ))
                })?;
            Some(config.0)
        }
    };
    let secret = plan.secret(&token, docker_config);
    apply(context, &secret).await
}

/// Deletes a worker's Pods, Service, Ingress and Secret; absent ones are fine.
async fn delete_worker(context: &Context, namespace: &str, owner_uid: &str) -> Result<(), Error> {
    for name in [importer_name(owner_uid), uploader_name(owner_uid), provisioner_name(owner_uid)] {
        delete_named::<Pod>(context, namespace, &name).await?;
    }
    delete_named::<Service>(context, namespace, &uploader_name(owner_uid)).await?;
    delete_named::<Ingress>(context, namespace, &uploader_name(owner_uid)).await?;
    delete_named::<Secret>(context, namespace, &worker_secret_name(owner_uid)).await
}

/// Deletes one namespaced object in the background; absent is fine.
async fn delete_named<K>(context: &Context, namespace: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    Api::<K>::namespaced(context.client.clone(), namespace)
        .delete(name, &DeleteParams::background())
        .await
        .map(drop)
        .or_else(ignore(kube::core::Status::is_not_found))
        .map_err(Error::kube(format!("deleting {} {name} in {namespace}", K::kind(&()))))
}

/// Copies an image within the registry by mounting its blobs.
async fn copy_image(context: &Context, from: &str, to: &str) -> Result<(), Error> {
    let action = format!("copying {from} to {to}");
    let registry_error = |reason: String| Error::Registry {
        action: action.clone(),
        reason,
    };
    let source = ImageReference::parse(from).map_err(|error| registry_error(error.to_string()))?;
    let destination = ImageReference::parse(to).map_err(|error| registry_error(error.to_string()))?;
    let mut client = context.registry(&[
        (&source.repository, &["pull"]),
        (&destination.repository, &["pull", "push"]),
    ])?;
    dvcr_importer::import::copy_within_registry(&mut client, &source, &destination, &Progress::default())
        .await
        .map(drop)
        .map_err(|error| registry_error(error.to_string()))
}
