//! The Kubernetes objects the controller creates for an import: the
//! importer or uploader Pod, the Secret it mounts, and an uploader's Service
//! and Ingress. Built here, without I/O, so that their shapes are tested.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeDevice, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend, IngressSpec,
    IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use crate::api::common::{GROUP, VERSION};
use crate::import::MountedFiles;

/// Port of the importer's and uploader's progress gauges.
pub const METRICS_PORT: i32 = 8090;
/// Port the uploader takes uploads on.
pub const UPLOAD_PORT: i32 = 8080;
/// Where a worker Pod mounts its Secret.
pub const SECRET_MOUNT: &str = "/var/run/dvcr";
/// Where a worker Pod unpacks compressed sources.
pub const SCRATCH_MOUNT: &str = "/scratch";
/// Label naming the resource a worker belongs to.
pub const OWNER_UID_LABEL: &str = "virtualization.deckhouse.io/owner-uid";
/// Label naming what a worker does (`importer`, `uploader`, `provisioner`).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label marking objects this controller manages.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "dvcr-controller";

/// Keys of a worker's Secret, also the names of the files mounted from it.
pub mod keys {
    /// The scoped registry token.
    pub const TOKEN: &str = "registry-token";
    /// The registry's CA certificates.
    pub const REGISTRY_CA: &str = "registry-ca.crt";
    /// The source's CA certificates (`caBundle`).
    pub const SOURCE_CA: &str = "source-ca.crt";
    /// The source registry's credentials (a dockerconfigjson).
    pub const AUTH: &str = "auth.json";
}

/// Settings of the workers the controller starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The registry's host (and port), `dvcr.d8-virtualization.svc`.
    pub registry_host: String,
    /// PEM CA certificates of the registry, mounted into every worker.
    pub registry_ca_bundle: Option<String>,
    /// Speak plain HTTP to the registry (test clusters only).
    pub registry_plain_http: bool,
    /// The image holding the `dvcr` binary.
    pub dvcr_image: String,
    /// The controller's namespace, where workers of cluster-wide resources run.
    pub controller_namespace: String,
    /// Where uploads are reachable from outside the cluster.
    pub upload_ingress: Option<UploadIngress>,
    /// How long an uploader waits for an upload, in seconds.
    pub upload_timeout_seconds: u64,
    /// The volume mode of disks' PVCs.
    pub disk_volume_mode: VolumeMode,
}

/// How a disk's PVC holds the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMode {
    /// A file system with `disk.img` (raw) at its root, as KubeVirt reads it.
    Filesystem,
    /// A raw block device.
    Block,
}

/// KubeVirt's default file-system overhead of a PVC disk (5.5%): a
/// `Filesystem` PVC must be this much larger than the disk it holds.
const FILESYSTEM_OVERHEAD_PER_MILLE: u64 = 55;

impl VolumeMode {
    /// The PVC size that holds a disk of `disk_bytes`, rounded up to MiB.
    pub fn claim_bytes(self, disk_bytes: u64) -> u64 {
        let needed = match self {
            VolumeMode::Block => disk_bytes,
            VolumeMode::Filesystem => {
                let needed =
                    (u128::from(disk_bytes) * 1000).div_ceil(u128::from(1000 - FILESYSTEM_OVERHEAD_PER_MILLE));
                u64::try_from(needed).unwrap_or(u64::MAX)
            }
        };
        needed.div_ceil(1 << 20).saturating_mul(1 << 20)
    }

    /// Where the provisioner writes the disk.
    pub fn provisioner_target(self) -> &'static str {
        match self {
            VolumeMode::Block => DISK_DEVICE,
            VolumeMode::Filesystem => "/disk/disk.img",
        }
    }
}

/// The device path of a `Block` disk in the provisioner.
pub const DISK_DEVICE: &str = "/dev/dvcr-disk";
/// The device path of a `Block` source PVC (an image kept in a PVC) in the
/// provisioner.
pub const SOURCE_DEVICE: &str = "/dev/dvcr-source";

