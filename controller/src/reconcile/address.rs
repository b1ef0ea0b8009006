//! VirtualMachineIPAddress and VirtualMachineIPAddressLease, without I/O.
//!
//! A claim (VirtualMachineIPAddress) gets its address by holding the
//! cluster-wide lease named after it ([`ipam::lease_name`]); the choice is
//! [`ipam::choose`]. Leases are created or bound by the I/O layer so that two
//! claims can never both hold one: a lease of a given name exists once, and
//! a released lease is bound with its `resourceVersion` as a precondition.
//! A deleted claim releases its lease (the finalizer waits for that), and a
//! released lease is deleted after [`RELEASED_LEASE_HOLD`], so an address is
//! not handed to another machine while ARP caches still point at the old one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{Action, Plan, WAIT_INTERVAL};
use crate::api::network::{
    AddressType, IpAddressPhase, IpAddressRef, IpAddressStatus, LeasePhase, LeaseStatus, VirtualMachineIPAddressSpec,
};
use crate::conditions::Setter;
use crate::ipam::{self, AddressPool, Choice, IpamError};

/// Condition of claims and leases: an address is leased.
pub const BOUND: &str = "Bound";
/// Condition of claims: a machine uses the address.
pub const ATTACHED: &str = "Attached";
/// How long a released lease keeps its address from being handed out again.
pub const RELEASED_LEASE_HOLD: Duration = Duration::from_secs(600);

/// What the reconciler reads of a VirtualMachineIPAddress.
#[derive(Debug, Clone, Copy)]
pub struct AddressView<'a> {
    /// `metadata.namespace` and `metadata.name`.
    pub claim: &'a IpAddressRef,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// [`super::FINALIZER`] is among `metadata.finalizers`.
    pub has_finalizer: bool,
    /// `spec`.
    pub spec: &'a VirtualMachineIPAddressSpec,
    /// `status`, as last written.
    pub status: &'a IpAddressStatus,
}

/// What the I/O layer observed for a claim.
#[derive(Debug, Clone)]
pub struct AddressObserved<'a> {
    /// The configured `virtualMachineCIDRs`; `None` when none are.
    pub pool: Option<&'a AddressPool>,
    /// Every lease: its address and the claim holding it (`None`: released).
    pub leases: BTreeMap<Ipv4Addr, Option<IpAddressRef>>,
    /// The machine in the claim's namespace that uses it.
    pub machine: Option<String>,
    /// The time now.
    pub now: Timestamp,
}

fn reason_of(error: &IpamError) -> &'static str {
    match error {
        IpamError::InvalidCidr(_) | IpamError::Overlap(..) | IpamError::NoCidrs => "InvalidCIDRs",
        IpamError::InvalidAddress(_) => "InvalidStaticIP",
        IpamError::OutsidePool(..) => "OutsideCIDRs",
        IpamError::Taken(..) => "AddressTaken",
        IpamError::Exhausted(_) => "NoFreeAddress",
    }
}

