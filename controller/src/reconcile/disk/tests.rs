use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::*;
use crate::api::common::{DataSource, DataSourceType, HttpSource, ImageSize, ObjectRefSource};
use crate::api::disk::DiskPersistentVolumeClaim;
use crate::workload::{VolumeMode, WorkerPod};

const UID: &str = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9";
const IMAGE: &str = "dvcr.dvcr.svc/cvi/noble:cafe";

fn config(mode: VolumeMode) -> WorkerConfig {
    crate::workload::test_config(mode)
}

fn spec(size: Option<&str>, source: Option<DataSource>) -> VirtualDiskSpec {
    VirtualDiskSpec {
        persistent_volume_claim: DiskPersistentVolumeClaim {
            size: size.map(|size| Quantity(size.into())),
            storage_class_name: Some("fast".into()),
        },
        data_source: source,
    }
}

fn from_image() -> Option<DataSource> {
    Some(DataSource {
        source_type: DataSourceType::ObjectRef,
        http: None,
        container_image: None,
        object_ref: Some(ObjectRefSource {
            kind: ObjectRefKind::ClusterVirtualImage,
            name: "noble".into(),
            namespace: None,
        }),
    })
}

fn view<'a>(spec: &'a VirtualDiskSpec, status: &'a VirtualDiskStatus) -> DiskView<'a> {
    DiskView {
        namespace: "vms",
        name: "root",
        uid: UID,
        generation: Some(1),
        deleting: false,
        has_finalizer: true,
        spec,
        status,
    }
}

fn ready_image(virtual_bytes: u64) -> SourceImage {
    SourceImage::Ready {
        location: ImageLocation::Registry(IMAGE.into()),
        uid: "cafe".into(),
        size: Some(ImageSize {
            unpacked_bytes: Some(virtual_bytes.to_string()),
            ..ImageSize::default()
        }),
        format: Some("qcow2".into()),
        cdrom: Some(false),
    }
}

fn observed(provisioner: WorkerState, claim: Option<ClaimState>, source: Option<SourceImage>) -> DiskObserved {
    DiskObserved {
        importer: WorkerState::Absent,
        provisioner,
        claim,
        source,
        wait_for_first_consumer: false,
        now: Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH),
        fresh_upload_token: "U".repeat(32),
    }
}

fn bound(requested: u64, capacity: u64) -> Option<ClaimState> {
    Some(ClaimState {
        phase: Some("Bound".into()),
        requested_bytes: Some(requested),
        capacity_bytes: Some(capacity),
        storage_class: Some("fast".into()),
        deleting: false,
    })
}

fn ready_condition(status: &VirtualDiskStatus) -> (String, String, String) {
    conditions::find(&status.conditions, types::READY)
        .map(|condition| (condition.status.clone(), condition.reason.clone(), condition.message.clone()))
        .unwrap_or_default()
}

