//! The worker that brings a resource's content into the registry: an
//! importer Pod (`HTTP`, `ContainerImage`), or an uploader Pod with its
//! Service and Ingress (`Upload`). For an image, what it stores is the
//! image; for a VirtualDisk, it is the intermediate copy (`vd/<ns>/<name>`)
//! that the provisioner then writes into the disk's PVC.

use base64::Engine;

use super::{Action, Refusal, WorkerState};
use crate::api::common::{Conditions, DataSource, DataSourceType, DownloadSpeed, ImageSize, UploadUrls};
use crate::api::disk::{DiskPhase, VirtualDiskStatus};
use crate::api::image::{ImagePhase, ImageStatus};
use crate::conditions::{types, Setter};
use crate::import::{
    claim_import_args, download_speed, import_args, parse_progress, parse_report, share_text, ImportOutcome, ImportSpecError,
    MountedFiles,
};
use crate::workload::{
    importer_name, uploader_in_cluster_url, DiskVolume, VolumeMode, uploader_ingress, uploader_name, uploader_service, worker_secret_name,
    Owner, RepositoryAccess, SecretKey, WorkerConfig, WorkerPod, WorkerSecret, METRICS_PORT, SCRATCH_MOUNT,
    UPLOAD_PORT,
};

/// One resource's import, as its reconciler describes it.
#[derive(Debug, Clone)]
pub struct ImportJob<'a> {
    /// The resource; its UID names the worker and labels its progress.
    pub owner: Owner,
    /// Where the content comes from (`HTTP`, `ContainerImage`, `Upload`).
    pub data_source: &'a DataSource,
    /// Where the worker runs.
    pub namespace: &'a str,
    /// The namespace of an `imagePullSecret` that names none; `None` when
    /// it must be named (cluster-wide resources).
    pub pull_secret_namespace: Option<&'a str>,
    /// The repository the worker may push to.
    pub repository: &'a str,
    /// `host/repository:tag` to store.
    pub target: &'a str,
    /// `status.progress` as last written.
    pub shown_progress: Option<&'a str>,
    /// The share of the resource's progress the import is: 1 for an image,
    /// one half for a disk (the provisioner does the rest).
    pub progress_share: f64,
    /// `status.imageUploadURLs` as last written.
    pub upload_urls: Option<&'a UploadUrls>,
    /// Bytes of an upload were seen earlier (the resource left
    /// `WaitForUserUpload`).
    pub upload_seen: bool,
    /// An `objectRef` image kept in a PVC, which the importer reads from
    /// its volume (`None`: the source is `data_source`'s).
    pub claim_source: Option<ClaimSource<'a>>,
}

/// An image kept in a PVC, read by an importer that mounts it read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimSource<'a> {
    /// The PVC, in the importer's namespace.
    pub claim_name: &'a str,
    /// The image's virtual size: what is read of the volume.
    pub virtual_bytes: u64,
    /// An ISO.
    pub cdrom: bool,
    /// How the PVC holds the image.
    pub mode: VolumeMode,
}

/// Where the import is.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportStep {
    /// The worker is being started, waits, or works.
    Working {
        /// Nothing was uploaded yet: the resource waits for its user.
        waiting_for_upload: bool,
        /// What the `Ready` condition says meanwhile.
        message: String,
        /// `DatasourceReady` changes to this when set.
        source_read: Option<SourceRead>,
    },
    /// Stored under the job's target.
    Stored(StoredImage),
}

/// What `DatasourceReady` says of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRead {
    /// Not read yet.
    NotYet,
    /// No upload came yet.
    WaitingForUpload,
    /// Being read.
    Reading,
}

impl SourceRead {
    /// The condition's status, reason and message.
    pub fn condition(self) -> (bool, &'static str, &'static str) {
        match self {
            SourceRead::NotYet => (false, "Pending", "the source is not read yet"),
            SourceRead::WaitingForUpload => (false, "WaitForUserUpload", "no upload yet"),
            SourceRead::Reading => (true, "Ready", "the source is being read"),
        }
    }
}

