//! The manifests under `deploy/`: the committed CRDs are those the types
//! render, every overlay renders with the real `kubectl kustomize` and
//! parses as Kubernetes objects, and the user roles are the reference's
//! role matrix.

#[path = "support/discovery.rs"]
mod discovery;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dvcr_controller::crds::render_crd_files;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    // No cluster is involved: nothing may reach for one.
    let output = kubectl_with(args, stdin, Path::new("/nonexistent"));
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn kubectl_with(args: &[&str], stdin: Option<&str>, kubeconfig: &Path) -> std::process::Output {
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("cannot run kubectl ({error}): scripts/test.sh installs it")
        });
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

fn render(overlay: &str) -> Vec<Value> {
    let path = deploy_dir().join("overlays").join(overlay);
    documents(&kubectl(&["kustomize", path.to_str().unwrap()], None))
}

#[test]
fn committed_crds_are_the_ones_the_types_render() {
    let folder = deploy_dir().join("base/crds");
    let rendered = render_crd_files().unwrap();
    let regenerate =
        "run `cargo run -- controller crds --output-dir deploy/base/crds` and commit the result";
    for file in &rendered {
        let committed =
            std::fs::read_to_string(folder.join(&file.file_name)).unwrap_or_else(|error| {
                panic!(
                    "deploy/base/crds/{} is missing ({error}): {regenerate}",
                    file.file_name
                )
            });
        assert!(
            committed == file.content,
            "deploy/base/crds/{} is stale: {regenerate}",
            file.file_name
        );
    }
    let expected: BTreeSet<String> = rendered.iter().map(|file| file.file_name.clone()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present, expected,
        "deploy/base/crds holds files no type renders"
    );
}

/// Decodes a rendered object into its typed form, so that a field of the
/// wrong type or shape fails here rather than at `kubectl apply`.
fn decode_typed(object: &Value) {
    let kind = object["kind"].as_str().unwrap_or_default();
    let decoded = match kind {
        "CustomResourceDefinition" => {
            serde_json::from_value::<CustomResourceDefinition>(object.clone()).map(drop)
        }
        "Deployment" => serde_json::from_value::<Deployment>(object.clone()).map(drop),
        "Service" => serde_json::from_value::<Service>(object.clone()).map(drop),
        "ServiceAccount" => serde_json::from_value::<ServiceAccount>(object.clone()).map(drop),
        "Namespace" => serde_json::from_value::<Namespace>(object.clone()).map(drop),
        "PersistentVolumeClaim" => {
            serde_json::from_value::<PersistentVolumeClaim>(object.clone()).map(drop)
        }
        "ClusterRole" => serde_json::from_value::<ClusterRole>(object.clone()).map(drop),
        "ClusterRoleBinding" => {
            serde_json::from_value::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(object.clone())
                .map(drop)
        }
        "ConfigMap" => {
            serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(object.clone())
                .map(drop)
        }
        other => {
            panic!("the overlays render a {other}, which this test does not know how to check")
        }
    };
    if let Err(error) = decoded {
        panic!(
            "{kind} {} does not decode: {error}",
            object["metadata"]["name"]
        );
    }
}