fn cleanup() -> Action {
    Action::DeleteWorker {
        namespace: "vms".into(),
        owner_uid: UID.into(),
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn quantities_are_read_in_bytes() {
    assert_eq!(quantity_bytes("10Gi"), Some(10 * GIB));
    assert_eq!(quantity_bytes("500M"), Some(500_000_000));
    assert_eq!(quantity_bytes("1073741824"), Some(GIB));
    assert_eq!(quantity_bytes("1.5Gi"), Some(3 * GIB / 2));
    assert_eq!(quantity_bytes("20000000Pi"), None, "overflow is no size");
    assert_eq!(quantity_bytes("ten"), None);
    assert_eq!(quantity_bytes("10Xi"), None);
}

#[test]
fn a_disk_from_an_image_gets_a_pvc_and_a_provisioner_in_one_step() {
    let disk = spec(None, from_image());
    let status = VirtualDiskStatus::default();
    let plan = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Absent, None, Some(ready_image(10 * GIB))),
        &config(VolumeMode::Block),
    );
    let Some(Action::CreateClaim(claim)) = plan.actions.first() else {
        panic!("no PVC first: {:?}", plan.actions);
    };
    let claim = serde_json::to_value(claim.as_ref()).unwrap_or_default();
    assert_eq!(claim["metadata"]["name"], format!("vd-root-{UID}"));
    assert_eq!(claim["metadata"]["ownerReferences"][0]["kind"], "VirtualDisk");
    assert_eq!(claim["spec"]["volumeMode"], "Block");
    assert_eq!(claim["spec"]["storageClassName"], "fast");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], (10 * GIB).to_string(), "the virtual size");
    let Some(Action::CreateSecret(secret)) = plan.actions.get(1) else {
        panic!("no Secret: {:?}", plan.actions);
    };
    assert_eq!(secret.access[0].repository, "cvi/noble");
    assert_eq!(secret.access[0].actions, vec!["pull"], "a provisioner only reads");
    let Some(Action::CreatePod(pod)) = plan.actions.get(2) else {
        panic!("no Pod: {:?}", plan.actions);
    };
    assert_eq!(pod.key.name, format!("dvcr-provisioner-{UID}"));
    assert_eq!(
        pod.args,
        vec![
            "convert".to_string(),
            format!("docker://{IMAGE}"),
            "/dev/dvcr-disk".into(),
            "-O".into(),
            "raw".into(),
            "--registry-token-file=/var/run/dvcr/registry-token".into(),
            "--ca-bundle=/var/run/dvcr/registry-ca.crt".into(),
            format!("--owner-uid={UID}"),
            "--metrics-listen=0.0.0.0:8090".into(),
        ]
    );
    let shaped = serde_json::to_value(pod.pod(&config(VolumeMode::Block))).unwrap_or_default();
    let container = &shaped["spec"]["containers"][0];
    assert_eq!(container["volumeDevices"][0]["devicePath"], "/dev/dvcr-disk");
    assert_eq!(container["terminationMessagePolicy"], "FallbackToLogsOnError");
    assert_eq!(shaped["spec"]["volumes"][2]["persistentVolumeClaim"]["claimName"], format!("vd-root-{UID}"));
    assert_eq!(plan.status.phase, Some(DiskPhase::Provisioning));
    assert_eq!(
        plan.status.target.as_ref().and_then(|target| target.persistent_volume_claim_name.clone()),
        Some(format!("vd-root-{UID}"))
    );
}

/// A disk from a VirtualImage kept in a PVC: the provisioner mounts that
/// PVC read-only and copies its raw image, never probed, for the image's
/// length.
#[test]
fn a_disk_from_an_image_kept_in_a_pvc_copies_that_pvc() {
    let mut source = from_image();
    if let Some(object) = source.as_mut().and_then(|source| source.object_ref.as_mut()) {
        object.kind = ObjectRefKind::VirtualImage;
    }
    let disk = spec(Some("20Gi"), source);
    let status = VirtualDiskStatus::default();
    let mut in_claim = ready_image(10 * GIB);
    if let SourceImage::Ready { location, .. } = &mut in_claim {
        *location = ImageLocation::Claim {
            namespace: "vms".into(),
            name: "vi-noble-cafe".into(),
        };
    }
    let plan = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Absent, None, Some(in_claim)),
        &config(VolumeMode::Filesystem),
    );
    let pod = pods(&plan)[0];
    assert_eq!(
        pod.args[..7],
        [
            "convert".to_string(),
            "/source/disk.img".into(),
            "--source-format".into(),
            "raw".into(),
            format!("--source-length={}", 10 * GIB),
            "/disk/disk.img".into(),
            "-O".into(),
        ]
    );
    let shaped = serde_json::to_value(pod.pod(&config(VolumeMode::Filesystem))).unwrap_or_default();
    let mounts = shaped["spec"]["containers"][0]["volumeMounts"].as_array().cloned().unwrap_or_default();
    let source_mount = mounts.iter().find(|mount| mount["name"] == "source").cloned().unwrap_or_default();
    assert_eq!((source_mount["mountPath"].as_str(), source_mount["readOnly"].as_bool()), (Some("/source"), Some(true)));
    let volumes = shaped["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    let source_volume = volumes.iter().find(|volume| volume["name"] == "source").cloned().unwrap_or_default();
    assert_eq!(source_volume["persistentVolumeClaim"]["claimName"], "vi-noble-cafe");
    assert_eq!(source_volume["persistentVolumeClaim"]["readOnly"], true);
    assert_eq!(claim_request(&plan), Some(VolumeMode::Filesystem.claim_bytes(20 * GIB).to_string()));
}