/// What to do, and what to show, for one reconcile of an import.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportUpdate {
    /// Objects to create; the caller removes the worker once the content
    /// is stored.
    pub actions: Vec<Action>,
    /// `status.imageUploadURLs`, when the uploader is being created.
    pub upload_urls: Option<UploadUrls>,
    /// A new `status.progress`.
    pub progress: Option<String>,
    /// A new `status.downloadSpeed`.
    pub download_speed: Option<DownloadSpeed>,
    /// Where it is.
    pub step: ImportStep,
}

/// The status fields an import shows, on whichever resource holds them.
pub struct Shown<'a> {
    /// `status.conditions`.
    pub conditions: &'a mut Conditions,
    /// `status.imageUploadURLs`.
    pub upload_urls: &'a mut Option<UploadUrls>,
    /// `status.progress`.
    pub progress: &'a mut Option<String>,
    /// `status.downloadSpeed`.
    pub download_speed: &'a mut Option<DownloadSpeed>,
}

/// A status that shows an import.
pub trait ShowsImport {
    /// Its fields an import writes.
    fn shown(&mut self) -> Shown<'_>;
    /// Sets the phase of a resource whose import works.
    fn set_importing(&mut self, waiting_for_upload: bool);
}

/// Images and disks show an import in fields and phases of the same names.
macro_rules! shows_import {
    ($($status:ty => $phase:ident),*) => {$(
        impl ShowsImport for $status {
            fn shown(&mut self) -> Shown<'_> {
                Shown {
                    conditions: &mut self.conditions,
                    upload_urls: &mut self.image_upload_urls,
                    progress: &mut self.progress,
                    download_speed: &mut self.download_speed,
                }
            }

            fn set_importing(&mut self, waiting_for_upload: bool) {
                self.phase = Some(if waiting_for_upload { $phase::WaitForUserUpload } else { $phase::Provisioning });
            }
        }
    )*};
}

shows_import!(ImageStatus => ImagePhase, VirtualDiskStatus => DiskPhase);

/// What an import stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredImage {
    /// Stored and virtual sizes.
    pub size: ImageSize,
    /// The format detected (`qcow2`, `raw`, `iso`, ...).
    pub format: String,
    /// An ISO.
    pub cdrom: bool,
}

impl ImportUpdate {
    /// Writes what the update shows into `status` (upload URLs, progress,
    /// speed, and while the import works its phase and its `DatasourceReady`
    /// and `Ready` conditions), and returns the actions and, once stored,
    /// what was stored.
    pub fn show(self, status: &mut impl ShowsImport, setter: &Setter) -> (Vec<Action>, Option<StoredImage>) {
        let shown = status.shown();
        if self.upload_urls.is_some() {
            *shown.upload_urls = self.upload_urls;
        }
        if self.progress.is_some() {
            *shown.progress = self.progress;
        }
        if self.download_speed.is_some() {
            *shown.download_speed = self.download_speed;
        }
        match self.step {
            ImportStep::Working {
                waiting_for_upload,
                message,
                source_read,
            } => {
                if let Some(source_read) = source_read {
                    let (holds, reason, said) = source_read.condition();
                    setter.set(shown.conditions, types::DATASOURCE_READY, holds, reason, said.into());
                }
                let reason = if waiting_for_upload { "WaitForUserUpload" } else { "Provisioning" };
                setter.set(shown.conditions, types::READY, false, reason, message);
                status.set_importing(waiting_for_upload);
                (self.actions, None)
            }
            ImportStep::Stored(stored) => (self.actions, Some(stored)),
        }
    }
}

