//! DVCR's controller: the `virtualization.deckhouse.io/v1alpha2` resources
//! as Rust types, and the CRDs rendered from them.

pub mod api;
pub mod class;
pub mod conditions;
pub mod crds;
pub mod import;
pub mod ipam;
pub mod kubevirt;
pub mod reconcile;
pub mod runtime;
pub mod workload;

/// The Kubernetes API types this crate's types are built from.
pub use k8s_openapi;
/// The kube-rs crate the controller runs on.
pub use kube;
