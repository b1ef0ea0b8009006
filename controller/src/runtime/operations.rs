//! The VirtualMachineOperation controller: send the operation to KubeVirt
//! once, record KubeVirt's answer.

use std::sync::Arc;

use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};

use super::{execute, Context, Error};
use crate::api::{VirtualMachine, VirtualMachineOperation};
use crate::reconcile::operation::{answered, next_step, OperationStep, OperationView};
use crate::reconcile::Plan;

/// Reconciles a VirtualMachineOperation.
pub async fn reconcile_operation(
    operation: Arc<VirtualMachineOperation>,
    context: Arc<Context>,
) -> Result<Requeue, Error> {
    let namespace = operation.namespace().ok_or(Error::Incomplete("namespace"))?;
    let status = operation.status.clone().unwrap_or_default();
    let view = OperationView {
        namespace: &namespace,
        generation: operation.metadata.generation,
        spec: &operation.spec,
        status: &status,
    };
    if next_step(&view, true) == OperationStep::Finished || operation.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::await_change());
    }
    let machine = &operation.spec.virtual_machine_name;
    let exists = Api::<VirtualMachine>::namespaced(context.client.clone(), &namespace)
        .get_opt(machine)
        .await
        .map_err(Error::kube(format!("reading VirtualMachine {namespace}/{machine}")))?
        .is_some();
    let now = k8s_openapi::jiff::Timestamp::now();
    let new_status = match next_step(&view, exists) {
        OperationStep::Finished => return Ok(Requeue::await_change()),
        OperationStep::Fail(message) => answered(&view, Err(message), now),
        OperationStep::Send(request) => match execute::put_subresource(&context, &request).await {
            Ok(()) => answered(&view, Ok(()), now),
            // KubeVirt's refusal (the machine is not running, a migration
            // is under way, ...) ends the operation; anything else is retried.
            Err(kube::Error::Api(refusal)) if (400..500).contains(&refusal.code) => {
                answered(&view, Err(refusal.message.clone()), now)
            }
            Err(error) => return Err(Error::kube(format!("PUT {}", request.path))(error)),
        },
    };
    let plan = Plan {
        status: new_status,
        actions: Vec::new(),
        requeue_after: None,
    };
    let api: Api<VirtualMachineOperation> = Api::namespaced(context.client.clone(), &namespace);
    execute::carry_out(&context, &api, operation.as_ref(), &status, plan).await
}