/// The Ingress settings of uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadIngress {
    /// The public host name.
    pub host: String,
    /// The IngressClass; the cluster's default when empty.
    pub class_name: Option<String>,
    /// A TLS Secret for the host, in every namespace uploads run in; the
    /// external URL is `https://` when set.
    pub tls_secret_name: Option<String>,
}

impl UploadIngress {
    /// The external URL of an upload with `token`.
    pub fn url(&self, token: &str) -> String {
        let scheme = if self.tls_secret_name.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/upload/{token}", self.host)
    }
}

/// The resource a worker belongs to: named in its owner reference, so that
/// Kubernetes deletes the worker with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `VirtualImage`, `ClusterVirtualImage`, `VirtualDisk`.
    pub kind: &'static str,
    /// The resource's name.
    pub name: String,
    /// The resource's UID.
    pub uid: String,
}

impl Owner {
    /// The owner reference (controller, blocking the owner's deletion).
    pub fn reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: self.kind.to_string(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// Metadata of a worker object of this owner.
    fn metadata(&self, name: String, namespace: &str, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some(labels(&self.uid, component)),
            owner_references: Some(vec![self.reference()]),
            ..ObjectMeta::default()
        }
    }
}

fn labels(uid: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (COMPONENT_LABEL.to_string(), component.to_string()),
        (OWNER_UID_LABEL.to_string(), uid.to_string()),
    ])
}

/// Name of the importer Pod of the resource `uid`.
pub fn importer_name(uid: &str) -> String {
    format!("dvcr-importer-{uid}")
}

/// Name of the uploader Pod, Service and Ingress of the resource `uid`.
pub fn uploader_name(uid: &str) -> String {
    format!("dvcr-uploader-{uid}")
}

/// Name of the Secret of the resource `uid`'s worker.
pub fn worker_secret_name(uid: &str) -> String {
    format!("dvcr-worker-{uid}")
}

/// A Secret by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What a registry token must allow on one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryAccess {
    /// The repository, `vi/<ns>/<name>`.
    pub repository: String,
    /// `pull`, `push`.
    pub actions: Vec<&'static str>,
}

/// The Secret a worker mounts. Its token is minted, and the pull secret
/// read, by the I/O layer when it creates the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSecret {
    /// Name and namespace of the Secret.
    pub key: SecretKey,
    /// Its owner.
    pub owner: Owner,
    /// What the token allows.
    pub access: Vec<RepositoryAccess>,
    /// The source's CA certificates (PEM).
    pub source_ca_bundle: Option<Vec<u8>>,
    /// A dockerconfigjson Secret whose `.dockerconfigjson` becomes `auth.json`.
    pub pull_secret: Option<SecretKey>,
    /// The registry's CA certificates (PEM).
    pub registry_ca_bundle: Option<String>,
}

impl WorkerSecret {
    /// The files a worker finds under [`SECRET_MOUNT`].
    pub fn mounted_files(&self) -> MountedFiles {
        let path = |key: &str| format!("{SECRET_MOUNT}/{key}");
        MountedFiles {
            source_ca_bundle: self.source_ca_bundle.as_ref().map(|_| path(keys::SOURCE_CA)),
            auth_file: self.pull_secret.as_ref().map(|_| path(keys::AUTH)),
            registry_token_file: Some(path(keys::TOKEN)),
            registry_ca_bundle: self.registry_ca_bundle.as_ref().map(|_| path(keys::REGISTRY_CA)),
        }
    }

    /// The Secret, once the token is minted and the pull secret's
    /// dockerconfigjson read.
    pub fn secret(&self, token: &str, docker_config: Option<Vec<u8>>) -> Secret {
        let mut data = BTreeMap::from([(keys::TOKEN.to_string(), ByteString(token.as_bytes().to_vec()))]);
        if let Some(ca) = &self.source_ca_bundle {
            data.insert(keys::SOURCE_CA.to_string(), ByteString(ca.clone()));
        }
        if let Some(ca) = &self.registry_ca_bundle {
            data.insert(keys::REGISTRY_CA.to_string(), ByteString(ca.as_bytes().to_vec()));
        }
        if let Some(config) = docker_config {
            data.insert(keys::AUTH.to_string(), ByteString(config));
        }
        Secret {
            metadata: self
                .owner
                .metadata(self.key.name.clone(), &self.key.namespace, "worker-secret"),
            data: Some(data),
            type_: Some("Opaque".to_string()),
            ..Secret::default()
        }
    }
}