#[test]
fn a_filesystem_disk_is_written_as_disk_img_on_a_larger_pvc() {
    let disk = spec(Some("20Gi"), from_image());
    let status = VirtualDiskStatus::default();
    let plan = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Absent, None, Some(ready_image(10 * GIB))),
        &config(VolumeMode::Filesystem),
    );
    let Some(Action::CreateClaim(claim)) = plan.actions.first() else {
        panic!("no PVC: {:?}", plan.actions);
    };
    let requested = claim
        .spec
        .as_ref()
        .and_then(|spec| spec.resources.as_ref())
        .and_then(|resources| resources.requests.as_ref())
        .and_then(|requests| requests.get("storage"))
        .and_then(|quantity| quantity_bytes(&quantity.0))
        .unwrap_or(0);
    assert_eq!(requested, VolumeMode::Filesystem.claim_bytes(20 * GIB));
    assert!(requested > 20 * GIB, "room for the file system");
    let Some(Action::CreatePod(pod)) = plan.actions.get(2) else {
        panic!("no Pod: {:?}", plan.actions);
    };
    assert_eq!(pod.args[2], "/disk/disk.img");
}

#[test]
fn provisioning_runs_then_the_disk_is_ready_and_the_worker_goes() {
    let disk = spec(None, from_image());
    let status = VirtualDiskStatus {
        phase: Some(DiskPhase::Provisioning),
        ..VirtualDiskStatus::default()
    };
    let running = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Running { metrics: None }, bound(10 * GIB, 10 * GIB), Some(ready_image(10 * GIB))),
        &config(VolumeMode::Block),
    );
    assert!(running.actions.is_empty(), "{:?}", running.actions);
    assert_eq!(running.status.phase, Some(DiskPhase::Provisioning));
    assert_eq!(running.status.capacity.as_deref(), Some("10.0Gi"));
    assert_eq!(running.status.progress, None, "no progress page, no progress");

    // The provisioner's gauges are the disk's progress; it never goes back.
    let at = |percent: f64, previous: Option<&str>| {
        let status = VirtualDiskStatus {
            progress: previous.map(String::from),
            ..status.clone()
        };
        let metrics = WorkerState::Running {
            metrics: Some(progress_page(percent)),
        };
        let plan = reconcile(
            &view(&disk, &status),
            &observed(metrics, bound(10 * GIB, 10 * GIB), Some(ready_image(10 * GIB))),
            &config(VolumeMode::Block),
        );
        plan.status.progress
    };
    assert_eq!(at(42.0, Some("0%")).as_deref(), Some("42.0%"));
    assert_eq!(at(30.0, Some("42.0%")).as_deref(), Some("42.0%"));
    assert_eq!(at(100.0, Some("42.0%")).as_deref(), Some("99.9%"), "100% is for Ready");
    let imported = spec(None, from_url());
    let status = VirtualDiskStatus {
        phase: Some(DiskPhase::Provisioning),
        progress: Some("50.0%".into()),
        ..VirtualDiskStatus::default()
    };
    let metrics = WorkerState::Running {
        metrics: Some(progress_page(40.0)),
    };
    let writing = importing(WorkerState::Absent, bound(GIB, GIB), metrics);
    let plan = reconcile(&view(&imported, &status), &writing, &config(VolumeMode::Block));
    assert_eq!(plan.status.progress.as_deref(), Some("70.0%"), "the second half of an imported disk");

    let done = reconcile(
        &view(&disk, &running.status),
        &observed(
            WorkerState::Succeeded { report: String::new() },
            bound(10 * GIB, 10 * GIB),
            Some(ready_image(10 * GIB)),
        ),
        &config(VolumeMode::Block),
    );
    assert_eq!(done.actions, vec![cleanup()]);
    assert_eq!(done.status.phase, Some(DiskPhase::Ready));
    assert_eq!(done.status.progress.as_deref(), Some("100%"));
    assert_eq!(ready_condition(&done.status).0, "True");

    // A provisioner lost halfway is started again on the same PVC.
    let again = reconcile(
        &view(&disk, &running.status),
        &observed(WorkerState::Absent, bound(10 * GIB, 10 * GIB), Some(ready_image(10 * GIB))),
        &config(VolumeMode::Block),
    );
    assert!(again.actions.iter().any(|action| matches!(action, Action::CreatePod(_))));
    assert!(!again.actions.iter().any(|action| matches!(action, Action::CreateClaim(_))));
}

