use super::*;
use crate::api::common::{
    Checksum, ContainerImageSource, DownloadSpeed, HttpSource, ObjectRefSource, SecretName,
};
use crate::workload::{SecretKey, UploadIngress, VolumeMode, WorkerPod, WorkerSecret};

const UID: &str = "0b5c7e0e-1111-2222-3333-444455556666";
const TARGET: &str = "dvcr.dvcr.svc/vi/vms/ubuntu:0b5c7e0e-1111-2222-3333-444455556666";

fn config() -> WorkerConfig {
    crate::workload::test_config(VolumeMode::Filesystem)
}

fn http_source() -> DataSource {
    DataSource {
        source_type: DataSourceType::Http,
        http: Some(HttpSource {
            url: "https://images.example/jammy.qcow2".into(),
            ca_bundle: None,
            checksum: Some(Checksum {
                sha256: Some("ab".repeat(32)),
                ..Checksum::default()
            }),
        }),
        container_image: None,
        object_ref: None,
    }
}

fn source_of(source_type: DataSourceType) -> DataSource {
    DataSource {
        source_type,
        http: None,
        container_image: None,
        object_ref: None,
    }
}

fn view<'a>(source: &'a DataSource, status: &'a ImageStatus) -> ImageView<'a> {
    ImageView {
        kind: ImageKind::VirtualImage { namespace: "vms" },
        name: "ubuntu",
        uid: UID,
        generation: Some(1),
        deleting: false,
        has_finalizer: true,
        storage: ImageStorage::ContainerRegistry,
        storage_class: None,
        data_source: source,
        status,
    }
}

fn observed(worker: WorkerState) -> ImageObserved {
    ImageObserved {
        worker,
        provisioner: WorkerState::Absent,
        claim: None,
        source: None,
        stored: None,
        now: Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH),
        fresh_upload_token: "T".repeat(32),
    }
}

fn condition<'a>(status: &'a ImageStatus, condition_type: &str) -> (&'a str, &'a str, &'a str) {
    conditions::find(&status.conditions, condition_type)
        .map(|condition| (condition.status.as_str(), condition.reason.as_str(), condition.message.as_str()))
        .unwrap_or(("", "", ""))
}

fn created_pod(plan: &Plan<ImageStatus>) -> &WorkerPod {
    plan.actions
        .iter()
        .find_map(|action| match action {
            Action::CreatePod(pod) => Some(pod),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Pod is created: {:?}", plan.actions))
}

fn created_secret(plan: &Plan<ImageStatus>) -> &WorkerSecret {
    plan.actions
        .iter()
        .find_map(|action| match action {
            Action::CreateSecret(secret) => Some(secret),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Secret is created: {:?}", plan.actions))
}

fn cleanup() -> Action {
    Action::DeleteWorker {
        namespace: "vms".into(),
        owner_uid: UID.into(),
    }
}

const STORED_REPORT: &str = r#"{"source-image-size":1073741824,"source-image-virtual-size":10737418240,
    "source-image-format":"qcow2","duration":5000000000,"average-speed":214748364}"#;

#[test]
fn a_new_http_image_gets_its_finalizer_secret_and_importer_pod() {
    let source = http_source();
    let status = ImageStatus::default();
    let mut image = view(&source, &status);
    image.has_finalizer = false;
    let plan = reconcile(&image, &observed(WorkerState::Absent), &config());
    assert_eq!(plan.actions[0], Action::AddFinalizer);
    let secret = created_secret(&plan);
    assert_eq!(secret.key.namespace, "vms");
    assert_eq!(secret.access[0].repository, "vi/vms/ubuntu");
    assert_eq!(secret.access[0].actions, vec!["pull", "push"]);
    assert_eq!(secret.registry_ca_bundle.as_deref(), Some("REGISTRY CA"));
    let pod = created_pod(&plan);
    assert_eq!(pod.key.name, format!("dvcr-importer-{UID}"));
    assert_eq!(pod.component, "importer");
    assert_eq!(
        pod.args,
        vec![
            "import".to_string(),
            "https://images.example/jammy.qcow2".into(),
            format!("--checksum=sha256:{}", "ab".repeat(32)),
            TARGET.into(),
            "--registry-token-file=/var/run/dvcr/registry-token".into(),
            "--registry-ca-bundle=/var/run/dvcr/registry-ca.crt".into(),
            format!("--owner-uid={UID}"),
            "--metrics-listen=0.0.0.0:8090".into(),
            "--report-file=/dev/termination-log".into(),
            "--scratch-dir=/scratch".into(),
        ]
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));
    assert_eq!(condition(&plan.status, types::READY).1, "Provisioning");
    assert_eq!(condition(&plan.status, types::DATASOURCE_READY).0, "True");
    assert_eq!(plan.status.observed_generation, Some(1));
    assert_eq!(plan.requeue_after, Some(PROGRESS_INTERVAL));
}

#[test]
fn a_pending_importer_says_why_it_waits() {
    let source = http_source();
    let status = ImageStatus {
        phase: Some(ImagePhase::Provisioning),
        ..ImageStatus::default()
    };
    let waiting = WorkerState::Pending {
        waiting: Some("ImagePullBackOff: Back-off pulling image".into()),
    };
    let plan = reconcile(&view(&source, &status), &observed(waiting), &config());
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));
    assert_eq!(
        condition(&plan.status, types::READY).2,
        "the importer Pod waits: ImagePullBackOff: Back-off pulling image"
    );
}

