//! The VirtualDisk controller: observe the PVC, its storage class, the
//! provisioner Pod and the source image; plan with
//! [`crate::reconcile::disk`]; act; write the status.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};

use super::images::{observe_import_worker, observe_source, observe_worker};
use super::{execute, Context, Error};
use crate::api::VirtualDisk;
use crate::reconcile::disk::{quantity_bytes, reconcile, ClaimState, DiskObserved, DiskView};
use crate::reconcile::{WorkerState, FINALIZER};
use crate::workload::{disk_claim_name, provisioner_name};

/// Reconciles a VirtualDisk.
pub async fn reconcile_virtual_disk(disk: Arc<VirtualDisk>, context: Arc<Context>) -> Result<Requeue, Error> {
    let namespace = disk.namespace().ok_or(Error::Incomplete("namespace"))?;
    let uid = disk.uid().ok_or(Error::Incomplete("uid"))?;
    let name = disk.name_any();
    let status = disk.status.clone().unwrap_or_default();
    let view = DiskView {
        namespace: &namespace,
        name: &name,
        uid: &uid,
        generation: disk.meta().generation,
        deleting: disk.meta().deletion_timestamp.is_some(),
        has_finalizer: disk.finalizers().iter().any(|finalizer| finalizer == FINALIZER),
        spec: &disk.spec,
        status: &status,
    };
    let observed = observe(&context, &view).await?;
    let plan = reconcile(&view, &observed, &context.workers);
    let api: Api<VirtualDisk> = Api::namespaced(context.client.clone(), &namespace);
    execute::carry_out(&context, &api, disk.as_ref(), &status, plan).await
}

async fn observe(context: &Context, view: &DiskView<'_>) -> Result<DiskObserved, Error> {
    let now = k8s_openapi::jiff::Timestamp::now();
    if view.deleting {
        return Ok(DiskObserved {
            importer: WorkerState::Absent,
            provisioner: WorkerState::Absent,
            claim: None,
            source: None,
            wait_for_first_consumer: false,
            now,
            fresh_upload_token: String::new(),
        });
    }
    let namespace = view.namespace;
    let claim_name = disk_claim_name(view.name, view.uid);
    let (provisioner, claim) = observe_filling(context, namespace, view.uid, &claim_name).await?;
    let pending_class = claim
        .as_ref()
        .filter(|claim| claim.phase.as_deref() == Some("Pending"))
        .and_then(|claim| claim.storage_class.clone());
    let wait_for_first_consumer = match pending_class {
        Some(class) => Api::<StorageClass>::all(context.client.clone())
            .get_opt(&class)
            .await
            .map_err(Error::kube(format!("reading StorageClass {class}")))?
            .and_then(|class| class.volume_binding_mode)
            .is_some_and(|mode| mode == "WaitForFirstConsumer"),
        None => false,
    };
    let source = match view.source_object() {
        Some((kind, namespace, name)) => Some(observe_source(context, kind, namespace, name).await?),
        None => None,
    };
    let importer = match view.spec.data_source.as_ref().filter(|_| view.imports()) {
        Some(source) => observe_import_worker(context, namespace, source, view.uid).await?,
        None => WorkerState::Absent,
    };
    Ok(DiskObserved {
        importer,
        provisioner,
        claim,
        source,
        wait_for_first_consumer,
        now,
        fresh_upload_token: Alphanumeric.sample_string(&mut rand::rng(), 32),
    })
}

/// The provisioner Pod of the resource `owner_uid` and the PVC `claim_name`
/// it fills.
pub(super) async fn observe_filling(
    context: &Context,
    namespace: &str,
    owner_uid: &str,
    claim_name: &str,
) -> Result<(WorkerState, Option<ClaimState>), Error> {
    let provisioner = observe_worker(context, namespace, &provisioner_name(owner_uid)).await?;
    let claim = Api::<PersistentVolumeClaim>::namespaced(context.client.clone(), namespace)
        .get_opt(claim_name)
        .await
        .map_err(Error::kube(format!("reading PVC {namespace}/{claim_name}")))?
        .map(|claim| claim_state(&claim));
    Ok((provisioner, claim))
}

/// What the reconciler needs of a PVC.
pub fn claim_state(claim: &PersistentVolumeClaim) -> ClaimState {
    let storage = |quantities: Option<&BTreeMap<String, Quantity>>| {
        quantities
            .and_then(|quantities| quantities.get("storage"))
            .and_then(|quantity| quantity_bytes(&quantity.0))
    };
    let spec = claim.spec.as_ref();
    let status = claim.status.as_ref();
    ClaimState {
        phase: status.and_then(|status| status.phase.clone()),
        requested_bytes: storage(
            spec.and_then(|spec| spec.resources.as_ref())
                .and_then(|resources| resources.requests.as_ref()),
        ),
        capacity_bytes: storage(status.and_then(|status| status.capacity.as_ref())),
        storage_class: spec.and_then(|spec| spec.storage_class_name.clone()),
        deleting: claim.metadata.deletion_timestamp.is_some(),
    }
}