/// A disk PVC a worker writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskVolume {
    /// The PVC.
    pub claim_name: String,
    /// Its volume mode.
    pub mode: VolumeMode,
}

/// A worker Pod to create: the `dvcr` arguments and where it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerPod {
    /// Name and namespace.
    pub key: SecretKey,
    /// `importer` or `uploader`.
    pub component: &'static str,
    /// The owner.
    pub owner: Owner,
    /// Arguments of `dvcr`.
    pub args: Vec<String>,
    /// The Secret to mount.
    pub secret_name: String,
    /// The disk a provisioner writes.
    pub disk: Option<DiskVolume>,
    /// The PVC a provisioner reads, read-only (an image kept in a PVC).
    pub source_disk: Option<DiskVolume>,
}

fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            ..Capabilities::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..SecurityContext::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: number,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

impl WorkerPod {
    /// The Pod: one container running `dvcr`, restricted (non-root, no
    /// capabilities, read-only root), never restarted (a failed import is
    /// reported, not retried blindly), with a scratch `emptyDir` and the
    /// Secret mounted read-only.
    pub fn pod(&self, config: &WorkerConfig) -> Pod {
        let mut ports = vec![port("metrics", METRICS_PORT)];
        let mut readiness_probe = None;
        if self.component == "uploader" {
            ports.push(port("upload", UPLOAD_PORT));
            readiness_probe = Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/upload".to_string()),
                    port: IntOrString::Int(UPLOAD_PORT),
                    ..HTTPGetAction::default()
                }),
                period_seconds: Some(2),
                ..Probe::default()
            });
        }
        let container = Container {
            name: self.component.to_string(),
            image: Some(config.dvcr_image.clone()),
            args: Some(self.args.clone()),
            ports: Some(ports),
            readiness_probe,
            // A provisioner (`dvcr convert`) writes no report: its last log
            // lines say why it failed.
            termination_message_policy: Some(
                if self.disk.is_some() { "FallbackToLogsOnError" } else { "File" }.to_string(),
            ),
            security_context: Some(restricted_security_context()),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("200m".to_string())),
                    ("memory".to_string(), Quantity("128Mi".to_string())),
                ])),
                limits: Some(BTreeMap::from([("memory".to_string(), Quantity("1Gi".to_string()))])),
                ..ResourceRequirements::default()
            }),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "worker".to_string(),
                    mount_path: SECRET_MOUNT.to_string(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "scratch".to_string(),
                    mount_path: SCRATCH_MOUNT.to_string(),
                    ..VolumeMount::default()
                },
            ]),
            ..Container::default()
        };
        let mut pod = Pod {
            metadata: self
                .owner
                .metadata(self.key.name.clone(), &self.key.namespace, self.component),
            spec: Some(PodSpec {
                containers: vec![container],
                restart_policy: Some("Never".to_string()),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(64535),
                    run_as_group: Some(64535),
                    fs_group: Some(64535),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".to_string(),
                        ..SeccompProfile::default()
                    }),
                    ..PodSecurityContext::default()
                }),
                volumes: Some(vec![
                    Volume {
                        name: "worker".to_string(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(self.secret_name.clone()),
                            default_mode: Some(0o440),
                            ..SecretVolumeSource::default()
                        }),
                        ..Volume::default()
                    },
                    Volume {
                        name: "scratch".to_string(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    },
                ]),
                ..PodSpec::default()
            }),
            status: None,
        };
        if let Some(spec) = pod.spec.as_mut() {
            let attached = [
                ("disk", &self.disk, "/disk", DISK_DEVICE, false),
                ("source", &self.source_disk, "/source", SOURCE_DEVICE, true),
            ];
            for (name, volume, mount_path, device_path, read_only) in attached {
                let Some(volume) = volume else { continue };
                spec.volumes.get_or_insert_with(Vec::new).push(Volume {
                    name: name.to_string(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: volume.claim_name.clone(),
                        read_only: Some(read_only),
                    }),
                    ..Volume::default()
                });
                let Some(container) = spec.containers.first_mut() else { continue };
                match volume.mode {
                    VolumeMode::Block => container.volume_devices.get_or_insert_with(Vec::new).push(VolumeDevice {
                        name: name.to_string(),
                        device_path: device_path.to_string(),
                    }),
                    VolumeMode::Filesystem => container.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
                        name: name.to_string(),
                        mount_path: mount_path.to_string(),
                        read_only: read_only.then_some(true),
                        ..VolumeMount::default()
                    }),
                }
            }
        }
        pod
    }
}

