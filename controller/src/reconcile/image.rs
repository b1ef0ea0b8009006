//! VirtualImage and ClusterVirtualImage: import into the registry by an
//! importer Pod (`HTTP`, `ContainerImage`), an uploader Pod with its Service
//! and Ingress (`Upload`), or a registry-side copy (`ObjectRef`); then a
//! periodic check that the image is still stored, and deletion of the
//! registry image behind a finalizer.
//!
//! A VirtualImage with `storage: PersistentVolumeClaim` is kept raw in a
//! PVC of its namespace instead, filled as a disk is
//! ([`super::provision`]): imported sources go through the intermediate
//! copy `vi/<ns>/<name>:<uid>`, removed once the PVC holds the image; an
//! `objectRef` image is read in place (from the registry, or from another
//! image's PVC). Its PVC going away is `PVCLost`.

use k8s_openapi::jiff::Timestamp;

use super::import_worker::{self, ClaimSource, ImportJob, StoredImage};
use super::provision::{self, ClaimState, ClaimTarget, CopyObserved, CopyStep, ImageLocation, ProvisionSource, Provisioned};
use super::{Action, Plan, Refusal, WorkerState, IMAGE_CHECK_INTERVAL, PROGRESS_INTERVAL, WAIT_INTERVAL};
use crate::api::common::{DataSource, DataSourceType, ImageSize, ObjectRefKind};
use crate::api::image::{ImagePhase, ImageStatus, ImageStorage, ImageTarget};
use crate::conditions::{self, types, Desired, Setter};
use crate::import::{repository, ImageOwner, ImportSpecError};
use crate::workload::{Owner, WorkerConfig};

/// Which image resource, and for a VirtualImage its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind<'a> {
    /// A namespaced VirtualImage.
    VirtualImage {
        /// Its namespace.
        namespace: &'a str,
    },
    /// A ClusterVirtualImage.
    ClusterVirtualImage,
}

/// What the reconciler reads of an image resource.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    /// Its kind.
    pub kind: ImageKind<'a>,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.uid`: the tag in the registry, and names its workers.
    pub uid: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `metadata.finalizers` holds [`super::FINALIZER`].
    pub has_finalizer: bool,
    /// `spec.storage` (ClusterVirtualImages: the registry).
    pub storage: ImageStorage,
    /// `spec.persistentVolumeClaim.storageClassName`, for `storage:
    /// PersistentVolumeClaim`.
    pub storage_class: Option<&'a str>,
    /// `spec.dataSource`.
    pub data_source: &'a DataSource,
    /// `status`, as last written.
    pub status: &'a ImageStatus,
}

/// The state of the image an `objectRef` names.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceImage {
    /// No such object.
    Missing,
    /// It exists but is not Ready (yet); its phase, if any.
    NotReady(Option<String>),
    /// Ready, stored in the registry or in a PVC.
    Ready {
        /// Its `status.target`.
        location: ImageLocation,
        /// Its UID.
        uid: String,
        /// Its status sizes, format and CD-ROM flag, copied with it.
        size: Option<ImageSize>,
        /// Its format.
        format: Option<String>,
        /// Whether it is an ISO.
        cdrom: Option<bool>,
    },
}

/// The virtual size a Ready image reports, which a PVC made from it needs;
/// refused when it reports none.
pub fn reported_virtual_bytes(size: Option<&ImageSize>, described: &str) -> Result<u64, Refusal> {
    size.and_then(ImageSize::virtual_bytes).ok_or_else(|| Refusal {
        reason: "InvalidDataSource",
        message: format!("{described} does not report its virtual size"),
    })
}