fn registry_args(objects: &[Value]) -> Vec<String> {
    let deployment = objects
        .iter()
        .find(|object| {
            object["kind"] == "Deployment" && object["metadata"]["name"] == "dvcr-registry"
        })
        .expect("the registry's Deployment");
    serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

#[test]
fn every_overlay_renders_and_parses_as_kubernetes_objects() {
    for overlay in ["pvc", "s3"] {
        let rendered = kubectl(
            &[
                "kustomize",
                deploy_dir()
                    .join("overlays")
                    .join(overlay)
                    .to_str()
                    .unwrap(),
            ],
            None,
        );
        // kubectl's own decoder, offline (`apply --dry-run=client`, which
        // asks an API server for discovery, is the next test's).
        let listed = kubectl(
            &[
                "label",
                "--local",
                "-f",
                "-",
                "dvcr.deckhouse.io/checked=true",
                "-o",
                "name",
            ],
            Some(&rendered),
        );
        let objects = documents(&rendered);
        assert_eq!(
            listed.lines().count(),
            objects.len(),
            "{overlay}: kubectl read every object"
        );
        for object in &objects {
            decode_typed(object);
            let kind = object["kind"].as_str().unwrap();
            let cluster_wide = matches!(
                kind,
                "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding" | "Namespace"
            );
            if !cluster_wide {
                assert_eq!(
                    object["metadata"]["namespace"], "dvcr",
                    "{overlay}: {kind} in the dvcr namespace"
                );
            }
        }
        let crds = objects
            .iter()
            .filter(|object| object["kind"] == "CustomResourceDefinition")
            .count();
        assert_eq!(crds, 9, "{overlay}: every CRD is installed");
        let args = registry_args(&objects);
        for required in [
            "--tls-cert=/etc/dvcr/tls/tls.crt",
            "--htpasswd=/etc/dvcr/auth/htpasswd",
            "--read-only-user=node-puller",
        ] {
            assert!(
                args.iter().any(|arg| arg == required),
                "{overlay}: the registry runs with {required}: {args:?}"
            );
        }
        let storage: Vec<&String> = args
            .iter()
            .filter(|arg| arg.starts_with("--storage-dir") || arg.starts_with("--s3-bucket"))
            .collect();
        assert_eq!(storage.len(), 1, "{overlay}: exactly one storage: {args:?}");
    }
    let pvc = render("pvc");
    assert!(registry_args(&pvc).contains(&"--storage-dir=/var/lib/dvcr".to_string()));
    assert!(pvc
        .iter()
        .any(|object| object["kind"] == "PersistentVolumeClaim"
            && object["metadata"]["name"] == "dvcr-data"));
    let s3 = render("s3");
    assert!(registry_args(&s3).contains(&"--s3-bucket=$(DVCR_S3_BUCKET)".to_string()));
}

/// The role matrix of the reference (section 5): per resource, what User,
/// PrivilegedUser, Editor, Admin, ClusterEditor and ClusterAdmin may do.
const ROLE_MATRIX: &[(&str, [&str; 6])] = &[
    (
        "virtualmachines",
        ["R", "R", "CRUD", "CRUD", "CRUD", "CRUD"],
    ),
    ("virtualdisks", ["R", "R", "CRUD", "CRUD", "CRUD", "CRUD"]),
    ("virtualimages", ["R", "R", "R", "CRUD", "CRUD", "CRUD"]),
    ("clustervirtualimages", ["R", "R", "R", "R", "CRUD", "CRUD"]),
    (
        "virtualmachineblockdeviceattachments",
        ["R", "R", "CRUD", "CRUD", "CRUD", "CRUD"],
    ),
    (
        "virtualmachineoperations",
        ["R", "CR", "CRUD", "CRUD", "CRUD", "CRUD"],
    ),
    (
        "virtualmachineipaddresses",
        ["R", "R", "CRUD", "CRUD", "CRUD", "CRUD"],
    ),
    (
        "virtualmachineipaddressleases",
        ["-", "-", "-", "R", "R", "CRUD"],
    ),
    (
        "virtualmachineclasses",
        ["R", "R", "R", "R", "CRUD", "CRUD"],
    ),
];

const ROLES: [&str; 6] = [
    "user",
    "privileged-user",
    "editor",
    "admin",
    "cluster-editor",
    "cluster-admin",
];

fn verbs_of(cell: &str) -> BTreeSet<&'static str> {
    let mut verbs = BTreeSet::new();
    for letter in cell.chars() {
        match letter {
            'R' => verbs.extend(["get", "list", "watch"]),
            'C' => {
                verbs.insert("create");
            }
            'U' => verbs.extend(["patch", "update"]),
            'D' => verbs.extend(["delete", "deletecollection"]),
            '-' => {}
            other => panic!("unknown matrix letter {other}"),
        }
    }
    verbs
}

