//! The VirtualMachineOperation controller: send the operation to KubeVirt
//! once, record KubeVirt's answer, then follow the machine to the end state.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};
use serde_json::Value;

use super::{execute, machines, Context, Error};
use crate::api::machine::OperationPhase;
use crate::api::{VirtualMachine, VirtualMachineOperation};
use crate::kubevirt::mirror_status;
use crate::reconcile::operation::{
    answered, followed, next_step, MachineProgress, MigrationProgress, OperationStep, OperationView,
};
use crate::reconcile::{Plan, PROGRESS_INTERVAL};

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
    let step = next_step(&view, true);
    if step == OperationStep::Finished || operation.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::await_change());
    }
    let api: Api<VirtualMachineOperation> = Api::namespaced(context.client.clone(), &namespace);
    if step == OperationStep::Follow {
        let progress = observe_machine(&context, &namespace, &operation.spec.virtual_machine_name).await?;
        let (new_status, again) = followed(&view, &progress, Timestamp::now());
        let plan = Plan {
            status: new_status,
            actions: Vec::new(),
            requeue_after: again,
        };
        return execute::carry_out(&context, &api, operation.as_ref(), &status, plan).await;
    }
    let machine = &operation.spec.virtual_machine_name;
    let exists = Api::<VirtualMachine>::namespaced(context.client.clone(), &namespace)
        .get_opt(machine)
        .await
        .map_err(Error::kube(format!("reading VirtualMachine {namespace}/{machine}")))?
        .is_some();
    let now = Timestamp::now();
    let new_status = match next_step(&view, exists) {
        OperationStep::Finished | OperationStep::Follow => return Ok(Requeue::await_change()),
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
    // An accepted operation is looked at again until it shows.
    let requeue_after = (new_status.phase == Some(OperationPhase::InProgress)).then_some(PROGRESS_INTERVAL);
    let plan = Plan {
        status: new_status,
        actions: Vec::new(),
        requeue_after,
    };
    execute::carry_out(&context, &api, operation.as_ref(), &status, plan).await
}

/// What KubeVirt shows of machine `name`: its phase, its instance's
/// creation and latest migration.
async fn observe_machine(context: &Context, namespace: &str, name: &str) -> Result<MachineProgress, Error> {
    let Some(machine) = machines::read_kubevirt(context, machines::kubevirt_machines(), namespace, name).await? else {
        return Ok(MachineProgress::default());
    };
    let instance = machines::read_kubevirt(context, machines::kubevirt_instances(), namespace, name).await?;
    let mirrored = mirror_status(Some(&machine), instance.as_ref());
    let time = |value: &Value| value.as_str().and_then(|text| text.parse::<Timestamp>().ok());
    let instance = instance.unwrap_or_default();
    let migration = &instance["status"]["migrationState"];
    Ok(MachineProgress {
        phase: Some(mirrored.phase),
        instance_created: time(&instance["metadata"]["creationTimestamp"]),
        migration: migration.is_object().then(|| MigrationProgress {
            started: time(&migration["startTimestamp"]),
            completed: migration["completed"].as_bool().unwrap_or(false),
            failed: migration["failed"].as_bool().unwrap_or(false),
        }),
    })
}