fn metrics(percent: Option<f64>, average: f64, current: f64) -> String {
    let mut text = String::from("# HELP registry_progress x\n");
    if let Some(percent) = percent {
        text.push_str(&format!("registry_progress{{ownerUID=\"{UID}\"}} {percent}\n"));
    }
    text.push_str(&format!("registry_average_speed{{ownerUID=\"{UID}\"}} {average}\n"));
    text.push_str(&format!("registry_current_speed{{ownerUID=\"{UID}\"}} {current}\n"));
    text
}

#[test]
fn a_running_import_shows_monotonic_progress_and_speed_never_100() {
    let source = http_source();
    let mut status = ImageStatus {
        phase: Some(ImagePhase::Provisioning),
        progress: Some("50.0%".into()),
        ..ImageStatus::default()
    };
    let running = |text: String| {
        observed(WorkerState::Running {
            metrics: Some(text),
        })
    };
    let plan = reconcile(&view(&source, &status), &running(metrics(Some(40.0), 1048576.0, 2097152.0)), &config());
    assert_eq!(plan.status.progress.as_deref(), Some("50.0%"), "never goes back");
    assert_eq!(
        plan.status.download_speed,
        Some(DownloadSpeed {
            avg: Some("1.0Mi/s".into()),
            avg_bytes: Some("1048576".into()),
            current: Some("2.0Mi/s".into()),
            current_bytes: Some("2097152".into()),
        })
    );
    status.progress = None;
    let plan = reconcile(&view(&source, &status), &running(metrics(Some(100.0), 1.0, 1.0)), &config());
    assert_eq!(plan.status.progress.as_deref(), Some("99.9%"), "100% only once Ready");
    let plan = reconcile(&view(&source, &status), &running(metrics(None, 1.0, 1.0)), &config());
    assert_eq!(plan.status.progress, None, "unknown length: no percent");
    let unreadable = observed(WorkerState::Running { metrics: None });
    let plan = reconcile(&view(&source, &status), &unreadable, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));
    assert!(plan.actions.is_empty());
}

#[test]
fn a_stored_report_makes_the_image_ready_and_removes_the_worker() {
    let source = http_source();
    let status = ImageStatus {
        phase: Some(ImagePhase::Provisioning),
        progress: Some("99.9%".into()),
        download_speed: Some(DownloadSpeed {
            avg: Some("1.0Mi/s".into()),
            avg_bytes: Some("1048576".into()),
            current: Some("2.0Mi/s".into()),
            current_bytes: Some("2097152".into()),
        }),
        ..ImageStatus::default()
    };
    let done = observed(WorkerState::Succeeded {
        report: STORED_REPORT.into(),
    });
    let plan = reconcile(&view(&source, &status), &done, &config());
    assert_eq!(plan.actions, vec![cleanup()]);
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    assert_eq!(plan.status.progress.as_deref(), Some("100%"));
    assert_eq!(plan.status.format.as_deref(), Some("qcow2"));
    assert_eq!(plan.status.cdrom, Some(false));
    let size = plan.status.size.clone().unwrap_or_default();
    assert_eq!(size.stored.as_deref(), Some("1.0Gi"));
    assert_eq!(size.unpacked_bytes.as_deref(), Some("10737418240"));
    assert_eq!(
        plan.status.target.as_ref().and_then(|target| target.registry_url.as_deref()),
        Some(TARGET)
    );
    let speed = plan.status.download_speed.clone().unwrap_or_default();
    assert_eq!((speed.avg.as_deref(), speed.current), (Some("1.0Mi/s"), None), "only the average stays");
    assert_eq!(condition(&plan.status, types::READY), ("True", "Ready", &*format!("stored as {TARGET}")));
    assert_eq!(plan.requeue_after, Some(IMAGE_CHECK_INTERVAL), "a Ready image is checked from now on");
    assert_eq!(condition(&plan.status, types::DATASOURCE_READY).0, "True");
}

