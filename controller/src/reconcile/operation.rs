//! VirtualMachineOperation: one Start, Stop, Restart, Migrate or Evict,
//! sent once to KubeVirt's subresource API, then followed until the machine
//! got there. KubeVirt's acceptance makes the operation `InProgress`
//! (condition `SignalSent`); it is `Completed` once KubeVirt shows the end
//! state (Running after a start, Stopped after a stop, a new instance
//! Running after a restart, a finished migration that began after the
//! request), and `Failed` when KubeVirt refuses it, a migration fails, or
//! the end state is not reached in time. It is never sent twice.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::machine::{
    MachinePhase, OperationPhase, OperationStatus, OperationType, VirtualMachineOperationSpec,
};
use crate::conditions;
use crate::kubevirt::{operation_request, SubresourceRequest};

/// How long a start, stop or restart may take to show.
pub const POWER_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a migration may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600);

/// Condition: the request reached KubeVirt.
pub const SIGNAL_SENT: &str = "SignalSent";
/// Condition: the operation is over.
pub const COMPLETED: &str = "Completed";

/// What the reconciler reads of an operation.
#[derive(Debug, Clone, Copy)]
pub struct OperationView<'a> {
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `spec`.
    pub spec: &'a VirtualMachineOperationSpec,
    /// `status`, as last written.
    pub status: &'a OperationStatus,
}

/// The next step of an operation.
#[derive(Debug, Clone, PartialEq)]
pub enum OperationStep {
    /// Already finished: nothing to do.
    Finished,
    /// Fails without a request (the machine does not exist).
    Fail(String),
    /// Send this request, then record the answer with [`answered`].
    Send(SubresourceRequest),
    /// Sent and accepted: observe the machine and decide with [`followed`].
    Follow,
}

/// What to do for an operation, given whether its machine exists.
pub fn next_step(view: &OperationView<'_>, machine_exists: bool) -> OperationStep {
    match view.status.phase {
        Some(OperationPhase::Completed | OperationPhase::Failed | OperationPhase::Terminating) => {
            OperationStep::Finished
        }
        Some(OperationPhase::InProgress) => OperationStep::Follow,
        _ if !machine_exists => OperationStep::Fail(format!(
            "VirtualMachine {}/{} does not exist",
            view.namespace, view.spec.virtual_machine_name
        )),
        _ => OperationStep::Send(operation_request(
            view.namespace,
            &view.spec.virtual_machine_name,
            view.spec.operation_type,
            view.spec.force,
        )),
    }
}

/// The status once the request was answered (`Ok`) or refused (`Err`
/// with KubeVirt's message), or the operation failed without one.
pub fn answered(view: &OperationView<'_>, answer: Result<(), String>, now: Timestamp) -> OperationStatus {
    let mut status = view.status.clone();
    status.observed_generation = view.generation;
    let verb = format!("{:?}", view.spec.operation_type);
    let machine = &view.spec.virtual_machine_name;
    let setter = conditions::Setter {
        generation: view.generation,
        now,
    };
    match answer {
        Ok(()) => {
            status.phase = Some(OperationPhase::InProgress);
            let accepted = format!("KubeVirt accepted {verb} of {machine}");
            setter.set(&mut status.conditions, SIGNAL_SENT, true, "SignalSent", accepted.clone());
            let waiting = format!("{accepted}; waiting for {}", end_state(view.spec.operation_type));
            setter.set(&mut status.conditions, COMPLETED, false, "InProgress", waiting);
        }
        Err(error) => {
            status.phase = Some(OperationPhase::Failed);
            let message = format!("{verb} of {machine}: {error}");
            setter.set(&mut status.conditions, SIGNAL_SENT, false, "Failed", message.clone());
            setter.set(&mut status.conditions, COMPLETED, false, "Failed", message);
        }
    }
    status
}

fn end_state(operation: OperationType) -> &'static str {
    match operation {
        OperationType::Start => "it to run",
        OperationType::Stop => "it to stop",
        OperationType::Restart => "a new instance to run",
        OperationType::Migrate | OperationType::Evict => "the migration to finish",
    }
}

fn goal(operation: OperationType) -> &'static str {
    match operation {
        OperationType::Start => "Running",
        OperationType::Stop => "Stopped",
        OperationType::Restart => "a new running instance",
        OperationType::Migrate | OperationType::Evict => "a finished migration",
    }
}

/// What KubeVirt shows of the machine an operation is about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MachineProgress {
    /// The machine's phase as mirrored from KubeVirt; `None` when KubeVirt
    /// has no machine.
    pub phase: Option<MachinePhase>,
    /// When its running instance was created.
    pub instance_created: Option<Timestamp>,
    /// The instance's latest migration.
    pub migration: Option<MigrationProgress>,
}

