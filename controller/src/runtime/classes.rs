//! The VirtualMachineClass controller: lists the nodes, works out the
//! class's available nodes and, for `Discovery`, the CPU features its
//! discovery nodes share ([`crate::class::class_status`]), writes the status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};

use super::{execute, Context, Error};
use crate::api::VirtualMachineClass;
use crate::class::{class_status, NodeFacts};
use crate::conditions::Setter;
use crate::reconcile::Plan;

/// How often a class looks at the nodes again without a label change
/// (taints, nodes gone): node labels changing wake every class at once.
pub const NODES_INTERVAL: Duration = Duration::from_secs(300);

/// Reconciles a VirtualMachineClass.
pub async fn reconcile_class(class: Arc<VirtualMachineClass>, context: Arc<Context>) -> Result<Requeue, Error> {
    let nodes = Api::<Node>::all(context.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("listing Nodes"))?;
    let facts: Vec<NodeFacts> = nodes.items.iter().map(node_facts).collect();
    let previous = class.status.clone().unwrap_or_default();
    let setter = Setter {
        generation: class.metadata.generation,
        now: k8s_openapi::jiff::Timestamp::now(),
    };
    let plan = Plan {
        status: class_status(&class.spec, &previous, &facts, &setter),
        actions: Vec::new(),
        requeue_after: Some(NODES_INTERVAL),
    };
    let api: Api<VirtualMachineClass> = Api::all(context.client.clone());
    execute::carry_out(&context, &api, class.as_ref(), &previous, plan).await
}

/// What a class needs of a node: its name, labels and taints.
pub fn node_facts(node: &Node) -> NodeFacts {
    NodeFacts {
        name: node.name_any(),
        labels: node.labels().clone(),
        taints: node
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.clone())
            .unwrap_or_default(),
    }
}
