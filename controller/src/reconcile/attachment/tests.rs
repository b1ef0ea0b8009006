use serde_json::json;

use super::*;
use crate::conditions;
use crate::reconcile::FINALIZER;

fn spec(kind: &str) -> VirtualMachineBlockDeviceAttachmentSpec {
    serde_json::from_value(json!({"virtualMachineName": "web", "blockDeviceRef": {"kind": kind, "name": "data"}}))
        .unwrap_or_else(|error| panic!("{error}"))
}

fn view<'a>(spec: &'a VirtualMachineBlockDeviceAttachmentSpec, status: &'a AttachmentStatus) -> AttachmentView<'a> {
    AttachmentView {
        namespace: "vms",
        generation: Some(2),
        deleting: false,
        has_finalizer: true,
        spec,
        status,
    }
}

fn ready_disk() -> DeviceState {
    DeviceState::Ready(ResolvedDevice::Disk {
        claim_name: "vd-data-1234".into(),
    })
}

/// A running instance; `volume` is its hot-plugged volume's (spec present,
/// status phase) when given.
fn instance(phase: &str, volume: Option<Option<&str>>) -> Value {
    let mut instance = json!({
        "metadata": {"name": "web", "namespace": "vms"},
        "spec": {"volumes": [{"name": "vd-root", "persistentVolumeClaim": {"claimName": "vd-root-1"}}]},
        "status": {"phase": phase, "volumeStatus": [{"name": "vd-root", "phase": "Ready", "target": "vda"}]},
    });
    if let Some(volume_phase) = volume {
        if let Some(volumes) = instance["spec"]["volumes"].as_array_mut() {
            let claim = json!({"claimName": "vd-data-1234", "hotpluggable": true});
            volumes.push(json!({"name": "vd-data", "persistentVolumeClaim": claim}));
        }
        if let (Some(volume_phase), Some(statuses)) = (volume_phase, instance["status"]["volumeStatus"].as_array_mut())
        {
            statuses.push(json!({"name": "vd-data", "phase": volume_phase, "target": "sda",
                "message": format!("volume is {volume_phase}"), "hotplugVolume": {}}));
        }
    }
    instance
}

fn observed(instance: Option<Value>) -> AttachmentObserved {
    AttachmentObserved {
        disk: ready_disk(),
        machine: AttachedMachine::Found { names_disk: false },
        other_user: None,
        instance,
        now: Timestamp::UNIX_EPOCH,
    }
}

fn condition(status: &AttachmentStatus, condition_type: &str) -> (String, String, String) {
    conditions::find(&status.conditions, condition_type)
        .map(|condition| {
            (
                condition.status.clone(),
                condition.reason.clone(),
                condition.message.clone(),
            )
        })
        .unwrap_or_else(|| panic!("no condition {condition_type} in {:?}", status.conditions))
}

#[test]
fn a_ready_disk_is_plugged_into_the_running_instance_and_followed_until_attached() {
    let spec = spec("VirtualDisk");
    let status = AttachmentStatus::default();
    let plan = reconcile(&view(&spec, &status), &observed(Some(instance("Running", None))));
    let expected = add_volume_request("vms", "web", "vd-data", "vd-data-1234");
    assert_eq!(plan.actions, vec![Action::KubevirtSubresource(expected.clone())]);
    assert_eq!(
        expected.path,
        "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web/addvolume"
    );
    assert_eq!(
        expected.body,
        json!({"name": "vd-data", "disk": {"name": "vd-data", "disk": {"bus": "scsi"}},
            "volumeSource": {"persistentVolumeClaim": {"claimName": "vd-data-1234", "hotpluggable": true}}})
    );
    assert_eq!(plan.status.phase, Some(AttachmentPhase::InProgress));
    assert_eq!(plan.status.virtual_machine_name.as_deref(), Some("web"));
    assert_eq!(plan.status.observed_generation, Some(2));
    assert_eq!(condition(&plan.status, BLOCK_DEVICE_READY).0, "True");
    assert_eq!(condition(&plan.status, VIRTUAL_MACHINE_READY).0, "True");
    assert_eq!(condition(&plan.status, ATTACHED).1, "Attaching");
    assert_eq!(plan.requeue_after, Some(PROGRESS_INTERVAL));

    // KubeVirt has it in the instance's spec, attaching: never sent twice.
    let status = plan.status;
    let plan = reconcile(
        &view(&spec, &status),
        &observed(Some(instance("Running", Some(Some("AttachedToNode"))))),
    );
    assert!(plan.actions.is_empty(), "{:?}", plan.actions);
    assert_eq!(plan.status.phase, Some(AttachmentPhase::InProgress));
    let (_, _, message) = condition(&plan.status, ATTACHED);
    assert!(
        message.ends_with("volume vd-data is AttachedToNode (volume is AttachedToNode)"),
        "{message}"
    );
    let plan = reconcile(&view(&spec, &status), &observed(Some(instance("Running", Some(None)))));
    assert!(plan.actions.is_empty());
    assert!(condition(&plan.status, ATTACHED)
        .2
        .ends_with("volume vd-data is requested"));

    let plan = reconcile(
        &view(&spec, &status),
        &observed(Some(instance("Running", Some(Some("Ready"))))),
    );
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(AttachmentPhase::Attached));
    assert_eq!(
        condition(&plan.status, ATTACHED),
        (
            "True".into(),
            "Attached".into(),
            "VirtualDisk data is attached to VirtualMachine web as sda".into()
        )
    );
    assert_eq!(
        plan.requeue_after,
        Some(WAIT_INTERVAL),
        "a restarted machine is looked for"
    );

    // A restart: the new instance lacks the volume, which is plugged in again.
    let attached = plan.status;
    let plan = reconcile(&view(&spec, &attached), &observed(Some(instance("Running", None))));
    assert_eq!(plan.actions, vec![Action::KubevirtSubresource(expected)]);
    assert_eq!(plan.status.phase, Some(AttachmentPhase::InProgress));
}