#[test]
fn a_failed_provisioner_says_why_from_its_last_log_line() {
    let disk = spec(None, from_image());
    let status = VirtualDiskStatus {
        phase: Some(DiskPhase::Provisioning),
        ..VirtualDiskStatus::default()
    };
    let failed = WorkerState::Failed {
        report: Some("INFO reading\nError: block device /dev/dvcr-disk has 1 bytes, the image needs 2\n".into()),
        reason: "Error: exit code 1".into(),
    };
    let plan = reconcile(
        &view(&disk, &status),
        &observed(failed, bound(10 * GIB, 10 * GIB), Some(ready_image(10 * GIB))),
        &config(VolumeMode::Block),
    );
    assert_eq!(plan.actions, vec![cleanup()]);
    assert_eq!(plan.status.phase, Some(DiskPhase::Failed));
    let (_, reason, message) = ready_condition(&plan.status);
    assert_eq!(reason, "ProvisioningFailed");
    assert!(message.ends_with("the image needs 2"), "{message}");
    let killed = WorkerState::Failed {
        report: None,
        reason: "OOMKilled: exit code 137".into(),
    };
    let plan = reconcile(
        &view(&disk, &status),
        &observed(killed, bound(10 * GIB, 10 * GIB), Some(ready_image(10 * GIB))),
        &config(VolumeMode::Block),
    );
    assert!(ready_condition(&plan.status).2.contains("OOMKilled"));
}

#[test]
fn sources_are_waited_for_and_sizes_checked() {
    let disk = spec(Some("5Gi"), from_image());
    let status = VirtualDiskStatus::default();
    let waiting = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Absent, None, Some(SourceImage::NotReady(Some("Provisioning".into())))),
        &config(VolumeMode::Block),
    );
    assert_eq!(waiting.status.phase, Some(DiskPhase::Pending));
    assert!(waiting.actions.is_empty());
    assert_eq!(ready_condition(&waiting.status).1, "SourceNotReady");
    let missing = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Absent, None, Some(SourceImage::Missing)),
        &config(VolumeMode::Block),
    );
    assert_eq!(ready_condition(&missing.status).1, "SourceNotFound");

    let small = reconcile(
        &view(&disk, &status),
        &observed(WorkerState::Absent, None, Some(ready_image(10 * GIB))),
        &config(VolumeMode::Block),
    );
    assert_eq!(small.status.phase, Some(DiskPhase::Failed));
    let (_, reason, message) = ready_condition(&small.status);
    assert_eq!(reason, "InvalidSize");
    assert!(message.contains("5.0Gi is smaller than the image's virtual size 10.0Gi"), "{message}");
}

#[test]
fn blank_disks_need_a_size_and_may_wait_for_their_first_consumer() {
    let no_size = spec(None, None);
    let status = VirtualDiskStatus::default();
    let plan = reconcile(
        &view(&no_size, &status),
        &observed(WorkerState::Absent, None, None),
        &config(VolumeMode::Block),
    );
    assert_eq!(plan.status.phase, Some(DiskPhase::Failed));
    assert_eq!(ready_condition(&plan.status).2, "a blank disk needs persistentVolumeClaim.size");

    let blank = spec(Some("2Gi"), None);
    let plan = reconcile(
        &view(&blank, &status),
        &observed(WorkerState::Absent, None, None),
        &config(VolumeMode::Block),
    );
    assert!(matches!(plan.actions.as_slice(), [Action::CreateClaim(_)]), "{:?}", plan.actions);

    let pending = Some(ClaimState {
        phase: Some("Pending".into()),
        requested_bytes: Some(2 * GIB),
        capacity_bytes: None,
        storage_class: Some("local".into()),
        deleting: false,
    });
    let mut look = observed(WorkerState::Absent, pending, None);
    look.wait_for_first_consumer = true;
    let plan = reconcile(&view(&blank, &plan.status), &look, &config(VolumeMode::Block));
    assert_eq!(plan.status.phase, Some(DiskPhase::WaitForFirstConsumer));
    assert_eq!(plan.status.storage_class_name.as_deref(), Some("local"));

    let plan = reconcile(
        &view(&blank, &plan.status),
        &observed(WorkerState::Absent, bound(2 * GIB, 2 * GIB), None),
        &config(VolumeMode::Block),
    );
    assert_eq!(plan.status.phase, Some(DiskPhase::Ready));
    assert!(plan.actions.is_empty());
}

