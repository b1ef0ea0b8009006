//! Rust types of the `virtualization.deckhouse.io/v1alpha2` resources
//! (reference, section 5) and their CustomResourceDefinitions.

pub mod common;
pub mod disk;
pub mod image;
pub mod machine;
pub mod network;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use disk::VirtualDisk;
pub use image::{ClusterVirtualImage, VirtualImage};
pub use machine::{
    VirtualMachine, VirtualMachineBlockDeviceAttachment, VirtualMachineClass,
    VirtualMachineOperation,
};
pub use network::{VirtualMachineIPAddress, VirtualMachineIPAddressLease};

/// The CRDs of every resource, in a stable order.
pub fn custom_resource_definitions() -> Vec<CustomResourceDefinition> {
    vec![
        VirtualImage::crd(),
        ClusterVirtualImage::crd(),
        VirtualDisk::crd(),
        VirtualMachine::crd(),
        VirtualMachineBlockDeviceAttachment::crd(),
        VirtualMachineOperation::crd(),
        VirtualMachineIPAddress::crd(),
        VirtualMachineIPAddressLease::crd(),
        VirtualMachineClass::crd(),
    ]
}
