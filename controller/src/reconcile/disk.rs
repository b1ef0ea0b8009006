//! VirtualDisk: a PVC, blank or written from a Ready image by a
//! provisioner Pod (`dvcr convert docker://IMAGE TARGET -O raw`, reading
//! the image in place from the registry); growing `size` resizes the PVC.
//!
//! A disk from `HTTP`, `ContainerImage` or `Upload` is made in two steps
//! (reference, section 1): the importer or uploader stores the source as
//! the disk's intermediate copy `vd/<ns>/<name>:<uid>`, then the PVC is
//! created (of the copy's virtual size unless a size is given) and the
//! provisioner writes the copy into it. The copy is deleted once the disk
//! is Ready.

use k8s_openapi::jiff::Timestamp;

use super::image::{reported_virtual_bytes, SourceImage};
use super::import_worker::ImportJob;
pub use super::provision::ClaimState;
use super::provision::{self, ClaimTarget, CopyObserved, CopyStep, ImageLocation, ProvisionSource, Provisioned};
use super::{Action, Plan, Refusal, WorkerState, IMAGE_CHECK_INTERVAL, PROGRESS_INTERVAL, WAIT_INTERVAL};
use crate::api::common::{DataSourceType, ObjectRefKind};
use crate::api::disk::{DiskPhase, DiskTarget, VirtualDiskSpec, VirtualDiskStatus};
use crate::conditions::{self, types, Desired, Setter};
use crate::import::{human_bytes, repository, ImageOwner};
use crate::workload::{disk_claim_name, Owner, WorkerConfig};

