//! The controller's worker Pods, run for real: the Secret and the `dvcr`
//! arguments the image reconciler plans are carried out here by the real
//! binary against a real registry (scoped tokens on), a real HTTP server and
//! curl, with the Pod's mounts mapped onto folders; the report each worker
//! leaves is fed back to the reconciler, which must then say Ready (or
//! Failed, with the importer's reason).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::file_server::FileServer;
use common::image::pseudo_random;
use common::token_registry::TokenRegistry;
use common::{free_port, require_tool, run, wait_for_listener, DVCR};
use dvcr_controller::api::common::{Checksum, DataSource, DataSourceType, HttpSource};
use dvcr_controller::api::image::{ImagePhase, ImageStatus, ImageStorage};
use dvcr_controller::api::disk::{VirtualDiskSpec, VirtualDiskStatus};
use dvcr_controller::conditions::{find, types};
use dvcr_controller::reconcile::disk::DiskView;
use dvcr_controller::reconcile::image::{reconcile, ImageKind, ImageObserved, ImageView};
use dvcr_controller::reconcile::provision::ImageLocation;
use dvcr_controller::reconcile::{Action, Plan, WorkerState};
use dvcr_controller::workload::{
    UploadIngress, VolumeMode, WorkerConfig, WorkerPod, WorkerSecret, SCRATCH_MOUNT, SECRET_MOUNT,
};
use dvcr_controller::k8s_openapi::jiff::Timestamp;

const UID: &str = "5a1f0c9e-7d3b-4e2a-9c61-0f8e2d4b7a13";

/// A registry that takes only scoped tokens, and the key to mint them.
struct Cluster(TokenRegistry);

impl std::ops::Deref for Cluster {
    type Target = TokenRegistry;

    fn deref(&self) -> &TokenRegistry {
        &self.0
    }
}

impl Cluster {
    fn start() -> Cluster {
        Cluster(TokenRegistry::start())
    }

    fn config(&self) -> WorkerConfig {
        WorkerConfig {
            registry_host: self.server.address.clone(),
            registry_ca_bundle: None,
            registry_plain_http: true,
            dvcr_image: "dvcr:test".into(),
            controller_namespace: "dvcr".into(),
            upload_ingress: Some(UploadIngress {
                host: "upload.example.com".into(),
                class_name: None,
                tls_secret_name: None,
            }),
            upload_timeout_seconds: 60,
            disk_volume_mode: VolumeMode::Filesystem,
        }
    }

    /// Mints the token the I/O layer would, and writes the Secret's data
    /// where the Pod would see it mounted.
    fn mount_secret(&self, secret: &WorkerSecret, mount: &Path) {
        let access: Vec<String> = secret
            .access
            .iter()
            .map(|access| format!("repository:{}:{}", access.repository, access.actions.join(",")))
            .collect();
        // A worker that needs no registry access (one reading a PVC) holds a
        // token that grants nothing; `dvcr token issue` mints none such.
        let token = match access.is_empty() {
            true => String::new(),
            false => self.token(&access.iter().map(String::as_str).collect::<Vec<_>>()),
        };
        std::fs::create_dir_all(mount).unwrap();
        for (key, value) in secret.secret(&token, None).data.unwrap_or_default() {
            std::fs::write(mount.join(key), value.0).unwrap();
        }
    }

    /// The Pod's arguments with its mounts mapped onto folders here.
    fn local_args(&self, pod: &WorkerPod, name: &str, ports: &[(&str, u16)]) -> (Vec<String>, std::path::PathBuf) {
        let base = self.root.join(name);
        let report = base.join("termination-log");
        std::fs::create_dir_all(base.join("scratch")).unwrap();
        let args = pod
            .args
            .iter()
            .map(|arg| {
                let mut arg = arg
                    .replace(SECRET_MOUNT, &base.join("secret").display().to_string())
                    .replace(SCRATCH_MOUNT, &base.join("scratch").display().to_string())
                    .replace("/dev/termination-log", &report.display().to_string());
                for (from, port) in ports {
                    arg = arg.replace(from, &format!("127.0.0.1:{port}"));
                }
                arg
            })
            .collect();
        (args, report)
    }

