//! VirtualImages with `storage: PersistentVolumeClaim`.

use super::*;
use crate::reconcile::provision::ClaimState;
use crate::workload::DiskVolume;

const CLAIM: &str = "vi-ubuntu-0b5c7e0e-1111-2222-3333-444455556666";
const GIB: u64 = 1 << 30;

fn in_claim<'a>(source: &'a DataSource, status: &'a ImageStatus) -> ImageView<'a> {
    ImageView {
        storage: ImageStorage::PersistentVolumeClaim,
        storage_class: Some("replicated"),
        ..view(source, status)
    }
}

fn claim(phase: &str) -> Option<ClaimState> {
    Some(ClaimState {
        phase: Some(phase.into()),
        requested_bytes: Some(11 * GIB),
        capacity_bytes: Some(11 * GIB),
        storage_class: Some("replicated".into()),
        deleting: false,
    })
}

fn looking(worker: WorkerState, claim: Option<ClaimState>, provisioner: WorkerState) -> ImageObserved {
    ImageObserved {
        provisioner,
        claim,
        ..observed(worker)
    }
}

fn claims(plan: &Plan<ImageStatus>) -> Vec<&k8s_openapi::api::core::v1::PersistentVolumeClaim> {
    plan.actions
        .iter()
        .filter_map(|action| match action {
            Action::CreateClaim(claim) => Some(claim.as_ref()),
            _ => None,
        })
        .collect()
}

fn requested(claim: &k8s_openapi::api::core::v1::PersistentVolumeClaim) -> Option<String> {
    claim
        .spec
        .as_ref()
        .and_then(|spec| spec.resources.as_ref())
        .and_then(|resources| resources.requests.as_ref())
        .and_then(|requests| requests.get("storage"))
        .map(|quantity| quantity.0.clone())
}

fn claim_target(status: &ImageStatus) -> (Option<&str>, Option<&str>) {
    let target = status.target.as_ref();
    (
        target.and_then(|target| target.registry_url.as_deref()),
        target.and_then(|target| target.persistent_volume_claim_name.as_deref()),
    )
}

fn progress_page(percent: f64) -> String {
    format!("registry_progress{{ownerUID=\"{UID}\"}} {percent}\n")
}

