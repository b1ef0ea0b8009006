use super::*;
use crate::reconcile::provision::ImageLocation;

const UID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

fn spec(yaml: &str) -> VirtualMachineSpec {
    serde_norway::from_str(yaml).unwrap_or_else(|error| panic!("the test spec does not parse: {error}"))
}

fn expected(yaml: &str) -> Value {
    serde_norway::from_str(yaml).unwrap_or_else(|error| panic!("the expected YAML does not parse: {error}"))
}

/// The metadata and runStrategy every shape shares, around `template`.
fn machine(name: &str, run_strategy: &str, template_spec: &str) -> Value {
    let indented: String = template_spec.lines().map(|line| format!("      {line}\n")).collect();
    expected(&format!(
        "apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: vms
  labels:
    virtualization.deckhouse.io/virtual-machine: {name}
  ownerReferences:
    - apiVersion: virtualization.deckhouse.io/v1alpha2
      kind: VirtualMachine
      name: {name}
      uid: {UID}
      controller: true
      blockOwnerDeletion: true
spec:
  runStrategy: {run_strategy}
  template:
    metadata:
      labels:
        virtualization.deckhouse.io/virtual-machine: {name}
    spec:
{indented}"
    ))
}

fn assert_same(actual: &Value, expected: &Value) {
    let mut expected = expected.clone();
    expected["metadata"]["annotations"] = json!({SPEC_HASH_ANNOTATION: spec_hash(&expected["spec"])});
    let expected = &expected;
    assert!(
        actual == expected,
        "rendered:\n{}\nexpected:\n{}",
        serde_norway::to_string(actual).unwrap_or_default(),
        serde_norway::to_string(expected).unwrap_or_default()
    );
}

#[test]
fn a_container_disk_machine_with_inline_cloud_init() {
    let machine_spec = spec(
        "runPolicy: AlwaysOnUnlessStoppedManually
cpu: {cores: 2, coreFraction: 25%}
memory: {size: 4Gi}
blockDeviceRefs:
  - {kind: VirtualImage, name: noble}
provisioning:
  type: UserData
  userData: |
    #cloud-config
    users: [{name: cloud}]
",
    );
    let devices = [ResolvedDevice::Image {
        location: ImageLocation::Registry("dvcr.dvcr.svc/vi/vms/noble:u1".into()),
        cdrom: false,
    }];
    let rendered = virtual_machine("web", "vms", UID, &machine_spec, &devices).unwrap_or_default();
    let want = machine(
        "web",
        "Always",
        "domain:
  cpu: {cores: 2, sockets: 1, threads: 1}
  memory: {guest: 4Gi}
  resources:
    requests: {cpu: 500m, memory: 4Gi}
    limits: {cpu: '2', memory: 4Gi}
  firmware:
    bootloader: {bios: {}}
  devices:
    disks:
      - {name: vi-noble, bootOrder: 1, disk: {bus: virtio}}
      - {name: cloudinit, disk: {bus: virtio}}
    interfaces:
      - {name: default, masquerade: {}, model: virtio}
networks:
  - {name: default, pod: {}}
volumes:
  - name: vi-noble
    containerDisk: {image: dvcr.dvcr.svc/vi/vms/noble:u1, imagePullPolicy: IfNotPresent}
  - name: cloudinit
    cloudInitNoCloud:
      userData: |
        #cloud-config
        users: [{name: cloud}]
",
    );
    assert_same(&rendered, &want);
}

#[test]
fn an_iso_is_a_sata_cdrom_after_the_pvc_disk_it_installs_onto() {
    let machine_spec = spec(
        "runPolicy: Manual
cpu: {cores: 4}
memory: {size: 8Gi}
bootloader: EFIWithSecureBoot
osType: Windows
enableParavirtualization: false
terminationGracePeriodSeconds: 300
nodeSelector: {kubernetes.io/arch: amd64}
blockDeviceRefs:
  - {kind: VirtualDisk, name: system}
  - {kind: ClusterVirtualImage, name: windows-2022}
provisioning:
  type: UserDataRef
  userDataRef: {kind: Secret, name: unattend}
",
    );
    let devices = [
        ResolvedDevice::Disk {
            claim_name: "vd-system-pvc".into(),
        },
        ResolvedDevice::Image {
            location: ImageLocation::Registry("dvcr.dvcr.svc/cvi/windows-2022:u2".into()),
            cdrom: true,
        },
    ];
    let rendered = virtual_machine("win", "vms", UID, &machine_spec, &devices).unwrap_or_default();
    let want = machine(
        "win",
        "Manual",
        "domain:
  cpu: {cores: 4, sockets: 1, threads: 1}
  memory: {guest: 8Gi}
  resources:
    requests: {cpu: 4000m, memory: 8Gi}
    limits: {cpu: '4', memory: 8Gi}
  firmware:
    bootloader: {efi: {secureBoot: true}}
  features:
    smm: {enabled: true}
    hyperv: {relaxed: {}, vapic: {}, spinlocks: {spinlocks: 8191}}
  clock: {utc: {}, timer: {hyperv: {}}}
  devices:
    disks:
      - {name: vd-system, bootOrder: 1, disk: {bus: sata}}
      - {name: cvi-windows-2022, bootOrder: 2, cdrom: {bus: sata}}
      - {name: cloudinit, disk: {bus: sata}}
    interfaces:
      - {name: default, masquerade: {}, model: e1000}
networks:
  - {name: default, pod: {}}
volumes:
  - name: vd-system
    persistentVolumeClaim: {claimName: vd-system-pvc}
  - name: cvi-windows-2022
    containerDisk: {image: dvcr.dvcr.svc/cvi/windows-2022:u2, imagePullPolicy: IfNotPresent}
  - name: cloudinit
    cloudInitNoCloud:
      userDataSecretRef: {name: unattend}
terminationGracePeriodSeconds: 300
nodeSelector: {kubernetes.io/arch: amd64}
",
    );
    assert_same(&rendered, &want);
}