    /// Runs a planned provisioner with its PVC's file system mapped onto a
    /// folder; returns the disk it wrote.
    fn run_provisioner(&self, pod: &WorkerPod, name: &str) -> std::path::PathBuf {
        self.run_provisioner_reading(pod, name, None)
    }

    /// Runs a planned provisioner, its PVC's file system mapped onto a
    /// folder and a source PVC's `disk.img` onto `source`; returns the disk
    /// it wrote.
    fn run_provisioner_reading(&self, pod: &WorkerPod, name: &str, source: Option<&Path>) -> std::path::PathBuf {
        let (mut args, _) = self.local_args(pod, name, &[("0.0.0.0:8090", free_port())]);
        let disk = self.root.join(name).join("disk/disk.img");
        std::fs::create_dir_all(self.root.join(name).join("disk")).unwrap();
        assert_eq!(pod.source_disk.is_some(), source.is_some(), "a source PVC is mounted when one is read");
        for arg in args.iter_mut() {
            if arg == "/disk/disk.img" {
                *arg = disk.display().to_string();
            }
            if let (Some(source), "/source/disk.img") = (source, arg.as_str()) {
                *arg = source.display().to_string();
            }
        }
        let output = Command::new(DVCR).args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        disk
    }
}

fn http_source(url: String, sha256: Option<String>) -> DataSource {
    DataSource {
        source_type: DataSourceType::Http,
        http: Some(HttpSource {
            url,
            ca_bundle: None,
            checksum: sha256.map(|sha256| Checksum {
                sha256: Some(sha256),
                ..Checksum::default()
            }),
        }),
        container_image: None,
        object_ref: None,
    }
}

/// The VirtualDisk `vms/root` of `UID`.
fn disk_view<'a>(spec: &'a VirtualDiskSpec, status: &'a VirtualDiskStatus) -> DiskView<'a> {
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
        now: Timestamp::now(),
        fresh_upload_token: "Q7".repeat(16),
    }
}

fn planned(plan: &Plan<ImageStatus>) -> (&WorkerSecret, &WorkerPod) {
    planned_of(&plan.actions)
}

fn planned_of(actions: &[Action]) -> (&WorkerSecret, &WorkerPod) {
    let secret = actions.iter().find_map(|action| match action {
        Action::CreateSecret(secret) => Some(secret),
        _ => None,
    });
    let pod = actions.iter().find_map(|action| match action {
        Action::CreatePod(pod) => Some(pod),
        _ => None,
    });
    match (secret, pod) {
        (Some(secret), Some(pod)) => (secret, pod),
        _ => panic!("no worker planned: {actions:?}"),
    }
}

fn finished(output: &Output, report: &Path) -> WorkerState {
    let report = std::fs::read_to_string(report).unwrap_or_default();
    if output.status.success() {
        WorkerState::Succeeded { report }
    } else {
        WorkerState::Failed {
            report: Some(report),
            reason: "Error".into(),
        }
    }
}