#[test]
fn an_imported_image_goes_through_its_copy_into_its_pvc_which_it_then_watches() {
    let source = http_source();
    let status = ImageStatus::default();

    // 1. The importer stores the source as the copy vi/<ns>/<name>:<uid>.
    let nothing_yet = looking(WorkerState::Absent, None, WorkerState::Absent);
    let plan = reconcile(&in_claim(&source, &status), &nothing_yet, &config());
    let importer = created_pod(&plan);
    assert_eq!(importer.component, "importer");
    assert!(importer.args.contains(&TARGET.to_string()), "{:?}", importer.args);
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));
    assert_eq!(claim_target(&plan.status), (None, Some(CLAIM)), "the PVC is the target, not the registry");

    // 2. Stored: sizes and format recorded, the PVC (of the virtual size plus
    // the file system's overhead) created, the importer removed.
    let plan = reconcile(
        &in_claim(&source, &plan.status),
        &looking(WorkerState::Succeeded { report: STORED_REPORT.into() }, None, WorkerState::Absent),
        &config(),
    );
    let created = claims(&plan);
    assert_eq!(created.len(), 1, "{:?}", plan.actions);
    assert_eq!(created[0].metadata.name.as_deref(), Some(CLAIM));
    assert_eq!(requested(created[0]), Some(VolumeMode::Filesystem.claim_bytes(10 * GIB).to_string()));
    let spec = created[0].spec.as_ref();
    assert_eq!(spec.and_then(|spec| spec.storage_class_name.as_deref()), Some("replicated"));
    assert_eq!(plan.actions.last(), Some(&cleanup()));
    assert_eq!(plan.status.format.as_deref(), Some("qcow2"));
    assert_eq!(plan.status.size.as_ref().and_then(|size| size.unpacked_bytes.as_deref()), Some("10737418240"));
    assert_eq!(plan.status.progress.as_deref(), Some("50.0%"));
    assert_ne!(plan.status.phase, Some(ImagePhase::Ready));

    // 3. The PVC exists, the importer is gone: the provisioner writes the
    // copy into it, read in place from the registry.
    let plan = reconcile(
        &in_claim(&source, &plan.status),
        &looking(WorkerState::Absent, claim("Pending"), WorkerState::Absent),
        &config(),
    );
    let provisioner = created_pod(&plan);
    assert_eq!(provisioner.component, "provisioner");
    assert_eq!(&provisioner.args[..5], [
        "convert".to_string(),
        format!("docker://{TARGET}"),
        "/disk/disk.img".into(),
        "-O".into(),
        "raw".into()
    ]);
    assert_eq!(
        provisioner.disk,
        Some(DiskVolume {
            claim_name: CLAIM.into(),
            mode: VolumeMode::Filesystem
        })
    );
    assert_eq!(provisioner.source_disk, None);
    assert_eq!(created_secret(&plan).access[0].repository, "vi/vms/ubuntu");
    assert_eq!(created_secret(&plan).access[0].actions, vec!["pull"]);

    // 4. Writing: the second half of the progress.
    let plan = reconcile(
        &in_claim(&source, &plan.status),
        &looking(
            WorkerState::Absent,
            claim("Bound"),
            WorkerState::Running {
                metrics: Some(progress_page(50.0)),
            },
        ),
        &config(),
    );
    assert_eq!(plan.status.progress.as_deref(), Some("75.0%"));
    assert_eq!(condition(&plan.status, types::READY).2, format!("writing {TARGET} into the PVC"));

    // 5. Written: the copy goes before the workers; Ready, with the PVC.
    let plan = reconcile(
        &in_claim(&source, &plan.status),
        &looking(WorkerState::Absent, claim("Bound"), WorkerState::Succeeded { report: String::new() }),
        &config(),
    );
    assert_eq!(
        plan.actions,
        vec![
            Action::DeleteImage {
                repository: "vi/vms/ubuntu".into(),
                tag: UID.into()
            },
            cleanup()
        ]
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    assert_eq!(plan.status.progress.as_deref(), Some("100%"));
    assert_eq!(condition(&plan.status, types::READY), ("True", "Ready", &*format!("stored in PVC {CLAIM}")));
    assert_eq!(claim_target(&plan.status), (None, Some(CLAIM)));
    let ready = plan.status;

    // 6. Ready: the PVC is watched, not the registry (the copy is gone).
    let plan = reconcile(
        &in_claim(&source, &ready),
        &looking(WorkerState::Absent, claim("Bound"), WorkerState::Absent),
        &config(),
    );
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    for (found, what) in [(None, "is gone"), (claim("Lost"), "lost its volume")] {
        let plan = reconcile(
            &in_claim(&source, &ready),
            &looking(WorkerState::Absent, found, WorkerState::Absent),
            &config(),
        );
        assert_eq!(plan.status.phase, Some(ImagePhase::PvcLost));
        let (holds, reason, message) = condition(&plan.status, types::READY);
        assert_eq!((holds, reason), ("False", "PVCLost"));
        assert!(message.contains(&format!("PVC {CLAIM} {what}")), "{message}");
    }

    // Deletion: the workers and the copy (if any is left) go; the PVC is
    // owned by the image, so Kubernetes deletes it after.
    let mut leaving = in_claim(&source, &ready);
    leaving.deleting = true;
    let plan = reconcile(&leaving, &looking(WorkerState::Absent, None, WorkerState::Absent), &config());
    assert_eq!(
        plan.actions,
        vec![
            cleanup(),
            Action::DeleteImage {
                repository: "vi/vms/ubuntu".into(),
                tag: UID.into()
            },
            Action::RemoveFinalizer
        ]
    );
}

fn object_ref(name: &str) -> DataSource {
    DataSource {
        object_ref: Some(ObjectRefSource {
            kind: ObjectRefKind::VirtualImage,
            name: name.into(),
            namespace: None,
        }),
        ..source_of(DataSourceType::ObjectRef)
    }
}

fn ready_source(location: ImageLocation) -> SourceImage {
    SourceImage::Ready {
        location,
        uid: "source-uid".into(),
        size: Some(ImageSize {
            unpacked_bytes: Some((3 * GIB).to_string()),
            ..ImageSize::default()
        }),
        format: Some("iso".into()),
        cdrom: Some(true),
    }
}