#[test]
fn failures_carry_the_importers_reason_and_message() {
    let source = http_source();
    let status = ImageStatus {
        phase: Some(ImagePhase::Provisioning),
        ..ImageStatus::default()
    };
    let report = r#"{"source-image-size":0,"source-image-virtual-size":0,"source-image-format":"",
        "duration":1,"average-speed":0,"error-message":"sha256 mismatch: expected ab.., got cd..",
        "reason":"BadImageChecksum"}"#;
    for worker in [
        WorkerState::Succeeded { report: report.into() },
        WorkerState::Failed {
            report: Some(report.into()),
            reason: "Error".into(),
        },
    ] {
        let plan = reconcile(&view(&source, &status), &observed(worker), &config());
        assert_eq!(plan.actions, vec![cleanup()]);
        assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
        assert_eq!(
            condition(&plan.status, types::READY),
            ("False", "BadImageChecksum", "sha256 mismatch: expected ab.., got cd..")
        );
    }
    let evicted = WorkerState::Failed {
        report: None,
        reason: "Evicted: the node was low on resource: ephemeral-storage".into(),
    };
    let plan = reconcile(&view(&source, &status), &observed(evicted), &config());
    let (state, reason, message) = condition(&plan.status, types::READY);
    assert_eq!((state, reason), ("False", "ImporterFailed"));
    assert!(message.contains("Evicted: the node was low on resource"), "{message}");
    let unknown = r#"{"source-image-size":0,"source-image-virtual-size":0,"source-image-format":"",
        "duration":1,"average-speed":0,"error-message":"boom","reason":"SomethingNew"}"#;
    let plan = reconcile(
        &view(&source, &status),
        &observed(WorkerState::Succeeded { report: unknown.into() }),
        &config(),
    );
    assert_eq!(condition(&plan.status, types::READY).1, "ImporterFailed");
    let garbage = observed(WorkerState::Succeeded {
        report: "not json".into(),
    });
    let plan = reconcile(&view(&source, &status), &garbage, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    assert!(condition(&plan.status, types::READY).2.contains("report is not valid"));
}

#[test]
fn a_failed_image_stays_failed_until_its_spec_changes() {
    let source = http_source();
    let status = ImageStatus {
        phase: Some(ImagePhase::Failed),
        progress: Some("12.0%".into()),
        observed_generation: Some(1),
        ..ImageStatus::default()
    };
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &config());
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    assert_eq!(plan.requeue_after, None);

    let mut changed = view(&source, &status);
    changed.generation = Some(2);
    let plan = reconcile(&changed, &observed(WorkerState::Absent), &config());
    assert_eq!(plan.actions, vec![cleanup()]);
    assert_eq!(plan.status.phase, Some(ImagePhase::Pending));
    assert_eq!(plan.status.progress, None);
    assert_eq!(plan.status.observed_generation, Some(2));
    assert_eq!(plan.requeue_after, Some(std::time::Duration::ZERO));
}