/// Writes at `qcow2` the qcow2 qemu-img makes (with `qemu_options`, such as
/// `-c`) of a raw disk of `virtual_bytes` holding pseudo-random data at each
/// (offset, length, seed) and holes elsewhere.
fn make_qcow2(qcow2: &Path, virtual_bytes: u64, data: &[(u64, usize, u64)], qemu_options: &[&str]) {
    let raw = qcow2.with_extension("source.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(virtual_bytes).unwrap();
    for &(offset, length, seed) in data {
        std::os::unix::fs::FileExt::write_all_at(&file, &pseudo_random(length, seed), offset).unwrap();
    }
    let qemu_img = require_tool("qemu-img");
    run(Command::new(qemu_img).args(["convert", "-O", "qcow2"]).args(qemu_options).arg(&raw).arg(qcow2));
    std::fs::remove_file(raw).unwrap();
}

fn sha256_hex(data: &[u8]) -> String {
    common::sha256_digest(data).trim_start_matches("sha256:").to_string()
}

fn layer_of(cluster: &Cluster, reference: &str) -> Vec<u8> {
    let (repository, tag) = reference.split_once(':').unwrap_or_default();
    let token = cluster.token(&[&format!("repository:{repository}:pull")]);
    let bearer = format!("Authorization: Bearer {token}");
    let curl = |path: &str| {
        let output = Command::new(require_tool("curl"))
            .args(["-sf", "-H", &bearer, "-H", "Accept: application/vnd.docker.distribution.manifest.v2+json"])
            .arg(cluster.server.url(path))
            .output()
            .unwrap();
        assert!(output.status.success(), "GET {path} failed");
        output.stdout
    };
    let manifest = curl(&format!("/v2/{repository}/manifests/{tag}"));
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let digest = manifest["layers"][0]["digest"].as_str().unwrap_or_default().to_string();
    curl(&format!("/v2/{repository}/blobs/{digest}"))
}

#[test]
fn the_planned_importer_imports_and_its_report_makes_the_image_ready() {
    let cluster = Cluster::start();
    let files = cluster.root.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let disk = pseudo_random(3 << 20, 77);
    std::fs::write(files.join("disk.img"), &disk).unwrap();
    let web = FileServer::start(&files);
    let config = cluster.config();

    let source = http_source(web.url("plain", "disk.img"), Some(sha256_hex(&disk)));
    let status = ImageStatus::default();
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &config);
    assert_eq!(plan.status.phase, Some(ImagePhase::Provisioning));
    let (secret, pod) = planned(&plan);
    cluster.mount_secret(secret, &cluster.root.join("importer/secret"));
    let metrics_port = free_port();
    let (args, report) = cluster.local_args(pod, "importer", &[("0.0.0.0:8090", metrics_port)]);
    let output = Command::new(DVCR).args(&args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));

    let done = reconcile(
        &view(&source, &plan.status),
        &observed(finished(&output, &report)),
        &config,
    );
    assert_eq!(done.status.phase, Some(ImagePhase::Ready), "{:?}", done.status.conditions);
    assert_eq!(done.status.format.as_deref(), Some("raw"));
    assert_eq!(done.status.size.as_ref().and_then(|size| size.unpacked_bytes.as_deref()), Some("3145728"));
    let url = done.status.target.as_ref().and_then(|target| target.registry_url.clone()).unwrap_or_default();
    assert_eq!(url, format!("{}/vi/vms/ubuntu:{UID}", cluster.server.address));
    let layer = layer_of(&cluster, url.trim_start_matches(&format!("{}/", cluster.server.address)));
    let tail = &layer[1024..1024 + disk.len()];
    assert!(tail == disk.as_slice(), "the stored disk differs from the source");

    // A checksum that does not match: the importer's reason reaches the status.
    let wrong = http_source(web.url("plain", "disk.img"), Some("00".repeat(32)));
    let other = ImageView {
        uid: "6b2a1d0f-8e4c-4f3b-8d72-1a9f3e5c8b24",
        ..view(&wrong, &status)
    };
    let plan = reconcile(&other, &observed(WorkerState::Absent), &config);
    let (secret, pod) = planned(&plan);
    cluster.mount_secret(secret, &cluster.root.join("bad/secret"));
    let (args, report) = cluster.local_args(pod, "bad", &[("0.0.0.0:8090", free_port())]);
    let output = Command::new(DVCR).args(&args).output().unwrap();
    assert!(!output.status.success());
    let failed = reconcile(
        &ImageView {
            status: &plan.status,
            ..other
        },
        &observed(finished(&output, &report)),
        &config,
    );
    assert_eq!(failed.status.phase, Some(ImagePhase::Failed));
    let ready = find(&failed.status.conditions, types::READY).expect("a Ready condition");
    assert_eq!(ready.reason, "BadImageChecksum", "{}", ready.message);
    assert!(ready.message.contains("sha256"), "{}", ready.message);
}