/// Name of a disk's PVC: `vd-<name>-<uid>`, or `vd-<uid>` for long names.
pub fn disk_claim_name(name: &str, uid: &str) -> String {
    claim_name("vd", name, uid)
}

/// Name of the PVC of a VirtualImage kept in a PVC: `vi-<name>-<uid>`, or
/// `vi-<uid>` for long names.
pub fn image_claim_name(name: &str, uid: &str) -> String {
    claim_name("vi", name, uid)
}

fn claim_name(prefix: &str, name: &str, uid: &str) -> String {
    let full = format!("{prefix}-{name}-{uid}");
    if full.len() <= 253 {
        full
    } else {
        format!("{prefix}-{uid}")
    }
}

/// Name of the PVC `owner` fills: a VirtualImage's, or a disk's.
pub fn claim_name_of(owner: &Owner) -> String {
    match owner.kind {
        "VirtualImage" => image_claim_name(&owner.name, &owner.uid),
        _ => disk_claim_name(&owner.name, &owner.uid),
    }
}

/// Name of a disk's provisioner Pod.
pub fn provisioner_name(uid: &str) -> String {
    format!("dvcr-provisioner-{uid}")
}

/// The PVC `owner` (a disk, or an image kept in a PVC) fills:
/// `ReadWriteOnce`, `bytes` requested, owned by it.
pub fn claim_of(
    owner: &Owner,
    namespace: &str,
    bytes: u64,
    storage_class: Option<&str>,
    mode: VolumeMode,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        // Owned like every worker object: deleting the VirtualDisk (or
        // VirtualImage) deletes the PVC.
        metadata: owner.metadata(claim_name_of(owner), namespace, "disk"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            volume_mode: Some(
                match mode {
                    VolumeMode::Block => "Block",
                    VolumeMode::Filesystem => "Filesystem",
                }
                .to_string(),
            ),
            storage_class_name: storage_class.map(str::to_string),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), Quantity(bytes.to_string()))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// The uploader's Service: port 80 to the Pod's upload port.
