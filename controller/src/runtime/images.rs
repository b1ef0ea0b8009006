//! The VirtualImage and ClusterVirtualImage controllers: observe, plan
//! with [`crate::reconcile::image`], act, write the status.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};
use serde::de::DeserializeOwned;

use super::disks::observe_filling;
use super::observe::{source_image, worker_state};
use super::{execute, Context, Error};
use crate::api::common::{DataSource, DataSourceType, ObjectRefKind};
use crate::api::image::{ImagePhase, ImageStorage};
use crate::api::{ClusterVirtualImage, VirtualImage};
use crate::reconcile::image::{reconcile, ImageKind, ImageObserved, ImageView, SourceImage};
use crate::reconcile::{WorkerState, FINALIZER};
use crate::workload::{image_claim_name, importer_name, uploader_name, METRICS_PORT};

/// How long a failed reconcile waits before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(15);

/// Reconciles a VirtualImage.
pub async fn reconcile_virtual_image(image: Arc<VirtualImage>, context: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = image.namespace().ok_or(Error::Incomplete("namespace"))?;
    let api: Api<VirtualImage> = Api::namespaced(context.client.clone(), &namespace);
    let status = image.status.clone().unwrap_or_default();
    let uid = image.uid().ok_or(Error::Incomplete("uid"))?;
    let view = ImageView {
        kind: ImageKind::VirtualImage { namespace: &namespace },
        name: &image.name_any(),
        uid: &uid,
        generation: image.meta().generation,
        deleting: image.meta().deletion_timestamp.is_some(),
        has_finalizer: image.finalizers().iter().any(|finalizer| finalizer == FINALIZER),
        storage: image.spec.storage,
        storage_class: image
            .spec
            .persistent_volume_claim
            .as_ref()
            .and_then(|claim| claim.storage_class_name.as_deref()),
        data_source: &image.spec.data_source,
        status: &status,
    };
    reconcile_image(&context, &api, image.as_ref(), &view).await
}

/// Reconciles a ClusterVirtualImage.
pub async fn reconcile_cluster_virtual_image(
    image: Arc<ClusterVirtualImage>,
    context: Arc<Context>,
) -> Result<Requeue, Error> {
    let api: Api<ClusterVirtualImage> = Api::all(context.client.clone());
    let status = image.status.clone().unwrap_or_default();
    let uid = image.uid().ok_or(Error::Incomplete("uid"))?;
    let view = ImageView {
        kind: ImageKind::ClusterVirtualImage,
        name: &image.name_any(),
        uid: &uid,
        generation: image.meta().generation,
        deleting: image.meta().deletion_timestamp.is_some(),
        has_finalizer: image.finalizers().iter().any(|finalizer| finalizer == FINALIZER),
        storage: ImageStorage::ContainerRegistry,
        storage_class: None,
        data_source: &image.spec.data_source,
        status: &status,
    };
    reconcile_image(&context, &api, image.as_ref(), &view).await
}

/// Retries a failed reconcile after [`RETRY_AFTER`].
pub fn error_policy<K>(object: Arc<K>, error: &Error, _context: Arc<Context>) -> Requeue
where
    K: Resource,
{
    tracing::warn!(object = %object.name_any(), %error, "reconcile failed; retrying");
    match error {
        // Lost a race for an address: choose again at once.
        Error::AddressTaken { .. } => Requeue::requeue(Duration::from_secs(1)),
        _ => Requeue::requeue(RETRY_AFTER),
    }
}

async fn reconcile_image<K>(context: &Context, api: &Api<K>, object: &K, view: &ImageView<'_>) -> Result<Requeue, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let observed = observe(context, view).await?;
    let plan = reconcile(view, &observed, &context.workers);
    execute::carry_out(context, api, object, view.status, plan).await
}