#[test]
fn a_new_attachment_takes_the_finalizer_first() {
    let spec = spec("VirtualDisk");
    let status = AttachmentStatus::default();
    let mut looked = view(&spec, &status);
    looked.has_finalizer = false;
    let plan = reconcile(&looked, &observed(None));
    assert_eq!(plan.actions, vec![Action::AddFinalizer]);
    assert_eq!(FINALIZER, "virtualization.deckhouse.io/dvcr-cleanup");
}

#[test]
fn attachments_wait_for_the_disk_and_the_machine() {
    let spec = spec("VirtualDisk");
    let status = AttachmentStatus::default();
    let cases: Vec<(AttachmentObserved, &str, &str, &str)> = vec![
        (
            AttachmentObserved {
                disk: DeviceState::Missing,
                ..observed(None)
            },
            BLOCK_DEVICE_READY,
            "NotFound",
            "VirtualDisk data does not exist",
        ),
        (
            AttachmentObserved {
                disk: DeviceState::NotReady(Some("Provisioning".into())),
                ..observed(None)
            },
            BLOCK_DEVICE_READY,
            "NotReady",
            "VirtualDisk data is Provisioning",
        ),
        (
            AttachmentObserved {
                machine: AttachedMachine::Missing,
                ..observed(None)
            },
            VIRTUAL_MACHINE_READY,
            "NotFound",
            "VirtualMachine web does not exist",
        ),
        (
            observed(None),
            VIRTUAL_MACHINE_READY,
            "NotRunning",
            "VirtualMachine web is not running; the disk is plugged in once it runs",
        ),
        (
            observed(Some(instance("Scheduling", None))),
            VIRTUAL_MACHINE_READY,
            "NotRunning",
            "VirtualMachine web is Scheduling in KubeVirt; the disk is plugged in once it runs",
        ),
        (
            AttachmentObserved {
                other_user: Some("VirtualMachine db".into()),
                ..observed(Some(instance("Running", None)))
            },
            BLOCK_DEVICE_READY,
            "InUse",
            "VirtualDisk data is used by VirtualMachine db; it is attached once that lets it go",
        ),
    ];
    for (observed, condition_type, reason, message) in cases {
        let plan = reconcile(&view(&spec, &status), &observed);
        assert!(plan.actions.is_empty(), "{message}: {:?}", plan.actions);
        assert_eq!(plan.status.phase, Some(AttachmentPhase::Pending), "{message}");
        assert_eq!(
            condition(&plan.status, condition_type),
            ("False".into(), reason.into(), message.into())
        );
        assert_eq!(condition(&plan.status, ATTACHED).0, "False");
        assert_eq!(plan.requeue_after, Some(WAIT_INTERVAL), "{message}");
    }

    // An attachment already holding the disk is not displaced by a later one.
    let holding = AttachmentStatus {
        phase: Some(AttachmentPhase::Attached),
        ..AttachmentStatus::default()
    };
    let contested = AttachmentObserved {
        other_user: Some("VirtualMachineBlockDeviceAttachment newer".into()),
        ..observed(Some(instance("Running", Some(Some("Ready")))))
    };
    let plan = reconcile(&view(&spec, &holding), &contested);
    assert_eq!(plan.status.phase, Some(AttachmentPhase::Attached));
}