#[test]
fn the_planned_uploader_takes_curl_at_the_external_path_and_reports_ready() {
    let cluster = Cluster::start();
    let config = cluster.config();
    let source = DataSource {
        source_type: DataSourceType::Upload,
        http: None,
        container_image: None,
        object_ref: None,
    };
    let status = ImageStatus::default();
    let plan = reconcile(&view(&source, &status), &observed(WorkerState::Absent), &config);
    assert_eq!(plan.status.phase, Some(ImagePhase::WaitForUserUpload));
    let external = plan
        .status
        .image_upload_urls
        .as_ref()
        .and_then(|urls| urls.external.clone())
        .unwrap_or_default();
    let path = external.trim_start_matches("http://upload.example.com").to_string();
    assert_eq!(path, format!("/upload/{}", "Q7".repeat(16)));

    let (secret, pod) = planned(&plan);
    cluster.mount_secret(secret, &cluster.root.join("uploader/secret"));
    let (upload_port, metrics_port) = (free_port(), free_port());
    let (args, report) = cluster.local_args(
        pod,
        "uploader",
        &[("0.0.0.0:8080", upload_port), ("0.0.0.0:8090", metrics_port)],
    );
    let mut child = Command::new(DVCR).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_listener(upload_port, "the uploader");
    wait_for_listener(metrics_port, "the uploader's metrics");

    // Before the upload: the gauges say nothing arrived, the image waits.
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let metrics = run(Command::new(require_tool("curl")).args(["-sf", &metrics_url]));
    let waiting = reconcile(
        &view(&source, &plan.status),
        &observed(WorkerState::Running { metrics: Some(metrics) }),
        &config,
    );
    assert_eq!(waiting.status.phase, Some(ImagePhase::WaitForUserUpload));

    let disk = pseudo_random(2 << 20, 78);
    let image = cluster.root.join("upload.img");
    std::fs::write(&image, &disk).unwrap();
    let answer = run(Command::new(require_tool("curl")).args([
        "-sf",
        "-T",
        &image.display().to_string(),
        &format!("http://127.0.0.1:{upload_port}{path}"),
    ]));
    assert!(answer.contains("source-image-format"), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the uploader did not exit after the upload");
        std::thread::sleep(Duration::from_millis(25));
    };
    let output = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let done = reconcile(
        &view(&source, &waiting.status),
        &observed(finished(&output, &report)),
        &config,
    );
    assert_eq!(done.status.phase, Some(ImagePhase::Ready), "{:?}", done.status.conditions);
    assert_eq!(done.status.size.as_ref().and_then(|size| size.stored_bytes.as_deref()), Some("2097152"));
}

