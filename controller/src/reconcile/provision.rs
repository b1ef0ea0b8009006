//! Filling a PVC with an image, for a VirtualDisk and for a VirtualImage
//! kept in a PVC (`storage: PersistentVolumeClaim`): the intermediate copy
//! an importer or uploader stores first (for `HTTP`, `ContainerImage`,
//! `Upload`), the PVC, and the provisioner Pod that writes the image into
//! it (`dvcr convert SOURCE TARGET -O raw`), reading it in place from the
//! registry or from another image's PVC.

use dvcr_importer::reference::ImageReference;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use super::import_worker::{self, ImportJob, ShowsImport, StoredImage};
use super::{Action, Plan, Refusal, WorkerState, PROGRESS_INTERVAL};
use crate::conditions::{types, Setter};
use crate::import::{human_bytes, parse_progress, share_text};
use crate::workload::{
    claim_of, provisioner_name, worker_secret_name, DiskVolume, Owner, RepositoryAccess, SecretKey, VolumeMode,
    WorkerConfig, WorkerPod, WorkerSecret, METRICS_PORT,
};

/// Where a Ready image's content is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// In the registry: `host/repository:tag` (`status.target.registryURL`).
    Registry(String),
    /// Raw in a PVC (`status.target.persistentVolumeClaimName`), of a
    /// VirtualImage with `storage: PersistentVolumeClaim`.
    Claim {
        /// The image's namespace.
        namespace: String,
        /// The PVC.
        name: String,
    },
}

impl std::fmt::Display for ImageLocation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageLocation::Registry(reference) => formatter.write_str(reference),
            ImageLocation::Claim { namespace, name } => write!(formatter, "PVC {namespace}/{name}"),
        }
    }
}

/// Refuses an image kept in a PVC of another namespace than `namespace`,
/// where the worker reading it runs: a Pod mounts PVCs of its own
/// namespace only. An image in the registry is readable from anywhere.
pub fn readable_from(location: &ImageLocation, namespace: &str) -> Result<(), Refusal> {
    match location {
        ImageLocation::Claim {
            namespace: claim_namespace,
            ..
        } if claim_namespace != namespace => Err(Refusal {
            reason: "InvalidDataSource",
            message: format!(
                "the source image is kept in {location}, which a Pod in {namespace} cannot read; use an image \
                 in the registry or one kept in {namespace}"
            ),
        }),
        _ => Ok(()),
    }
}

/// What the I/O layer saw of a PVC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimState {
    /// `status.phase`: `Pending`, `Bound`, `Lost`.
    pub phase: Option<String>,
    /// `spec.resources.requests.storage`, in bytes.
    pub requested_bytes: Option<u64>,
    /// `status.capacity.storage`, in bytes.
    pub capacity_bytes: Option<u64>,
    /// `spec.storageClassName`.
    pub storage_class: Option<String>,
    /// Being deleted (`metadata.deletionTimestamp`).
    pub deleting: bool,
}

impl ClaimState {
    /// Its volume is gone.
    pub fn lost(&self) -> bool {
        self.phase.as_deref() == Some("Lost")
    }
}

/// The PVC a resource fills, and the resource.
#[derive(Debug, Clone)]
pub struct ClaimTarget<'a> {
    /// The resource that owns the PVC and the workers; its UID names them.
    pub owner: Owner,
    /// The namespace of all of them.
    pub namespace: &'a str,
    /// `storageClassName` of a PVC to create.
    pub storage_class: Option<&'a str>,
    /// How the PVC holds the image.
    pub mode: VolumeMode,
}

impl ClaimTarget<'_> {
    /// The PVC's name.
    pub fn claim_name(&self) -> String {
        crate::workload::claim_name_of(&self.owner)
    }

    /// The PVC to create for an image of `image_bytes`.
    pub fn claim(&self, image_bytes: u64) -> PersistentVolumeClaim {
        claim_of(&self.owner, self.namespace, self.mode.claim_bytes(image_bytes), self.storage_class, self.mode)
    }

    fn delete_workers(&self) -> Action {
        Action::DeleteWorker {
            namespace: self.namespace.to_string(),
            owner_uid: self.owner.uid.clone(),
        }
    }
}

