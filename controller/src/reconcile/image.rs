//! VirtualImage and ClusterVirtualImage: import into the registry by an
//! importer Pod (`HTTP`, `ContainerImage`), an uploader Pod with its Service
//! and Ingress (`Upload`), or a registry-side copy (`ObjectRef`); then a
//! periodic check that the image is still stored, and deletion of the
//! registry image behind a finalizer.

use base64::Engine;
use k8s_openapi::jiff::Timestamp;

use super::{Action, Plan, WorkerState, IMAGE_CHECK_INTERVAL, PROGRESS_INTERVAL, WAIT_INTERVAL};
use crate::api::common::{DataSource, DataSourceType, ImageSize, ObjectRefKind, UploadUrls};
use crate::api::image::{ImagePhase, ImageStatus, ImageStorage, ImageTarget};
use crate::conditions::{self, types, Desired, Setter};
use crate::import::{
    download_speed, import_args, parse_progress, parse_report, progress_text, repository, ImageOwner, ImportOutcome,
    ImportSpecError,
};
use crate::workload::{
    importer_name, uploader_in_cluster_url, uploader_ingress, uploader_name, uploader_service, worker_secret_name,
    Owner, RepositoryAccess, SecretKey, WorkerConfig, WorkerPod, WorkerSecret, METRICS_PORT, SCRATCH_MOUNT,
    UPLOAD_PORT,
};

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

/// A spec the controller cannot act on: the image fails with this reason.
struct Refusal {
    reason: &'static str,
    message: String,
}

impl From<ImportSpecError> for Refusal {
    fn from(error: ImportSpecError) -> Self {
        Refusal {
            reason: "InvalidDataSource",
            message: error.to_string(),
        }
    }
}