#[test]
fn user_roles_are_the_reference_role_matrix() {
    let objects = render("pvc");
    let roles: BTreeMap<String, ClusterRole> = objects
        .iter()
        .filter(|object| object["kind"] == "ClusterRole")
        .map(|object| {
            let role: ClusterRole = serde_json::from_value(object.clone()).unwrap();
            (role.metadata.name.clone().unwrap(), role)
        })
        .collect();
    for (column, role_name) in ROLES.iter().enumerate() {
        let role = roles
            .get(&format!("dvcr:{role_name}"))
            .unwrap_or_else(|| panic!("ClusterRole dvcr:{role_name}"));
        let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for rule in role.rules.iter().flatten() {
            assert_eq!(
                rule.api_groups.as_deref(),
                Some(&["virtualization.deckhouse.io".to_string()][..])
            );
            assert!(rule.resource_names.is_none(), "no rule is limited to names");
            for resource in rule.resources.iter().flatten() {
                assert!(
                    !resource.contains('*') && !resource.contains('/'),
                    "{role_name}: no wildcard or subresource"
                );
                granted
                    .entry(resource.clone())
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
        for (resource, cells) in ROLE_MATRIX {
            let expected: BTreeSet<String> = verbs_of(cells[column])
                .into_iter()
                .map(String::from)
                .collect();
            let actual = granted.remove(*resource).unwrap_or_default();
            assert_eq!(actual, expected, "{role_name} on {resource}");
        }
        assert!(
            granted.is_empty(),
            "{role_name} grants resources outside the matrix: {granted:?}"
        );
    }
    let aggregated: BTreeMap<&str, &str> =
        [("user", "view"), ("editor", "edit"), ("admin", "admin")].into();
    for role_name in ROLES {
        let role = &roles[&format!("dvcr:{role_name}")];
        let labels = role.metadata.labels.clone().unwrap_or_default();
        let into: Vec<&str> = labels
            .iter()
            .filter(|(key, value)| {
                key.starts_with("rbac.authorization.k8s.io/aggregate-to-") && *value == "true"
            })
            .map(|(key, _)| key.trim_start_matches("rbac.authorization.k8s.io/aggregate-to-"))
            .collect();
        assert_eq!(
            into,
            aggregated
                .get(role_name)
                .into_iter()
                .copied()
                .collect::<Vec<_>>(),
            "{role_name} aggregation"
        );
    }
}

#[test]
fn the_controller_is_granted_exactly_the_requests_it_makes() {
    let objects = render("pvc");
    let role = objects
        .iter()
        .find(|object| object["kind"] == "ClusterRole" && object["metadata"]["name"] == "dvcr:controller")
        .expect("the controller's ClusterRole");
    let role: ClusterRole = serde_json::from_value(role.clone()).unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String)> = dvcr_controller::runtime::PERMISSIONS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect();
    assert_eq!(granted, needed, "deploy/base/controller.yaml and runtime::PERMISSIONS differ");

    let binding = objects
        .iter()
        .find(|object| object["kind"] == "ClusterRoleBinding" && object["metadata"]["name"] == "dvcr:controller")
        .expect("the controller's ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], "dvcr-controller");
    assert_eq!(binding["subjects"][0]["namespace"], "dvcr");
    let deployment = objects
        .iter()
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "dvcr-controller")
        .expect("the controller's Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "dvcr-controller");
    let container = &pod["containers"][0];
    assert_eq!(container["name"], "controller", "own_image looks for this name");
    let env: Vec<&str> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|variable| variable["name"].as_str())
        .collect();
    assert!(env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"), "{env:?}");
    let args: Vec<&str> = container["args"].as_array().into_iter().flatten().filter_map(|arg| arg.as_str()).collect();
    assert_eq!(args[1..3], ["controller", "run"]);
}

/// `kubectl apply --dry-run=client --validate=false -f -` of every overlay,
/// against an in-process API server that knows Kubernetes' own kinds and
/// no object yet (a fresh cluster; `support/discovery.rs`): kubectl maps
/// every object to a kind the server serves and plans to create it. A kind
/// at an API version Kubernetes does not serve fails it, as it would fail
/// an install.
#[test]
fn every_overlay_applies_with_kubectl_apply_dry_run_client() {
    use k8s_openapi::api::{apps, coordination, core, networking, rbac, storage};
    let server = discovery::DiscoveryServer::start(vec![
        discovery::kind::<Namespace>(),
        discovery::kind::<ServiceAccount>(),
        discovery::kind::<Service>(),
        discovery::kind::<PersistentVolumeClaim>(),
        discovery::kind::<core::v1::ConfigMap>(),
        discovery::kind::<core::v1::Secret>(),
        discovery::kind::<core::v1::Pod>(),
        discovery::kind::<core::v1::Node>(),
        discovery::kind::<core::v1::Event>(),
        discovery::kind::<apps::v1::Deployment>(),
        discovery::kind::<apps::v1::StatefulSet>(),
        discovery::kind::<apps::v1::DaemonSet>(),
        discovery::kind::<ClusterRole>(),
        discovery::kind::<rbac::v1::ClusterRoleBinding>(),
        discovery::kind::<rbac::v1::Role>(),
        discovery::kind::<rbac::v1::RoleBinding>(),
        discovery::kind::<CustomResourceDefinition>(),
        discovery::kind::<coordination::v1::Lease>(),
        discovery::kind::<networking::v1::Ingress>(),
        discovery::kind::<storage::v1::StorageClass>(),
    ]);
    let kubeconfig = std::env::temp_dir().join(format!("dvcr-deploy-test-{}.kubeconfig", std::process::id()));
    server.write_kubeconfig(&kubeconfig);
    let apply = ["apply", "--dry-run=client", "--validate=false", "-f", "-"];
    for overlay in ["pvc", "s3"] {
        let path = deploy_dir().join("overlays").join(overlay);
        let rendered = kubectl(&["kustomize", path.to_str().unwrap()], None);
        let objects = documents(&rendered);
        let output = kubectl_with(&apply, Some(&rendered), &kubeconfig);
        let said = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "{overlay}: kubectl apply --dry-run=client failed: {}{said}",
            String::from_utf8_lossy(&output.stderr)
        );
        for object in &objects {
            let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
            let group = object["apiVersion"].as_str().unwrap_or_default().split_once('/').map(|(group, _)| group);
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let line = match group {
                Some(group) => format!("{kind}.{group}/{name} created (dry run)"),
                None => format!("{kind}/{name} created (dry run)"),
            };
            assert!(said.lines().any(|said| said == line), "{overlay}: no {line:?} in:\n{said}");
            // kubectl asked the server whether the object exists.
            let plural = object["kind"].as_str().map(str::to_lowercase).unwrap_or_default();
            assert!(
                server.requests().iter().any(|request| request.starts_with("GET ")
                    && request.contains(&format!("/{plural}"))
                    && request.ends_with(&format!("/{name}"))),
                "{overlay}: kubectl never looked for {line}"
            );
        }
        assert_eq!(said.lines().count(), objects.len(), "{overlay}: one line per object:\n{said}");
    }

    // The check has teeth: an API version Kubernetes no longer serves fails.
    let retired = "apiVersion: rbac.authorization.k8s.io/v1beta1\nkind: ClusterRole\nmetadata: {name: old}\nrules: []\n";
    let output = kubectl_with(&apply, Some(retired), &kubeconfig);
    assert!(!output.status.success(), "a retired API version was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no matches for kind \"ClusterRole\""), "{stderr}");
    let _ = std::fs::remove_file(&kubeconfig);
}