/// What the I/O layer saw of the first step of a PVC filled from an import.
#[derive(Debug, Clone, Copy)]
pub struct CopyObserved<'a> {
    /// The importer or uploader Pod.
    pub importer: &'a WorkerState,
    /// The PVC.
    pub claim: Option<&'a ClaimState>,
    /// A fresh random token for an upload URL.
    pub fresh_upload_token: &'a str,
}

/// Where the first step of a PVC filled from an import is.
#[derive(Debug, Clone, PartialEq)]
pub enum CopyStep {
    /// The importer or uploader works (or is being removed).
    Importing,
    /// Stored just now: the PVC is being created.
    Stored(StoredImage),
    /// Stored, the PVC exists and the importer is gone: the copy
    /// (`host/repository:tag`) is ready for the provisioner.
    InRegistry(String),
}

/// The first step of a PVC filled from `HTTP`, `ContainerImage` or
/// `Upload`: the importer or uploader stores the source as the resource's
/// intermediate copy (`job.target`). Once stored, the PVC is created (of
/// the image's virtual size, or `requested` when larger) and the worker
/// removed; the provisioner starts on the next reconcile (it shares the
/// worker's Secret name, which must be gone first).
pub fn import_copy<S: ShowsImport>(
    job: &ImportJob<'_>,
    target: &ClaimTarget<'_>,
    observed: CopyObserved<'_>,
    requested: Option<u64>,
    config: &WorkerConfig,
    setter: &Setter,
    plan: &mut Plan<S>,
) -> Result<CopyStep, Refusal> {
    plan.requeue_after = Some(PROGRESS_INTERVAL);
    if observed.claim.is_some() {
        if *observed.importer == WorkerState::Absent {
            return Ok(CopyStep::InRegistry(job.target.to_string()));
        }
        // Stored, PVC made; the importer was not removed yet.
        plan.actions.push(target.delete_workers());
        plan.status.set_importing(false);
        let message = "the source is stored; removing the importer before the provisioner starts".to_string();
        setter.set(plan.status.shown().conditions, types::READY, false, "Provisioning", message);
        return Ok(CopyStep::Importing);
    }
    let update = import_worker::drive(job, observed.importer, config, observed.fresh_upload_token)?;
    let (actions, stored) = update.show(&mut plan.status, setter);
    plan.actions.extend(actions);
    let Some(stored) = stored else {
        return Ok(CopyStep::Importing);
    };
    let format = &stored.format;
    let virtual_bytes = stored.size.virtual_bytes().ok_or_else(|| Refusal {
            reason: "ImporterFailed",
            message: "the importer's report lacks the image's virtual size".into(),
        })?;
    let image_bytes = fitting_size(requested, virtual_bytes, &format!("the {format} image"))?;
    plan.actions.push(Action::CreateClaim(Box::new(target.claim(image_bytes))));
    plan.actions.push(target.delete_workers());
    plan.status.set_importing(false);
    let shown = plan.status.shown();
    *shown.progress = Some("50.0%".into());
    *shown.download_speed = import_worker::settled_speed(shown.download_speed.take());
    let message = format!("the source is stored in the registry as {}", job.target);
    setter.set(shown.conditions, types::DATASOURCE_READY, true, "Ready", message);
    let message = format!("creating a PVC of {} for the {format} image", human_bytes(image_bytes));
    setter.set(shown.conditions, types::READY, false, "Provisioning", message);
    Ok(CopyStep::Stored(stored))
}

/// The PVC's image size: the image's virtual size, or `requested` when
/// given, which must hold the image.
pub fn fitting_size(requested: Option<u64>, virtual_bytes: u64, described: &str) -> Result<u64, Refusal> {
    match requested {
        Some(requested) if requested < virtual_bytes => Err(Refusal {
            reason: "InvalidSize",
            message: format!(
                "persistentVolumeClaim.size {} is smaller than {described}'s virtual size {}",
                human_bytes(requested),
                human_bytes(virtual_bytes)
            ),
        }),
        Some(requested) => Ok(requested),
        None => Ok(virtual_bytes),
    }
}