#[test]
fn ready_images_are_checked_and_lost_ones_say_so() {
    let source = http_source();
    let status = ImageStatus {
        phase: Some(ImagePhase::Ready),
        target: Some(ImageTarget {
            registry_url: Some(TARGET.into()),
            persistent_volume_claim_name: None,
        }),
        ..ImageStatus::default()
    };
    let mut look = observed(WorkerState::Absent);
    look.stored = Some(true);
    let plan = reconcile(&view(&source, &status), &look, &config());
    assert_eq!((plan.status.phase, plan.actions.len()), (Some(ImagePhase::Ready), 0));
    assert_eq!(plan.requeue_after, Some(IMAGE_CHECK_INTERVAL));

    look.stored = Some(false);
    let lost = reconcile(&view(&source, &status), &look, &config());
    assert_eq!(lost.status.phase, Some(ImagePhase::ImageLost));
    let (state, reason, message) = condition(&lost.status, types::READY);
    assert_eq!((state, reason), ("False", "ImageLost"));
    assert!(message.contains(TARGET), "{message}");

    look.stored = Some(true);
    let found = reconcile(&view(&source, &lost.status), &look, &config());
    assert_eq!(found.status.phase, Some(ImagePhase::Ready));
    assert_eq!(condition(&found.status, types::READY).0, "True");

    look.stored = None;
    look.worker = WorkerState::Succeeded {
        report: STORED_REPORT.into(),
    };
    let leftover = reconcile(&view(&source, &status), &look, &config());
    assert_eq!(leftover.actions, vec![cleanup()], "a worker left behind is removed");
    assert_eq!(leftover.status.phase, Some(ImagePhase::Ready));
}

#[test]
fn deletion_removes_workers_and_the_registry_image_then_the_finalizer() {
    let source = http_source();
    let status = ImageStatus {
        phase: Some(ImagePhase::Ready),
        ..ImageStatus::default()
    };
    let mut image = view(&source, &status);
    image.deleting = true;
    let plan = reconcile(&image, &observed(WorkerState::Absent), &config());
    assert_eq!(
        plan.actions,
        vec![
            cleanup(),
            Action::DeleteImage {
                repository: "vi/vms/ubuntu".into(),
                tag: UID.into(),
            },
            Action::RemoveFinalizer,
        ]
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Terminating));
    image.has_finalizer = false;
    assert!(reconcile(&image, &observed(WorkerState::Absent), &config()).actions.is_empty());
}

#[test]
fn uploads_get_an_uploader_service_and_urls() {
    let source = source_of(DataSourceType::Upload);
    let status = ImageStatus::default();
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &config());
    let pod = created_pod(&plan);
    assert_eq!(pod.component, "uploader");
    assert_eq!(pod.key.name, format!("dvcr-uploader-{UID}"));
    assert_eq!(
        pod.args[..4],
        [
            "upload-server".to_string(),
            "--listen=0.0.0.0:8080".into(),
            format!("--destination={TARGET}"),
            "--timeout=900s".into(),
        ]
    );
    assert!(pod.args.contains(&"--report-file=/dev/termination-log".to_string()));
    assert!(plan.actions.iter().any(|action| matches!(action, Action::CreateService(_))));
    assert!(!plan.actions.iter().any(|action| matches!(action, Action::CreateIngress(_))));
    assert_eq!(plan.status.phase, Some(ImagePhase::WaitForUserUpload));
    let urls = plan.status.image_upload_urls.clone().unwrap_or_default();
    assert_eq!(urls.in_cluster, Some(format!("http://dvcr-uploader-{UID}.vms.svc/upload")));
    assert_eq!(urls.external, None);
    assert_eq!(condition(&plan.status, types::DATASOURCE_READY).1, "WaitForUserUpload");

    let mut public = config();
    public.upload_ingress = Some(UploadIngress {
        host: "upload.example.com".into(),
        class_name: None,
        tls_secret_name: Some("tls".into()),
    });
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &public);
    let token = "T".repeat(32);
    assert!(plan.actions.iter().any(|action| matches!(action, Action::CreateIngress(_))));
    assert!(created_pod(&plan).args.contains(&format!("--path-token={token}")));
    let external = plan.status.image_upload_urls.clone().unwrap_or_default().external;
    assert_eq!(external, Some(format!("https://upload.example.com/upload/{token}")));

    // A worker recreated later keeps the URL already handed out.
    let mut again = observed(WorkerState::Absent);
    again.fresh_upload_token = "U".repeat(32);
    let plan = reconcile(&view(&source, &plan.status), &again, &public);
    assert!(created_pod(&plan).args.contains(&format!("--path-token={token}")));
}