#[test]
fn ready_disks_grow_never_shrink_and_notice_a_lost_pvc() {
    let status = VirtualDiskStatus {
        phase: Some(DiskPhase::Ready),
        ..VirtualDiskStatus::default()
    };
    let grown = spec(Some("20Gi"), from_image());
    let plan = reconcile(
        &view(&grown, &status),
        &observed(WorkerState::Absent, bound(10 * GIB, 10 * GIB), None),
        &config(VolumeMode::Block),
    );
    assert_eq!(
        plan.actions,
        vec![Action::ResizeClaim {
            namespace: "vms".into(),
            name: format!("vd-root-{UID}"),
            bytes: 20 * GIB,
        }]
    );
    assert_eq!(plan.status.phase, Some(DiskPhase::Resizing));

    // Requested, the storage has not grown it yet.
    let plan = reconcile(
        &view(&grown, &plan.status),
        &observed(WorkerState::Absent, bound(20 * GIB, 10 * GIB), None),
        &config(VolumeMode::Block),
    );
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(DiskPhase::Resizing));
    let plan = reconcile(
        &view(&grown, &plan.status),
        &observed(WorkerState::Absent, bound(20 * GIB, 20 * GIB), None),
        &config(VolumeMode::Block),
    );
    assert_eq!(plan.status.phase, Some(DiskPhase::Ready));
    let resized = conditions::find(&plan.status.conditions, types::RESIZED).map(|condition| condition.status.clone());
    assert_eq!(resized.as_deref(), Some("True"));

    let shrunk = spec(Some("5Gi"), from_image());
    let plan = reconcile(
        &view(&shrunk, &status),
        &observed(WorkerState::Absent, bound(10 * GIB, 10 * GIB), None),
        &config(VolumeMode::Block),
    );
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(DiskPhase::Ready));
    let reason = conditions::find(&plan.status.conditions, types::RESIZED).map(|condition| condition.reason.clone());
    assert_eq!(reason.as_deref(), Some("ShrinkNotSupported"));

    let lost = reconcile(
        &view(&grown, &status),
        &observed(WorkerState::Absent, None, None),
        &config(VolumeMode::Block),
    );
    assert_eq!(lost.status.phase, Some(DiskPhase::PvcLost));
}

#[test]
fn deletion_and_unsupported_sources() {
    let disk = spec(None, from_image());
    let status = VirtualDiskStatus::default();
    let mut leaving = view(&disk, &status);
    leaving.deleting = true;
    let plan = reconcile(&leaving, &observed(WorkerState::Absent, None, None), &config(VolumeMode::Block));
    assert_eq!(plan.actions, vec![cleanup(), Action::RemoveFinalizer]);
    assert_eq!(plan.status.phase, Some(DiskPhase::Terminating));

    let mut fresh = view(&disk, &status);
    fresh.has_finalizer = false;
    let plan = reconcile(&fresh, &observed(WorkerState::Absent, None, None), &config(VolumeMode::Block));
    assert_eq!(plan.actions.first(), Some(&Action::AddFinalizer));

}

const COPY: &str = "dvcr.dvcr.svc/vd/vms/root:1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9";

fn from_url() -> Option<DataSource> {
    Some(DataSource {
        source_type: DataSourceType::Http,
        http: Some(HttpSource {
            url: "https://images.example/noble.qcow2".into(),
            ca_bundle: None,
            checksum: None,
        }),
        container_image: None,
        object_ref: None,
    })
}

