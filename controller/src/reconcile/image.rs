//! VirtualImage and ClusterVirtualImage: import into the registry by an
//! importer Pod (`HTTP`, `ContainerImage`), an uploader Pod with its Service
//! and Ingress (`Upload`), or a registry-side copy (`ObjectRef`); then a
//! periodic check that the image is still stored, and deletion of the
//! registry image behind a finalizer.

use k8s_openapi::jiff::Timestamp;

use super::import_worker::{self, ImportJob, StoredImage};
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
    /// Ready, stored in the registry.
    Ready {
        /// Its `status.target.registryURL`.
        registry_url: String,
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

/// What the I/O layer observed for one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageObserved {
    /// The importer or uploader Pod.
    pub worker: WorkerState,
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

    /// Where its workers run: a VirtualImage's namespace, or the
    /// controller's for a ClusterVirtualImage.
    pub fn worker_namespace<'a>(&'a self, config: &'a WorkerConfig) -> &'a str {
        match self.kind {
            ImageKind::VirtualImage { namespace } => namespace,
            ImageKind::ClusterVirtualImage => &config.controller_namespace,
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

    match phase {
        Some(ImagePhase::Ready) | Some(ImagePhase::ImageLost) => {
            if observed.worker != WorkerState::Absent {
                plan.actions.push(cleanup);
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
            plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
            return plan;
        }
        Some(ImagePhase::Failed) => {
            if observed.worker != WorkerState::Absent {
                plan.actions.push(cleanup);
            }
            return plan;
        }
        _ => {}
    }

    if view.storage == ImageStorage::PersistentVolumeClaim {
        fail(
            &mut plan,
            now,
            generation,
            Refusal {
                reason: "StorageNotSupported",
                message: "spec.storage PersistentVolumeClaim is not supported by this controller; \
                          use ContainerRegistry (the default)"
                    .into(),
            },
        );
        return plan;
    }

    let target = format!("{}/{repository}:{}", config.registry_host, view.uid);
    let result = match view.data_source.source_type {
        DataSourceType::ObjectRef => copy_object(view, observed, &target, &mut plan),
        DataSourceType::Upload | DataSourceType::Http | DataSourceType::ContainerImage => {
            run_worker(view, observed, config, &namespace, &repository, &target, &mut plan)
        }
    };
    if let Err(refusal) = result {
        if observed.worker != WorkerState::Absent {
            plan.actions.push(cleanup);
        }
        fail(&mut plan, now, generation, refusal);
    }
    plan
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
/// registry (a mount of its blobs and a new manifest tag).
fn copy_object(
    view: &ImageView<'_>,
    observed: &ImageObserved,
    target: &str,
    plan: &mut Plan<ImageStatus>,
) -> Result<(), Refusal> {
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
    let waiting = |plan: &mut Plan<ImageStatus>, reason, message: String| {
        plan.status.phase = Some(ImagePhase::Pending);
        for condition_type in [types::DATASOURCE_READY, types::READY] {
            conditions::set(
                &mut plan.status.conditions,
                Desired {
                    condition_type,
                    status: false,
                    reason,
                    message: message.clone(),
                },
                view.generation,
                observed.now,
            );
        }
        plan.requeue_after = Some(WAIT_INTERVAL);
    };
    match &observed.source {
        None | Some(SourceImage::Missing) => {
            waiting(plan, "SourceNotFound", format!("waiting for {described}: it does not exist"));
        }
        Some(SourceImage::NotReady(phase)) => {
            let phase = phase.as_deref().unwrap_or("no phase yet");
            waiting(plan, "SourceNotReady", format!("waiting for {described} to be Ready (it is {phase})"));
        }
        Some(SourceImage::Ready {
            registry_url,
            uid,
            size,
            format,
            cdrom,
        }) => {
            plan.actions.push(Action::CopyImage {
                from: registry_url.clone(),
                to: target.to_string(),
            });
            plan.status.source_uid = Some(uid.clone());
            plan.status.size = size.clone();
            plan.status.format = format.clone();
            plan.status.cdrom = *cdrom;
            ready(plan, observed.now, view.generation, target);
        }
    }
    Ok(())
}

/// `HTTP`, `ContainerImage`, `Upload`: a worker Pod imports or receives the
/// image, reports progress on its gauges and the outcome in its termination
/// message.
fn run_worker(
    view: &ImageView<'_>,
    observed: &ImageObserved,
    config: &WorkerConfig,
    namespace: &str,
    repository: &str,
    target: &str,
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