/// What a provisioner writes into the PVC.
#[derive(Debug, Clone, Copy)]
pub struct ProvisionSource<'a> {
    /// Where the image is.
    pub location: &'a ImageLocation,
    /// Its virtual size: a PVC source (raw) is read this far, not to the
    /// end of its volume.
    pub virtual_bytes: Option<u64>,
    /// The image was imported for this resource first: the provisioner's
    /// share of the progress is its second half.
    pub imported: bool,
}

/// Where the provisioner is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioned {
    /// Starting, waiting or writing.
    Working,
    /// The image is in the PVC; the intermediate copy (of an imported
    /// image), then the workers, are being removed.
    Written,
}

/// Creates the PVC (for an image of `image_bytes`) and, when there is
/// something to write, starts its provisioner at once: `Provisioning`, 0%.
pub fn create_claim<S: ShowsImport>(
    target: &ClaimTarget<'_>,
    image_bytes: u64,
    source: Option<ProvisionSource<'_>>,
    config: &WorkerConfig,
    setter: &Setter,
    plan: &mut Plan<S>,
) -> Result<(), Refusal> {
    plan.actions.push(Action::CreateClaim(Box::new(target.claim(image_bytes))));
    if let Some(source) = source {
        plan.actions.extend(start_provisioner(target, source, config)?);
    }
    plan.status.set_importing(false);
    let shown = plan.status.shown();
    *shown.progress = Some("0%".into());
    setter.set(shown.conditions, types::READY, false, "Provisioning", "creating the PVC".into());
    plan.requeue_after = Some(PROGRESS_INTERVAL);
    Ok(())
}

/// A PVC whose volume is gone while it was being filled.
pub fn lost_while_filling(claim_name: &str) -> Refusal {
    Refusal {
        reason: "PVCLost",
        message: format!("the PVC {claim_name} lost its volume"),
    }
}

/// Follows the provisioner of a PVC that exists: starts it when it is
/// gone before it finished (deleted, or its node went away), shows its
/// progress while it writes, and says when the image is written. A failed
/// provisioner is a refusal with its last words.
pub fn follow_provisioner<S: ShowsImport>(
    target: &ClaimTarget<'_>,
    source: ProvisionSource<'_>,
    provisioner: &WorkerState,
    config: &WorkerConfig,
    setter: &Setter,
    plan: &mut Plan<S>,
) -> Result<Provisioned, Refusal> {
    plan.requeue_after = Some(PROGRESS_INTERVAL);
    let message = match provisioner {
        WorkerState::Absent => {
            plan.actions.extend(start_provisioner(target, source, config)?);
            "starting the provisioner".to_string()
        }
        WorkerState::Pending { waiting } => match waiting {
            Some(reason) => format!("the provisioner Pod waits: {reason}"),
            None => "the provisioner Pod is starting".into(),
        },
        WorkerState::Running { metrics } => {
            // An imported image's first half was its import.
            let (from, share) = if source.imported { (50.0, 0.5) } else { (0.0, 1.0) };
            let progress = metrics.as_deref().map(|text| parse_progress(text, &target.owner.uid));
            let shown = plan.status.shown();
            let last = shown.progress.clone();
            if let Some(text) = progress.and_then(|progress| share_text(&progress, from, share, last.as_deref())) {
                *shown.progress = Some(text);
            }
            format!("writing {} into the PVC", source.location)
        }
        WorkerState::Succeeded { .. } => {
            // The intermediate copy has served its purpose. It goes before
            // the workers: were it the other way, a failed deletion would
            // leave a finished disk with no provisioner, written again.
            if let (true, ImageLocation::Registry(copy)) = (source.imported, source.location) {
                if let Ok(copy) = ImageReference::parse(copy) {
                    plan.actions.push(Action::DeleteImage {
                        repository: copy.repository,
                        tag: copy.reference,
                    });
                }
            }
            plan.actions.push(target.delete_workers());
            return Ok(Provisioned::Written);
        }
        WorkerState::Failed { report, reason } => {
            let said = report
                .as_deref()
                .map(str::trim)
                .filter(|text| !text.is_empty())
                .map(|text| text.lines().last().unwrap_or(text).to_string());
            return Err(Refusal {
                reason: "ProvisioningFailed",
                message: match said {
                    Some(said) => format!("writing {} into the PVC failed: {said}", source.location),
                    None => format!("the provisioner Pod failed ({reason}); see its events"),
                },
            });
        }
    };
    plan.status.set_importing(false);
    setter.set(plan.status.shown().conditions, types::READY, false, "Provisioning", message);
    Ok(Provisioned::Working)
}