pub fn uploader_service(owner: &Owner, namespace: &str) -> Service {
    let name = uploader_name(&owner.uid);
    Service {
        metadata: owner.metadata(name, namespace, "uploader"),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([
                (COMPONENT_LABEL.to_string(), "uploader".to_string()),
                (OWNER_UID_LABEL.to_string(), owner.uid.clone()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("upload".to_string()),
                port: 80,
                target_port: Some(IntOrString::Int(UPLOAD_PORT)),
                protocol: Some("TCP".to_string()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The in-cluster URL of an uploader.
pub fn uploader_in_cluster_url(owner_uid: &str, namespace: &str) -> String {
    format!("http://{}.{namespace}.svc/upload", uploader_name(owner_uid))
}

/// The uploader's Ingress: exactly `/upload/<token>` on the public host to
/// the Service. The uploader answers on that path itself, so no
/// controller-specific rewrite annotation is needed.
pub fn uploader_ingress(owner: &Owner, namespace: &str, ingress: &UploadIngress, token: &str) -> Ingress {
    let name = uploader_name(&owner.uid);
    let mut metadata = owner.metadata(name.clone(), namespace, "uploader");
    // Images are large: let the Ingress pass bodies of any size, streamed.
    metadata.annotations = Some(BTreeMap::from([
        ("nginx.ingress.kubernetes.io/proxy-body-size".to_string(), "0".to_string()),
        ("nginx.ingress.kubernetes.io/proxy-request-buffering".to_string(), "off".to_string()),
    ]));
    Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: ingress.class_name.clone(),
            tls: ingress.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: Some(vec![ingress.host.clone()]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            rules: Some(vec![IngressRule {
                host: Some(ingress.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some(format!("/upload/{token}")),
                        path_type: "Exact".to_string(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name,
                                port: Some(ServiceBackendPort {
                                    number: Some(80),
                                    ..ServiceBackendPort::default()
                                }),
                            }),
                            ..IngressBackend::default()
                        },
                    }],
                }),
            }]),
            ..IngressSpec::default()
        }),
        status: None,
    }
}