/// What the reconciler reads of a VirtualDisk.
#[derive(Debug, Clone, Copy)]
pub struct DiskView<'a> {
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.uid`.
    pub uid: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `metadata.finalizers` holds [`super::FINALIZER`].
    pub has_finalizer: bool,
    /// `spec`.
    pub spec: &'a VirtualDiskSpec,
    /// `status`, as last written.
    pub status: &'a VirtualDiskStatus,
}

/// What the I/O layer observed for one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskObserved {
    /// The importer or uploader Pod of a disk from `HTTP`,
    /// `ContainerImage` or `Upload` (with its progress while it runs).
    pub importer: WorkerState,
    /// The provisioner Pod.
    pub provisioner: WorkerState,
    /// The PVC.
    pub claim: Option<ClaimState>,
    /// The image an `objectRef` names.
    pub source: Option<SourceImage>,
    /// The storage class binds volumes only for a consuming Pod.
    pub wait_for_first_consumer: bool,
    /// The time now.
    pub now: Timestamp,
    /// A fresh random token of 32 alphanumerics, used for the external
    /// upload URL when the disk has none yet.
    pub fresh_upload_token: String,
}

impl DiskObserved {
    /// Some worker Pod of the disk exists.
    fn has_workers(&self) -> bool {
        self.importer != WorkerState::Absent || self.provisioner != WorkerState::Absent
    }
}

impl DiskView<'_> {
    fn owner(&self) -> Owner {
        Owner {
            kind: "VirtualDisk",
            name: self.name.to_string(),
            uid: self.uid.to_string(),
        }
    }

    /// The image an `objectRef` names, as (kind, namespace, name).
    pub fn source_object(&self) -> Option<(ObjectRefKind, Option<&str>, &str)> {
        let object = self.spec.data_source.as_ref()?.object_ref.as_ref()?;
        let namespace = match object.kind {
            ObjectRefKind::ClusterVirtualImage => None,
            _ => Some(self.namespace),
        };
        Some((object.kind, namespace, &object.name))
    }

    /// The source is imported into an intermediate copy first (`HTTP`,
    /// `ContainerImage`, `Upload`).
    pub fn imports(&self) -> bool {
        self.spec
            .data_source
            .as_ref()
            .is_some_and(|source| source.source_type != DataSourceType::ObjectRef)
    }

    /// The disk's PVC, as the provisioning steps fill it.
    fn claim_target(&self, config: &WorkerConfig) -> ClaimTarget<'_> {
        ClaimTarget {
            owner: self.owner(),
            namespace: self.namespace,
            storage_class: self.spec.persistent_volume_claim.storage_class_name.as_deref(),
            mode: config.disk_volume_mode,
        }
    }

    /// The repository of the disk's intermediate copy, `vd/<ns>/<name>`.
    pub fn copy_repository(&self, registry_host: &str) -> String {
        repository(
            registry_host,
            ImageOwner::VirtualDisk {
                namespace: self.namespace,
                name: self.name,
            },
        )
    }
}

/// Parses a Kubernetes quantity of bytes (`10Gi`, `500M`, `1073741824`).
pub fn quantity_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "P" => 1000_u64.pow(5),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return None,
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier);
    }
    let fractional: f64 = number.parse().ok()?;
    let bytes = (fractional * multiplier as f64).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Decides the status and actions of a disk.
pub fn reconcile(view: &DiskView<'_>, observed: &DiskObserved, config: &WorkerConfig) -> Plan<VirtualDiskStatus> {
    let mut status = view.status.clone();
    status.observed_generation = view.generation;
    let cleanup = Action::DeleteWorker {
        namespace: view.namespace.to_string(),
        owner_uid: view.uid.to_string(),
    };
    if view.deleting {
        // The PVC is owned by the disk: Kubernetes deletes it after the disk.
        let mut actions = Vec::new();
        if view.has_finalizer {
            actions.push(cleanup);
            let made = matches!(
                status.phase,
                Some(DiskPhase::Ready) | Some(DiskPhase::Resizing) | Some(DiskPhase::PvcLost)
            );
            if view.imports() && !made {
                actions.push(Action::DeleteImage {
                    repository: view.copy_repository(&config.registry_host),
                    tag: view.uid.to_string(),
                });
            }
            actions.push(Action::RemoveFinalizer);
        }
        status.phase = Some(DiskPhase::Terminating);
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
    let claim_name = disk_claim_name(view.name, view.uid);
    plan.status.target = Some(DiskTarget {
        persistent_volume_claim_name: Some(claim_name.clone()),
    });
    if let Some(claim) = &observed.claim {
        plan.status.storage_class_name = claim.storage_class.clone();
        plan.status.capacity = claim.capacity_bytes.map(human_bytes);
    }
    let outcome = match view.status.phase {
        Some(DiskPhase::Ready) | Some(DiskPhase::Resizing) | Some(DiskPhase::PvcLost) => {
            if observed.has_workers() {
                plan.actions.push(cleanup.clone());
            }
            keep_ready(view, observed, &mut plan)
        }
        Some(DiskPhase::Failed) => {
            if observed.has_workers() {
                plan.actions.push(cleanup.clone());
            }
            Ok(())
        }
        _ => provision(view, observed, config, &claim_name, &mut plan),
    };
    if let Err(refusal) = outcome {
        if observed.has_workers() && !plan.actions.contains(&cleanup) {
            plan.actions.push(cleanup);
        }
        plan.status.phase = Some(DiskPhase::Failed);
        set(&mut plan.status, observed.now, view.generation, types::READY, false, refusal.reason, refusal.message);
    }
    plan
}

fn set(
    status: &mut VirtualDiskStatus,
    now: Timestamp,
    generation: Option<i64>,
    condition_type: &str,
    holds: bool,
    reason: &str,
    message: String,
) {
    conditions::set(
        &mut status.conditions,
        Desired {
            condition_type,
            status: holds,
            reason,
            message,
        },
        generation,
        now,
    );
}

/// `persistentVolumeClaim.size` in bytes, if given.
fn requested_size(view: &DiskView<'_>) -> Result<Option<u64>, Refusal> {
    let Some(size) = view.spec.persistent_volume_claim.size.as_ref() else {
        return Ok(None);
    };
    quantity_bytes(&size.0).map(Some).ok_or_else(|| Refusal {
        reason: "InvalidSize",
        message: format!("persistentVolumeClaim.size {:?} is not a size", size.0),
    })
}

/// A Ready disk: its PVC must stay, and may grow.
fn keep_ready(
    view: &DiskView<'_>,
    observed: &DiskObserved,
    plan: &mut Plan<VirtualDiskStatus>,
) -> Result<(), Refusal> {
    let (now, generation) = (observed.now, view.generation);
    let Some(claim) = observed.claim.as_ref().filter(|claim| !claim.lost()) else {
        plan.status.phase = Some(DiskPhase::PvcLost);
        set(
            &mut plan.status,
            now,
            generation,
            types::READY,
            false,
            "PVCLost",
            "the disk's PVC is gone; its data is lost".into(),
        );
        return Ok(());
    };
    plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
    let wanted = requested_size(view)?;
    let requested = claim.requested_bytes.unwrap_or(0);
    match wanted {
        Some(wanted) if wanted > requested => {
            plan.actions.push(Action::ResizeClaim {
                namespace: view.namespace.to_string(),
                name: disk_claim_name(view.name, view.uid),
                bytes: wanted,
            });
            plan.status.phase = Some(DiskPhase::Resizing);
            set(
                &mut plan.status,
                now,
                generation,
                types::RESIZED,
                false,
                "Resizing",
                format!("growing the PVC from {} to {}", human_bytes(requested), human_bytes(wanted)),
            );
            plan.requeue_after = Some(PROGRESS_INTERVAL);
        }
        Some(wanted) if wanted < requested => {
            set(
                &mut plan.status,
                now,
                generation,
                types::RESIZED,
                false,
                "ShrinkNotSupported",
                format!(
                    "persistentVolumeClaim.size {} is below the PVC's {}: disks only grow",
                    human_bytes(wanted),
                    human_bytes(requested)
                ),
            );
            plan.status.phase = Some(DiskPhase::Ready);
        }
        _ if claim.capacity_bytes.unwrap_or(0) < requested => {
            // Requested, not yet grown by the storage.
            plan.status.phase = Some(DiskPhase::Resizing);
            plan.requeue_after = Some(PROGRESS_INTERVAL);
        }
        _ => {
            if plan.status.phase == Some(DiskPhase::Resizing) {
                set(
                    &mut plan.status,
                    now,
                    generation,
                    types::RESIZED,
                    true,
                    "Resized",
                    format!("the PVC has {}", human_bytes(claim.capacity_bytes.unwrap_or(0))),
                );
            }
            plan.status.phase = Some(DiskPhase::Ready);
            set(&mut plan.status, now, generation, types::READY, true, "Ready", "the disk is ready".into());
        }
    }
    Ok(())
}

/// A disk being made: the source, the PVC, the provisioner.
fn provision(
    view: &DiskView<'_>,
    observed: &DiskObserved,
    config: &WorkerConfig,
    claim_name: &str,
    plan: &mut Plan<VirtualDiskStatus>,
) -> Result<(), Refusal> {
    let (now, generation) = (observed.now, view.generation);
    let setter = Setter { generation, now };
    let requested = requested_size(view)?;
    let target = view.claim_target(config);

    // What to write (where, and its virtual size), and how large the PVC must be.
    let (source, disk_bytes) = match &view.spec.data_source {
        None => {
            let bytes = requested.ok_or_else(|| Refusal {
                reason: "InvalidSize",
                message: "a blank disk needs persistentVolumeClaim.size".into(),
            })?;
            (None, bytes)
        }
        // The copy's PVC is made by the import step: no size is needed here.
        Some(data_source) if view.imports() => {
            let repository = view.copy_repository(&config.registry_host);
            let copy = format!("{}/{repository}:{}", config.registry_host, view.uid);
            let job = ImportJob {
                owner: view.owner(),
                data_source,
                namespace: view.namespace,
                pull_secret_namespace: Some(view.namespace),
                repository: &repository,
                target: &copy,
                shown_progress: view.status.progress.as_deref(),
                progress_share: 0.5,
                upload_urls: view.status.image_upload_urls.as_ref(),
                upload_seen: view.status.phase == Some(DiskPhase::Provisioning),
                claim_source: None,
            };
            let copy_observed = CopyObserved {
                importer: &observed.importer,
                claim: observed.claim.as_ref(),
                fresh_upload_token: &observed.fresh_upload_token,
            };
            match provision::import_copy(&job, &target, copy_observed, requested, config, &setter, plan)? {
                CopyStep::InRegistry(copy) => (Some((ImageLocation::Registry(copy), None)), 0),
                CopyStep::Importing | CopyStep::Stored(_) => return Ok(()),
            }
        }
        Some(_) => {
            let Some((kind, namespace, name)) = view.source_object() else {
                return Err(Refusal {
                    reason: "InvalidDataSource",
                    message: "dataSource.objectRef is missing".into(),
                });
            };
            if kind == ObjectRefKind::VirtualDisk {
                return Err(Refusal {
                    reason: "InvalidDataSource",
                    message: "a VirtualDisk cannot be made from another VirtualDisk yet; use an image".into(),
                });
            }
            let described = match namespace {
                Some(namespace) => format!("{kind:?} {namespace}/{name}"),
                None => format!("{kind:?} {name}"),
            };
            match &observed.source {
                Some(SourceImage::Ready { location, size, .. }) => {
                    let virtual_bytes = reported_virtual_bytes(size.as_ref(), &described)?;
                    let bytes = provision::fitting_size(requested, virtual_bytes, "the image")?;
                    (Some((location.clone(), Some(virtual_bytes))), bytes)
                }
                other => {
                    let (reason, message) = match other {
                        Some(SourceImage::NotReady(phase)) => (
                            "SourceNotReady",
                            format!(
                                "waiting for {described} to be Ready (it is {})",
                                phase.as_deref().unwrap_or("without a phase")
                            ),
                        ),
                        _ => ("SourceNotFound", format!("waiting for {described}: it does not exist")),
                    };
                    plan.status.phase = Some(DiskPhase::Pending);
                    set(&mut plan.status, now, generation, types::DATASOURCE_READY, false, reason, message.clone());
                    set(&mut plan.status, now, generation, types::READY, false, reason, message);
                    plan.requeue_after = Some(WAIT_INTERVAL);
                    return Ok(());
                }
            }
        }
    };
    let source = source.as_ref().map(|(location, virtual_bytes)| ProvisionSource {
        location,
        virtual_bytes: *virtual_bytes,
        imported: view.imports(),
    });
    if let Some(source) = &source {
        let message = if view.imports() {
            format!("the source is stored in the registry as {}", source.location)
        } else {
            "the image is Ready".to_string()
        };
        set(&mut plan.status, now, generation, types::DATASOURCE_READY, true, "Ready", message);
    }

    let Some(claim) = &observed.claim else {
        return provision::create_claim(&target, disk_bytes, source, config, &setter, plan);
    };
    if claim.lost() {
        return Err(provision::lost_while_filling(claim_name));
    }
    let bound = claim.phase.as_deref() == Some("Bound");
    let Some(source) = source else {
        // Blank: ready once bound (or waiting for its first consumer).
        if bound {
            plan.status.phase = Some(DiskPhase::Ready);
            plan.status.progress = Some("100%".into());
            set(&mut plan.status, now, generation, types::READY, true, "Ready", "the blank disk is ready".into());
            plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
        } else if observed.wait_for_first_consumer {
            plan.status.phase = Some(DiskPhase::WaitForFirstConsumer);
            set(
                &mut plan.status,
                now,
                generation,
                types::READY,
                false,
                "WaitForFirstConsumer",
                "the storage class binds the volume when a virtual machine first uses the disk".into(),
            );
            plan.requeue_after = Some(WAIT_INTERVAL);
        } else {
            plan.status.phase = Some(DiskPhase::Provisioning);
            set(&mut plan.status, now, generation, types::READY, false, "Provisioning", "binding the PVC".into());
            plan.requeue_after = Some(PROGRESS_INTERVAL);
        }
        return Ok(());
    };
    match provision::follow_provisioner(&target, source, &observed.provisioner, config, &setter, plan)? {
        Provisioned::Working => {}
        Provisioned::Written => {
            plan.status.phase = Some(DiskPhase::Ready);
            plan.status.progress = Some("100%".into());
            let message = format!("written from {}", source.location);
            set(&mut plan.status, now, generation, types::READY, true, "Ready", message);
            plan.requeue_after = Some(IMAGE_CHECK_INTERVAL);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
