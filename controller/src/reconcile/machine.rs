//! VirtualMachine: once every block device is Ready, a `kubevirt.io/v1`
//! VirtualMachine of the same name (owned by ours, so deleted with it),
//! KubeVirt's state mirrored back, and the run policies KubeVirt does not
//! enforce carried out by starting or stopping it.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::{Action, Plan, PROGRESS_INTERVAL, WAIT_INTERVAL};
use crate::api::machine::{
    BlockDeviceKind, MachinePhase, RestartApprovalMode, VirtualMachineClassSpec, VirtualMachineSpec,
    VirtualMachineStatus,
};
use crate::conditions::Setter;
use crate::kubevirt::{self, power_action, PowerAction, ResolvedDevice};

/// Condition: every block device is Ready.
pub const BLOCK_DEVICES_READY: &str = "BlockDevicesReady";
/// Condition: the machine runs.
pub const RUNNING: &str = "Running";

/// What the reconciler reads of a VirtualMachine.
#[derive(Debug, Clone, Copy)]
pub struct MachineView<'a> {
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
    /// `spec`.
    pub spec: &'a VirtualMachineSpec,
    /// `status`, as last written.
    pub status: &'a VirtualMachineStatus,
}

/// The state of one block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    /// No such object.
    Missing,
    /// Not Ready; its phase.
    NotReady(Option<String>),
    /// Ready, resolved.
    Ready(ResolvedDevice),
}

/// The machine's VirtualMachineIPAddress, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressState {
    /// No virtualMachineCIDRs are configured: the machine keeps the pod
    /// network's address.
    Unmanaged,
    /// The claim does not exist.
    Missing {
        /// Its name.
        claim: String,
        /// Whether it is the machine's own (named after it, created by the
        /// controller) rather than one `spec.virtualMachineIPAddressName` names.
        own: bool,
    },
    /// The claim has no address yet; its `Bound` condition's message.
    Pending {
        /// Its name.
        claim: String,
        /// Why, as the claim says.
        message: String,
    },
    /// The claim is attached to another machine.
    Taken {
        /// Its name.
        claim: String,
        /// The machine using it.
        machine: String,
    },
    /// The claim holds this address.
    Bound {
        /// Its name.
        claim: String,
        /// The address.
        address: String,
    },
}

/// The machine's VirtualMachineClass, as observed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassState {
    /// `spec.virtualMachineClassName` is not set.
    Unnamed,
    /// The class does not exist.
    Missing(String),
    /// The class.
    Found {
        /// Its name.
        name: String,
        /// Its spec.
        spec: Box<VirtualMachineClassSpec>,
        /// The CPU features a `Discovery` class found (`status.cpuFeatures`).
        discovered: Option<Vec<String>>,
    },
}

/// Condition: the machine's VirtualMachineClass exists.
pub const CLASS_READY: &str = "ClassReady";
/// Condition: the machine's size is one its class allows.
pub const SIZING_POLICY_MATCHED: &str = "SizingPolicyMatched";

/// Condition: the running instance predates a change of the machine.
pub const AWAITING_RESTART: &str = "AwaitingRestartToApplyConfiguration";
/// Reason of [`AWAITING_RESTART`] once an automatic restart is sent.
const RESTARTING: &str = "Restarting";

/// Condition: the machine's address is leased.
pub const IP_ADDRESS_READY: &str = "IPAddressReady";

/// What the I/O layer observed.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineObserved {
    /// Each of `spec.blockDeviceRefs`, in order.
    pub devices: Vec<DeviceState>,
    /// Its VirtualMachineIPAddress.
    pub address: AddressState,
    /// Its VirtualMachineClass.
    pub class: ClassState,
    /// KubeVirt's VirtualMachine of the same name.
    pub kubevirt_machine: Option<Value>,
    /// Its VirtualMachineInstance.
    pub instance: Option<Value>,
    /// The time now.
    pub now: Timestamp,
}

fn kind_name(kind: BlockDeviceKind) -> &'static str {
    match kind {
        BlockDeviceKind::VirtualImage => "VirtualImage",
        BlockDeviceKind::ClusterVirtualImage => "ClusterVirtualImage",
        BlockDeviceKind::VirtualDisk => "VirtualDisk",
    }
}