#[test]
fn an_image_from_another_image_is_written_into_its_pvc_from_the_registry_or_from_that_images_pvc() {
    let source = object_ref("base");
    let status = ImageStatus::default();
    let mut look = looking(WorkerState::Absent, None, WorkerState::Absent);

    look.source = Some(SourceImage::NotReady(Some("Provisioning".into())));
    let plan = reconcile(&in_claim(&source, &status), &look, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Pending));
    assert_eq!(condition(&plan.status, types::READY).1, "SourceNotReady");
    assert!(claims(&plan).is_empty());

    // From the registry: PVC and provisioner at once, reading it in place.
    look.source = Some(ready_source(ImageLocation::Registry("dvcr.dvcr.svc/vi/vms/base:source-uid".into())));
    let plan = reconcile(&in_claim(&source, &status), &look, &config());
    assert_eq!(requested(claims(&plan)[0]), Some(VolumeMode::Filesystem.claim_bytes(3 * GIB).to_string()));
    let provisioner = created_pod(&plan);
    assert_eq!(provisioner.args[1], "docker://dvcr.dvcr.svc/vi/vms/base:source-uid");
    assert_eq!((plan.status.cdrom, plan.status.format.as_deref()), (Some(true), Some("iso")));
    assert_eq!(plan.status.source_uid.as_deref(), Some("source-uid"));
    assert_eq!(plan.status.progress.as_deref(), Some("0%"));

    // From another image's PVC, on block volumes: mounted read-only, read
    // as raw (never probed) for the image's length, not the device's.
    look.source = Some(ready_source(ImageLocation::Claim {
        namespace: "vms".into(),
        name: "vi-base-source-uid".into(),
    }));
    let block = crate::workload::test_config(VolumeMode::Block);
    let plan = reconcile(&in_claim(&source, &status), &look, &block);
    let provisioner = created_pod(&plan);
    assert_eq!(&provisioner.args[..7], [
        "convert".to_string(),
        crate::workload::SOURCE_DEVICE.into(),
        "--source-format".into(),
        "raw".into(),
        format!("--source-length={}", 3 * GIB),
        crate::workload::DISK_DEVICE.into(),
        "-O".into(),
    ]);
    assert!(!provisioner.args.iter().any(|arg| arg.starts_with("--registry-token-file")));
    assert_eq!(
        provisioner.source_disk,
        Some(DiskVolume {
            claim_name: "vi-base-source-uid".into(),
            mode: VolumeMode::Block
        })
    );
    assert!(created_secret(&plan).access.is_empty(), "no registry access is needed");
    let pod = provisioner.pod(&block);
    let volumes = pod.spec.as_ref().and_then(|spec| spec.volumes.clone()).unwrap_or_default();
    let source_volume = volumes.iter().find(|volume| volume.name == "source");
    let source_claim = source_volume.and_then(|volume| volume.persistent_volume_claim.as_ref());
    assert_eq!(source_claim.map(|claim| claim.claim_name.as_str()), Some("vi-base-source-uid"));
    assert_eq!(source_claim.and_then(|claim| claim.read_only), Some(true));
    let devices = pod.spec.as_ref().and_then(|spec| spec.containers[0].volume_devices.clone()).unwrap_or_default();
    assert_eq!(devices.len(), 2, "the disk and the source: {devices:?}");

    // Written: no copy to delete.
    let plan = reconcile(
        &in_claim(&source, &plan.status),
        &ImageObserved {
            provisioner: WorkerState::Succeeded { report: String::new() },
            claim: claim("Bound"),
            ..look.clone()
        },
        &block,
    );
    assert_eq!(plan.actions, vec![cleanup()]);
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));

    // A PVC of another namespace cannot be mounted.
    look.source = Some(ready_source(ImageLocation::Claim {
        namespace: "other".into(),
        name: "vi-base-source-uid".into(),
    }));
    let plan = reconcile(&in_claim(&source, &status), &look, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    let (_, reason, message) = condition(&plan.status, types::READY);
    assert_eq!(reason, "InvalidDataSource");
    assert!(message.contains("PVC other/vi-base-source-uid, which a Pod in vms cannot read"), "{message}");
}