/// Decides the status and actions of a claim.
pub fn reconcile(view: &AddressView<'_>, observed: &AddressObserved<'_>) -> Plan<IpAddressStatus> {
    let mut plan = Plan {
        status: view.status.clone(),
        actions: Vec::new(),
        requeue_after: None,
    };
    let held: Vec<Ipv4Addr> = observed
        .leases
        .iter()
        .filter(|(_, holder)| holder.as_ref() == Some(view.claim))
        .map(|(address, _)| *address)
        .collect();
    if view.deleting {
        for address in held {
            plan.actions.push(Action::ReleaseAddress {
                address,
                claim: view.claim.clone(),
            });
        }
        if view.has_finalizer {
            plan.actions.push(Action::RemoveFinalizer);
        }
        return plan;
    }
    if !view.has_finalizer {
        plan.actions.push(Action::AddFinalizer);
    }
    plan.status.observed_generation = view.generation;
    let conditions = Setter {
        generation: view.generation,
        now: observed.now,
    };

    let Some(pool) = observed.pool else {
        plan.status.phase = Some(IpAddressPhase::Pending);
        conditions.set(
            &mut plan.status.conditions,
            BOUND,
            false,
            "NoCIDRsConfigured",
            "the controller has no virtualMachineCIDRs (--virtual-machine-cidrs) to take addresses from".into(),
        );
        return plan;
    };
    let static_ip = match view.spec.address_type {
        AddressType::Static => Some(view.spec.static_ip.as_deref().unwrap_or_default()),
        AddressType::Auto => None,
    };
    // An automatic claim whose lease was lost (deleted by hand) takes its
    // old address again when it is still free: a running machine keeps it.
    let previous = match (static_ip, held.is_empty(), &view.status.address) {
        (None, true, Some(text)) => text
            .parse::<Ipv4Addr>()
            .ok()
            .filter(|address| pool.contains(*address) && !observed.leases.contains_key(address)),
        _ => None,
    };
    let choice = match previous {
        Some(address) => Ok(Choice::Lease(address)),
        None => ipam::choose(pool, view.claim, static_ip, &observed.leases),
    };
    let address = match choice {
        Ok(Choice::Held(address)) => address,
        Ok(Choice::Lease(address)) => {
            plan.actions.push(Action::LeaseAddress {
                address,
                claim: view.claim.clone(),
            });
            address
        }
        Err(error) => {
            plan.status.phase = Some(IpAddressPhase::Pending);
            plan.status.address = None;
            conditions.set(
                &mut plan.status.conditions,
                BOUND,
                false,
                reason_of(&error),
                error.to_string(),
            );
            // Addresses free up as claims go.
            plan.requeue_after = Some(WAIT_INTERVAL);
            return plan;
        }
    };
    // A claim whose staticIP changed lets its old address go.
    for old in held.into_iter().filter(|old| *old != address) {
        plan.actions.push(Action::ReleaseAddress {
            address: old,
            claim: view.claim.clone(),
        });
    }
    plan.status.address = Some(address.to_string());
    conditions.set(
        &mut plan.status.conditions,
        BOUND,
        true,
        "Bound",
        format!("{address} is leased ({})", ipam::lease_name(address)),
    );
    match &observed.machine {
        Some(machine) => {
            plan.status.phase = Some(IpAddressPhase::Attached);
            plan.status.virtual_machine_name = Some(machine.clone());
            conditions.set(
                &mut plan.status.conditions,
                ATTACHED,
                true,
                "Attached",
                format!("used by VirtualMachine {machine}"),
            );
        }
        None => {
            plan.status.phase = Some(IpAddressPhase::Bound);
            plan.status.virtual_machine_name = None;
            conditions.set(
                &mut plan.status.conditions,
                ATTACHED,
                false,
                "NotAttached",
                "no VirtualMachine uses the address".into(),
            );
        }
    }
    plan
}

/// The machine a claim is attached to, among the machines of its namespace
/// (`(name, spec.virtualMachineIPAddressName)`): one that names it, or,
/// for a machine naming none, the machine of the claim's own name. The one
/// attached already keeps it; otherwise the first by name. A machine uses
/// the address only once the claim names it, so two machines naming one
/// claim never both get the address.
pub fn attached_machine(claim: &str, current: Option<&str>, machines: &[(String, Option<String>)]) -> Option<String> {
    let mut wanting: Vec<&str> = machines
        .iter()
        .filter(|(machine, named)| named.as_deref().unwrap_or(machine) == claim)
        .map(|(machine, _)| machine.as_str())
        .collect();
    wanting.sort_unstable();
    current
        .filter(|current| wanting.contains(current))
        .or(wanting.first().copied())
        .map(str::to_string)
}

/// What the reconciler reads of a lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseView<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<&'a str>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `spec.virtualMachineIPAddressRef`.
    pub holder: Option<&'a IpAddressRef>,
    /// `status`, as last written.
    pub status: &'a LeaseStatus,
}