/// What the I/O layer observed for one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageObserved {
    /// The importer or uploader Pod.
    pub worker: WorkerState,
    /// The provisioner Pod of an image kept in a PVC.
    pub provisioner: WorkerState,
    /// The PVC of an image kept in a PVC.
    pub claim: Option<ClaimState>,
    /// The object an `objectRef` names (`None` for other sources).
    pub source: Option<SourceImage>,
    /// Whether the image is in the registry, when it was checked (Ready
    /// images, every [`IMAGE_CHECK_INTERVAL`]).
    pub stored: Option<bool>,
    /// The time now.
    pub now: Timestamp,
    /// A fresh random token of 32 alphanumerics, used for the external
    /// upload URL when the image has none yet.
    pub fresh_upload_token: String,
}

impl ImageView<'_> {
    fn owner(&self) -> Owner {
        Owner {
            kind: match self.kind {
                ImageKind::VirtualImage { .. } => "VirtualImage",
                ImageKind::ClusterVirtualImage => "ClusterVirtualImage",
            },
            name: self.name.to_string(),
            uid: self.uid.to_string(),
        }
    }

    /// The registry repository of this image.
    pub fn repository(&self, registry_host: &str) -> String {
        let owner = match self.kind {
            ImageKind::VirtualImage { namespace } => ImageOwner::VirtualImage {
                namespace,
                name: self.name,
            },
            ImageKind::ClusterVirtualImage => ImageOwner::ClusterVirtualImage { name: self.name },
        };
        repository(registry_host, owner)
    }

    /// The PVC of a VirtualImage kept in one.
    fn claim_target(&self, config: &WorkerConfig) -> Option<ClaimTarget<'_>> {
        match (self.kind, self.storage) {
            (ImageKind::VirtualImage { namespace }, ImageStorage::PersistentVolumeClaim) => Some(ClaimTarget {
                owner: self.owner(),
                namespace,
                storage_class: self.storage_class,
                mode: config.disk_volume_mode,
            }),
            _ => None,
        }
    }

    /// Where its workers run: a VirtualImage's namespace; for a
    /// ClusterVirtualImage made from a VirtualImage, that image's namespace
    /// (where a PVC keeping it can be mounted; no worker is needed for one
    /// in the registry); else the
    /// controller's for a ClusterVirtualImage.
    pub fn worker_namespace<'a>(&'a self, config: &'a WorkerConfig) -> &'a str {
        match (self.kind, self.source_object()) {
            (ImageKind::VirtualImage { namespace }, _) => namespace,
            (ImageKind::ClusterVirtualImage, Some((ObjectRefKind::VirtualImage, Some(namespace), _))) => namespace,
            (ImageKind::ClusterVirtualImage, _) => &config.controller_namespace,
        }
    }

    /// The object an `objectRef` names, as (kind, namespace, name); the
    /// namespace of a namespaced kind defaults to the image's own.
    pub fn source_object(&self) -> Option<(ObjectRefKind, Option<&str>, &str)> {
        let object = self.data_source.object_ref.as_ref()?;
        if self.data_source.source_type != DataSourceType::ObjectRef {
            return None;
        }
        let namespace = match (object.kind, self.kind) {
            (ObjectRefKind::ClusterVirtualImage, _) => None,
            (_, ImageKind::VirtualImage { namespace }) => Some(object.namespace.as_deref().unwrap_or(namespace)),
            (_, ImageKind::ClusterVirtualImage) => object.namespace.as_deref(),
        };
        Some((object.kind, namespace, &object.name))
    }
}

