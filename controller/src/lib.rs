//! DVCR's controller: the `virtualization.deckhouse.io/v1alpha2` resources
//! as Rust types, and the CRDs rendered from them.

pub mod api;
pub mod crds;
pub mod import;
