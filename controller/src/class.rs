//! VirtualMachineClass rules, without I/O: whether a machine's size is one
//! its class's sizing policies allow, and what the class adds to KubeVirt's
//! machine (the CPU model or features, node selector and tolerations).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Taint, Toleration};
use serde_json::{json, Value};

use crate::api::machine::{
    ClassCpuFeatures, ClassCpuType, ClassNodeSelector, SizingPolicy, VirtualMachineClassSpec,
    VirtualMachineClassStatus, VirtualMachineSpec,
};
use crate::conditions::Setter;
use crate::reconcile::disk::quantity_bytes;

/// A machine its class does not allow, or a class that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    /// No sizing policy covers the core count.
    #[error("VirtualMachineClass {class} allows no machine with {cores} cores (its policies cover: {allowed})")]
    Cores {
        /// The class.
        class: String,
        /// `spec.cpu.cores`.
        cores: i32,
        /// The core counts allowed.
        allowed: String,
    },
    /// The memory is outside the policy's range or off its step.
    #[error("VirtualMachineClass {class} allows {allowed} of memory for {cores} cores, not {memory}")]
    Memory {
        /// The class.
        class: String,
        /// `spec.cpu.cores`.
        cores: i32,
        /// `spec.memory.size`.
        memory: String,
        /// What the policy allows.
        allowed: String,
    },
    /// The core fraction is not among the policy's.
    #[error("VirtualMachineClass {class} allows a coreFraction of {allowed} for {cores} cores, not {fraction}")]
    CoreFraction {
        /// The class.
        class: String,
        /// `spec.cpu.cores`.
        cores: i32,
        /// `spec.cpu.coreFraction`.
        fraction: String,
        /// The fractions allowed.
        allowed: String,
    },
    /// A quantity of the machine or the class does not parse.
    #[error("{0:?} is not a quantity of bytes such as 4Gi")]
    Quantity(String),
    /// A `Discovery` class whose status has no CPU features yet.
    #[error(
        "VirtualMachineClass {class} has cpu.type Discovery and has not found its nodes' common CPU features yet \
         (status.cpuFeatures; see its Discovered condition)"
    )]
    NotDiscovered {
        /// The class.
        class: String,
    },
    /// `cpu.type` needs a field the class does not fill.
    #[error("VirtualMachineClass {class} has cpu.type {cpu_type} but no cpu.{field}")]
    CpuIncomplete {
        /// The class.
        class: String,
        /// `cpu.type`.
        cpu_type: &'static str,
        /// The missing field.
        field: &'static str,
    },
}

fn bytes(quantity: &str) -> Result<u64, ClassError> {
    quantity_bytes(quantity).ok_or_else(|| ClassError::Quantity(quantity.to_string()))
}

fn covers(policy: &SizingPolicy, cores: i32) -> bool {
    let range = &policy.cores;
    let step = range.step.filter(|step| *step > 0).unwrap_or(1);
    (range.min..=range.max).contains(&cores) && (cores - range.min) % step == 0
}

fn describe_cores(policy: &SizingPolicy) -> String {
    let range = &policy.cores;
    match range.step.filter(|step| *step > 1) {
        Some(step) => format!("{}-{} in steps of {step}", range.min, range.max),
        None if range.min == range.max => range.min.to_string(),
        None => format!("{}-{}", range.min, range.max),
    }
}

/// Checks a machine's cores, memory and core fraction against the sizing
/// policies of its class `name`. A class without policies allows any size.
pub fn check_sizing(name: &str, class: &VirtualMachineClassSpec, spec: &VirtualMachineSpec) -> Result<(), ClassError> {
    if class.sizing_policies.is_empty() {
        return Ok(());
    }
    let cores = spec.cpu.cores;
    let Some(policy) = class.sizing_policies.iter().find(|policy| covers(policy, cores)) else {
        let allowed: Vec<String> = class.sizing_policies.iter().map(describe_cores).collect();
        return Err(ClassError::Cores {
            class: name.to_string(),
            cores,
            allowed: allowed.join(", "),
        });
    };
    if let Some(range) = &policy.memory {
        let memory = bytes(&spec.memory.size.0)?;
        let min = range.min.as_ref().map(|min| bytes(&min.0)).transpose()?;
        let max = range.max.as_ref().map(|max| bytes(&max.0)).transpose()?;
        let step = range
            .step
            .as_ref()
            .map(|step| bytes(&step.0))
            .transpose()?
            .filter(|step| *step > 0);
        let in_range = min.is_none_or(|min| memory >= min) && max.is_none_or(|max| memory <= max);
        let on_step = step.is_none_or(|step| (memory - min.unwrap_or(0).min(memory)) % step == 0);
        if !(in_range && on_step) {
            let text = |quantity: &Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
                quantity.as_ref().map(|quantity| quantity.0.clone())
            };
            let mut allowed = match (text(&range.min), text(&range.max)) {
                (Some(min), Some(max)) => format!("{min} to {max}"),
                (Some(min), None) => format!("at least {min}"),
                (None, Some(max)) => format!("at most {max}"),
                (None, None) => "any amount".into(),
            };
            if let Some(step) = text(&range.step) {
                allowed.push_str(&format!(" in steps of {step}"));
            }
            return Err(ClassError::Memory {
                class: name.to_string(),
                cores,
                memory: spec.memory.size.0.clone(),
                allowed,
            });
        }
    }
    if !policy.core_fractions.is_empty() && !policy.core_fractions.contains(&spec.cpu.core_fraction) {
        return Err(ClassError::CoreFraction {
            class: name.to_string(),
            cores,
            fraction: spec.cpu.core_fraction.clone(),
            allowed: policy.core_fractions.join(", "),
        });
    }
    Ok(())
}