/// Reads a `caBundle`: base64 of PEM, as the API defines it, or PEM pasted as it is.
fn decode_ca_bundle(field: &str, text: &str) -> Result<Vec<u8>, Refusal> {
    if text.trim_start().starts_with("-----BEGIN") {
        return Ok(text.as_bytes().to_vec());
    }
    let compact: String = text.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|error| Refusal {
            reason: "InvalidDataSource",
            message: format!("{field} is neither PEM nor base64 of PEM: {error}"),
        })
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
    let upload = view.data_source.source_type == DataSourceType::Upload;
    let (now, generation) = (observed.now, view.generation);
    let waiting_phase = if upload { ImagePhase::WaitForUserUpload } else { ImagePhase::Provisioning };
    let in_progress = |plan: &mut Plan<ImageStatus>, phase: ImagePhase, message: String| {
        plan.status.phase = Some(phase);
        let reason = if phase == ImagePhase::WaitForUserUpload { "WaitForUserUpload" } else { "Provisioning" };
        conditions::set(
            &mut plan.status.conditions,
            Desired {
                condition_type: types::READY,
                status: false,
                reason,
                message,
            },
            generation,
            now,
        );
        plan.requeue_after = Some(PROGRESS_INTERVAL);
    };
    match &observed.worker {
        WorkerState::Absent => {
            let owner = view.owner();
            let secret = worker_secret(view, config, namespace, repository, owner.clone())?;
            let files = secret.mounted_files();
            let mut args = if upload {
                upload_args(target, view.uid, &files, config)
            } else {
                import_args(
                    view.data_source,
                    target,
                    view.uid,
                    &files,
                    &format!("0.0.0.0:{METRICS_PORT}"),
                    |_, _, _| Err(ImportSpecError::MissingSource(DataSourceType::ObjectRef, "objectRef")),
                )?
            };
            args.push(format!("--scratch-dir={SCRATCH_MOUNT}"));
            if config.registry_plain_http {
                args.push("--plain-http".into());
            }
            // An upload reachable from outside: the URL already handed out
            // is kept; the uploader answers on the Ingress's exact path too.
            let external = match (upload, &config.upload_ingress) {
                (true, Some(ingress)) => {
                    let token = external_token(view.status).unwrap_or_else(|| observed.fresh_upload_token.clone());
                    args.push(format!("--path-token={token}"));
                    Some((ingress, token))
                }
                _ => None,
            };
            let name = if upload { uploader_name(view.uid) } else { importer_name(view.uid) };
            plan.actions.push(Action::CreateSecret(secret));
            plan.actions.push(Action::CreatePod(WorkerPod {
                key: SecretKey {
                    namespace: namespace.to_string(),
                    name,
                },
                component: if upload { "uploader" } else { "importer" },
                owner: owner.clone(),
                args,
                secret_name: worker_secret_name(view.uid),
                disk: None,
            }));
            if upload {
                plan.actions.push(Action::CreateService(Box::new(uploader_service(&owner, namespace))));
                if let Some((ingress, token)) = &external {
                    plan.actions.push(Action::CreateIngress(Box::new(uploader_ingress(
                        &owner, namespace, ingress, token,
                    ))));
                }
                plan.status.image_upload_urls = Some(UploadUrls {
                    in_cluster: Some(uploader_in_cluster_url(view.uid, namespace)),
                    external: external.map(|(ingress, token)| ingress.url(&token)),
                });
            }
            set_datasource(plan, now, generation, !upload, upload);
            let message = if upload {
                "waiting for the upload: curl -T IMAGE <status.imageUploadURLs>".to_string()
            } else {
                "starting the importer".to_string()
            };
            in_progress(plan, waiting_phase, message);
        }
        WorkerState::Pending { waiting } => {
            let message = match waiting {
                Some(reason) => format!("the {} Pod waits: {reason}", if upload { "uploader" } else { "importer" }),
                None => format!("the {} Pod is starting", if upload { "uploader" } else { "importer" }),
            };
            in_progress(plan, waiting_phase, message);
        }
        WorkerState::Running { metrics } => {
            let progress = metrics.as_deref().map(|text| parse_progress(text, view.uid));
            let receiving = progress.is_some_and(|progress| {
                progress.percent.is_some_and(|percent| percent > 0.0)
                    || progress.current_speed.is_some_and(|speed| speed > 0.0)
            });
            if let Some(progress) = progress {
                if !upload || receiving {
                    if let Some(text) = progress_text(&progress, view.status.progress.as_deref()) {
                        plan.status.progress = Some(text);
                    }
                    plan.status.download_speed = Some(download_speed(&progress));
                }
            }
            if upload && !receiving && view.status.phase != Some(ImagePhase::Provisioning) {
                in_progress(plan, ImagePhase::WaitForUserUpload, "waiting for the upload".into());
            } else {
                if upload {
                    set_datasource(plan, now, generation, true, false);
                }
                let message = if upload { "receiving the upload" } else { "importing" };
                in_progress(plan, ImagePhase::Provisioning, message.into());
            }
        }
        WorkerState::Succeeded { report } => {
            // On failure the caller removes the worker.
            match parse_report(report)? {
                ImportOutcome::Stored { size, format, cdrom } => {
                    plan.actions.push(Action::DeleteWorker {
                        namespace: namespace.to_string(),
                        owner_uid: view.uid.to_string(),
                    });
                    plan.status.size = Some(size);
                    plan.status.format = Some(format);
                    plan.status.cdrom = Some(cdrom);
                    plan.status.download_speed = plan.status.download_speed.take().map(|mut speed| {
                        speed.current = None;
                        speed.current_bytes = None;
                        speed
                    });
                    ready(plan, now, generation, target);
                }
                ImportOutcome::Failed { message, reason } => {
                    return Err(Refusal {
                        reason: known_reason(&reason),
                        message,
                    })
                }
            }
        }
        WorkerState::Failed { report, reason } => {
            let outcome = report.as_deref().map(parse_report);
            let refusal = match outcome {
                Some(Ok(ImportOutcome::Failed { message, reason })) => Refusal {
                    reason: known_reason(&reason),
                    message,
                },
                _ => Refusal {
                    reason: if upload { "UploaderFailed" } else { "ImporterFailed" },
                    message: format!(
                        "the {} Pod failed ({reason}) without a report; see its events",
                        if upload { "uploader" } else { "importer" }
                    ),
                },
            };
            return Err(refusal);
        }
    }
    Ok(())
}

/// The condition reasons the importer and uploader write, as static text
/// (unknown ones become `ImporterFailed`).
fn known_reason(reason: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "BadImageChecksum",
        "SourceUnavailable",
        "SourceReadFailed",
        "BadImage",
        "ImporterFailed",
        "RegistryFailed",
        "BadArguments",
        "WaitForUserUploadTimeout",
        "UploaderFailed",
    ];
    KNOWN
        .iter()
        .find(|known| **known == reason)
        .copied()
        .unwrap_or("ImporterFailed")
}