/// Decides the status and actions of a machine.
pub fn reconcile(view: &MachineView<'_>, observed: &MachineObserved) -> Plan<VirtualMachineStatus> {
    let mut plan = Plan {
        status: view.status.clone(),
        actions: Vec::new(),
        requeue_after: None,
    };
    plan.status.observed_generation = view.generation;
    if view.deleting {
        // KubeVirt's machine is owned by ours: Kubernetes deletes it.
        plan.status.phase = Some(MachinePhase::Terminating);
        return plan;
    }
    let conditions = Setter {
        generation: view.generation,
        now: observed.now,
    };

    let mut resolved = Vec::new();
    let mut waiting = Vec::new();
    for (reference, state) in view.spec.block_device_refs.iter().zip(&observed.devices) {
        let described = format!("{} {}", kind_name(reference.kind), reference.name);
        match state {
            DeviceState::Ready(device) => resolved.push(device.clone()),
            DeviceState::Missing => waiting.push(format!("{described} does not exist")),
            DeviceState::NotReady(phase) => {
                waiting.push(format!("{described} is {}", phase.as_deref().unwrap_or("not Ready")))
            }
        }
    }
    if observed.devices.len() != view.spec.block_device_refs.len() {
        waiting.push("the block devices were not all looked up".into());
    }
    if !waiting.is_empty() {
        conditions.set(&mut plan.status.conditions,
            BLOCK_DEVICES_READY,
            false,
            "BlockDevicesNotReady",
            format!("waiting: {}", waiting.join("; ")),
        );
        if observed.kubevirt_machine.is_none() {
            plan.status.phase = Some(MachinePhase::Pending);
        }
        plan.requeue_after = Some(WAIT_INTERVAL);
        return plan;
    }
    conditions.set(
        &mut plan.status.conditions,
        BLOCK_DEVICES_READY,
        true,
        "BlockDevicesReady",
        "every block device is Ready".into(),
    );

    let class = match &observed.class {
        ClassState::Unnamed => None,
        ClassState::Missing(name) => {
            conditions.set(&mut plan.status.conditions,
                CLASS_READY,
                false,
                "ClassNotFound",
                format!("VirtualMachineClass {name} does not exist"),
            );
            if observed.kubevirt_machine.is_none() {
                plan.status.phase = Some(MachinePhase::Pending);
            }
            plan.requeue_after = Some(WAIT_INTERVAL);
            return plan;
        }
        ClassState::Found { name, spec, discovered } => {
            conditions.set(
                &mut plan.status.conditions,
                CLASS_READY,
                true,
                "ClassReady",
                format!("VirtualMachineClass {name}"),
            );
            if let Err(error) = crate::class::check_sizing(name, spec, view.spec) {
                conditions.set(
                    &mut plan.status.conditions,
                    SIZING_POLICY_MATCHED,
                    false,
                    "SizingPolicyNotMatched",
                    error.to_string(),
                );
                if observed.kubevirt_machine.is_none() {
                    plan.status.phase = Some(MachinePhase::Pending);
                }
                // Waits for a change of the machine or of its class.
                plan.requeue_after = Some(WAIT_INTERVAL);
                return plan;
            }
            let matched = format!("the size is one VirtualMachineClass {name} allows");
            conditions.set(&mut plan.status.conditions, SIZING_POLICY_MATCHED, true, "SizingPolicyMatched", matched);
            Some((name, spec, discovered.as_deref()))
        }
    };

    let address = match &observed.address {
        AddressState::Unmanaged => None,
        AddressState::Bound { claim, address } => {
            plan.status.virtual_machine_ip_address_name = Some(claim.clone());
            conditions.set(
                &mut plan.status.conditions,
                IP_ADDRESS_READY,
                true,
                "Bound",
                format!("{address} from {claim}"),
            );
            Some(address.clone())
        }
        waiting => {
            let (reason, message) = match waiting {
                AddressState::Missing { claim, own: true } => {
                    plan.actions.push(Action::CreateAddressClaim(Box::new(address_claim(view))));
                    ("Pending", format!("creating VirtualMachineIPAddress {claim}"))
                }
                AddressState::Missing { claim, own: false } => (
                    "NotFound",
                    format!("VirtualMachineIPAddress {claim} (spec.virtualMachineIPAddressName) does not exist"),
                ),
                AddressState::Pending { claim, message } => {
                    ("Pending", format!("VirtualMachineIPAddress {claim} has no address yet: {message}"))
                }
                AddressState::Taken { claim, machine } => (
                    "AttachedElsewhere",
                    format!("VirtualMachineIPAddress {claim} is used by VirtualMachine {machine}"),
                ),
                AddressState::Unmanaged | AddressState::Bound { .. } => ("", String::new()),
            };
            conditions.set(&mut plan.status.conditions, IP_ADDRESS_READY, false, reason, message);
            if observed.kubevirt_machine.is_none() {
                plan.status.phase = Some(MachinePhase::Pending);
            }
            plan.requeue_after = Some(WAIT_INTERVAL);
            return plan;
        }
    };

    let mut desired = match kubevirt::virtual_machine(view.name, view.namespace, view.uid, view.spec, &resolved) {
        Ok(desired) => desired,
        Err(error) => {
            plan.status.phase = Some(MachinePhase::Pending);
            conditions.set(&mut plan.status.conditions, RUNNING, false, "InvalidSpec", error.to_string());
            return plan;
        }
    };
    if let Some((name, class, discovered)) = class {
        if let Err(error) = crate::class::apply_class(&mut desired, name, class, discovered) {
            plan.status.phase = Some(MachinePhase::Pending);
            conditions.set(&mut plan.status.conditions, CLASS_READY, false, "InvalidClass", error.to_string());
            // Waits for the class to change (or to discover its features).
            plan.requeue_after = Some(WAIT_INTERVAL);
            return plan;
        }
    }
    if let Some(address) = &address {
        kubevirt::assign_address(&mut desired, address);
    }
    kubevirt::stamp_template(&mut desired);
    let rendered = kubevirt::template_hash(&desired).unwrap_or_default().to_string();
    let applied_hash = observed
        .kubevirt_machine
        .as_ref()
        .and_then(|machine| machine["metadata"]["annotations"][kubevirt::SPEC_HASH_ANNOTATION].as_str());
    if applied_hash != desired["metadata"]["annotations"][kubevirt::SPEC_HASH_ANNOTATION].as_str() {
        // A machine a user stopped (KubeVirt set `Halted`) stays stopped
        // through a change of its spec.
        let halted = observed
            .kubevirt_machine
            .as_ref()
            .is_some_and(|machine| machine["spec"]["runStrategy"] == "Halted");
        if halted && view.spec.run_policy == crate::api::machine::RunPolicy::AlwaysOnUnlessStoppedManually {
            desired["spec"]["runStrategy"] = Value::from("Halted");
        }
        plan.actions.push(Action::ApplyKubevirtMachine(Box::new(desired)));
    }

    let mirrored = kubevirt::mirror_status(observed.kubevirt_machine.as_ref(), observed.instance.as_ref());
    plan.status.phase = Some(if observed.kubevirt_machine.is_none() { MachinePhase::Starting } else { mirrored.phase });
    plan.status.node_name = mirrored.node_name;
    // The leased address is the machine's; KubeVirt's report only when none is leased.
    plan.status.ip_address = address.or(mirrored.ip_address);
    let running = mirrored.phase == MachinePhase::Running;
    conditions.set(&mut plan.status.conditions,
        RUNNING,
        running,
        if running { "Running" } else { "NotRunning" },
        format!("KubeVirt reports {:?}", mirrored.phase),
    );
    let power = observed
        .kubevirt_machine
        .as_ref()
        .and_then(|_| power_action(view.spec.run_policy, mirrored.phase));
    if let Some(power) = power {
        plan.actions.push(Action::KubevirtSubresource(kubevirt::operation_request(
            view.namespace,
            view.name,
            match power {
                PowerAction::Start => crate::api::machine::OperationType::Start,
                PowerAction::Stop => crate::api::machine::OperationType::Stop,
            },
            false,
        )));
    }
    let started_from = observed
        .instance
        .as_ref()
        .filter(|instance| kubevirt::instance_running(instance))
        .and_then(kubevirt::template_hash);
    match started_from {
        Some(started_from) if started_from != rendered.as_str() => {
            plan.status.restart_awaiting_changes = Some(true);
            let automatic = view
                .spec
                .disruptions
                .as_ref()
                .is_some_and(|disruptions| disruptions.restart_approval_mode == RestartApprovalMode::Automatic);
            if !automatic {
                let message = "the machine runs as it was when it started: a change of its spec, class, disks or \
                               address waits for a restart (a VirtualMachineOperation Restart), or for \
                               disruptions.restartApprovalMode Automatic";
                conditions.set(&mut plan.status.conditions, AWAITING_RESTART, true, "RestartRequired", message.into());
            } else if !restart_under_way(&plan.status, observed.now)
                && mirrored.phase == MachinePhase::Running
                && power.is_none()
            {
                plan.actions.push(Action::KubevirtSubresource(kubevirt::operation_request(
                    view.namespace,
                    view.name,
                    crate::api::machine::OperationType::Restart,
                    false,
                )));
                // A new transition time: the restart is given its own time to show.
                plan.status.conditions.retain(|condition| condition.type_ != AWAITING_RESTART);
                let message = "restarting to apply a change (disruptions.restartApprovalMode Automatic)";
                conditions.set(&mut plan.status.conditions, AWAITING_RESTART, true, RESTARTING, message.into());
            }
        }
        _ => {
            plan.status.restart_awaiting_changes = None;
            plan.status.conditions.retain(|condition| condition.type_ != AWAITING_RESTART);
        }
    }
    plan.requeue_after = Some(if running { WAIT_INTERVAL } else { PROGRESS_INTERVAL });
    plan
}