#[test]
fn a_registry_image_from_a_pvc_is_imported_from_that_volume_and_a_failed_provisioner_says_why() {
    let mut source = object_ref("base");
    let status = ImageStatus::default();
    let mut look = observed(WorkerState::Absent);
    let kept = |namespace: &str| {
        ready_source(ImageLocation::Claim {
            namespace: namespace.into(),
            name: "vi-base-source-uid".into(),
        })
    };
    look.source = Some(kept("vms"));
    let plan = reconcile(&view(&source, &status), &look, &config());
    assert!(!plan.actions.iter().any(|action| matches!(action, Action::CopyImage { .. })));
    let importer = created_pod(&plan);
    assert_eq!(importer.component, "importer");
    assert_eq!(
        importer.args[..5],
        [
            "import".to_string(),
            "/source/disk.img".into(),
            TARGET.into(),
            "--source-format=iso".into(),
            format!("--source-length={}", 3 * GIB),
        ]
    );
    assert_eq!(
        importer.source_disk,
        Some(DiskVolume {
            claim_name: "vi-base-source-uid".into(),
            mode: VolumeMode::Filesystem
        })
    );
    assert_eq!(created_secret(&plan).access[0].actions, vec!["pull", "push"]);
    assert_eq!(plan.status.source_uid.as_deref(), Some("source-uid"));
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));

    // Its report makes it Ready in the registry.
    let mut done = look.clone();
    done.worker = WorkerState::Succeeded {
        report: STORED_REPORT.into(),
    };
    let plan = reconcile(&view(&source, &plan.status), &done, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    assert_eq!(claim_target(&plan.status), (Some(TARGET), None));

    // Another namespace's PVC cannot be mounted by this image's importer.
    look.source = Some(kept("other"));
    let plan = reconcile(&view(&source, &status), &look, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    let message = condition(&plan.status, types::READY).2;
    assert!(message.contains("kept in PVC other/vi-base-source-uid, which a Pod in vms cannot read"), "{message}");

    // A cluster image from it: the importer runs where the PVC is.
    if let Some(object) = source.object_ref.as_mut() {
        object.namespace = Some("other".into());
    }
    let mut cluster = view(&source, &status);
    cluster.kind = ImageKind::ClusterVirtualImage;
    assert_eq!(cluster.worker_namespace(&config()), "other");
    let plan = reconcile(&cluster, &look, &config());
    let importer = created_pod(&plan);
    assert_eq!((importer.key.namespace.as_str(), importer.owner.kind), ("other", "ClusterVirtualImage"));
    assert!(importer.args.contains(&format!("dvcr.dvcr.svc/cvi/ubuntu:{UID}")), "{:?}", importer.args);
    let http = http_source();
    let plain = view(&http, &status);
    assert_eq!(
        ImageView {
            kind: ImageKind::ClusterVirtualImage,
            ..plain
        }
        .worker_namespace(&config()),
        "dvcr",
        "other cluster images' workers run in the controller's namespace"
    );

    let writing = ImageStatus {
        phase: Some(ImagePhase::Provisioning),
        progress: Some("62.0%".into()),
        ..ImageStatus::default()
    };
    let plan = reconcile(
        &in_claim(&http, &writing),
        &looking(
            WorkerState::Absent,
            claim("Bound"),
            WorkerState::Failed {
                report: Some("cannot convert docker://...\nError: No space left on device (os error 28)".into()),
                reason: "Error: exit code 1".into(),
            },
        ),
        &config(),
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    let (_, reason, message) = condition(&plan.status, types::READY);
    assert_eq!(reason, "ProvisioningFailed");
    assert!(message.ends_with("into the PVC failed: Error: No space left on device (os error 28)"), "{message}");
    assert_eq!(plan.actions, vec![cleanup()], "the failed provisioner is removed");
}

/// A failed image retried after a spec change: the PVC of the failed
/// attempt is deleted, and the new attempt waits until it is gone (it would
/// otherwise be taken for the new attempt's).
#[test]
fn a_retry_deletes_the_failed_attempts_pvc_and_waits_for_it_to_go() {
    let source = http_source();
    let failed = ImageStatus {
        phase: Some(ImagePhase::Failed),
        observed_generation: Some(1),
        ..ImageStatus::default()
    };
    let mut changed = in_claim(&source, &failed);
    changed.generation = Some(2);
    let plan = reconcile(&changed, &looking(WorkerState::Absent, claim("Bound"), WorkerState::Absent), &config());
    assert_eq!(
        plan.actions,
        vec![
            cleanup(),
            Action::DeleteClaim {
                namespace: "vms".into(),
                name: CLAIM.into()
            }
        ]
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Pending));

    let mut going = claim("Bound");
    if let Some(going) = going.as_mut() {
        going.deleting = true;
    }
    let plan = reconcile(
        &ImageView {
            status: &plan.status,
            ..changed
        },
        &looking(WorkerState::Absent, going, WorkerState::Absent),
        &config(),
    );
    assert!(plan.actions.is_empty(), "nothing starts while the old PVC goes: {:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(ImagePhase::Pending));
    assert!(condition(&plan.status, types::READY).2.contains("of the failed attempt to be deleted"));

    let plan = reconcile(
        &ImageView {
            status: &plan.status,
            ..changed
        },
        &looking(WorkerState::Absent, None, WorkerState::Absent),
        &config(),
    );
    assert_eq!(created_pod(&plan).component, "importer", "then the import starts again");
}