fn upload() -> Option<DataSource> {
    Some(DataSource {
        source_type: DataSourceType::Upload,
        http: None,
        container_image: None,
        object_ref: None,
    })
}

fn importing(importer: WorkerState, claim: Option<ClaimState>, provisioner: WorkerState) -> DiskObserved {
    DiskObserved {
        importer,
        ..observed(provisioner, claim, None)
    }
}

fn progress_page(percent: f64) -> String {
    format!(
        "registry_progress{{ownerUID=\"{UID}\"}} {percent}\nregistry_average_speed{{ownerUID=\"{UID}\"}} 1048576\n\
         registry_current_speed{{ownerUID=\"{UID}\"}} 2097152\n"
    )
}

fn stored_report(virtual_bytes: u64) -> WorkerState {
    WorkerState::Succeeded {
        report: format!(
            r#"{{"source-image-size":1073741824,"source-image-virtual-size":{virtual_bytes},
            "source-image-format":"qcow2","duration":5000000000,"average-speed":214748364}}"#
        ),
    }
}

fn created<'a, T>(plan: &'a Plan<VirtualDiskStatus>, pick: impl Fn(&'a Action) -> Option<&'a T>) -> Vec<&'a T> {
    plan.actions.iter().filter_map(pick).collect()
}

fn pods(plan: &Plan<VirtualDiskStatus>) -> Vec<&WorkerPod> {
    created(plan, |action| match action {
        Action::CreatePod(pod) => Some(pod),
        _ => None,
    })
}

fn secrets(plan: &Plan<VirtualDiskStatus>) -> Vec<&crate::workload::WorkerSecret> {
    created(plan, |action| match action {
        Action::CreateSecret(secret) => Some(secret),
        _ => None,
    })
}

fn claim_request(plan: &Plan<VirtualDiskStatus>) -> Option<String> {
    plan.actions.iter().find_map(|action| match action {
        Action::CreateClaim(claim) => claim
            .spec
            .as_ref()
            .and_then(|spec| spec.resources.as_ref())
            .and_then(|resources| resources.requests.as_ref())
            .and_then(|requests| requests.get("storage"))
            .map(|quantity| quantity.0.clone()),
        _ => None,
    })
}

fn copy_deletion() -> Action {
    Action::DeleteImage {
        repository: "vd/vms/root".into(),
        tag: UID.into(),
    }
}