/// Decides the status and actions of an image.
pub fn reconcile(view: &ImageView<'_>, observed: &ImageObserved, config: &WorkerConfig) -> Plan<ImageStatus> {
    let mut status = view.status.clone();
    status.observed_generation = view.generation;
    let namespace = view.worker_namespace(config).to_string();
    let repository = view.repository(&config.registry_host);
    let cleanup = Action::DeleteWorker {
        namespace: namespace.clone(),
        owner_uid: view.uid.to_string(),
    };

    if view.deleting {
        status.phase = Some(ImagePhase::Terminating);
        let mut actions = Vec::new();
        if view.has_finalizer {
            actions.push(cleanup);
            actions.push(Action::DeleteImage {
                repository,
                tag: view.uid.to_string(),
            });
            actions.push(Action::RemoveFinalizer);
        }
        return Plan {
            status,
            actions,
            requeue_after: None,
        };
    }

    let mut plan = Plan {
        status,
        actions: if view.has_finalizer { Vec::new() } else { vec![Action::AddFinalizer] },
        requeue_after: None,
    };
    let now = observed.now;
    let generation = view.generation;
    let setter = Setter { generation, now };

    // A failed import is retried when its spec changes; a Ready image keeps
    // what it stored.
    let spec_changed = view.status.observed_generation.is_some() && view.status.observed_generation != generation;
    let phase = match view.status.phase {
        Some(ImagePhase::Failed) if spec_changed => {
            plan.actions.push(cleanup.clone());
            // A PVC made by the failed attempt holds nothing usable.
            if let (Some(target), Some(_)) = (view.claim_target(config), &observed.claim) {
                plan.actions.push(Action::DeleteClaim {
                    namespace: target.namespace.to_string(),
                    name: target.claim_name(),
                });
            }
            plan.status = ImageStatus {
                observed_generation: generation,
                ..ImageStatus::default()
            };
            setter.set(&mut plan.status.conditions,
                types::READY,
                false,
                "Pending",
                "the spec changed; importing again".into(),
            );
            plan.status.phase = Some(ImagePhase::Pending);
            plan.requeue_after = Some(std::time::Duration::ZERO);
            return plan;
        }
        phase => phase,
    };

    let claim_target = view.claim_target(config);
    let has_workers = observed.worker != WorkerState::Absent || observed.provisioner != WorkerState::Absent;
    match phase {
        Some(ImagePhase::Ready) | Some(ImagePhase::ImageLost) | Some(ImagePhase::PvcLost) => {
            if has_workers {
                plan.actions.push(cleanup);
            }
            plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
            if let Some(target) = &claim_target {
                keep_claim(&target.claim_name(), observed, &setter, &mut plan);
                return plan;
            }
            let url = plan
                .status
                .target
                .as_ref()
                .and_then(|target| target.registry_url.clone())
                .unwrap_or_default();
            match observed.stored {
                Some(false) => {
                    plan.status.phase = Some(ImagePhase::ImageLost);
                    setter.set(&mut plan.status.conditions,
                        types::READY,
                        false,
                        "ImageLost",
                        format!(
                            "the image {url} is no longer in the registry; delete this resource and import it again"
                        ),
                    );
                }
                Some(true) if phase == Some(ImagePhase::ImageLost) => {
                    plan.status.phase = Some(ImagePhase::Ready);
                    setter.set(&mut plan.status.conditions, types::READY, true, "Ready", format!("stored as {url}"));
                }
                _ => {}
            }
            return plan;
        }
        Some(ImagePhase::Failed) => {
            if has_workers {
                plan.actions.push(cleanup);
            }
            return plan;
        }
        _ => {}
    }

    let target = format!("{}/{repository}:{}", config.registry_host, view.uid);
    let result = match (&claim_target, view.data_source.source_type) {
        (Some(claim_target), _) => fill_claim(view, observed, config, claim_target, &repository, &target, &mut plan),
        (None, DataSourceType::ObjectRef) => {
            copy_object(view, observed, config, (&namespace, &repository, &target), &mut plan)
        }
        (None, DataSourceType::Upload | DataSourceType::Http | DataSourceType::ContainerImage) => {
            run_worker(view, observed, config, (&namespace, &repository, &target), None, &mut plan)
        }
    };
    if let Err(refusal) = result {
        if has_workers && !plan.actions.contains(&cleanup) {
            plan.actions.push(cleanup);
        }
        fail(&mut plan, now, generation, refusal);
    }
    plan
}