/// The settings unit tests share.
#[cfg(test)]
pub(crate) fn test_config(disk_volume_mode: VolumeMode) -> WorkerConfig {
    WorkerConfig {
        registry_host: "dvcr.dvcr.svc".into(),
        registry_ca_bundle: Some("REGISTRY CA".into()),
        registry_plain_http: false,
        dvcr_image: "registry.example/dvcr:1.0".into(),
        controller_namespace: "dvcr".into(),
        upload_ingress: None,
        upload_timeout_seconds: 900,
        disk_volume_mode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_hold_the_disk_with_kubevirts_file_system_overhead() {
        let ten_gib = 10u64 << 30;
        assert_eq!(VolumeMode::Block.claim_bytes(ten_gib), ten_gib);
        let filesystem = VolumeMode::Filesystem.claim_bytes(ten_gib);
        assert_eq!(filesystem % (1 << 20), 0, "whole MiB");
        assert!(filesystem as f64 * 0.945 >= ten_gib as f64, "{filesystem}");
        assert!(filesystem < ten_gib + (ten_gib / 1000) * 60, "{filesystem}");
        assert_eq!(VolumeMode::Block.claim_bytes(1), 1 << 20);
        assert_eq!(VolumeMode::Filesystem.claim_bytes(u64::MAX), u64::MAX, "no wrap-around");
    }

    fn config() -> WorkerConfig {
        test_config(VolumeMode::Filesystem)
    }

    fn owner() -> Owner {
        Owner {
            kind: "VirtualImage",
            name: "ubuntu".into(),
            uid: "0b5c7e0e-1111-2222-3333-444455556666".into(),
        }
    }

    #[test]
    fn worker_pods_are_restricted_owned_and_mount_their_secret() {
        let worker = WorkerPod {
            key: SecretKey {
                namespace: "vms".into(),
                name: importer_name(&owner().uid),
            },
            component: "importer",
            owner: owner(),
            args: vec!["import".into()],
            secret_name: worker_secret_name(&owner().uid),
            disk: None,
            source_disk: None,
        };
        let pod = serde_json::to_value(worker.pod(&config())).unwrap_or_default();
        assert_eq!(pod["metadata"]["name"], "dvcr-importer-0b5c7e0e-1111-2222-3333-444455556666");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "VirtualImage");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(pod["metadata"]["labels"][OWNER_UID_LABEL], owner().uid);
        assert_eq!(pod["spec"]["restartPolicy"], "Never");
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["image"], "registry.example/dvcr:1.0");
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(container["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(container["volumeMounts"][0]["mountPath"], SECRET_MOUNT);
        assert_eq!(
            pod["spec"]["volumes"][0]["secret"]["secretName"],
            "dvcr-worker-0b5c7e0e-1111-2222-3333-444455556666"
        );
        assert!(container["readinessProbe"].is_null(), "an importer has nothing to probe");
    }

    #[test]
    fn uploaders_get_a_probe_a_service_and_an_exact_path_ingress() {
        let worker = WorkerPod {
            key: SecretKey {
                namespace: "vms".into(),
                name: uploader_name(&owner().uid),
            },
            component: "uploader",
            owner: owner(),
            args: vec!["upload-server".into()],
            secret_name: worker_secret_name(&owner().uid),
            disk: None,
            source_disk: None,
        };
        let pod = serde_json::to_value(worker.pod(&config())).unwrap_or_default();
        assert_eq!(pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"], "/upload");
        let service = serde_json::to_value(uploader_service(&owner(), "vms")).unwrap_or_default();
        assert_eq!(service["spec"]["selector"][COMPONENT_LABEL], "uploader");
        assert_eq!(service["spec"]["ports"][0]["targetPort"], UPLOAD_PORT);
        let public = UploadIngress {
            host: "upload.example.com".into(),
            class_name: Some("nginx".into()),
            tls_secret_name: Some("upload-tls".into()),
        };
        let token = "a".repeat(32);
        let ingress = serde_json::to_value(uploader_ingress(&owner(), "vms", &public, &token)).unwrap_or_default();
        let path = &ingress["spec"]["rules"][0]["http"]["paths"][0];
        assert_eq!(path["path"], format!("/upload/{token}"));
        assert_eq!(path["pathType"], "Exact");
        assert_eq!(path["backend"]["service"]["name"], uploader_name(&owner().uid));
        assert_eq!(ingress["spec"]["tls"][0]["secretName"], "upload-tls");
        assert_eq!(public.url(&token), format!("https://upload.example.com/upload/{token}"));
        assert_eq!(
            uploader_in_cluster_url(&owner().uid, "vms"),
            "http://dvcr-uploader-0b5c7e0e-1111-2222-3333-444455556666.vms.svc/upload"
        );
    }

    #[test]
    fn the_worker_secret_holds_only_what_was_asked_and_names_the_mounted_files() {
        let mut plan = WorkerSecret {
            key: SecretKey {
                namespace: "vms".into(),
                name: worker_secret_name(&owner().uid),
            },
            owner: owner(),
            access: vec![RepositoryAccess {
                repository: "vi/vms/ubuntu".into(),
                actions: vec!["pull", "push"],
            }],
            source_ca_bundle: None,
            pull_secret: None,
            registry_ca_bundle: None,
        };
        let files = plan.mounted_files();
        assert_eq!(files.registry_token_file.as_deref(), Some("/var/run/dvcr/registry-token"));
        assert_eq!((files.source_ca_bundle, files.auth_file, files.registry_ca_bundle), (None, None, None));
        let secret = plan.secret("TOKEN", None);
        let data = secret.data.unwrap_or_default();
        assert_eq!(data.keys().collect::<Vec<_>>(), vec![keys::TOKEN]);

        plan.source_ca_bundle = Some(b"SOURCE CA".to_vec());
        plan.registry_ca_bundle = Some("REGISTRY CA".into());
        plan.pull_secret = Some(SecretKey {
            namespace: "vms".into(),
            name: "pull".into(),
        });
        let files = plan.mounted_files();
        assert_eq!(files.auth_file.as_deref(), Some("/var/run/dvcr/auth.json"));
        assert_eq!(files.source_ca_bundle.as_deref(), Some("/var/run/dvcr/source-ca.crt"));
        let data = plan.secret("TOKEN", Some(b"{}".to_vec())).data.unwrap_or_default();
        assert_eq!(data.get(keys::AUTH).map(|value| value.0.clone()), Some(b"{}".to_vec()));
        assert_eq!(data.get(keys::SOURCE_CA).map(|value| value.0.clone()), Some(b"SOURCE CA".to_vec()));
        assert_eq!(data.get(keys::REGISTRY_CA).map(|value| value.0.clone()), Some(b"REGISTRY CA".to_vec()));
    }
}