#[test]
fn an_upload_is_waiting_until_bytes_arrive_then_provisioning() {
    let source = source_of(DataSourceType::Upload);
    let status = ImageStatus {
        phase: Some(ImagePhase::WaitForUserUpload),
        ..ImageStatus::default()
    };
    let idle = observed(WorkerState::Running {
        metrics: Some(metrics(Some(0.0), 0.0, 0.0)),
    });
    let plan = reconcile(&view(&source, &status), &idle, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::WaitForUserUpload));
    assert_eq!(plan.status.progress, None);
    let receiving = observed(WorkerState::Running {
        metrics: Some(metrics(Some(10.0), 100.0, 100.0)),
    });
    let plan = reconcile(&view(&source, &status), &receiving, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));
    assert_eq!(plan.status.progress.as_deref(), Some("10.0%"));
    assert_eq!(condition(&plan.status, types::DATASOURCE_READY).0, "True");
    let chunked = observed(WorkerState::Running {
        metrics: Some(metrics(None, 100.0, 100.0)),
    });
    let plan = reconcile(&view(&source, &status), &chunked, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning), "a chunked upload has no percent but a speed");

    let timeout = r#"{"source-image-size":0,"source-image-virtual-size":0,"source-image-format":"",
        "duration":1,"average-speed":0,"error-message":"no image was uploaded within 900s; create a new upload",
        "reason":"WaitForUserUploadTimeout"}"#;
    let gone = observed(WorkerState::Failed {
        report: Some(timeout.into()),
        reason: "Error".into(),
    });
    let plan = reconcile(&view(&source, &status), &gone, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    assert_eq!(condition(&plan.status, types::READY).1, "WaitForUserUploadTimeout");
    assert_eq!(plan.actions, vec![cleanup()]);
}

fn object_ref(kind: ObjectRefKind, namespace: Option<&str>) -> DataSource {
    DataSource {
        object_ref: Some(ObjectRefSource {
            kind,
            name: "base".into(),
            namespace: namespace.map(str::to_string),
        }),
        ..source_of(DataSourceType::ObjectRef)
    }
}

#[test]
fn object_refs_wait_for_their_source_then_copy_in_the_registry() {
    let source = object_ref(ObjectRefKind::ClusterVirtualImage, None);
    let status = ImageStatus::default();
    let image = view(&source, &status);
    assert_eq!(image.source_object(), Some((ObjectRefKind::ClusterVirtualImage, None, "base")));

    let mut look = observed(WorkerState::Absent);
    look.source = Some(SourceImage::Missing);
    let plan = reconcile(&image, &look, &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Pending));
    assert_eq!(condition(&plan.status, types::DATASOURCE_READY).1, "SourceNotFound");
    assert_eq!(plan.requeue_after, Some(WAIT_INTERVAL));
    assert!(plan.actions.is_empty(), "no Pod for a copy: {:?}", plan.actions);

    look.source = Some(SourceImage::NotReady(Some("Provisioning".into())));
    let plan = reconcile(&image, &look, &config());
    let (_, reason, message) = condition(&plan.status, types::DATASOURCE_READY);
    assert_eq!(reason, "SourceNotReady");
    assert!(message.contains("it is Provisioning"), "{message}");

    let size = ImageSize {
        stored: Some("1.0Gi".into()),
        ..ImageSize::default()
    };
    look.source = Some(SourceImage::Ready {
        location: ImageLocation::Registry("dvcr.dvcr.svc/cvi/base:cafe".into()),
        uid: "cafe".into(),
        size: Some(size.clone()),
        format: Some("iso".into()),
        cdrom: Some(true),
    });
    let plan = reconcile(&image, &look, &config());
    assert_eq!(
        plan.actions,
        vec![Action::CopyImage {
            from: "dvcr.dvcr.svc/cvi/base:cafe".into(),
            to: TARGET.into(),
        }]
    );
    assert_eq!(plan.status.phase, Some(ImagePhase::Ready));
    assert_eq!(plan.status.source_uid.as_deref(), Some("cafe"));
    assert_eq!(plan.requeue_after, Some(IMAGE_CHECK_INTERVAL));
    assert_eq!((plan.status.size, plan.status.cdrom), (Some(size), Some(true)));
}