#[test]
fn a_disk_from_a_url_is_imported_into_its_copy_then_written_into_a_claim_of_the_images_size() {
    let disk = spec(None, from_url());
    let block = config(VolumeMode::Block);
    let status = VirtualDiskStatus::default();

    // 1. The importer stores the source as the disk's copy; no PVC yet.
    let plan = reconcile(&view(&disk, &status), &importing(WorkerState::Absent, None, WorkerState::Absent), &block);
    let importer = pods(&plan);
    assert_eq!(importer.len(), 1, "{:?}", plan.actions);
    assert_eq!(importer[0].component, "importer");
    assert_eq!(importer[0].key.name, format!("dvcr-importer-{UID}"));
    assert_eq!(importer[0].owner.kind, "VirtualDisk");
    assert_eq!(importer[0].args[..3], ["import", "https://images.example/noble.qcow2", COPY]);
    assert!(importer[0].disk.is_none(), "the importer does not touch the PVC");
    let secret = secrets(&plan);
    assert_eq!(secret[0].access[0].repository, "vd/vms/root");
    assert_eq!(secret[0].access[0].actions, vec!["pull", "push"]);
    assert_eq!(claim_request(&plan), None, "the PVC's size is not known before the import");
    assert_eq!(plan.status.phase, Some(DiskPhase::Provisioning));
    assert_eq!(plan.requeue_after, Some(PROGRESS_INTERVAL));

    // Its progress is the first half of the disk's.
    let running = WorkerState::Running {
        metrics: Some(progress_page(60.0)),
    };
    let plan = reconcile(&view(&disk, &plan.status), &importing(running, None, WorkerState::Absent), &block);
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.progress.as_deref(), Some("30.0%"));
    let speed = plan.status.download_speed.clone().unwrap_or_default();
    assert_eq!(speed.current_bytes.as_deref(), Some("2097152"));
    assert_eq!(ready_condition(&plan.status).2, "importing");

    // 2. Stored: a PVC of the image's virtual size, the importer removed.
    let plan = reconcile(
        &view(&disk, &plan.status),
        &importing(stored_report(3 * GIB), None, WorkerState::Absent),
        &block,
    );
    assert_eq!(claim_request(&plan), Some((3 * GIB).to_string()));
    assert_eq!(plan.actions.last(), Some(&cleanup()), "the importer goes after the PVC is made");
    assert!(pods(&plan).is_empty(), "the provisioner waits for the importer's Secret to go");
    assert_eq!(plan.status.progress.as_deref(), Some("50.0%"));
    assert_eq!(plan.status.download_speed.as_ref().and_then(|speed| speed.current.clone()), None);
    let datasource = conditions::find(&plan.status.conditions, types::DATASOURCE_READY);
    assert_eq!(datasource.map(|condition| condition.status.as_str()), Some("True"));
    assert!(datasource.is_some_and(|condition| condition.message.contains(COPY)));

    // The importer still there (a crash between the two actions): removed first.
    let pending_claim = Some(ClaimState {
        phase: Some("Pending".into()),
        requested_bytes: Some(3 * GIB),
        capacity_bytes: None,
        storage_class: Some("fast".into()),
        deleting: false,
    });
    let plan = reconcile(
        &view(&disk, &plan.status),
        &importing(stored_report(3 * GIB), pending_claim.clone(), WorkerState::Absent),
        &block,
    );
    assert_eq!(plan.actions, vec![cleanup()]);
    assert_eq!(plan.status.phase, Some(DiskPhase::Provisioning));

    // 3. The provisioner writes the copy into the PVC, with a pull-only token.
    let plan = reconcile(
        &view(&disk, &plan.status),
        &importing(WorkerState::Absent, pending_claim, WorkerState::Absent),
        &block,
    );
    let provisioner = pods(&plan);
    assert_eq!(provisioner.len(), 1, "{:?}", plan.actions);
    assert_eq!(provisioner[0].component, "provisioner");
    assert_eq!(
        provisioner[0].args[..5],
        ["convert", &format!("docker://{COPY}"), VolumeMode::Block.provisioner_target(), "-O", "raw"]
    );
    assert_eq!(secrets(&plan)[0].access[0].actions, vec!["pull"]);
    assert_eq!(plan.status.phase, Some(DiskPhase::Provisioning));

    // 4. Written: the copy is deleted before the workers, then Ready.
    let plan = reconcile(
        &view(&disk, &plan.status),
        &importing(
            WorkerState::Absent,
            bound(3 * GIB, 3 * GIB),
            WorkerState::Succeeded { report: String::new() },
        ),
        &block,
    );
    assert_eq!(plan.actions, vec![copy_deletion(), cleanup()]);
    assert_eq!(plan.status.phase, Some(DiskPhase::Ready));
    assert_eq!(plan.status.progress.as_deref(), Some("100%"));

    // Deleting a Ready disk leaves the registry alone; one still being made
    // deletes its copy.
    let mut leaving = view(&disk, &plan.status);
    leaving.deleting = true;
    let gone = reconcile(&leaving, &importing(WorkerState::Absent, None, WorkerState::Absent), &block);
    assert_eq!(gone.actions, vec![cleanup(), Action::RemoveFinalizer]);
    let making = VirtualDiskStatus {
        phase: Some(DiskPhase::Provisioning),
        ..VirtualDiskStatus::default()
    };
    let mut leaving = view(&disk, &making);
    leaving.deleting = true;
    let gone = reconcile(&leaving, &importing(WorkerState::Absent, None, WorkerState::Absent), &block);
    assert_eq!(gone.actions, vec![cleanup(), copy_deletion(), Action::RemoveFinalizer]);
}