#[test]
fn a_plain_pvc_machine_without_cloud_init() {
    let machine_spec = spec(
        "runPolicy: AlwaysOn
cpu: {cores: 1, coreFraction: 5%}
memory: {size: 512Mi}
bootloader: EFI
blockDeviceRefs:
  - {kind: VirtualDisk, name: root}
",
    );
    let devices = [ResolvedDevice::Disk {
        claim_name: "root-pvc".into(),
    }];
    let rendered = virtual_machine("db", "vms", UID, &machine_spec, &devices).unwrap_or_default();
    let want = machine(
        "db",
        "Manual",
        "domain:
  cpu: {cores: 1, sockets: 1, threads: 1}
  memory: {guest: 512Mi}
  resources:
    requests: {cpu: 50m, memory: 512Mi}
    limits: {cpu: '1', memory: 512Mi}
  firmware:
    bootloader: {efi: {secureBoot: false}}
  devices:
    disks:
      - {name: vd-root, bootOrder: 1, disk: {bus: virtio}}
    interfaces:
      - {name: default, masquerade: {}, model: virtio}
networks:
  - {name: default, pod: {}}
volumes:
  - name: vd-root
    persistentVolumeClaim: {claimName: root-pvc}
",
    );
    assert_same(&rendered, &want);
}

/// An image kept in a PVC boots as an `ephemeral` volume: the PVC is
/// shared read-only and the machine's writes go to an overlay, as over a
/// containerDisk; an ISO in a PVC is a CD-ROM.
#[test]
fn images_kept_in_pvcs_are_ephemeral_volumes() {
    let machine_spec = spec(
        "runPolicy: AlwaysOnUnlessStoppedManually
cpu: {cores: 1}
memory: {size: 1Gi}
enableParavirtualization: true
blockDeviceRefs:
  - {kind: VirtualImage, name: noble}
  - {kind: VirtualImage, name: installer}
",
    );
    let in_claim = |name: &str, cdrom| ResolvedDevice::Image {
        location: ImageLocation::Claim {
            namespace: "vms".into(),
            name: name.into(),
        },
        cdrom,
    };
    let devices = [in_claim("vi-noble-u1", false), in_claim("vi-installer-u2", true)];
    let rendered = virtual_machine("pvc", "vms", UID, &machine_spec, &devices).unwrap_or_default();
    let want = machine(
        "pvc",
        "Always",
        "domain:
  cpu: {cores: 1, sockets: 1, threads: 1}
  memory: {guest: 1Gi}
  resources:
    requests: {cpu: 1000m, memory: 1Gi}
    limits: {cpu: '1', memory: 1Gi}
  firmware:
    bootloader: {bios: {}}
  devices:
    disks:
      - {name: vi-noble, bootOrder: 1, disk: {bus: virtio}}
      - {name: vi-installer, bootOrder: 2, cdrom: {bus: sata}}
    interfaces:
      - {name: default, masquerade: {}, model: virtio}
networks:
  - {name: default, pod: {}}
volumes:
  - name: vi-noble
    ephemeral: {persistentVolumeClaim: {claimName: vi-noble-u1, readOnly: true}}
  - name: vi-installer
    ephemeral: {persistentVolumeClaim: {claimName: vi-installer-u2, readOnly: true}}
",
    );
    assert_same(&rendered, &want);
    let foreign = [ResolvedDevice::Image {
        location: ImageLocation::Claim {
            namespace: "other".into(),
            name: "vi-noble-u1".into(),
        },
        cdrom: false,
    }];
    let one = spec("cpu: {cores: 1}\nmemory: {size: 1Gi}\nblockDeviceRefs: [{kind: VirtualImage, name: noble}]\n");
    assert_eq!(
        virtual_machine("x", "vms", UID, &one, &foreign),
        Err(MachineSpecError::ForeignClaim("VirtualImage noble".into()))
    );
}