#[test]
fn the_planned_provisioner_writes_the_stored_qcow2_as_the_raw_disk_qemu_img_makes() {
    use dvcr_controller::api::common::{ImageSize, ObjectRefKind, ObjectRefSource};
    use dvcr_controller::api::disk::{DiskPersistentVolumeClaim, DiskPhase};
    use dvcr_controller::reconcile::disk::{self, ClaimState, DiskObserved};
    use dvcr_controller::reconcile::image::SourceImage;

    let cluster = Cluster::start();
    let config = cluster.config();
    // A qcow2 with data and holes, stored as an image the way an import stores it.
    let qcow2 = cluster.root.join("source.qcow2");
    make_qcow2(&qcow2, 48 << 20, &[(5 << 20, 3 << 20, 79), (40 << 20, 1 << 20, 80)], &[]);
    let token = cluster.root.join("import-token");
    std::fs::write(&token, cluster.token(&["repository:cvi/noble:pull,push"])).unwrap();
    let image = format!("{}/cvi/noble:v1", cluster.server.address);
    run(Command::new(DVCR).arg("import").arg(&qcow2).arg(&image).arg("--registry-token-file").arg(&token));

    let disk_spec = VirtualDiskSpec {
        persistent_volume_claim: DiskPersistentVolumeClaim::default(),
        data_source: Some(DataSource {
            source_type: DataSourceType::ObjectRef,
            http: None,
            container_image: None,
            object_ref: Some(ObjectRefSource {
                kind: ObjectRefKind::ClusterVirtualImage,
                name: "noble".into(),
                namespace: None,
            }),
        }),
    };
    let status = VirtualDiskStatus::default();
    let view = disk_view(&disk_spec, &status);
    let source = SourceImage::Ready {
        location: ImageLocation::Registry(image.clone()),
        uid: "noble".into(),
        size: Some(ImageSize {
            unpacked_bytes: Some((48u64 << 20).to_string()),
            ..ImageSize::default()
        }),
        format: Some("qcow2".into()),
        cdrom: Some(false),
    };
    let look = |provisioner: WorkerState, claim: Option<ClaimState>| DiskObserved {
        importer: WorkerState::Absent,
        provisioner,
        claim,
        source: Some(source.clone()),
        wait_for_first_consumer: false,
        now: Timestamp::now(),
        fresh_upload_token: "U".repeat(32),
    };
    let plan = disk::reconcile(&view, &look(WorkerState::Absent, None), &config);
    let (secret, pod) = planned_of(&plan.actions);
    cluster.mount_secret(secret, &cluster.root.join("provisioner/secret"));
    let written = std::fs::read(cluster.run_provisioner(pod, "provisioner")).unwrap();
    let expected = cluster.root.join("expected.raw");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&expected));
    assert!(written == std::fs::read(&expected).unwrap(), "the disk differs from qemu-img's raw");

    let claim = ClaimState {
        phase: Some("Bound".into()),
        requested_bytes: Some(64 << 20),
        capacity_bytes: Some(64 << 20),
        storage_class: None,
        deleting: false,
    };
    let done = disk::reconcile(
        &DiskView {
            status: &plan.status,
            ..view
        },
        &look(WorkerState::Succeeded { report: String::new() }, Some(claim)),
        &config,
    );
    assert_eq!(done.status.phase, Some(DiskPhase::Ready), "{:?}", done.status.conditions);
}