#[test]
fn a_disk_smaller_than_its_imported_image_fails_and_an_importer_failure_is_its_failure() {
    let disk = spec(Some("1Gi"), from_url());
    let status = VirtualDiskStatus {
        phase: Some(DiskPhase::Provisioning),
        ..VirtualDiskStatus::default()
    };
    let plan = reconcile(
        &view(&disk, &status),
        &importing(stored_report(3 * GIB), None, WorkerState::Absent),
        &config(VolumeMode::Block),
    );
    assert_eq!(plan.status.phase, Some(DiskPhase::Failed));
    let (_, reason, message) = ready_condition(&plan.status);
    assert_eq!(reason, "InvalidSize");
    assert!(message.contains("1.0Gi") && message.contains("3.0Gi"), "{message}");
    assert_eq!(plan.actions, vec![cleanup()]);
    assert_eq!(claim_request(&plan), None);

    let mismatch = WorkerState::Failed {
        report: Some(
            r#"{"source-image-size":0,"source-image-virtual-size":0,"source-image-format":"","duration":1,
            "average-speed":0,"error-message":"sha256 mismatch","reason":"BadImageChecksum"}"#
                .into(),
        ),
        reason: "Error: exit code 1".into(),
    };
    let plan = reconcile(
        &view(&disk, &status),
        &importing(mismatch, None, WorkerState::Absent),
        &config(VolumeMode::Block),
    );
    assert_eq!(plan.status.phase, Some(DiskPhase::Failed));
    assert_eq!(ready_condition(&plan.status).1, "BadImageChecksum");
    assert_eq!(ready_condition(&plan.status).2, "sha256 mismatch");
    assert_eq!(plan.actions, vec![cleanup()]);
}

#[test]
fn a_disk_from_an_upload_waits_for_its_user_then_receives() {
    let disk = spec(Some("10Gi"), upload());
    let mut settings = config(VolumeMode::Filesystem);
    settings.upload_ingress = Some(crate::workload::UploadIngress {
        host: "upload.example.com".into(),
        class_name: None,
        tls_secret_name: None,
    });
    let status = VirtualDiskStatus::default();
    let plan = reconcile(&view(&disk, &status), &importing(WorkerState::Absent, None, WorkerState::Absent), &settings);
    let uploader = pods(&plan);
    assert_eq!(uploader[0].component, "uploader");
    assert!(uploader[0].args.contains(&format!("--destination={COPY}")), "{:?}", uploader[0].args);
    assert!(plan.actions.iter().any(|action| matches!(action, Action::CreateService(_))));
    assert!(plan.actions.iter().any(|action| matches!(action, Action::CreateIngress(_))));
    assert_eq!(plan.status.phase, Some(DiskPhase::WaitForUserUpload));
    let urls = plan.status.image_upload_urls.clone().unwrap_or_default();
    assert_eq!(urls.external.as_deref(), Some(format!("http://upload.example.com/upload/{}", "U".repeat(32)).as_str()));
    assert!(urls.in_cluster.as_deref().is_some_and(|url| url.contains(".vms.svc")));

    let idle = WorkerState::Running {
        metrics: Some(progress_page(0.0).replace("2097152", "0")),
    };
    let plan = reconcile(&view(&disk, &plan.status), &importing(idle, None, WorkerState::Absent), &settings);
    assert_eq!(plan.status.phase, Some(DiskPhase::WaitForUserUpload));
    assert_eq!(plan.status.image_upload_urls, Some(urls.clone()), "the URLs stay");

    let receiving = WorkerState::Running {
        metrics: Some(progress_page(20.0)),
    };
    let plan = reconcile(&view(&disk, &plan.status), &importing(receiving, None, WorkerState::Absent), &settings);
    assert_eq!(plan.status.phase, Some(DiskPhase::Provisioning));
    assert_eq!(plan.status.progress.as_deref(), Some("10.0%"));
    assert_eq!(ready_condition(&plan.status).2, "receiving the upload");

    let plan = reconcile(
        &view(&disk, &plan.status),
        &importing(stored_report(2 * GIB), None, WorkerState::Absent),
        &settings,
    );
    assert_eq!(
        claim_request(&plan),
        Some(VolumeMode::Filesystem.claim_bytes(10 * GIB).to_string()),
        "the size asked for, with the file system's overhead"
    );
}