#[test]
fn bad_specs_are_refused_with_what_to_fix() {
    let base = "cpu: {cores: 2, coreFraction: 150%}\nmemory: {size: 1Gi}\n";
    assert_eq!(
        virtual_machine("x", "vms", UID, &spec(base), &[]),
        Err(MachineSpecError::CoreFraction("150%".into()))
    );
    assert_eq!(cpu_request(0, "100%"), Err(MachineSpecError::Cores(0)));
    assert_eq!(cpu_request(3, "abc"), Err(MachineSpecError::CoreFraction("abc".into())));
    assert_eq!(cpu_request(3, "10%").as_deref(), Ok("300m"));
    let twice = spec(
        "cpu: {cores: 1}\nmemory: {size: 1Gi}\n\
         blockDeviceRefs: [{kind: VirtualDisk, name: a}, {kind: VirtualDisk, name: a}]\n",
    );
    let disk = ResolvedDevice::Disk { claim_name: "a".into() };
    assert_eq!(
        virtual_machine("x", "vms", UID, &twice, &[disk.clone(), disk.clone()]),
        Err(MachineSpecError::DuplicateDevice("VirtualDisk a".into()))
    );
    assert_eq!(
        virtual_machine("x", "vms", UID, &twice, &[disk]),
        Err(MachineSpecError::DeviceCount(2, 1))
    );
    let missing = spec("cpu: {cores: 1}\nmemory: {size: 1Gi}\nprovisioning: {type: UserDataRef}\n");
    assert_eq!(
        virtual_machine("x", "vms", UID, &missing, &[]),
        Err(MachineSpecError::MissingProvisioning("UserDataRef", "userDataRef"))
    );
}

#[test]
fn long_or_dotted_names_become_hashed_volume_names() {
    assert_eq!(volume_name(BlockDeviceKind::VirtualDisk, "root"), "vd-root");
    let long = "a".repeat(70);
    let hashed = volume_name(BlockDeviceKind::VirtualImage, &long);
    assert_eq!(hashed.len(), 3 + 16);
    assert_ne!(hashed, volume_name(BlockDeviceKind::VirtualImage, &"a".repeat(71)));
    assert!(volume_name(BlockDeviceKind::ClusterVirtualImage, "ubuntu.24.04").starts_with("cvi-"));
    assert!(!volume_name(BlockDeviceKind::ClusterVirtualImage, "ubuntu.24.04").contains('.'));
}

#[test]
fn run_policies_map_to_run_strategies_and_power_actions() {
    assert_eq!(run_strategy(RunPolicy::AlwaysOnUnlessStoppedManually), "Always");
    for policy in [RunPolicy::AlwaysOn, RunPolicy::AlwaysOff, RunPolicy::Manual] {
        assert_eq!(run_strategy(policy), "Manual");
    }
    assert_eq!(power_action(RunPolicy::AlwaysOn, MachinePhase::Stopped), Some(PowerAction::Start));
    assert_eq!(power_action(RunPolicy::AlwaysOn, MachinePhase::Running), None);
    assert_eq!(power_action(RunPolicy::AlwaysOff, MachinePhase::Running), Some(PowerAction::Stop));
    assert_eq!(power_action(RunPolicy::AlwaysOff, MachinePhase::Stopped), None);
    assert_eq!(power_action(RunPolicy::Manual, MachinePhase::Stopped), None);
    assert_eq!(power_action(RunPolicy::AlwaysOnUnlessStoppedManually, MachinePhase::Stopped), None);
}

#[test]
fn kubevirt_state_is_mirrored() {
    let running = json!({"status": {"printableStatus": "Running"}});
    let instance = json!({"status": {"nodeName": "node-2", "interfaces": [{"ipAddress": "10.66.10.7"}]}});
    assert_eq!(
        mirror_status(Some(&running), Some(&instance)),
        MirroredStatus {
            phase: MachinePhase::Running,
            node_name: Some("node-2".into()),
            ip_address: Some("10.66.10.7".into()),
        }
    );
    let phase = |printable: &str| mirror_status(Some(&json!({"status": {"printableStatus": printable}})), None).phase;
    assert_eq!(phase("Stopped"), MachinePhase::Stopped);
    assert_eq!(phase("WaitingForVolumeBinding"), MachinePhase::Starting);
    assert_eq!(phase("Migrating"), MachinePhase::Migrating);
    assert_eq!(phase("ErrImagePull"), MachinePhase::Degraded);
    assert_eq!(mirror_status(None, None).phase, MachinePhase::Pending);
}

#[test]
fn operations_become_kubevirt_subresource_requests() {
    let request = operation_request("vms", "web", OperationType::Stop, true);
    assert_eq!(request.path, "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachines/web/stop");
    assert_eq!(request.body, json!({"gracePeriod": 0}));
    assert_eq!(operation_request("vms", "web", OperationType::Restart, false).body, json!({}));
    assert!(operation_request("vms", "web", OperationType::Evict, false).path.ends_with("/migrate"));
    assert!(operation_request("vms", "web", OperationType::Start, false).path.ends_with("/start"));
}