/// Decides the next step of an import from its worker's state, or why it
/// failed.
pub fn drive(
    job: &ImportJob<'_>,
    worker: &WorkerState,
    config: &WorkerConfig,
    fresh_upload_token: &str,
) -> Result<ImportUpdate, Refusal> {
    let upload = job.data_source.source_type == DataSourceType::Upload;
    let role = if upload { "uploader" } else { "importer" };
    let working = |waiting_for_upload: bool, message: String, source_read: Option<SourceRead>| ImportUpdate {
        actions: Vec::new(),
        upload_urls: None,
        progress: None,
        download_speed: None,
        step: ImportStep::Working {
            waiting_for_upload,
            message,
            source_read,
        },
    };
    match worker {
        WorkerState::Absent => {
            let (actions, upload_urls) = start(job, config, fresh_upload_token)?;
            let message = if upload {
                "waiting for the upload: curl -T IMAGE <status.imageUploadURLs>".to_string()
            } else {
                "starting the importer".to_string()
            };
            let source_read = if upload {
                SourceRead::WaitingForUpload
            } else {
                SourceRead::Reading
            };
            Ok(ImportUpdate {
                actions,
                upload_urls,
                ..working(upload, message, Some(source_read))
            })
        }
        WorkerState::Pending { waiting } => {
            let message = match waiting {
                Some(reason) => format!("the {role} Pod waits: {reason}"),
                None => format!("the {role} Pod is starting"),
            };
            Ok(working(upload && !job.upload_seen, message, None))
        }
        WorkerState::Running { metrics } => {
            let progress = metrics.as_deref().map(|text| parse_progress(text, &job.owner.uid));
            let receiving = progress.as_ref().is_some_and(|progress| {
                progress.percent.is_some_and(|percent| percent > 0.0)
                    || progress.current_speed.is_some_and(|speed| speed > 0.0)
            });
            if upload && !receiving && !job.upload_seen {
                return Ok(working(true, "waiting for the upload".into(), None));
            }
            let mut update = if upload {
                working(false, "receiving the upload".into(), Some(SourceRead::Reading))
            } else {
                working(false, "importing".into(), None)
            };
            if let Some(progress) = progress.filter(|_| !upload || receiving) {
                update.progress = share_text(&progress, 0.0, job.progress_share, job.shown_progress);
                update.download_speed = Some(download_speed(&progress));
            }
            Ok(update)
        }
        WorkerState::Succeeded { report } => match parse_report(report)? {
            ImportOutcome::Stored { size, format, cdrom } => Ok(ImportUpdate {
                actions: Vec::new(),
                upload_urls: None,
                progress: None,
                download_speed: None,
                step: ImportStep::Stored(StoredImage { size, format, cdrom }),
            }),
            ImportOutcome::Failed { message, reason } => Err(Refusal {
                reason: known_reason(&reason),
                message,
            }),
        },
        WorkerState::Failed { report, reason } => Err(match report.as_deref().map(parse_report) {
            Some(Ok(ImportOutcome::Failed { message, reason })) => Refusal {
                reason: known_reason(&reason),
                message,
            },
            _ => Refusal {
                reason: if upload { "UploaderFailed" } else { "ImporterFailed" },
                message: format!("the {role} Pod failed ({reason}) without a report; see its events"),
            },
        }),
    }
}

/// The download speed once the import ended: the average stays, the
/// current speed goes.
pub fn settled_speed(speed: Option<DownloadSpeed>) -> Option<DownloadSpeed> {
    speed.map(|speed| DownloadSpeed {
        current: None,
        current_bytes: None,
        ..speed
    })
}