/// Decides the status and actions of a lease. `holder_exists` says whether
/// the claim it names exists.
pub fn reconcile_lease(view: &LeaseView<'_>, holder_exists: bool, now: Timestamp) -> Plan<LeaseStatus> {
    let mut plan = Plan {
        status: view.status.clone(),
        actions: Vec::new(),
        requeue_after: None,
    };
    let Some(address) = ipam::lease_address(view.name) else {
        // Not a name the controller gives: not its lease to manage.
        return plan;
    };
    let conditions = Setter {
        generation: view.generation,
        now,
    };
    match view.holder {
        Some(holder) if holder_exists => {
            plan.status.phase = Some(LeasePhase::Bound);
            conditions.set(
                &mut plan.status.conditions,
                BOUND,
                true,
                "Bound",
                format!("leased to VirtualMachineIPAddress {}/{}", holder.namespace, holder.name),
            );
        }
        Some(holder) => {
            // Its claim went without releasing it (its finalizer removed by hand).
            plan.actions.push(Action::ReleaseAddress {
                address,
                claim: holder.clone(),
            });
            plan.status.phase = Some(LeasePhase::Released);
            conditions.set(
                &mut plan.status.conditions,
                BOUND,
                false,
                "ClaimDeleted",
                format!(
                    "VirtualMachineIPAddress {}/{} no longer exists",
                    holder.namespace, holder.name
                ),
            );
            plan.requeue_after = Some(RELEASED_LEASE_HOLD);
        }
        None => {
            plan.status.phase = Some(LeasePhase::Released);
            let already_released = view
                .status
                .conditions
                .iter()
                .any(|condition| condition.type_ == BOUND && condition.status == "False");
            if !already_released {
                conditions.set(
                    &mut plan.status.conditions,
                    BOUND,
                    false,
                    "Released",
                    "released by its claim".into(),
                );
            }
            let since = plan
                .status
                .conditions
                .iter()
                .find(|condition| condition.type_ == BOUND)
                .map_or(now, |condition| condition.last_transition_time.0);
            let held_for = now.duration_since(since).unsigned_abs();
            match RELEASED_LEASE_HOLD.checked_sub(held_for).filter(|left| !left.is_zero()) {
                Some(left) => plan.requeue_after = Some(left),
                None => plan.actions.push(Action::DeleteLease {
                    name: view.name.to_string(),
                    resource_version: view.resource_version.map(str::to_string),
                }),
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::tests::{claim, ip};

    fn pool() -> AddressPool {
        AddressPool::parse(&["10.66.10.0/29"]).unwrap_or_else(|error| panic!("{error}"))
    }

    fn now() -> Timestamp {
        "2026-11-23T10:00:00Z".parse().unwrap_or_else(|error| panic!("{error}"))
    }

    fn auto() -> VirtualMachineIPAddressSpec {
        VirtualMachineIPAddressSpec {
            address_type: AddressType::Auto,
            static_ip: None,
        }
    }

    fn fixed(address: &str) -> VirtualMachineIPAddressSpec {
        VirtualMachineIPAddressSpec {
            address_type: AddressType::Static,
            static_ip: Some(address.into()),
        }
    }

    fn plan_for(
        claim_ref: &IpAddressRef,
        spec: &VirtualMachineIPAddressSpec,
        status: &IpAddressStatus,
        leases: &BTreeMap<Ipv4Addr, Option<IpAddressRef>>,
        machine: Option<&str>,
    ) -> Plan<IpAddressStatus> {
        let pool = pool();
        let view = AddressView {
            claim: claim_ref,
            generation: Some(1),
            deleting: false,
            has_finalizer: true,
            spec,
            status,
        };
        let observed = AddressObserved {
            pool: Some(&pool),
            leases: leases.clone(),
            machine: machine.map(str::to_string),
            now: now(),
        };
        reconcile(&view, &observed)
    }

    fn condition<'a>(status: &'a IpAddressStatus, condition_type: &str) -> (&'a str, &'a str) {
        status
            .conditions
            .iter()
            .find(|condition| condition.type_ == condition_type)
            .map_or(("", ""), |condition| {
                (condition.status.as_str(), condition.reason.as_str())
            })
    }

    #[test]
    fn a_new_claim_gets_its_finalizer_then_leases_the_first_free_address() {
        let status = IpAddressStatus::default();
        let pool = pool();
        let view = AddressView {
            claim: &claim("web"),
            generation: Some(1),
            deleting: false,
            has_finalizer: false,
            spec: &auto(),
            status: &status,
        };
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.66.10.1"), Some(claim("other")));
        let observed = AddressObserved {
            pool: Some(&pool),
            leases,
            machine: None,
            now: now(),
        };
        let plan = reconcile(&view, &observed);
        assert_eq!(
            plan.actions,
            vec![
                Action::AddFinalizer,
                Action::LeaseAddress {
                    address: ip("10.66.10.2"),
                    claim: claim("web")
                }
            ]
        );
        assert_eq!(plan.status.address.as_deref(), Some("10.66.10.2"));
        assert_eq!(plan.status.phase, Some(IpAddressPhase::Bound));
        assert_eq!(condition(&plan.status, BOUND), ("True", "Bound"));
    }

    #[test]
    fn a_held_lease_needs_no_action_and_a_machine_attaches() {
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.66.10.3"), Some(claim("web")));
        let plan = plan_for(
            &claim("web"),
            &auto(),
            &IpAddressStatus::default(),
            &leases,
            Some("web"),
        );
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.address.as_deref(), Some("10.66.10.3"));
        assert_eq!(plan.status.phase, Some(IpAddressPhase::Attached));
        assert_eq!(plan.status.virtual_machine_name.as_deref(), Some("web"));
        assert_eq!(condition(&plan.status, ATTACHED), ("True", "Attached"));
    }

    #[test]
    fn static_addresses_taken_outside_or_malformed_leave_the_claim_pending_with_the_reason() {
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.66.10.4"), Some(claim("other")));
        for (spec, reason, words) in [
            (
                fixed("10.66.10.4"),
                "AddressTaken",
                "already leased to VirtualMachineIPAddress vms/other",
            ),
            (
                fixed("10.66.99.1"),
                "OutsideCIDRs",
                "not a usable address of the virtualMachineCIDRs (10.66.10.0/29)",
            ),
            (fixed("ten"), "InvalidStaticIP", "is not an IPv4 address"),
        ] {
            let plan = plan_for(&claim("web"), &spec, &IpAddressStatus::default(), &leases, None);
            assert!(plan.actions.is_empty(), "{:?}", plan.actions);
            assert_eq!(plan.status.phase, Some(IpAddressPhase::Pending));
            assert_eq!(condition(&plan.status, BOUND), ("False", reason));
            let message = &plan.status.conditions[0].message;
            assert!(message.contains(words), "{message}");
            assert_eq!(plan.requeue_after, Some(WAIT_INTERVAL));
        }
    }

    #[test]
    fn an_exhausted_pool_is_said_plainly() {
        let leases: BTreeMap<_, _> = (1..=6)
            .map(|host| (ip(&format!("10.66.10.{host}")), Some(claim(&format!("vm-{host}")))))
            .collect();
        let plan = plan_for(&claim("late"), &auto(), &IpAddressStatus::default(), &leases, None);
        assert_eq!(condition(&plan.status, BOUND), ("False", "NoFreeAddress"));
        assert_eq!(
            plan.status.conditions[0].message,
            "every address of the virtualMachineCIDRs (10.66.10.0/29) is leased"
        );
    }

    #[test]
    fn a_changed_static_address_is_leased_before_the_old_one_is_released() {
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.66.10.1"), Some(claim("web")));
        let plan = plan_for(
            &claim("web"),
            &fixed("10.66.10.5"),
            &IpAddressStatus::default(),
            &leases,
            None,
        );
        assert_eq!(
            plan.actions,
            vec![
                Action::LeaseAddress {
                    address: ip("10.66.10.5"),
                    claim: claim("web")
                },
                Action::ReleaseAddress {
                    address: ip("10.66.10.1"),
                    claim: claim("web")
                },
            ]
        );
    }

    #[test]
    fn a_lost_lease_is_taken_again_for_the_same_address_when_free() {
        let status = IpAddressStatus {
            address: Some("10.66.10.5".into()),
            ..IpAddressStatus::default()
        };
        let plan = plan_for(&claim("web"), &auto(), &status, &BTreeMap::new(), Some("web"));
        assert_eq!(
            plan.actions,
            vec![Action::LeaseAddress {
                address: ip("10.66.10.5"),
                claim: claim("web")
            }]
        );
        // Taken meanwhile: the first free one instead.
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.66.10.5"), Some(claim("thief")));
        let plan = plan_for(&claim("web"), &auto(), &status, &leases, Some("web"));
        assert_eq!(
            plan.actions,
            vec![Action::LeaseAddress {
                address: ip("10.66.10.1"),
                claim: claim("web")
            }]
        );
    }

    #[test]
    fn deletion_releases_every_held_lease_then_the_finalizer() {
        let mut leases = BTreeMap::new();
        leases.insert(ip("10.66.10.2"), Some(claim("web")));
        leases.insert(ip("10.66.10.3"), Some(claim("other")));
        let pool = pool();
        let status = IpAddressStatus::default();
        let view = AddressView {
            claim: &claim("web"),
            generation: Some(1),
            deleting: true,
            has_finalizer: true,
            spec: &auto(),
            status: &status,
        };
        let observed = AddressObserved {
            pool: Some(&pool),
            leases,
            machine: None,
            now: now(),
        };
        assert_eq!(
            reconcile(&view, &observed).actions,
            vec![
                Action::ReleaseAddress {
                    address: ip("10.66.10.2"),
                    claim: claim("web")
                },
                Action::RemoveFinalizer
            ]
        );
    }

    #[test]
    fn without_cidrs_claims_wait_and_say_what_to_configure() {
        let status = IpAddressStatus::default();
        let view = AddressView {
            claim: &claim("web"),
            generation: Some(1),
            deleting: false,
            has_finalizer: true,
            spec: &auto(),
            status: &status,
        };
        let observed = AddressObserved {
            pool: None,
            leases: BTreeMap::new(),
            machine: None,
            now: now(),
        };
        let plan = reconcile(&view, &observed);
        assert!(plan.actions.is_empty());
        assert_eq!(condition(&plan.status, BOUND), ("False", "NoCIDRsConfigured"));
    }

    #[test]
    fn a_claim_is_attached_to_one_machine_only() {
        let machines = |list: &[(&str, Option<&str>)]| -> Vec<(String, Option<String>)> {
            list.iter()
                .map(|(name, named)| (name.to_string(), named.map(str::to_string)))
                .collect()
        };
        let vms = machines(&[
            ("web", None),
            ("db", Some("shared")),
            ("app", Some("shared")),
            ("x", Some("web")),
        ]);
        assert_eq!(attached_machine("shared", None, &vms).as_deref(), Some("app"));
        assert_eq!(
            attached_machine("shared", Some("db"), &vms).as_deref(),
            Some("db"),
            "kept"
        );
        assert_eq!(attached_machine("shared", Some("gone"), &vms).as_deref(), Some("app"));
        // `web` names no claim, so its own is `web`; `x` names `web` too.
        assert_eq!(attached_machine("web", None, &vms).as_deref(), Some("web"));
        assert_eq!(attached_machine("lonely", None, &vms), None);
    }

    #[test]
    fn leases_follow_their_claims_and_released_ones_go_after_the_hold() {
        let holder = claim("web");
        let status = LeaseStatus::default();
        let view = LeaseView {
            name: "ip-10-66-10-2",
            resource_version: Some("7"),
            generation: Some(1),
            holder: Some(&holder),
            status: &status,
        };
        let bound = reconcile_lease(&view, true, now());
        assert!(bound.actions.is_empty());
        assert_eq!(bound.status.phase, Some(LeasePhase::Bound));

        let orphaned = reconcile_lease(&view, false, now());
        assert_eq!(
            orphaned.actions,
            vec![Action::ReleaseAddress {
                address: ip("10.66.10.2"),
                claim: holder.clone()
            }]
        );

        let released = LeaseView { holder: None, ..view };
        let plan = reconcile_lease(&released, false, now());
        assert!(plan.actions.is_empty());
        assert_eq!(plan.status.phase, Some(LeasePhase::Released));
        assert_eq!(plan.requeue_after, Some(RELEASED_LEASE_HOLD));
        // Ten minutes later, the same lease is deleted (if unchanged).
        let later = now() + RELEASED_LEASE_HOLD;
        let plan_later = reconcile_lease(
            &LeaseView {
                status: &plan.status,
                ..released
            },
            false,
            later,
        );
        assert_eq!(
            plan_later.actions,
            vec![Action::DeleteLease {
                name: "ip-10-66-10-2".into(),
                resource_version: Some("7".into())
            }]
        );
        // A lease of a name the controller does not give is left alone.
        let foreign = reconcile_lease(&LeaseView { name: "mine", ..view }, false, now());
        assert!(foreign.actions.is_empty() && foreign.status == status);
    }
}