#[test]
fn images_and_disks_the_machine_boots_from_are_refused() {
    for kind in ["VirtualImage", "ClusterVirtualImage"] {
        let spec = spec(kind);
        let status = AttachmentStatus::default();
        let plan = reconcile(&view(&spec, &status), &observed(Some(instance("Running", None))));
        assert!(plan.actions.is_empty());
        assert_eq!(plan.status.phase, Some(AttachmentPhase::Failed));
        let (holds, reason, message) = condition(&plan.status, BLOCK_DEVICE_READY);
        assert_eq!((holds.as_str(), reason.as_str()), ("False", "NotHotpluggable"));
        assert!(
            message.starts_with(&format!("{kind} data cannot be hot-plugged")),
            "{message}"
        );
        assert_eq!(plan.requeue_after, None, "only a change of the attachment helps");
    }
    let spec = spec("VirtualDisk");
    let status = AttachmentStatus::default();
    let booted = AttachmentObserved {
        machine: AttachedMachine::Found { names_disk: true },
        ..observed(Some(instance("Running", None)))
    };
    let plan = reconcile(&view(&spec, &status), &booted);
    assert!(plan.actions.is_empty());
    assert_eq!(plan.status.phase, Some(AttachmentPhase::Failed));
    assert_eq!(condition(&plan.status, BLOCK_DEVICE_READY).1, "AlreadyAttached");
}

#[test]
fn a_refused_hotplug_fails_with_kubevirts_message() {
    let spec = spec("VirtualDisk");
    let status = AttachmentStatus::default();
    let plan = reconcile(&view(&spec, &status), &observed(Some(instance("Running", None))));
    let failed = refused(
        &view(&spec, &status),
        &plan.status,
        "HotplugVolumes feature gate is not enabled",
        Timestamp::UNIX_EPOCH,
    );
    assert_eq!(failed.phase, Some(AttachmentPhase::Failed));
    let (holds, reason, message) = condition(&failed, ATTACHED);
    assert_eq!((holds.as_str(), reason.as_str()), ("False", "HotplugRefused"));
    assert_eq!(
        message,
        "KubeVirt refused to plug VirtualDisk data into VirtualMachine web: HotplugVolumes feature gate is not \
         enabled (tried again every 60 s)"
    );
    assert_eq!(
        condition(&failed, BLOCK_DEVICE_READY).0,
        "True",
        "the rest of the plan's status stays"
    );
}

#[test]
fn deletion_unplugs_the_volume_then_releases_the_finalizer() {
    let spec = spec("VirtualDisk");
    let status = AttachmentStatus {
        phase: Some(AttachmentPhase::Attached),
        ..AttachmentStatus::default()
    };
    let mut deleting = view(&spec, &status);
    deleting.deleting = true;
    let gone = AttachmentObserved {
        disk: DeviceState::Missing,
        machine: AttachedMachine::Missing,
        ..observed(None)
    };
    for plugged in [Some(Some("Ready")), Some(Some("AttachedToNode")), Some(None)] {
        let plan = reconcile(
            &deleting,
            &AttachmentObserved {
                instance: Some(instance("Running", plugged)),
                ..gone.clone()
            },
        );
        assert_eq!(
            plan.actions,
            vec![Action::KubevirtSubresource(remove_volume_request(
                "vms", "web", "vd-data"
            ))],
            "{plugged:?}"
        );
        assert_eq!(plan.status.phase, Some(AttachmentPhase::Terminating));
        assert_eq!(condition(&plan.status, ATTACHED).1, "Detaching");
        assert_eq!(plan.requeue_after, Some(PROGRESS_INTERVAL));
    }
    assert_eq!(
        remove_volume_request("vms", "web", "vd-data").body,
        json!({"name": "vd-data"})
    );
    for instance in [
        None,
        Some(instance("Running", None)),
        Some(instance("Succeeded", Some(Some("Ready")))),
    ] {
        let plan = reconcile(
            &deleting,
            &AttachmentObserved {
                instance: instance.clone(),
                ..gone.clone()
            },
        );
        assert_eq!(plan.actions, vec![Action::RemoveFinalizer], "{instance:?}");
    }
    deleting.has_finalizer = false;
    let plan = reconcile(&deleting, &gone);
    assert!(plan.actions.is_empty());
}