/// KubeVirt's `status.migrationState` of an instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationProgress {
    /// `startTimestamp`.
    pub started: Option<Timestamp>,
    /// `completed`.
    pub completed: bool,
    /// `failed`.
    pub failed: bool,
}

/// The status of an operation under way, given what KubeVirt shows at
/// `now`, and when to look again (`None`: it is over).
pub fn followed(
    view: &OperationView<'_>,
    machine: &MachineProgress,
    now: Timestamp,
) -> (OperationStatus, Option<Duration>) {
    let mut status = view.status.clone();
    let sent = conditions::find(&view.status.conditions, SIGNAL_SENT)
        .map_or(now, |condition| condition.last_transition_time.0);
    let after_sending = |time: Option<Timestamp>| time.is_some_and(|time| time >= sent);
    let operation = view.spec.operation_type;
    let migration = machine.migration.as_ref().filter(|migration| after_sending(migration.started));
    let outcome: Option<Result<(), String>> = match operation {
        OperationType::Start => (machine.phase == Some(MachinePhase::Running)).then_some(Ok(())),
        OperationType::Stop => matches!(machine.phase, None | Some(MachinePhase::Stopped)).then_some(Ok(())),
        OperationType::Restart => (machine.phase == Some(MachinePhase::Running)
            && after_sending(machine.instance_created))
        .then_some(Ok(())),
        OperationType::Migrate | OperationType::Evict => match migration {
            Some(migration) if migration.failed => Some(Err("KubeVirt reports the migration failed".into())),
            Some(migration) if migration.completed => Some(Ok(())),
            _ => None,
        },
    };
    let limit = match operation {
        OperationType::Migrate | OperationType::Evict => MIGRATION_TIMEOUT,
        _ => POWER_TIMEOUT,
    };
    let elapsed = now.duration_since(sent).unsigned_abs();
    let outcome = outcome.or_else(|| {
        (elapsed >= limit).then(|| {
            Err(format!(
                "{} not reached within {} minutes (the machine is {})",
                goal(operation),
                limit.as_secs() / 60,
                machine.phase.map_or("not in KubeVirt".to_string(), |phase| format!("{phase:?}")),
            ))
        })
    });
    let setter = conditions::Setter {
        generation: view.generation,
        now,
    };
    let described = format!("{operation:?} of {}", view.spec.virtual_machine_name);
    match outcome {
        None => (status, Some(super::PROGRESS_INTERVAL)),
        Some(Ok(())) => {
            status.phase = Some(OperationPhase::Completed);
            setter.set(&mut status.conditions, COMPLETED, true, "Completed", format!("{described} is done"));
            (status, None)
        }
        Some(Err(error)) => {
            status.phase = Some(OperationPhase::Failed);
            setter.set(&mut status.conditions, COMPLETED, false, "Failed", format!("{described}: {error}"));
            (status, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::machine::OperationType;

    fn spec(operation_type: OperationType, force: bool) -> VirtualMachineOperationSpec {
        VirtualMachineOperationSpec {
            operation_type,
            virtual_machine_name: "web".into(),
            force,
        }
    }

    #[test]
    fn an_operation_is_sent_once_and_its_answer_recorded() {
        let stop = spec(OperationType::Stop, true);
        let status = OperationStatus::default();
        let view = OperationView {
            namespace: "vms",
            generation: Some(1),
            spec: &stop,
            status: &status,
        };
        let OperationStep::Send(request) = next_step(&view, true) else {
            panic!("nothing to send");
        };
        assert!(request.path.ends_with("/namespaces/vms/virtualmachines/web/stop"), "{}", request.path);
        assert_eq!(request.body, serde_json::json!({"gracePeriod": 0}));

        let accepted = answered(&view, Ok(()), Timestamp::UNIX_EPOCH);
        assert_eq!(accepted.phase, Some(OperationPhase::InProgress));
        let sent = conditions::find(&accepted.conditions, SIGNAL_SENT).map(|condition| condition.status.clone());
        assert_eq!(sent.as_deref(), Some("True"));
        let under_way = OperationView {
            status: &accepted,
            ..view
        };
        assert_eq!(next_step(&under_way, true), OperationStep::Follow, "never sent twice");

        let refused = answered(&view, Err("VM is not running".into()), Timestamp::UNIX_EPOCH);
        assert_eq!(refused.phase, Some(OperationPhase::Failed));
        let message = conditions::find(&refused.conditions, COMPLETED).map(|condition| condition.message.clone());
        assert_eq!(message.as_deref(), Some("Stop of web: VM is not running"));
        let failed = OperationView {
            status: &refused,
            ..view
        };
        assert_eq!(next_step(&failed, true), OperationStep::Finished);
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    /// The status of `operation` accepted by KubeVirt at `at(0)`.
    fn accepted(operation: &VirtualMachineOperationSpec) -> OperationStatus {
        let status = OperationStatus::default();
        let view = OperationView {
            namespace: "vms",
            generation: Some(1),
            spec: operation,
            status: &status,
        };
        answered(&view, Ok(()), at(0))
    }

    fn follow(
        operation: &VirtualMachineOperationSpec,
        machine: &MachineProgress,
        seconds: i64,
    ) -> (Option<OperationPhase>, String, Option<Duration>) {
        let status = accepted(operation);
        let view = OperationView {
            namespace: "vms",
            generation: Some(1),
            spec: operation,
            status: &status,
        };
        let (status, again) = followed(&view, machine, at(seconds));
        let message = conditions::find(&status.conditions, COMPLETED).map(|condition| condition.message.clone());
        (status.phase, message.unwrap_or_default(), again)
    }

    fn progress(phase: Option<MachinePhase>, created: Option<i64>) -> MachineProgress {
        MachineProgress {
            phase,
            instance_created: created.map(at),
            migration: None,
        }
    }

    #[test]
    fn operations_complete_when_kubevirt_shows_their_end_state() {
        let start = spec(OperationType::Start, false);
        let (phase, message, again) = follow(&start, &progress(Some(MachinePhase::Starting), Some(1)), 5);
        assert_eq!((phase, again), (Some(OperationPhase::InProgress), Some(super::super::PROGRESS_INTERVAL)));
        assert_eq!(message, "KubeVirt accepted Start of web; waiting for it to run");
        let (phase, message, again) = follow(&start, &progress(Some(MachinePhase::Running), Some(1)), 9);
        assert_eq!((phase, again), (Some(OperationPhase::Completed), None));
        assert_eq!(message, "Start of web is done");

        let stop = spec(OperationType::Stop, false);
        let stopping = progress(Some(MachinePhase::Stopping), Some(-60));
        assert_eq!(follow(&stop, &stopping, 5).0, Some(OperationPhase::InProgress));
        assert_eq!(follow(&stop, &progress(Some(MachinePhase::Stopped), None), 5).0, Some(OperationPhase::Completed));

        // A restart is done only with an instance newer than the request.
        let restart = spec(OperationType::Restart, false);
        let old_instance = progress(Some(MachinePhase::Running), Some(-3600));
        assert_eq!(follow(&restart, &old_instance, 2).0, Some(OperationPhase::InProgress));
        let new_instance = progress(Some(MachinePhase::Running), Some(4));
        assert_eq!(follow(&restart, &new_instance, 6).0, Some(OperationPhase::Completed));
    }

    #[test]
    fn migrations_follow_the_instance_migration_begun_after_the_request() {
        let migrate = spec(OperationType::Migrate, false);
        let with = |started: i64, completed: bool, failed: bool| MachineProgress {
            phase: Some(MachinePhase::Running),
            instance_created: Some(at(-3600)),
            migration: Some(MigrationProgress {
                started: Some(at(started)),
                completed,
                failed,
            }),
        };
        assert_eq!(follow(&migrate, &with(-600, true, false), 5).0, Some(OperationPhase::InProgress), "an earlier one");
        assert_eq!(follow(&migrate, &with(2, false, false), 5).0, Some(OperationPhase::InProgress));
        assert_eq!(follow(&migrate, &with(2, true, false), 30).0, Some(OperationPhase::Completed));
        let (phase, message, _) = follow(&migrate, &with(2, false, true), 30);
        assert_eq!(phase, Some(OperationPhase::Failed));
        assert_eq!(message, "Migrate of web: KubeVirt reports the migration failed");
    }

    #[test]
    fn operations_that_never_get_there_fail_after_their_time() {
        let start = spec(OperationType::Start, false);
        let stuck = progress(Some(MachinePhase::Starting), None);
        assert_eq!(follow(&start, &stuck, 599).0, Some(OperationPhase::InProgress));
        let (phase, message, again) = follow(&start, &stuck, 600);
        assert_eq!((phase, again), (Some(OperationPhase::Failed), None));
        assert_eq!(message, "Start of web: Running not reached within 10 minutes (the machine is Starting)");
        let evict = spec(OperationType::Evict, false);
        assert_eq!(follow(&evict, &stuck, 3599).0, Some(OperationPhase::InProgress));
        assert_eq!(follow(&evict, &stuck, 3600).0, Some(OperationPhase::Failed));
    }

    #[test]
    fn an_operation_on_a_missing_machine_fails_without_a_request() {
        let start = spec(OperationType::Start, false);
        let status = OperationStatus::default();
        let view = OperationView {
            namespace: "vms",
            generation: Some(1),
            spec: &start,
            status: &status,
        };
        assert_eq!(
            next_step(&view, false),
            OperationStep::Fail("VirtualMachine vms/web does not exist".into())
        );
    }
}