/// Whether an automatic restart was sent less than
/// [`super::operation::POWER_TIMEOUT`] ago (its instance may not have gone
/// yet): it is not sent again before then.
fn restart_under_way(status: &VirtualMachineStatus, now: Timestamp) -> bool {
    crate::conditions::find(&status.conditions, AWAITING_RESTART).is_some_and(|condition| {
        condition.reason == RESTARTING
            && now.duration_since(condition.last_transition_time.0).unsigned_abs()
                < super::operation::POWER_TIMEOUT
    })
}

/// The machine's own VirtualMachineIPAddress: named after it, `Auto`,
/// owned by it (deleted with it).
pub fn address_claim(view: &MachineView<'_>) -> crate::api::VirtualMachineIPAddress {
    use crate::api::network::{AddressType, VirtualMachineIPAddressSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    let mut claim = crate::api::VirtualMachineIPAddress::new(
        view.name,
        VirtualMachineIPAddressSpec {
            address_type: AddressType::Auto,
            static_ip: None,
        },
    );
    claim.metadata.namespace = Some(view.namespace.to_string());
    claim.metadata.owner_references = Some(vec![OwnerReference {
        api_version: format!("{}/{}", crate::api::common::GROUP, crate::api::common::VERSION),
        kind: "VirtualMachine".into(),
        name: view.name.to_string(),
        uid: view.uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    claim
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::conditions;

    use super::*;
    use crate::api::machine::RunPolicy;

    fn spec(policy: &str) -> VirtualMachineSpec {
        serde_norway::from_str(&format!(
            "runPolicy: {policy}\ncpu: {{cores: 1}}\nmemory: {{size: 1Gi}}\n\
             blockDeviceRefs: [{{kind: VirtualDisk, name: root}}, {{kind: ClusterVirtualImage, name: iso}}]\n"
        ))
        .unwrap_or_else(|error| panic!("{error}"))
    }

    fn view<'a>(spec: &'a VirtualMachineSpec, status: &'a VirtualMachineStatus) -> MachineView<'a> {
        MachineView {
            namespace: "vms",
            name: "web",
            uid: "u",
            generation: Some(1),
            deleting: false,
            spec,
            status,
        }
    }

    fn ready_devices() -> Vec<DeviceState> {
        vec![
            DeviceState::Ready(ResolvedDevice::Disk {
                claim_name: "vd-root".into(),
            }),
            DeviceState::Ready(ResolvedDevice::Image {
                location: crate::reconcile::provision::ImageLocation::Registry("dvcr/cvi/iso:1".into()),
                cdrom: true,
            }),
        ]
    }

    fn observed(devices: Vec<DeviceState>, machine: Option<Value>, instance: Option<Value>) -> MachineObserved {
        MachineObserved {
            devices,
            address: AddressState::Unmanaged,
            class: ClassState::Unnamed,
            kubevirt_machine: machine,
            instance,
            now: Timestamp::UNIX_EPOCH,
        }
    }

    fn condition(status: &VirtualMachineStatus, condition_type: &str) -> (String, String) {
        conditions::find(&status.conditions, condition_type)
            .map(|condition| (condition.status.clone(), condition.message.clone()))
            .unwrap_or_default()
    }

    #[test]
    fn a_machine_waits_for_its_devices_then_goes_to_kubevirt() {
        let machine = spec("AlwaysOnUnlessStoppedManually");
        let status = VirtualMachineStatus::default();
        let waiting = vec![
            DeviceState::NotReady(Some("Provisioning".into())),
            DeviceState::Missing,
        ];
        let plan = reconcile(&view(&machine, &status), &observed(waiting, None, None));
        assert!(plan.actions.is_empty());
        assert_eq!(plan.status.phase, Some(MachinePhase::Pending));
        let (state, message) = condition(&plan.status, BLOCK_DEVICES_READY);
        assert_eq!(state, "False");
        assert_eq!(
            message,
            "waiting: VirtualDisk root is Provisioning; ClusterVirtualImage iso does not exist"
        );

        let plan = reconcile(&view(&machine, &status), &observed(ready_devices(), None, None));
        let [Action::ApplyKubevirtMachine(desired)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        assert_eq!(desired["spec"]["runStrategy"], "Always");
        assert_eq!(desired["spec"]["template"]["spec"]["volumes"][1]["containerDisk"]["image"], "dvcr/cvi/iso:1");
        assert_eq!(plan.status.phase, Some(MachinePhase::Starting));
        assert_eq!(condition(&plan.status, BLOCK_DEVICES_READY).0, "True");
    }

    #[test]
    fn an_unchanged_machine_is_left_alone_and_its_state_mirrored() {
        let machine = spec("AlwaysOnUnlessStoppedManually");
        let status = VirtualMachineStatus::default();
        let first = reconcile(&view(&machine, &status), &observed(ready_devices(), None, None));
        let Some(Action::ApplyKubevirtMachine(desired)) = first.actions.first() else {
            panic!("{:?}", first.actions);
        };
        let mut existing = desired.as_ref().clone();
        existing["status"] = json!({"printableStatus": "Running"});
        let instance = json!({"status": {"nodeName": "n1", "interfaces": [{"ipAddress": "10.66.10.2"}]}});
        let look = observed(ready_devices(), Some(existing), Some(instance));
        let plan = reconcile(&view(&machine, &first.status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.phase, Some(MachinePhase::Running));
        assert_eq!(plan.status.node_name.as_deref(), Some("n1"));
        assert_eq!(plan.status.ip_address.as_deref(), Some("10.66.10.2"));
        assert_eq!(condition(&plan.status, RUNNING).0, "True");

        // KubeVirt's own changes (defaults, a user's stop) are not undone.
        let mut stopped = desired.as_ref().clone();
        stopped["spec"]["runStrategy"] = json!("Halted");
        stopped["spec"]["template"]["spec"]["domain"]["machine"] = json!({"type": "q35"});
        stopped["status"] = json!({"printableStatus": "Stopped"});
        let plan = reconcile(&view(&machine, &first.status), &observed(ready_devices(), Some(stopped), None));
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.phase, Some(MachinePhase::Stopped));

        // A changed spec is applied again.
        let mut bigger = machine.clone();
        bigger.cpu.cores = 2;
        let mut existing = desired.as_ref().clone();
        existing["status"] = json!({"printableStatus": "Running"});
        let plan = reconcile(&view(&bigger, &first.status), &observed(ready_devices(), Some(existing), None));
        let [Action::ApplyKubevirtMachine(changed)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        assert_eq!(changed["spec"]["runStrategy"], "Always");
        // ... keeping a user's stop.
        let mut halted = desired.as_ref().clone();
        halted["spec"]["runStrategy"] = json!("Halted");
        let plan = reconcile(&view(&bigger, &first.status), &observed(ready_devices(), Some(halted), None));
        let [Action::ApplyKubevirtMachine(changed)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        assert_eq!(changed["spec"]["runStrategy"], "Halted");
    }

    #[test]
    fn always_on_and_always_off_are_enforced_through_kubevirt() {
        for (policy, printable, verb) in [
            (RunPolicy::AlwaysOn, "Stopped", Some("start")),
            (RunPolicy::AlwaysOff, "Running", Some("stop")),
            (RunPolicy::Manual, "Stopped", None),
        ] {
            let machine = spec(&format!("{policy:?}"));
            let status = VirtualMachineStatus::default();
            let first = reconcile(&view(&machine, &status), &observed(ready_devices(), None, None));
            let Some(Action::ApplyKubevirtMachine(desired)) = first.actions.first() else {
                panic!("{:?}", first.actions);
            };
            assert_eq!(desired["spec"]["runStrategy"], "Manual");
            let mut existing = desired.as_ref().clone();
            existing["status"] = json!({"printableStatus": printable});
            let plan = reconcile(&view(&machine, &first.status), &observed(ready_devices(), Some(existing), None));
            let sent: Vec<String> = plan
                .actions
                .iter()
                .filter_map(|action| match action {
                    Action::KubevirtSubresource(request) => request.path.rsplit('/').next().map(str::to_string),
                    _ => None,
                })
                .collect();
            assert_eq!(sent, verb.map(|verb| vec![verb.to_string()]).unwrap_or_default(), "{policy:?}");
        }
    }

    #[test]
    fn machines_wait_for_their_address_and_carry_it_to_kubevirt() {
        let machine = spec("AlwaysOnUnlessStoppedManually");
        let status = VirtualMachineStatus::default();
        let mut look = observed(ready_devices(), None, None);
        look.address = AddressState::Missing {
            claim: "web".into(),
            own: true,
        };
        let plan = reconcile(&view(&machine, &status), &look);
        let [Action::CreateAddressClaim(claim)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        assert_eq!(claim.metadata.name.as_deref(), Some("web"));
        assert_eq!(claim.metadata.namespace.as_deref(), Some("vms"));
        let owner = claim.metadata.owner_references.as_ref().and_then(|owners| owners.first());
        assert_eq!(owner.map(|owner| owner.uid.as_str()), Some("u"));
        assert_eq!(claim.spec.address_type, crate::api::network::AddressType::Auto);
        assert_eq!(plan.status.phase, Some(MachinePhase::Pending));
        assert_eq!(condition(&plan.status, IP_ADDRESS_READY).0, "False");

        for (state, words) in [
            (
                AddressState::Missing {
                    claim: "fixed".into(),
                    own: false,
                },
                "VirtualMachineIPAddress fixed (spec.virtualMachineIPAddressName) does not exist",
            ),
            (
                AddressState::Pending {
                    claim: "web".into(),
                    message: "every address is leased".into(),
                },
                "VirtualMachineIPAddress web has no address yet: every address is leased",
            ),
            (
                AddressState::Taken {
                    claim: "fixed".into(),
                    machine: "db".into(),
                },
                "VirtualMachineIPAddress fixed is used by VirtualMachine db",
            ),
        ] {
            look.address = state;
            let plan = reconcile(&view(&machine, &status), &look);
            assert!(plan.actions.is_empty(), "{:?}", plan.actions);
            assert_eq!(condition(&plan.status, IP_ADDRESS_READY), ("False".into(), words.into()));
            assert_eq!(plan.requeue_after, Some(WAIT_INTERVAL));
        }

        look.address = AddressState::Bound {
            claim: "web".into(),
            address: "10.66.10.7".into(),
        };
        let plan = reconcile(&view(&machine, &status), &look);
        let [Action::ApplyKubevirtMachine(desired)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        let annotations = &desired["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[kubevirt::IP_ADDRESS_ANNOTATION], "10.66.10.7");
        assert_eq!(
            desired["metadata"]["annotations"][kubevirt::SPEC_HASH_ANNOTATION].as_str(),
            Some(kubevirt::spec_hash(&desired["spec"]).as_str()),
            "the hash covers the address, so a new address is applied"
        );
        assert_eq!(plan.status.virtual_machine_ip_address_name.as_deref(), Some("web"));
        assert_eq!(plan.status.ip_address.as_deref(), Some("10.66.10.7"));
        assert_eq!(condition(&plan.status, IP_ADDRESS_READY).0, "True");

        // Running: the leased address is shown, whatever the interface reports first.
        let mut existing = desired.as_ref().clone();
        existing["status"] = json!({"printableStatus": "Running"});
        let instance = json!({"status": {"interfaces": [{"ipAddress": "fe80::1"}]}});
        look.kubevirt_machine = Some(existing);
        look.instance = Some(instance);
        let plan = reconcile(&view(&machine, &plan.status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.ip_address.as_deref(), Some("10.66.10.7"));
    }

    #[test]
    fn a_class_must_exist_and_allow_the_size_and_then_reaches_kubevirt() {
        let machine = spec("Manual");
        let status = VirtualMachineStatus::default();
        let mut look = observed(ready_devices(), None, None);
        look.class = ClassState::Missing("generic".into());
        let plan = reconcile(&view(&machine, &status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.phase, Some(MachinePhase::Pending));
        assert_eq!(
            condition(&plan.status, CLASS_READY),
            ("False".into(), "VirtualMachineClass generic does not exist".into())
        );

        let class = |yaml: &str| ClassState::Found {
            name: "generic".into(),
            spec: Box::new(serde_norway::from_str(yaml).unwrap_or_else(|error| panic!("{error}"))),
            discovered: None,
        };
        look.class = class("cpu: {type: Host}
sizingPolicies: [{cores: {min: 2, max: 8}}]
");
        let plan = reconcile(&view(&machine, &status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        let (state, message) = condition(&plan.status, SIZING_POLICY_MATCHED);
        assert_eq!(state, "False");
        assert_eq!(message, "VirtualMachineClass generic allows no machine with 1 cores (its policies cover: 2-8)");

        look.class = class("cpu: {type: HostPassthrough}
sizingPolicies: [{cores: {min: 1, max: 8}}]
");
        let plan = reconcile(&view(&machine, &status), &look);
        let [Action::ApplyKubevirtMachine(desired)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        assert_eq!(desired["spec"]["template"]["spec"]["domain"]["cpu"]["model"], "host-passthrough");
        assert_eq!(condition(&plan.status, SIZING_POLICY_MATCHED).0, "True");
        assert_eq!(condition(&plan.status, CLASS_READY).0, "True");

        look.class = class("cpu: {type: Model}
");
        let plan = reconcile(&view(&machine, &status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(
            condition(&plan.status, CLASS_READY).1,
            "VirtualMachineClass generic has cpu.type Model but no cpu.model"
        );

        // A Discovery class: the machine waits for its features, then requires them.
        look.class = class("cpu: {type: Discovery}\n");
        let plan = reconcile(&view(&machine, &status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert!(condition(&plan.status, CLASS_READY).1.contains("has not found its nodes' common CPU features"));
        assert_eq!(plan.requeue_after, Some(WAIT_INTERVAL), "it looks again for the class's discovery");
        if let ClassState::Found { discovered, .. } = &mut look.class {
            *discovered = Some(vec!["avx2".into()]);
        }
        let plan = reconcile(&view(&machine, &status), &look);
        let [Action::ApplyKubevirtMachine(desired)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        let cpu = &desired["spec"]["template"]["spec"]["domain"]["cpu"];
        assert_eq!(cpu["model"], crate::class::DISCOVERY_BASE_MODEL);
        assert_eq!(cpu["features"], serde_json::json!([{"name": "avx2", "policy": "require"}]));
    }

    #[test]
    fn a_change_the_running_instance_predates_waits_for_a_restart_or_restarts_it() {
        use crate::api::machine::{Disruptions, OperationType};
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut machine = spec("Manual");
        let status = VirtualMachineStatus::default();
        let plan = reconcile(&view(&machine, &status), &observed(ready_devices(), None, None));
        let [Action::ApplyKubevirtMachine(first)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        let started_from = kubevirt::template_hash(first).unwrap_or_default().to_string();
        assert_eq!(started_from.len(), 16, "the template carries its hash");
        let mut applied = first.as_ref().clone();
        applied["status"] = json!({"printableStatus": "Running"});
        let instance = |hash: Option<&str>| {
            let annotations = hash.map_or(json!({}), |hash| json!({kubevirt::TEMPLATE_HASH_ANNOTATION: hash}));
            json!({"kind": "VirtualMachineInstance", "metadata": {"annotations": annotations},
                "status": {"phase": "Running"}})
        };
        let mut look = observed(ready_devices(), Some(applied.clone()), Some(instance(Some(&started_from))));
        let plan = reconcile(&view(&machine, &status), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.restart_awaiting_changes, None);

        // More memory: applied to KubeVirt's machine; the instance keeps the old size until a restart.
        machine.memory.size = Quantity("2Gi".into());
        let plan = reconcile(&view(&machine, &status), &look);
        let [Action::ApplyKubevirtMachine(changed)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions);
        };
        assert_ne!(kubevirt::template_hash(changed), Some(started_from.as_str()));
        assert_eq!(plan.status.restart_awaiting_changes, Some(true));
        let (holds, message) = condition(&plan.status, AWAITING_RESTART);
        assert_eq!(holds, "True");
        assert!(message.contains("waits for a restart"), "{message}");

        // Automatic: restarted once, after the apply.
        machine.disruptions = Some(Disruptions {
            restart_approval_mode: RestartApprovalMode::Automatic,
        });
        let plan = reconcile(&view(&machine, &status), &look);
        let restart = kubevirt::operation_request("vms", "web", OperationType::Restart, false);
        assert!(matches!(plan.actions.first(), Some(Action::ApplyKubevirtMachine(_))), "{:?}", plan.actions);
        assert_eq!(plan.actions.get(1), Some(&Action::KubevirtSubresource(restart.clone())));
        assert_eq!(plan.actions.len(), 2);
        let restarting = plan.status;
        look.kubevirt_machine = Some({
            let mut now_applied = changed.as_ref().clone();
            now_applied["status"] = json!({"printableStatus": "Running"});
            now_applied
        });
        let plan = reconcile(&view(&machine, &restarting), &look);
        assert!(plan.actions.is_empty(), "the restart is not sent twice: {:?}", plan.actions);
        assert_eq!(plan.status.restart_awaiting_changes, Some(true));
        look.now = Timestamp::UNIX_EPOCH + std::time::Duration::from_secs(601);
        let plan = reconcile(&view(&machine, &restarting), &look);
        assert_eq!(plan.actions, vec![Action::KubevirtSubresource(restart)], "sent again once the first timed out");
        look.now = Timestamp::UNIX_EPOCH;

        // The new instance runs the new template: nothing waits.
        look.instance = Some(instance(kubevirt::template_hash(changed)));
        let plan = reconcile(&view(&machine, &restarting), &look);
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.restart_awaiting_changes, None);
        assert!(conditions::find(&plan.status.conditions, AWAITING_RESTART).is_none());

        // An instance started before templates were stamped is never restarted for it.
        look.instance = Some(instance(None));
        machine.memory.size = Quantity("4Gi".into());
        let plan = reconcile(&view(&machine, &status), &look);
        assert!(matches!(plan.actions.as_slice(), [Action::ApplyKubevirtMachine(_)]), "{:?}", plan.actions);
        assert_eq!(plan.status.restart_awaiting_changes, None);
    }

    #[test]
    fn invalid_specs_and_deletion() {
        let mut machine = spec("Manual");
        machine.cpu.core_fraction = "0%".into();
        let status = VirtualMachineStatus::default();
        let plan = reconcile(&view(&machine, &status), &observed(ready_devices(), None, None));
        assert!(plan.actions.is_empty());
        assert_eq!(plan.status.phase, Some(MachinePhase::Pending));
        assert!(condition(&plan.status, RUNNING).1.contains("coreFraction"));
        let mut leaving = view(&machine, &status);
        leaving.deleting = true;
        let plan = reconcile(&leaving, &observed(ready_devices(), None, None));
        assert_eq!(plan.status.phase, Some(MachinePhase::Terminating));
        assert!(plan.actions.is_empty());
    }
}