#[test]
fn object_refs_name_their_namespace_and_refuse_disks() {
    let own = object_ref(ObjectRefKind::VirtualImage, None);
    let status = ImageStatus::default();
    assert_eq!(
        view(&own, &status).source_object(),
        Some((ObjectRefKind::VirtualImage, Some("vms"), "base")),
        "a VirtualImage names images of its own namespace"
    );
    let mut cluster = view(&own, &status);
    cluster.kind = ImageKind::ClusterVirtualImage;
    let plan = reconcile(&cluster, &observed(WorkerState::Absent), &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    assert!(condition(&plan.status, types::READY).2.contains("objectRef.namespace is required"));

    let disk = object_ref(ObjectRefKind::VirtualDisk, None);
    let plan = reconcile(&view(&disk, &status), &observed(WorkerState::Absent), &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    assert!(condition(&plan.status, types::READY).2.contains("not supported"));
}

#[test]
fn container_images_mount_their_pull_secret_and_cluster_images_run_in_the_controller_namespace() {
    let source = DataSource {
        container_image: Some(ContainerImageSource {
            image: "quay.example/images/ubuntu:24.04".into(),
            image_pull_secret: Some(SecretName {
                name: "pull".into(),
                namespace: None,
            }),
            ca_bundle: Some("LS0tLS1CRUdJTg==".into()),
        }),
        ..source_of(DataSourceType::ContainerImage)
    };
    let status = ImageStatus::default();
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &config());
    let secret = created_secret(&plan);
    assert_eq!(
        secret.pull_secret,
        Some(SecretKey {
            namespace: "vms".into(),
            name: "pull".into(),
        })
    );
    assert_eq!(secret.source_ca_bundle.as_deref(), Some(&b"-----BEGIN"[..]));
    let args = &created_pod(&plan).args;
    assert!(args.contains(&"docker://quay.example/images/ubuntu:24.04".to_string()));
    assert!(args.contains(&"--auth-file=/var/run/dvcr/auth.json".to_string()));
    assert!(args.contains(&"--ca-bundle=/var/run/dvcr/source-ca.crt".to_string()));

    let mut cluster = view(&source, &status);
    cluster.kind = ImageKind::ClusterVirtualImage;
    let plan = reconcile(&cluster, &observed(WorkerState::Absent), &config());
    assert!(condition(&plan.status, types::READY).2.contains("imagePullSecret.namespace is required"));

    let mut named = source.clone();
    if let Some(image) = named.container_image.as_mut() {
        image.image_pull_secret = Some(SecretName {
            name: "pull".into(),
            namespace: Some("images".into()),
        });
    }
    let mut cluster = view(&named, &status);
    cluster.kind = ImageKind::ClusterVirtualImage;
    let plan = reconcile(&cluster, &observed(WorkerState::Absent), &config());
    let pod = created_pod(&plan);
    assert_eq!(pod.key.namespace, "dvcr");
    assert_eq!(pod.owner.kind, "ClusterVirtualImage");
    assert!(pod.args.contains(&format!("dvcr.dvcr.svc/cvi/ubuntu:{UID}")));
    assert_eq!(created_secret(&plan).access[0].repository, "cvi/ubuntu");
}

#[test]
fn ca_bundles_may_be_pem_or_base64_and_anything_else_is_refused() {
    assert_eq!(
        import_worker::decode_ca_bundle("f", "-----BEGIN CERTIFICATE-----\nAA\n").ok(),
        Some(b"-----BEGIN CERTIFICATE-----\nAA\n".to_vec())
    );
    assert_eq!(import_worker::decode_ca_bundle("f", "LS0t\nLS0t").ok(), Some(b"------".to_vec()));
    let mut source = http_source();
    if let Some(http) = source.http.as_mut() {
        http.ca_bundle = Some("not base64 at all!".into());
    }
    let status = ImageStatus::default();
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &config());
    assert_eq!(plan.status.phase, Some(ImagePhase::Failed));
    let (_, reason, message) = condition(&plan.status, types::READY);
    assert_eq!(reason, "InvalidDataSource");
    assert!(message.starts_with("dataSource.http.caBundle is neither PEM nor base64"), "{message}");
}

#[test]
fn refusals_name_what_to_change() {
    let status = ImageStatus::default();
    let empty = source_of(DataSourceType::Http);
    let plan = reconcile(&view(&empty, &status), &observed(WorkerState::Absent), &config());
    assert_eq!(condition(&plan.status, types::READY).2, "dataSource.type is Http but dataSource.http is missing");
    let source = http_source();
    let mut plain = config();
    plain.registry_plain_http = true;
    plain.registry_ca_bundle = None;
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &plain);
    let args = &created_pod(&plan).args;
    assert!(args.contains(&"--plain-http".to_string()));
    assert!(!args.iter().any(|arg| arg.starts_with("--registry-ca-bundle")));
}

mod in_claim;