/// Adds what class `name` says to a rendered KubeVirt machine: the CPU
/// model (`Host`: `host-model`; `HostPassthrough`: `host-passthrough`;
/// `Model`: the model; `Features`: required features on `host-model`;
/// `Discovery`: the baseline `kvm64` with the features its nodes have in
/// common, `discovered`, required, so that its machines run and migrate on
/// any of them), the class's node labels to the node selector and its
/// tolerations after the machine's own; then updates the spec hash.
pub fn apply_class(
    machine: &mut Value,
    name: &str,
    class: &VirtualMachineClassSpec,
    discovered: Option<&[String]>,
) -> Result<(), ClassError> {
    let incomplete = |cpu_type, field| ClassError::CpuIncomplete {
        class: name.to_string(),
        cpu_type,
        field,
    };
    let template = &mut machine["spec"]["template"]["spec"];
    let cpu = &mut template["domain"]["cpu"];
    match class.cpu.cpu_type {
        ClassCpuType::Host => cpu["model"] = json!("host-model"),
        ClassCpuType::HostPassthrough => cpu["model"] = json!("host-passthrough"),
        ClassCpuType::Discovery => {
            let features = discovered.ok_or_else(|| ClassError::NotDiscovered {
                class: name.to_string(),
            })?;
            cpu["model"] = json!(DISCOVERY_BASE_MODEL);
            cpu["features"] = required(features);
        }
        ClassCpuType::Model => {
            let model = class.cpu.model.as_ref().ok_or_else(|| incomplete("Model", "model"))?;
            cpu["model"] = json!(model);
        }
        ClassCpuType::Features => {
            if class.cpu.features.is_empty() {
                return Err(incomplete("Features", "features"));
            }
            cpu["model"] = json!("host-model");
            cpu["features"] = required(&class.cpu.features);
        }
    }
    if let Some(selector) = &class.node_selector {
        for (key, value) in &selector.match_labels {
            template["nodeSelector"][key] = json!(value);
        }
    }
    if !class.tolerations.is_empty() {
        let mut tolerations = template["tolerations"].as_array().cloned().unwrap_or_default();
        tolerations.extend(
            class
                .tolerations
                .iter()
                .filter_map(|toleration| serde_json::to_value(toleration).ok()),
        );
        template["tolerations"] = Value::Array(tolerations);
    }
    crate::kubevirt::rehash(machine);
    Ok(())
}

/// KubeVirt's features list requiring each of `features`.
fn required(features: &[String]) -> Value {
    features
        .iter()
        .map(|feature| json!({"name": feature, "policy": "require"}))
        .collect()
}

/// The model a `Discovery` class builds on: a baseline every x86-64 host
/// runs, to which the common features are added.
pub const DISCOVERY_BASE_MODEL: &str = "kvm64";

/// The label prefix with which KubeVirt's node labeller marks the CPU
/// features a node's host supports (`...=true`).
pub const CPU_FEATURE_LABEL: &str = "cpu-feature.node.kubevirt.io/";

/// What a class needs to know of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its taints.
    pub taints: Vec<Taint>,
}

/// Condition of a `Discovery` class: its CPU features were found.
pub const DISCOVERED: &str = "Discovered";

fn selects(selector: Option<&ClassNodeSelector>, node: &NodeFacts) -> bool {
    selector.is_none_or(|selector| {
        selector
            .match_labels
            .iter()
            .all(|(key, value)| node.labels.get(key) == Some(value))
    })
}