#[test]
fn a_disk_from_a_url_is_imported_into_its_copy_then_provisioned_as_the_raw_disk_qemu_img_makes() {
    use dvcr_controller::api::disk::{DiskPersistentVolumeClaim, DiskPhase};
    use dvcr_controller::reconcile::disk::{self, ClaimState, DiskObserved};

    let cluster = Cluster::start();
    let config = cluster.config();
    // A qcow2 with data and holes, served over HTTP.
    let files = cluster.root.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = files.join("focal.qcow2");
    make_qcow2(&qcow2, 40 << 20, &[(3 << 20, 2 << 20, 81), (37 << 20, 1 << 20, 82)], &[]);
    let web = FileServer::start(&files);

    let disk_spec = VirtualDiskSpec {
        persistent_volume_claim: DiskPersistentVolumeClaim::default(),
        data_source: Some(http_source(web.url("plain", "focal.qcow2"), None)),
    };
    let view = |status| disk_view(&disk_spec, status);
    let look = |importer: WorkerState, claim: Option<ClaimState>, provisioner: WorkerState| DiskObserved {
        importer,
        provisioner,
        claim,
        source: None,
        wait_for_first_consumer: false,
        now: Timestamp::now(),
        fresh_upload_token: "U".repeat(32),
    };

    // The importer stores the URL's image as the disk's copy.
    let status = VirtualDiskStatus::default();
    let plan = disk::reconcile(&view(&status), &look(WorkerState::Absent, None, WorkerState::Absent), &config);
    let (secret, pod) = planned_of(&plan.actions);
    assert_eq!(pod.component, "importer");
    cluster.mount_secret(secret, &cluster.root.join("disk-importer/secret"));
    let (args, report) = cluster.local_args(pod, "disk-importer", &[("0.0.0.0:8090", free_port())]);
    let output = Command::new(DVCR).args(&args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    let copy = format!("vd/vms/root:{UID}");
    let stored = layer_of(&cluster, &copy);
    let source = std::fs::read(&qcow2).unwrap();
    assert!(stored[1024..1024 + source.len()] == source[..], "the copy differs from the source");

    // Its report sizes the PVC: the image's virtual size with the file system's overhead.
    let plan = disk::reconcile(
        &view(&plan.status),
        &look(finished(&output, &report), None, WorkerState::Absent),
        &config,
    );
    let requested = plan.actions.iter().find_map(|action| match action {
        Action::CreateClaim(claim) => {
            let requests = claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref()?;
            requests.get("storage").cloned()
        }
        _ => None,
    });
    assert_eq!(
        requested.map(|quantity| quantity.0),
        Some(VolumeMode::Filesystem.claim_bytes(40 << 20).to_string()),
        "{:?}",
        plan.actions
    );
    let claim = ClaimState {
        phase: Some("Bound".into()),
        requested_bytes: Some(VolumeMode::Filesystem.claim_bytes(40 << 20)),
        capacity_bytes: Some(VolumeMode::Filesystem.claim_bytes(40 << 20)),
        storage_class: None,
        deleting: false,
    };

    // The provisioner, with a pull-only token, writes the copy into the PVC.
    let plan = disk::reconcile(
        &view(&plan.status),
        &look(WorkerState::Absent, Some(claim.clone()), WorkerState::Absent),
        &config,
    );
    let (secret, pod) = planned_of(&plan.actions);
    assert_eq!(pod.component, "provisioner");
    assert_eq!(secret.access[0].actions, vec!["pull"]);
    cluster.mount_secret(secret, &cluster.root.join("disk-provisioner/secret"));
    let written = std::fs::read(cluster.run_provisioner(pod, "disk-provisioner")).unwrap();
    let expected = cluster.root.join("expected.raw");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&expected));
    assert!(written == std::fs::read(&expected).unwrap(), "the disk differs from qemu-img's raw");

    // Ready; the copy is deleted, which the registry does with the controller's token.
    let done = disk::reconcile(
        &view(&plan.status),
        &look(WorkerState::Absent, Some(claim), WorkerState::Succeeded { report: String::new() }),
        &config,
    );
    assert_eq!(done.status.phase, Some(DiskPhase::Ready), "{:?}", done.status.conditions);
    let Some(Action::DeleteImage { repository, tag }) = done.actions.first() else {
        panic!("the copy is not deleted first: {:?}", done.actions);
    };
    let token = cluster.token(&[&format!("repository:{repository}:*")]);
    let status = |method: &str| {
        let output = Command::new(require_tool("curl"))
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Accept: application/vnd.docker.distribution.manifest.v2+json"])
            .arg(cluster.server.url(&format!("/v2/{repository}/manifests/{tag}")))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    assert_eq!(status("DELETE"), "202");
    assert_eq!(status("GET"), "404", "the copy is gone");
}

