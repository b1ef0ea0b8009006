//! VirtualMachineIPAddress (`vmip`, namespaced) and
//! VirtualMachineIPAddressLease (`vmipl`, cluster-wide): addresses for
//! machines from the configured CIDRs, each leased to one claim at a time.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Conditions;

/// A claim on an address for a machine.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualMachineIPAddress",
    doc = "A claim on an IP address for a virtual machine.",
    namespaced,
    derive = "PartialEq",
    shortname = "vmip",
    category = "virtualization",
    status = "IpAddressStatus",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.address"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"VM","type":"string","jsonPath":".status.virtualMachineName"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineIPAddressSpec {
    /// `Auto`: any free address; `Static`: `staticIP`.
    #[serde(rename = "type", default)]
    pub address_type: AddressType,
    /// The address wanted (`type: Static`).
    #[serde(default, rename = "staticIP", skip_serializing_if = "Option::is_none")]
    pub static_ip: Option<String>,
}

/// How an address is chosen.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AddressType {
    /// Any free address of the configured CIDRs.
    #[default]
    Auto,
    /// The address in `staticIP`.
    Static,
}

/// Observed state of an address claim.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressStatus {
    /// The address leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// `Pending`, `Bound`, `Attached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<IpAddressPhase>,
    /// The machine using it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_name: Option<String>,
    /// `Bound`, `Attached`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phases of an address claim.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IpAddressPhase {
    /// No lease yet.
    Pending,
    /// A lease is held.
    Bound,
    /// A machine uses the address.
    Attached,
}

/// The lease of one address (named `ip-<a>-<b>-<c>-<d>`) to one claim.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "virtualization.deckhouse.io",
    version = "v1alpha2",
    kind = "VirtualMachineIPAddressLease",
    doc = "The lease of one IP address to one VirtualMachineIPAddress.",
    shortname = "vmipl",
    category = "virtualization",
    status = "LeaseStatus",
    printcolumn = r#"{"name":"VirtualMachineIPAddress","type":"string","jsonPath":".spec.virtualMachineIPAddressRef.name"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineIPAddressLeaseSpec {
    /// The claim holding the address; none once released.
    #[serde(
        default,
        rename = "virtualMachineIPAddressRef",
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_machine_ip_address_ref: Option<IpAddressRef>,
}

/// A VirtualMachineIPAddress by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct IpAddressRef {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// Observed state of a lease.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaseStatus {
    /// `Bound` or `Released`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<LeasePhase>,
    /// `Bound`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Conditions,
}

/// Phases of a lease.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LeasePhase {
    /// Held by a claim.
    Bound,
    /// Free again (kept for a while so the address is not reused at once).
    Released,
}