/// The worker's Secret and Pod, and for an upload its Service, Ingress
/// and URLs.
fn start(
    job: &ImportJob<'_>,
    config: &WorkerConfig,
    fresh_upload_token: &str,
) -> Result<(Vec<Action>, Option<UploadUrls>), Refusal> {
    let upload = job.data_source.source_type == DataSourceType::Upload;
    let uid = job.owner.uid.as_str();
    let secret = worker_secret(job, config)?;
    let files = secret.mounted_files();
    let metrics_listen = format!("0.0.0.0:{METRICS_PORT}");
    let mut args = match (upload, &job.claim_source) {
        (true, _) => upload_args(job.target, uid, &files, config),
        (false, Some(claim)) => {
            let path = crate::reconcile::provision::source_path(claim.mode);
            claim_import_args(path, claim.virtual_bytes, claim.cdrom, job.target, uid, &files, &metrics_listen)
        }
        (false, None) => import_args(job.data_source, job.target, uid, &files, &metrics_listen, |_, _, _| {
            Err(ImportSpecError::MissingSource(DataSourceType::ObjectRef, "objectRef"))
        })?,
    };
    args.push(format!("--scratch-dir={SCRATCH_MOUNT}"));
    if config.registry_plain_http {
        args.push("--plain-http".into());
    }
    // An upload reachable from outside: the URL already handed out is
    // kept; the uploader answers on the Ingress's exact path too.
    let external = match (upload, &config.upload_ingress) {
        (true, Some(ingress)) => {
            let token = job
                .upload_urls
                .and_then(external_token)
                .unwrap_or_else(|| fresh_upload_token.to_string());
            args.push(format!("--path-token={token}"));
            Some((ingress, token))
        }
        _ => None,
    };
    let mut actions = vec![
        Action::CreateSecret(secret),
        Action::CreatePod(WorkerPod {
            key: SecretKey {
                namespace: job.namespace.to_string(),
                name: if upload { uploader_name(uid) } else { importer_name(uid) },
            },
            component: if upload { "uploader" } else { "importer" },
            owner: job.owner.clone(),
            args,
            secret_name: worker_secret_name(uid),
            disk: None,
            source_disk: job.claim_source.map(|claim| DiskVolume {
                claim_name: claim.claim_name.to_string(),
                mode: claim.mode,
            }),
        }),
    ];
    if !upload {
        return Ok((actions, None));
    }
    actions.push(Action::CreateService(Box::new(uploader_service(
        &job.owner,
        job.namespace,
    ))));
    if let Some((ingress, token)) = &external {
        actions.push(Action::CreateIngress(Box::new(uploader_ingress(
            &job.owner,
            job.namespace,
            ingress,
            token,
        ))));
    }
    let urls = UploadUrls {
        in_cluster: Some(uploader_in_cluster_url(uid, job.namespace)),
        external: external.map(|(ingress, token)| ingress.url(&token)),
    };
    Ok((actions, Some(urls)))
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

/// The token of an external upload URL already handed out.
fn external_token(urls: &UploadUrls) -> Option<String> {
    let token = urls.external.as_ref()?.rsplit('/').next()?;
    (token.len() == 32 && token.chars().all(|c| c.is_ascii_alphanumeric())).then(|| token.to_string())
}

/// Reads a `caBundle`: base64 of PEM, as the API defines it, or PEM pasted as it is.
pub(super) fn decode_ca_bundle(field: &str, text: &str) -> Result<Vec<u8>, Refusal> {
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

/// The worker's Secret: a token to push to the job's repository, the
/// source's CA bundle, the source registry's pull secret.
fn worker_secret(job: &ImportJob<'_>, config: &WorkerConfig) -> Result<WorkerSecret, Refusal> {
    let source = job.data_source;
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
                    let namespace = secret
                        .namespace
                        .as_deref()
                        .or(job.pull_secret_namespace)
                        .ok_or_else(|| Refusal {
                            reason: "InvalidDataSource",
                            message: format!(
                                "dataSource.containerImage.imagePullSecret.namespace is required for a {}",
                                job.owner.kind
                            ),
                        })?;
                    Some(SecretKey {
                        namespace: namespace.to_string(),
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
            namespace: job.namespace.to_string(),
            name: worker_secret_name(&job.owner.uid),
        },
        owner: job.owner.clone(),
        access: vec![RepositoryAccess {
            repository: job.repository.to_string(),
            actions: vec!["pull", "push"],
        }],
        source_ca_bundle,
        pull_secret,
        registry_ca_bundle: config.registry_ca_bundle.clone(),
    })
}

fn upload_args(target: &str, uid: &str, files: &MountedFiles, config: &WorkerConfig) -> Vec<String> {
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