/// Where a worker finds a source PVC's image.
pub fn source_path(mode: VolumeMode) -> &'static str {
    match mode {
        VolumeMode::Block => crate::workload::SOURCE_DEVICE,
        VolumeMode::Filesystem => "/source/disk.img",
    }
}

/// The provisioner: its Secret (a token to pull a registry image) and its
/// Pod, running `dvcr convert` into the PVC.
pub fn start_provisioner(
    target: &ClaimTarget<'_>,
    source: ProvisionSource<'_>,
    config: &WorkerConfig,
) -> Result<Vec<Action>, Refusal> {
    let mode = target.mode;
    let mut access = Vec::new();
    let mut source_disk = None;
    let mut args = vec!["convert".to_string()];
    match source.location {
        ImageLocation::Registry(image) => {
            let repository = ImageReference::parse(image)
                .map_err(|error| Refusal {
                    reason: "InvalidDataSource",
                    message: format!("the image's registryURL {image:?} is not a reference: {error}"),
                })?
                .repository;
            access.push(RepositoryAccess {
                repository,
                actions: vec!["pull"],
            });
            args.push(format!("docker://{image}"));
        }
        ImageLocation::Claim { namespace, name } => {
            readable_from(source.location, target.namespace)?;
            let virtual_bytes = source.virtual_bytes.ok_or_else(|| Refusal {
                reason: "InvalidDataSource",
                message: format!("the image in PVC {namespace}/{name} does not report its virtual size"),
            })?;
            source_disk = Some(DiskVolume {
                claim_name: name.clone(),
                mode,
            });
            // What a provisioner wrote is raw: never probed for a format.
            args.push(source_path(mode).to_string());
            args.extend(["--source-format".to_string(), "raw".to_string()]);
            args.push(format!("--source-length={virtual_bytes}"));
        }
    }
    args.extend([mode.provisioner_target().to_string(), "-O".into(), "raw".into()]);
    let secret = WorkerSecret {
        key: SecretKey {
            namespace: target.namespace.to_string(),
            name: worker_secret_name(&target.owner.uid),
        },
        owner: target.owner.clone(),
        access,
        source_ca_bundle: None,
        pull_secret: None,
        registry_ca_bundle: config.registry_ca_bundle.clone(),
    };
    let files = secret.mounted_files();
    if matches!(source.location, ImageLocation::Registry(_)) {
        if let Some(path) = &files.registry_token_file {
            args.push(format!("--registry-token-file={path}"));
        }
        if let Some(path) = &files.registry_ca_bundle {
            args.push(format!("--ca-bundle={path}"));
        }
        if config.registry_plain_http {
            args.push("--plain-http".into());
        }
    }
    args.push(format!("--owner-uid={}", target.owner.uid));
    args.push(format!("--metrics-listen=0.0.0.0:{METRICS_PORT}"));
    Ok(vec![
        Action::CreateSecret(secret),
        Action::CreatePod(WorkerPod {
            key: SecretKey {
                namespace: target.namespace.to_string(),
                name: provisioner_name(&target.owner.uid),
            },
            component: "provisioner",
            owner: target.owner.clone(),
            args,
            secret_name: worker_secret_name(&target.owner.uid),
            disk: Some(DiskVolume {
                claim_name: target.claim_name(),
                mode,
            }),
            source_disk,
        }),
    ])
}