/// Whether `toleration` tolerates `taint`, as the scheduler decides it.
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_matches = toleration.effect.as_deref().is_none_or(|effect| effect.is_empty() || effect == taint.effect);
    let key_matches = match toleration.key.as_deref() {
        None | Some("") => toleration.operator.as_deref() == Some("Exists"),
        Some(key) => key == taint.key,
    };
    let value_matches = match toleration.operator.as_deref() {
        Some("Exists") => true,
        _ => toleration.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default(),
    };
    effect_matches && key_matches && value_matches
}

/// Whether a machine of `class` may be scheduled on `node`.
fn available(class: &VirtualMachineClassSpec, node: &NodeFacts) -> bool {
    selects(class.node_selector.as_ref(), node)
        && node
            .taints
            .iter()
            .filter(|taint| taint.effect == "NoSchedule" || taint.effect == "NoExecute")
            .all(|taint| class.tolerations.iter().any(|toleration| tolerates(toleration, taint)))
}

/// The status of class `class` on a cluster of `nodes`: its available
/// nodes, and for `Discovery` the CPU features every discovery node has.
/// A `Discovery` class without discovery nodes is `Pending`.
pub fn class_status(
    class: &VirtualMachineClassSpec,
    previous: &VirtualMachineClassStatus,
    nodes: &[NodeFacts],
    setter: &Setter,
) -> VirtualMachineClassStatus {
    let mut available_nodes: Vec<String> =
        nodes.iter().filter(|node| available(class, node)).map(|node| node.name.clone()).collect();
    available_nodes.sort();
    let mut status = VirtualMachineClassStatus {
        phase: Some("Ready".into()),
        available_nodes,
        cpu_features: None,
        conditions: previous.conditions.clone(),
        observed_generation: setter.generation,
    };
    if class.cpu.cpu_type != ClassCpuType::Discovery {
        status.conditions.retain(|condition| condition.type_ != DISCOVERED);
        return status;
    }
    let selector = class.cpu.discovery.as_ref().and_then(|discovery| discovery.node_selector.as_ref());
    let discovery_nodes: Vec<&NodeFacts> = nodes.iter().filter(|node| selects(selector, node)).collect();
    let features_of = |node: &NodeFacts| -> BTreeSet<String> {
        node.labels
            .iter()
            .filter(|(_, value)| value.as_str() == "true")
            .filter_map(|(key, _)| key.strip_prefix(CPU_FEATURE_LABEL))
            .map(str::to_string)
            .collect()
    };
    let mut sets = discovery_nodes.iter().map(|node| features_of(node));
    let Some(first) = sets.next() else {
        status.phase = Some("Pending".into());
        let message = match selector {
            Some(_) => "no node matches cpu.discovery.nodeSelector",
            None => "there are no nodes to discover CPU features on",
        };
        setter.set(&mut status.conditions, DISCOVERED, false, "NoNodes", message.into());
        return status;
    };
    let common: BTreeSet<String> = sets.fold(first, |common, features| &common & &features);
    if common.is_empty() {
        status.phase = Some("Pending".into());
        let message = format!(
            "the {} discovery nodes carry no common {CPU_FEATURE_LABEL}* labels: is KubeVirt's node labeller running?",
            discovery_nodes.len()
        );
        setter.set(&mut status.conditions, DISCOVERED, false, "NoFeatures", message);
        return status;
    }
    let message = format!("{} CPU features common to {} nodes", common.len(), discovery_nodes.len());
    setter.set(&mut status.conditions, DISCOVERED, true, "Discovered", message);
    status.cpu_features = Some(ClassCpuFeatures {
        enabled: common.into_iter().collect(),
    });
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubevirt::{spec_hash, SPEC_HASH_ANNOTATION};

    fn class(yaml: &str) -> VirtualMachineClassSpec {
        serde_norway::from_str(yaml).unwrap_or_else(|error| panic!("{error}"))
    }

    fn machine(cores: i32, fraction: &str, memory: &str) -> VirtualMachineSpec {
        serde_norway::from_str(&format!(
            "cpu: {{cores: {cores}, coreFraction: \"{fraction}\"}}\nmemory: {{size: {memory}}}\n"
        ))
        .unwrap_or_else(|error| panic!("{error}"))
    }

    const GENERIC: &str = "cpu: {type: Model, model: Nehalem}\n\
        nodeSelector: {matchLabels: {node-role/vm: \"\"}}\n\
        tolerations: [{key: dedicated, operator: Equal, value: vms, effect: NoSchedule}]\n\
        sizingPolicies:\n\
        - cores: {min: 1, max: 4}\n\
        \x20 memory: {min: 1Gi, max: 8Gi, step: 512Mi}\n\
        \x20 coreFractions: [\"5%\", \"20%\", \"50%\", \"100%\"]\n\
        - cores: {min: 6, max: 16, step: 2}\n\
        \x20 memory: {min: 4Gi}\n";

    #[test]
    fn sizes_inside_a_policy_pass() {
        let generic = class(GENERIC);
        for (cores, fraction, memory) in [
            (1, "5%", "1Gi"),
            (4, "100%", "8Gi"),
            (2, "50%", "1536Mi"),
            (16, "7%", "64Gi"),
        ] {
            assert_eq!(
                check_sizing("generic", &generic, &machine(cores, fraction, memory)),
                Ok(()),
                "{cores}"
            );
        }
        // A class without policies allows anything.
        let free = class("cpu: {type: Host}\n");
        assert_eq!(check_sizing("free", &free, &machine(64, "1%", "1Ti")), Ok(()));
    }

    #[test]
    fn sizes_outside_every_policy_are_refused_with_what_is_allowed() {
        let generic = class(GENERIC);
        let refusal = |cores, fraction, memory| {
            check_sizing("generic", &generic, &machine(cores, fraction, memory))
                .err()
                .map(|error| error.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            refusal(5, "100%", "4Gi"),
            "VirtualMachineClass generic allows no machine with 5 cores (its policies cover: 1-4, 6-16 in steps of 2)"
        );
        assert!(refusal(7, "100%", "4Gi").contains("no machine with 7 cores"));
        assert_eq!(
            refusal(2, "100%", "16Gi"),
            "VirtualMachineClass generic allows 1Gi to 8Gi in steps of 512Mi of memory for 2 cores, not 16Gi"
        );
        assert!(refusal(2, "100%", "1100Mi").contains("not 1100Mi"), "off the step");
        assert_eq!(
            refusal(8, "100%", "2Gi"),
            "VirtualMachineClass generic allows at least 4Gi of memory for 8 cores, not 2Gi"
        );
        assert_eq!(
            refusal(2, "30%", "2Gi"),
            "VirtualMachineClass generic allows a coreFraction of 5%, 20%, 50%, 100% for 2 cores, not 30%"
        );
    }

    #[test]
    fn the_class_reaches_kubevirts_machine_and_its_hash() {
        let mut rendered = json!({
            "metadata": {"annotations": {SPEC_HASH_ANNOTATION: "old"}},
            "spec": {"template": {"spec": {
                "domain": {"cpu": {"cores": 2}},
                "nodeSelector": {"zone": "a"},
                "tolerations": [{"key": "own", "operator": "Exists"}],
            }}},
        });
        assert_eq!(apply_class(&mut rendered, "generic", &class(GENERIC), None), Ok(()));
        let template = &rendered["spec"]["template"]["spec"];
        assert_eq!(template["domain"]["cpu"], json!({"cores": 2, "model": "Nehalem"}));
        assert_eq!(template["nodeSelector"], json!({"zone": "a", "node-role/vm": ""}));
        assert_eq!(template["tolerations"][0]["key"], "own");
        assert_eq!(template["tolerations"][1]["key"], "dedicated");
        assert_eq!(
            rendered["metadata"]["annotations"][SPEC_HASH_ANNOTATION].as_str(),
            Some(spec_hash(&rendered["spec"]).as_str())
        );

        for (cpu, model) in [
            ("{type: Host}", "host-model"),
            ("{type: HostPassthrough}", "host-passthrough"),
        ] {
            let mut rendered = json!({"spec": {"template": {"spec": {"domain": {"cpu": {}}}}}});
            assert_eq!(
                apply_class(&mut rendered, "c", &class(&format!("cpu: {cpu}\n")), None),
                Ok(())
            );
            assert_eq!(rendered["spec"]["template"]["spec"]["domain"]["cpu"]["model"], model);
        }
        let mut rendered = json!({"spec": {"template": {"spec": {"domain": {"cpu": {}}}}}});
        let features = class("cpu: {type: Features, features: [avx2, aes]}\n");
        assert_eq!(apply_class(&mut rendered, "c", &features, None), Ok(()));
        assert_eq!(
            rendered["spec"]["template"]["spec"]["domain"]["cpu"]["features"],
            json!([{"name": "avx2", "policy": "require"}, {"name": "aes", "policy": "require"}])
        );
        assert_eq!(
            apply_class(&mut rendered, "c", &class("cpu: {type: Model}\n"), None).map_err(|error| error.to_string()),
            Err("VirtualMachineClass c has cpu.type Model but no cpu.model".into())
        );

        let discovery = class("cpu: {type: Discovery}\n");
        let found = ["aes".to_string(), "avx2".to_string()];
        assert_eq!(apply_class(&mut rendered, "d", &discovery, Some(&found)), Ok(()));
        let cpu = &rendered["spec"]["template"]["spec"]["domain"]["cpu"];
        assert_eq!(cpu["model"], DISCOVERY_BASE_MODEL);
        let required = json!([{"name": "aes", "policy": "require"}, {"name": "avx2", "policy": "require"}]);
        assert_eq!(cpu["features"], required);
        assert!(matches!(
            apply_class(&mut rendered, "d", &discovery, None),
            Err(ClassError::NotDiscovered { .. })
        ));
    }

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: labels.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect(),
            taints: taints
                .iter()
                .map(|(key, effect)| Taint {
                    key: key.to_string(),
                    effect: effect.to_string(),
                    value: Some("vms".into()),
                    time_added: None,
                })
                .collect(),
        }
    }

    fn setter() -> Setter {
        Setter {
            generation: Some(3),
            now: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn available_nodes_are_selected_and_their_scheduling_taints_tolerated() {
        let nodes = [
            node("a", &[("node-role/vm", "")], &[]),
            node("b", &[("node-role/vm", "")], &[("dedicated", "NoSchedule")]),
            node("c", &[("node-role/vm", "")], &[("gpu", "NoExecute")]),
            node("d", &[("node-role/vm", "")], &[("slow", "PreferNoSchedule")]),
            node("e", &[], &[]),
        ];
        let status = class_status(&class(GENERIC), &VirtualMachineClassStatus::default(), &nodes, &setter());
        assert_eq!(status.available_nodes, ["a", "b", "d"], "c's NoExecute taint is not tolerated, e not selected");
        assert_eq!(status.phase.as_deref(), Some("Ready"));
        assert_eq!(status.cpu_features, None);
        assert_eq!(status.observed_generation, Some(3));
        let everything = class("cpu: {type: Host}\ntolerations: [{operator: Exists}]\n");
        let status = class_status(&everything, &VirtualMachineClassStatus::default(), &nodes, &setter());
        assert_eq!(status.available_nodes, ["a", "b", "c", "d", "e"], "an empty key with Exists tolerates every taint");
    }

    fn discovered(status: &VirtualMachineClassStatus) -> (String, String, String) {
        crate::conditions::find(&status.conditions, DISCOVERED)
            .map(|condition| (condition.status.clone(), condition.reason.clone(), condition.message.clone()))
            .unwrap_or_default()
    }

    #[test]
    fn a_discovery_class_requires_the_features_its_discovery_nodes_share() {
        let feature = |name: &str| (format!("{CPU_FEATURE_LABEL}{name}"), "true".to_string());
        let labelled = |name: &str, rack: &str, features: &[&str]| {
            let mut labels: BTreeMap<String, String> = features.iter().map(|name| feature(name)).collect();
            labels.insert("rack".into(), rack.into());
            labels.insert(format!("{CPU_FEATURE_LABEL}off"), "false".into());
            NodeFacts {
                name: name.into(),
                labels,
                taints: Vec::new(),
            }
        };
        let nodes = [
            labelled("old", "r1", &["aes", "sse4.2"]),
            labelled("new", "r1", &["aes", "avx2", "sse4.2"]),
            labelled("other", "r2", &["avx2"]),
        ];
        let discovery = class("cpu: {type: Discovery, discovery: {nodeSelector: {matchLabels: {rack: r1}}}}\n");
        let status = class_status(&discovery, &VirtualMachineClassStatus::default(), &nodes, &setter());
        let enabled = status.cpu_features.as_ref().map(|features| features.enabled.clone());
        assert_eq!(enabled, Some(vec!["aes".into(), "sse4.2".into()]));
        let (holds, _, message) = discovered(&status);
        assert_eq!((holds.as_str(), message.as_str()), ("True", "2 CPU features common to 2 nodes"));
        let why = "the class's own nodeSelector, not discovery's, says where machines run";
        assert_eq!(status.available_nodes.len(), 3, "{why}");

        let everywhere = class("cpu: {type: Discovery}\n");
        let status = class_status(&everywhere, &VirtualMachineClassStatus::default(), &nodes, &setter());
        assert_eq!(status.phase.as_deref(), Some("Pending"), "no feature is common to every node");
        assert_eq!(discovered(&status).1, "NoFeatures");
        let status = class_status(&discovery, &VirtualMachineClassStatus::default(), &[], &setter());
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        assert_eq!(discovered(&status).2, "no node matches cpu.discovery.nodeSelector");
    }
}