/// A Ready image kept in a PVC: its PVC must stay.
fn keep_claim(claim_name: &str, observed: &ImageObserved, setter: &Setter, plan: &mut Plan<ImageStatus>) {
    match &observed.claim {
        Some(claim) if !claim.lost() => {
            if plan.status.phase != Some(ImagePhase::Ready) {
                plan.status.phase = Some(ImagePhase::Ready);
                let message = format!("stored in PVC {claim_name}");
                setter.set(&mut plan.status.conditions, types::READY, true, "Ready", message);
            }
        }
        found => {
            plan.status.phase = Some(ImagePhase::PvcLost);
            let what = if found.is_some() { "lost its volume" } else { "is gone" };
            let message = format!(
                "the image's PVC {claim_name} {what}; its data is lost: delete this resource and import it again"
            );
            setter.set(&mut plan.status.conditions, types::READY, false, "PVCLost", message);
        }
    }
}

/// A VirtualImage kept in a PVC: the source (imported into the
/// intermediate copy first, or an `objectRef` image read in place), the
/// PVC, the provisioner.
fn fill_claim(
    view: &ImageView<'_>,
    observed: &ImageObserved,
    config: &WorkerConfig,
    claim_target: &ClaimTarget<'_>,
    repository: &str,
    copy: &str,
    plan: &mut Plan<ImageStatus>,
) -> Result<(), Refusal> {
    let setter = Setter {
        generation: view.generation,
        now: observed.now,
    };
    let claim_name = claim_target.claim_name();
    plan.status.target = Some(ImageTarget {
        registry_url: None,
        persistent_volume_claim_name: Some(claim_name.clone()),
    });
    if let Some(claim) = &observed.claim {
        if claim.deleting {
            // The PVC of a failed attempt, deleted when the spec changed.
            plan.status.phase = Some(ImagePhase::Pending);
            let message = format!("waiting for the PVC {claim_name} of the failed attempt to be deleted");
            setter.set(&mut plan.status.conditions, types::READY, false, "Pending", message);
            plan.requeue_after = Some(PROGRESS_INTERVAL);
            return Ok(());
        }
        plan.status.storage_class_name = claim.storage_class.clone();
    }
    let imported = view.data_source.source_type != DataSourceType::ObjectRef;
    let (location, virtual_bytes) = if imported {
        let job = ImportJob {
            owner: view.owner(),
            data_source: view.data_source,
            namespace: claim_target.namespace,
            pull_secret_namespace: Some(claim_target.namespace),
            repository,
            target: copy,
            shown_progress: view.status.progress.as_deref(),
            progress_share: 0.5,
            upload_urls: view.status.image_upload_urls.as_ref(),
            upload_seen: view.status.phase == Some(ImagePhase::Provisioning),
            claim_source: None,
        };
        let copy_observed = CopyObserved {
            importer: &observed.worker,
            claim: observed.claim.as_ref(),
            fresh_upload_token: &observed.fresh_upload_token,
        };
        match provision::import_copy(&job, claim_target, copy_observed, None, config, &setter, plan)? {
            CopyStep::Importing => return Ok(()),
            CopyStep::Stored(StoredImage { size, format, cdrom }) => {
                plan.status.size = Some(size);
                plan.status.format = Some(format);
                plan.status.cdrom = Some(cdrom);
                return Ok(());
            }
            CopyStep::InRegistry(copy) => (ImageLocation::Registry(copy), None),
        }
    } else {
        let Some(SourceImage::Ready {
            location,
            uid,
            size,
            format,
            cdrom,
        }) = ready_source(view, observed, plan)?
        else {
            return Ok(());
        };
        let virtual_bytes = reported_virtual_bytes(size.as_ref(), &format!("the image in {location}"))?;
        plan.status.source_uid = Some(uid.clone());
        plan.status.size = size.clone();
        plan.status.format = format.clone();
        plan.status.cdrom = *cdrom;
        let message = "the source image is Ready".to_string();
        setter.set(&mut plan.status.conditions, types::DATASOURCE_READY, true, "Ready", message);
        (location.clone(), Some(virtual_bytes))
    };
    let source = ProvisionSource {
        location: &location,
        virtual_bytes,
        imported,
    };
    let Some(claim) = &observed.claim else {
        // An imported image's PVC was made by its import step.
        let bytes = virtual_bytes.unwrap_or_default();
        return provision::create_claim(claim_target, bytes, Some(source), config, &setter, plan);
    };
    if claim.lost() {
        return Err(provision::lost_while_filling(&claim_name));
    }
    match provision::follow_provisioner(claim_target, source, &observed.provisioner, config, &setter, plan)? {
        Provisioned::Working => {}
        Provisioned::Written => {
            plan.status.phase = Some(ImagePhase::Ready);
            plan.status.progress = Some("100%".into());
            plan.status.download_speed = import_worker::settled_speed(plan.status.download_speed.take());
            let message = format!("written from {location}");
            setter.set(&mut plan.status.conditions, types::DATASOURCE_READY, true, "Ready", message);
            let message = format!("stored in PVC {claim_name}");
            setter.set(&mut plan.status.conditions, types::READY, true, "Ready", message);
            plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
        }
    }
    Ok(())
}