/// A VirtualImage kept in a PVC: imported into its copy, written into its
/// PVC by the planned provisioner; then a VirtualDisk made from it, whose
/// planned provisioner reads that PVC (raw, for the image's length only:
/// here the image's volume holds more than the image) and writes the disk
/// qemu-img's raw conversion would.
#[test]
fn an_image_kept_in_a_pvc_is_written_there_and_a_disk_is_copied_from_that_pvc() {
    use dvcr_controller::api::common::{ObjectRefKind, ObjectRefSource};
    use dvcr_controller::api::disk::{DiskPersistentVolumeClaim, DiskPhase};
    use dvcr_controller::reconcile::disk::{self, ClaimState, DiskObserved};
    use dvcr_controller::reconcile::image::SourceImage;

    let cluster = Cluster::start();
    let config = cluster.config();
    let files = cluster.root.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = files.join("jammy.qcow2");
    make_qcow2(&qcow2, 24 << 20, &[(0, 1 << 20, 91), (17 << 20, 3 << 20, 92)], &["-c"]);
    let web = FileServer::start(&files);
    let expected = cluster.root.join("expected.raw");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&expected));
    let expected = std::fs::read(&expected).unwrap();

    let source = http_source(web.url("plain", "jammy.qcow2"), None);
    let in_claim = |status| ImageView {
        storage: ImageStorage::PersistentVolumeClaim,
        ..view(&source, status)
    };
    let look = |worker: WorkerState, claim: Option<ClaimState>, provisioner: WorkerState| ImageObserved {
        provisioner,
        claim,
        ..observed(worker)
    };
    let bound = |bytes: u64| ClaimState {
        phase: Some("Bound".into()),
        requested_bytes: Some(bytes),
        capacity_bytes: Some(bytes),
        storage_class: None,
        deleting: false,
    };

    // The importer stores the copy; its report makes the image's PVC.
    let status = ImageStatus::default();
    let plan = reconcile(&in_claim(&status), &look(WorkerState::Absent, None, WorkerState::Absent), &config);
    let (secret, pod) = planned(&plan);
    assert_eq!(pod.component, "importer");
    cluster.mount_secret(secret, &cluster.root.join("image-importer/secret"));
    let (args, report) = cluster.local_args(pod, "image-importer", &[("0.0.0.0:8090", free_port())]);
    let output = Command::new(DVCR).args(&args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    let plan = reconcile(
        &in_claim(&plan.status),
        &look(finished(&output, &report), None, WorkerState::Absent),
        &config,
    );
    assert!(plan.actions.iter().any(|action| matches!(action, Action::CreateClaim(_))), "{:?}", plan.actions);
    let claim = bound(VolumeMode::Filesystem.claim_bytes(24 << 20));

    // The provisioner writes the copy into the image's PVC.
    let plan = reconcile(
        &in_claim(&plan.status),
        &look(WorkerState::Absent, Some(claim.clone()), WorkerState::Absent),
        &config,
    );
    let (secret, pod) = planned(&plan);
    assert_eq!(pod.component, "provisioner");
    cluster.mount_secret(secret, &cluster.root.join("image-provisioner/secret"));
    let image_disk = cluster.run_provisioner(pod, "image-provisioner");
    assert!(std::fs::read(&image_disk).unwrap() == expected, "the image's PVC differs from qemu-img's raw");
    let done = reconcile(
        &in_claim(&plan.status),
        &look(WorkerState::Absent, Some(claim), WorkerState::Succeeded { report: String::new() }),
        &config,
    );
    assert_eq!(done.status.phase, Some(ImagePhase::Ready), "{:?}", done.status.conditions);
    let claim_name = done.status.target.as_ref().and_then(|target| target.persistent_volume_claim_name.clone());
    assert_eq!(claim_name.as_deref(), Some(format!("vi-ubuntu-{UID}").as_str()));

    // Its volume is larger than the image, with something past the image.
    let mut volume = std::fs::OpenOptions::new().append(true).open(&image_disk).unwrap();
    std::io::Write::write_all(&mut volume, &pseudo_random(1 << 20, 93)).unwrap();

    // A disk from it: the provisioner reads that PVC, mounted as the source.
    let disk_spec = VirtualDiskSpec {
        persistent_volume_claim: DiskPersistentVolumeClaim::default(),
        data_source: Some(DataSource {
            source_type: DataSourceType::ObjectRef,
            http: None,
            container_image: None,
            object_ref: Some(ObjectRefSource {
                kind: ObjectRefKind::VirtualImage,
                name: "ubuntu".into(),
                namespace: None,
            }),
        }),
    };
    let disk_status = VirtualDiskStatus::default();
    let source_image = SourceImage::Ready {
        location: ImageLocation::Claim {
            namespace: "vms".into(),
            name: claim_name.unwrap_or_default(),
        },
        uid: UID.into(),
        size: done.status.size.clone(),
        format: done.status.format.clone(),
        cdrom: done.status.cdrom,
    };
    let disk_look = DiskObserved {
        importer: WorkerState::Absent,
        provisioner: WorkerState::Absent,
        claim: None,
        source: Some(source_image),
        wait_for_first_consumer: false,
        now: Timestamp::now(),
        fresh_upload_token: "U".repeat(32),
    };
    let plan = disk::reconcile(&disk_view(&disk_spec, &disk_status), &disk_look, &config);
    let (secret, pod) = planned_of(&plan.actions);
    assert!(secret.access.is_empty(), "reading a PVC needs no registry access");
    cluster.mount_secret(secret, &cluster.root.join("disk-provisioner/secret"));
    let written = cluster.run_provisioner_reading(pod, "disk-provisioner", Some(&image_disk));
    assert!(std::fs::read(&written).unwrap() == expected, "the disk differs from the image");
    let done = disk::reconcile(
        &DiskView {
            status: &plan.status,
            ..disk_view(&disk_spec, &disk_status)
        },
        &DiskObserved {
            provisioner: WorkerState::Succeeded { report: String::new() },
            claim: Some(bound(VolumeMode::Filesystem.claim_bytes(24 << 20))),
            ..disk_look.clone()
        },
        &config,
    );
    assert_eq!(done.status.phase, Some(DiskPhase::Ready), "{:?}", done.status.conditions);

    // A ClusterVirtualImage from it: an importer in the image's namespace
    // reads that PVC and stores the raw disk in the registry.
    let cluster_source = DataSource {
        source_type: DataSourceType::ObjectRef,
        http: None,
        container_image: None,
        object_ref: Some(ObjectRefSource {
            kind: ObjectRefKind::VirtualImage,
            name: "ubuntu".into(),
            namespace: Some("vms".into()),
        }),
    };
    let cluster_status = ImageStatus::default();
    let cluster_view = ImageView {
        kind: ImageKind::ClusterVirtualImage,
        name: "jammy",
        ..view(&cluster_source, &cluster_status)
    };
    let mut cluster_look = observed(WorkerState::Absent);
    cluster_look.source = disk_look.source.clone();
    let plan = reconcile(&cluster_view, &cluster_look, &config);
    let (secret, pod) = planned(&plan);
    assert_eq!((pod.component, pod.key.namespace.as_str()), ("importer", "vms"));
    cluster.mount_secret(secret, &cluster.root.join("cluster-importer/secret"));
    let (mut args, report) = cluster.local_args(pod, "cluster-importer", &[("0.0.0.0:8090", free_port())]);
    for arg in args.iter_mut().filter(|arg| *arg == "/source/disk.img") {
        *arg = image_disk.display().to_string();
    }
    let output = Command::new(DVCR).args(&args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    let stored = layer_of(&cluster, &format!("cvi/jammy:{UID}"));
    assert!(stored[1024..1024 + expected.len()] == expected[..], "the stored disk differs from the image");
    assert_eq!(stored.len(), 1024 + expected.len() + 1024, "one disk of the image's length, then the tar's end");
    cluster_look.worker = finished(&output, &report);
    let done = reconcile(&ImageView { status: &plan.status, ..cluster_view }, &cluster_look, &config);
    assert_eq!(done.status.phase, Some(ImagePhase::Ready), "{:?}", done.status.conditions);
    assert_eq!(done.status.format.as_deref(), Some("raw"));
}