/// Gathers what the reconciler needs: the worker Pod (and its progress
/// while it runs), the `objectRef` source, and for a Ready image whether
/// the registry still has it.
async fn observe(context: &Context, view: &ImageView<'_>) -> Result<ImageObserved, Error> {
    let worker = if view.deleting {
        WorkerState::Absent
    } else {
        observe_import_worker(context, view.worker_namespace(&context.workers), view.data_source, view.uid).await?
    };

    let source = match view.source_object() {
        Some((kind, namespace, name)) if !view.deleting => Some(observe_source(context, kind, namespace, name).await?),
        _ => None,
    };

    let in_claim = match view.kind {
        ImageKind::VirtualImage { namespace } if view.storage == ImageStorage::PersistentVolumeClaim && !view.deleting => {
            Some(namespace)
        }
        _ => None,
    };
    let (provisioner, claim) = match in_claim {
        Some(namespace) => {
            observe_filling(context, namespace, view.uid, &image_claim_name(view.name, view.uid)).await?
        }
        None => (WorkerState::Absent, None),
    };

    let stored = match view.status.phase {
        Some(ImagePhase::Ready) | Some(ImagePhase::ImageLost) if !view.deleting && in_claim.is_none() => {
            let repository = view.repository(&context.workers.registry_host);
            let client = context.registry(&[(&repository, &["pull"])])?;
            match client.manifest_exists(&repository, view.uid).await {
                Ok(found) => Some(found),
                Err(error) => {
                    // An unreachable registry is not a lost image.
                    tracing::warn!(%repository, %error, "cannot check the image in the registry");
                    None
                }
            }
        }
        _ => None,
    };
    Ok(ImageObserved {
        worker,
        provisioner,
        claim,
        source,
        stored,
        now: k8s_openapi::jiff::Timestamp::now(),
        fresh_upload_token: Alphanumeric.sample_string(&mut rand::rng(), 32),
    })
}

/// The importer (or, for `Upload`, the uploader) Pod of the resource
/// `owner_uid`, with its progress page while it runs.
pub(super) async fn observe_import_worker(
    context: &Context,
    namespace: &str,
    source: &DataSource,
    owner_uid: &str,
) -> Result<WorkerState, Error> {
    let name = if source.source_type == DataSourceType::Upload {
        uploader_name(owner_uid)
    } else {
        importer_name(owner_uid)
    };
    observe_worker(context, namespace, &name).await
}

/// The worker Pod `name`, with its progress page while it runs.
pub(super) async fn observe_worker(context: &Context, namespace: &str, name: &str) -> Result<WorkerState, Error> {
    let pod = Api::<Pod>::namespaced(context.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("reading Pod {namespace}/{name}")))?;
    let running_at = pod
        .as_ref()
        .and_then(|pod| pod.status.as_ref())
        .filter(|status| status.phase.as_deref() == Some("Running"))
        .and_then(|status| status.pod_ip.clone());
    let metrics = match running_at {
        Some(ip) => scrape(context, &ip).await,
        None => None,
    };
    Ok(worker_state(pod.as_ref(), metrics))
}

/// The image an `objectRef` names, read from the API.
pub(super) async fn observe_source(
    context: &Context,
    kind: ObjectRefKind,
    namespace: Option<&str>,
    name: &str,
) -> Result<SourceImage, Error> {
    let client = context.client.clone();
    let found = match (kind, namespace) {
        (ObjectRefKind::VirtualImage, Some(namespace)) => Api::<VirtualImage>::namespaced(client, namespace)
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("reading VirtualImage {namespace}/{name}")))?
            .map(|image| (image.status.clone(), image.uid())),
        (ObjectRefKind::ClusterVirtualImage, _) => Api::<ClusterVirtualImage>::all(client)
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("reading ClusterVirtualImage {name}")))?
            .map(|image| (image.status.clone(), image.uid())),
        // Refused by the reconciler with a message; nothing to read.
        _ => return Ok(SourceImage::Missing),
    };
    Ok(match found {
        None => SourceImage::Missing,
        Some((status, uid)) => source_image(status.as_ref(), uid.as_deref(), namespace),
    })
}

/// A running worker's progress page; `None` (logged) when it cannot be read.
async fn scrape(context: &Context, ip: &str) -> Option<String> {
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
    let url = format!("http://{host}:{METRICS_PORT}/metrics");
    match context.http.get(&url).send().await.and_then(|response| response.error_for_status()) {
        Ok(response) => response.text().await.ok(),
        Err(error) => {
            tracing::debug!(%url, %error, "cannot read the worker's progress");
            None
        }
    }
}