fn fail(plan: &mut Plan<ImageStatus>, now: Timestamp, generation: Option<i64>, refusal: Refusal) {
    plan.status.phase = Some(ImagePhase::Failed);
    plan.status.download_speed = None;
    conditions::set(
        &mut plan.status.conditions,
        Desired {
            condition_type: types::READY,
            status: false,
            reason: refusal.reason,
            message: refusal.message,
        },
        generation,
        now,
    );
}

fn ready(plan: &mut Plan<ImageStatus>, now: Timestamp, generation: Option<i64>, target: &str) {
    plan.status.phase = Some(ImagePhase::Ready);
    plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
    plan.status.progress = Some("100%".into());
    plan.status.target = Some(ImageTarget {
        registry_url: Some(target.to_string()),
        persistent_volume_claim_name: None,
    });
    for (condition_type, reason, message) in [
        (types::DATASOURCE_READY, "Ready", "the source was read".to_string()),
        (types::READY, "Ready", format!("stored as {target}")),
    ] {
        conditions::set(
            &mut plan.status.conditions,
            Desired {
                condition_type,
                status: true,
                reason,
                message,
            },
            generation,
            now,
        );
    }
}

/// `objectRef`: wait for the source to be Ready, then copy it in the
/// registry (a mount of its blobs and a new manifest tag); an image kept
/// in a PVC is read from its volume by an importer instead.
fn copy_object(
    view: &ImageView<'_>,
    observed: &ImageObserved,
    config: &WorkerConfig,
    (namespace, repository, target): (&str, &str, &str),
    plan: &mut Plan<ImageStatus>,
) -> Result<(), Refusal> {
    let Some(SourceImage::Ready {
        location,
        uid,
        size,
        format,
        cdrom,
    }) = ready_source(view, observed, plan)?
    else {
        return Ok(());
    };
    plan.status.source_uid = Some(uid.clone());
    let registry_url = match location {
        ImageLocation::Registry(registry_url) => registry_url,
        ImageLocation::Claim { name, .. } => {
            provision::readable_from(location, namespace)?;
            let virtual_bytes = reported_virtual_bytes(size.as_ref(), &format!("the image in {location}"))?;
            let claim = ClaimSource {
                claim_name: name,
                virtual_bytes,
                cdrom: cdrom.unwrap_or(false),
                mode: config.disk_volume_mode,
            };
            return run_worker(view, observed, config, (namespace, repository, target), Some(claim), plan);
        }
    };
    plan.actions.push(Action::CopyImage {
        from: registry_url.clone(),
        to: target.to_string(),
    });
    plan.status.size = size.clone();
    plan.status.format = format.clone();
    plan.status.cdrom = *cdrom;
    ready(plan, observed.now, view.generation, target);
    Ok(())
}