fn set_datasource(plan: &mut Plan<ImageStatus>, now: Timestamp, generation: Option<i64>, ready: bool, upload: bool) {
    let (reason, message) = match (ready, upload) {
        (true, _) => ("Ready", "the source is being read".to_string()),
        (false, true) => ("WaitForUserUpload", "no upload yet".to_string()),
        (false, false) => ("Pending", "the source is not read yet".to_string()),
    };
    conditions::set(
        &mut plan.status.conditions,
        Desired {
            condition_type: types::DATASOURCE_READY,
            status: ready,
            reason,
            message,
        },
        generation,
        now,
    );
}

/// The token of an external upload URL already handed out.
fn external_token(status: &ImageStatus) -> Option<String> {
    let external = status.image_upload_urls.as_ref()?.external.as_ref()?;
    let token = external.rsplit('/').next()?;
    (token.len() == 32 && token.chars().all(|c| c.is_ascii_alphanumeric())).then(|| token.to_string())
}

fn worker_secret(
    view: &ImageView<'_>,
    config: &WorkerConfig,
    namespace: &str,
    repository: &str,
    owner: Owner,
) -> Result<WorkerSecret, Refusal> {
    let source = view.data_source;
    let (source_ca_bundle, pull_secret) = match source.source_type {
        DataSourceType::Http => {
            let http = source
                .http
                .as_ref()
                .ok_or(ImportSpecError::MissingSource(source.source_type, "http"))?;
            let ca = http
                .ca_bundle
                .as_deref()
                .map(|text| decode_ca_bundle("dataSource.http.caBundle", text))
                .transpose()?;
            (ca, None)
        }
        DataSourceType::ContainerImage => {
            let image = source
                .container_image
                .as_ref()
                .ok_or(ImportSpecError::MissingSource(source.source_type, "containerImage"))?;
            let ca = image
                .ca_bundle
                .as_deref()
                .map(|text| decode_ca_bundle("dataSource.containerImage.caBundle", text))
                .transpose()?;
            let pull_secret = match &image.image_pull_secret {
                None => None,
                Some(secret) => {
                    let secret_namespace = match (&secret.namespace, view.kind) {
                        (Some(namespace), _) => namespace.clone(),
                        (None, ImageKind::VirtualImage { namespace }) => namespace.to_string(),
                        (None, ImageKind::ClusterVirtualImage) => {
                            return Err(Refusal {
                                reason: "InvalidDataSource",
                                message: "dataSource.containerImage.imagePullSecret.namespace is required for a \
                                          ClusterVirtualImage"
                                    .into(),
                            })
                        }
                    };
                    Some(SecretKey {
                        namespace: secret_namespace,
                        name: secret.name.clone(),
                    })
                }
            };
            (ca, pull_secret)
        }
        DataSourceType::Upload | DataSourceType::ObjectRef => (None, None),
    };
    Ok(WorkerSecret {
        key: SecretKey {
            namespace: namespace.to_string(),
            name: worker_secret_name(view.uid),
        },
        owner,
        access: vec![RepositoryAccess {
            repository: repository.to_string(),
            actions: vec!["pull", "push"],
        }],
        source_ca_bundle,
        pull_secret,
        registry_ca_bundle: config.registry_ca_bundle.clone(),
    })
}

fn upload_args(target: &str, uid: &str, files: &crate::import::MountedFiles, config: &WorkerConfig) -> Vec<String> {
    let mut args = vec![
        "upload-server".to_string(),
        format!("--listen=0.0.0.0:{UPLOAD_PORT}"),
        format!("--destination={target}"),
        format!("--timeout={}s", config.upload_timeout_seconds),
    ];
    if let Some(path) = &files.registry_token_file {
        args.push(format!("--registry-token-file={path}"));
    }
    if let Some(path) = &files.registry_ca_bundle {
        args.push(format!("--registry-ca-bundle={path}"));
    }
    args.push(format!("--owner-uid={uid}"));
    args.push(format!("--metrics-listen=0.0.0.0:{METRICS_PORT}"));
    args.push("--report-file=/dev/termination-log".into());
    args
}

#[cfg(test)]
mod tests;
