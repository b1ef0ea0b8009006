//! VirtualMachineOperation: one Start, Stop, Restart, Migrate or Evict,
//! sent once to KubeVirt's subresource API. An operation is done when
//! KubeVirt accepts it (`Completed`, condition `SignalSent`) or refuses it
//! (`Failed`, with KubeVirt's message); it is never sent again.

use k8s_openapi::jiff::Timestamp;

use crate::api::machine::{OperationPhase, OperationStatus, VirtualMachineOperationSpec};
use crate::conditions::{self, Desired};
use crate::kubevirt::{operation_request, SubresourceRequest};

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
}

/// What to do for an operation, given whether its machine exists.
pub fn next_step(view: &OperationView<'_>, machine_exists: bool) -> OperationStep {
    match view.status.phase {
        Some(OperationPhase::Completed | OperationPhase::Failed | OperationPhase::Terminating) => {
            OperationStep::Finished
        }
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
    let (phase, sent, reason, message) = match answer {
        Ok(()) => (
            OperationPhase::Completed,
            true,
            "SignalSent",
            format!("KubeVirt accepted {verb} of {machine}"),
        ),
        Err(error) => (OperationPhase::Failed, false, "Failed", format!("{verb} of {machine}: {error}")),
    };
    status.phase = Some(phase);
    for (condition_type, holds) in [(SIGNAL_SENT, sent), (COMPLETED, sent)] {
        conditions::set(
            &mut status.conditions,
            Desired {
                condition_type,
                status: holds,
                reason,
                message: message.clone(),
            },
            view.generation,
            now,
        );
    }
    status
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

        let done = answered(&view, Ok(()), Timestamp::UNIX_EPOCH);
        assert_eq!(done.phase, Some(OperationPhase::Completed));
        let sent = conditions::find(&done.conditions, SIGNAL_SENT).map(|condition| condition.status.clone());
        assert_eq!(sent.as_deref(), Some("True"));
        let finished = OperationView {
            status: &done,
            ..view
        };
        assert_eq!(next_step(&finished, true), OperationStep::Finished, "never sent twice");

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