/// The image an `objectRef` names, once Ready; until then the image waits
/// for it (`Pending`, with the reason), and `None` is returned. Refused:
/// disks, and a VirtualImage named by a ClusterVirtualImage without its
/// namespace.
fn ready_source<'a>(
    view: &ImageView<'_>,
    observed: &'a ImageObserved,
    plan: &mut Plan<ImageStatus>,
) -> Result<Option<&'a SourceImage>, Refusal> {
    let Some((kind, namespace, name)) = view.source_object() else {
        return Err(ImportSpecError::MissingSource(DataSourceType::ObjectRef, "objectRef").into());
    };
    let described = match namespace {
        Some(namespace) => format!("{kind:?} {namespace}/{name}"),
        None => format!("{kind:?} {name}"),
    };
    if kind == ObjectRefKind::VirtualDisk {
        return Err(Refusal {
            reason: "InvalidDataSource",
            message: format!(
                "an image from {described} is not supported: a disk's content is in its PVC, not in the registry; \
                 import from the image the disk was made from"
            ),
        });
    }
    if view.kind == ImageKind::ClusterVirtualImage && kind == ObjectRefKind::VirtualImage && namespace.is_none() {
        return Err(Refusal {
            reason: "InvalidDataSource",
            message: "dataSource.objectRef.namespace is required for a VirtualImage named by a ClusterVirtualImage"
                .into(),
        });
    }
    let (reason, message) = match &observed.source {
        Some(source @ SourceImage::Ready { .. }) => return Ok(Some(source)),
        None | Some(SourceImage::Missing) => ("SourceNotFound", format!("waiting for {described}: it does not exist")),
        Some(SourceImage::NotReady(phase)) => {
            let phase = phase.as_deref().unwrap_or("no phase yet");
            ("SourceNotReady", format!("waiting for {described} to be Ready (it is {phase})"))
        }
    };
    plan.status.phase = Some(ImagePhase::Pending);
    let setter = Setter {
        generation: view.generation,
        now: observed.now,
    };
    for condition_type in [types::DATASOURCE_READY, types::READY] {
        setter.set(&mut plan.status.conditions, condition_type, false, reason, message.clone());
    }
    plan.requeue_after = Some(WAIT_INTERVAL);
    Ok(None)
}

/// `HTTP`, `ContainerImage`, `Upload` (or an `objectRef` image kept in a
/// PVC, `claim_source`): a worker Pod imports or receives the image,
/// reports progress on its gauges and the outcome in its termination
/// message.
fn run_worker(
    view: &ImageView<'_>,
    observed: &ImageObserved,
    config: &WorkerConfig,
    (namespace, repository, target): (&str, &str, &str),
    claim_source: Option<ClaimSource<'_>>,
    plan: &mut Plan<ImageStatus>,
) -> Result<(), Refusal> {
    let job = ImportJob {
        owner: view.owner(),
        data_source: view.data_source,
        namespace,
        pull_secret_namespace: match view.kind {
            ImageKind::VirtualImage { namespace } => Some(namespace),
            ImageKind::ClusterVirtualImage => None,
        },
        repository,
        target,
        shown_progress: view.status.progress.as_deref(),
        progress_share: 1.0,
        upload_urls: view.status.image_upload_urls.as_ref(),
        upload_seen: view.status.phase == Some(ImagePhase::Provisioning),
        claim_source,
    };
    let update = import_worker::drive(&job, &observed.worker, config, &observed.fresh_upload_token)?;
    let setter = Setter {
        generation: view.generation,
        now: observed.now,
    };
    let (actions, stored) = update.show(&mut plan.status, &setter);
    plan.actions.extend(actions);
    match stored {
        None => plan.requeue_after = Some(PROGRESS_INTERVAL),
        Some(StoredImage { size, format, cdrom }) => {
            plan.actions.push(Action::DeleteWorker {
                namespace: namespace.to_string(),
                owner_uid: view.uid.to_string(),
            });
            plan.status.size = Some(size);
            plan.status.format = Some(format);
            plan.status.cdrom = Some(cdrom);
            plan.status.download_speed = import_worker::settled_speed(plan.status.download_speed.take());
            ready(plan, observed.now, view.generation, target);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
