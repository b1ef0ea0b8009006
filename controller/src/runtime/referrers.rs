//! Who waits on whom: a disk or image made from an `objectRef` source, and a
//! machine whose block devices are images and disks, are looked at again as
//! soon as what they wait on becomes usable, rather than at their next
//! periodic look (up to 30 seconds later).

use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;

use crate::api::common::{ObjectRefKind, ObjectRefSource};
use crate::api::disk::DiskPhase;
use crate::api::image::ImagePhase;
use crate::api::machine::BlockDeviceKind;
use crate::api::{ClusterVirtualImage, VirtualDisk, VirtualImage, VirtualMachine};

/// A resource others may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its kind.
    pub kind: ObjectRefKind,
    /// Its namespace; `None` for a ClusterVirtualImage.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl Target {
    /// A VirtualImage that became Ready, else `None`: only that wakes anyone.
    pub fn ready_image(image: &VirtualImage) -> Option<Target> {
        let ready = image.status.as_ref().and_then(|status| status.phase) == Some(ImagePhase::Ready);
        ready.then(|| Target {
            kind: ObjectRefKind::VirtualImage,
            namespace: image.namespace(),
            name: image.name_any(),
        })
    }

    /// A ClusterVirtualImage that became Ready, else `None`.
    pub fn ready_cluster_image(image: &ClusterVirtualImage) -> Option<Target> {
        let ready = image.status.as_ref().and_then(|status| status.phase) == Some(ImagePhase::Ready);
        ready.then(|| Target {
            kind: ObjectRefKind::ClusterVirtualImage,
            namespace: None,
            name: image.name_any(),
        })
    }

    /// A VirtualDisk a machine can use now (as the machine controller
    /// decides it: Ready, Resizing or waiting for its first consumer), else
    /// `None`.
    pub fn usable_disk(disk: &VirtualDisk) -> Option<Target> {
        let phase = disk.status.as_ref().and_then(|status| status.phase);
        let usable = matches!(phase, Some(DiskPhase::Ready | DiskPhase::Resizing | DiskPhase::WaitForFirstConsumer));
        usable.then(|| Target {
            kind: ObjectRefKind::VirtualDisk,
            namespace: disk.namespace(),
            name: disk.name_any(),
        })
    }

    /// Whether `source`, the `objectRef` of a resource in `own_namespace`
    /// (`None`: a cluster-wide resource), names this target.
    pub fn named_by(&self, source: &ObjectRefSource, own_namespace: Option<&str>) -> bool {
        source.kind == self.kind
            && source.name == self.name
            && (self.kind == ObjectRefKind::ClusterVirtualImage
                || source.namespace.as_deref().or(own_namespace) == self.namespace.as_deref())
    }

    /// Whether a block device of a machine in `namespace` is this target.
    fn is_device(&self, kind: BlockDeviceKind, name: &str, namespace: Option<&str>) -> bool {
        let kind = match kind {
            BlockDeviceKind::VirtualImage => ObjectRefKind::VirtualImage,
            BlockDeviceKind::ClusterVirtualImage => ObjectRefKind::ClusterVirtualImage,
            BlockDeviceKind::VirtualDisk => ObjectRefKind::VirtualDisk,
        };
        kind == self.kind
            && name == self.name
            && (kind == ObjectRefKind::ClusterVirtualImage || namespace == self.namespace.as_deref())
    }
}

fn waiting<K>(store: &Store<K>, target: Option<Target>, names: impl Fn(&K, &Target) -> bool) -> Vec<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let Some(target) = target else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|object| names(object, &target))
        .map(|object| ObjectRef::from_obj(object.as_ref()))
        .collect()
}

/// The disks made from `target` (`dataSource.objectRef`).
pub fn disks_waiting_on(store: &Store<VirtualDisk>, target: Option<Target>) -> Vec<ObjectRef<VirtualDisk>> {
    waiting(store, target, |disk, target| {
        let source = disk.spec.data_source.as_ref().and_then(|source| source.object_ref.as_ref());
        source.is_some_and(|source| target.named_by(source, disk.namespace().as_deref()))
    })
}

/// The VirtualImages made from `target`.
pub fn images_waiting_on(store: &Store<VirtualImage>, target: Option<Target>) -> Vec<ObjectRef<VirtualImage>> {
    waiting(store, target, |image, target| {
        let source = image.spec.data_source.object_ref.as_ref();
        source.is_some_and(|source| target.named_by(source, image.namespace().as_deref()))
    })
}

/// The ClusterVirtualImages made from `target`.
pub fn cluster_images_waiting_on(
    store: &Store<ClusterVirtualImage>,
    target: Option<Target>,
) -> Vec<ObjectRef<ClusterVirtualImage>> {
    waiting(store, target, |image, target| {
        let source = image.spec.data_source.object_ref.as_ref();
        source.is_some_and(|source| target.named_by(source, None))
    })
}

/// The machines with `target` among their block devices.
pub fn machines_waiting_on(store: &Store<VirtualMachine>, target: Option<Target>) -> Vec<ObjectRef<VirtualMachine>> {
    waiting(store, target, |machine, target| {
        let namespace = machine.namespace();
        machine
            .spec
            .block_device_refs
            .iter()
            .any(|device| target.is_device(device.kind, &device.name, namespace.as_deref()))
    })
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;

    fn store<K>(objects: Vec<serde_json::Value>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + 'static,
    {
        let mut writer: Writer<K> = Writer::default();
        writer.apply_watcher_event(&Event::Init);
        for object in objects {
            let object: K = serde_json::from_value(object).unwrap_or_else(|error| panic!("{error}"));
            writer.apply_watcher_event(&Event::InitApply(object));
        }
        writer.apply_watcher_event(&Event::InitDone);
        writer.as_reader()
    }

    fn names<K: kube::Resource>(references: Vec<ObjectRef<K>>) -> Vec<String> {
        let mut names: Vec<String> = references
            .into_iter()
            .map(|reference| format!("{}/{}", reference.namespace.unwrap_or_default(), reference.name))
            .collect();
        names.sort();
        names
    }

    fn image(namespace: &str, name: &str, phase: &str) -> VirtualImage {
        serde_json::from_value(json!({
            "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualImage",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"dataSource": {"type": "Upload"}}, "status": {"phase": phase}}))
        .unwrap_or_else(|error| panic!("{error}"))
    }

    fn disk(namespace: &str, name: &str, object_ref: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualDisk",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"persistentVolumeClaim": {"size": "10Gi"},
                "dataSource": {"type": "ObjectRef", "objectRef": object_ref}}})
    }

    #[test]
    fn a_ready_image_wakes_the_disks_and_images_made_from_it_in_its_namespace() {
        let disks = store::<VirtualDisk>(vec![
            disk("vms", "root", json!({"kind": "VirtualImage", "name": "ubuntu"})),
            disk("vms", "other", json!({"kind": "VirtualImage", "name": "debian"})),
            disk("dev", "root", json!({"kind": "VirtualImage", "name": "ubuntu"})),
            disk("dev", "cluster", json!({"kind": "ClusterVirtualImage", "name": "ubuntu"})),
        ]);
        let ready = Target::ready_image(&image("vms", "ubuntu", "Ready"));
        assert_eq!(names(disks_waiting_on(&disks, ready.clone())), ["vms/root"]);
        assert!(Target::ready_image(&image("vms", "ubuntu", "Provisioning")).is_none());
        assert!(disks_waiting_on(&disks, None).is_empty());

        let cluster = serde_json::from_value::<ClusterVirtualImage>(json!({
            "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "ClusterVirtualImage",
            "metadata": {"name": "ubuntu"}, "spec": {"dataSource": {"type": "Upload"}},
            "status": {"phase": "Ready"}}))
        .unwrap_or_else(|error| panic!("{error}"));
        let ready_cluster = Target::ready_cluster_image(&cluster);
        assert_eq!(names(disks_waiting_on(&disks, ready_cluster.clone())), ["dev/cluster"]);

        let copies = store::<ClusterVirtualImage>(vec![json!({
            "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "ClusterVirtualImage",
            "metadata": {"name": "copy"}, "spec": {"dataSource": {"type": "ObjectRef",
                "objectRef": {"kind": "VirtualImage", "name": "ubuntu", "namespace": "vms"}}}})]);
        assert_eq!(names(cluster_images_waiting_on(&copies, ready)), ["/copy"]);
        let namespaced = store::<VirtualImage>(vec![json!({
            "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualImage",
            "metadata": {"name": "copy", "namespace": "dev"}, "spec": {"dataSource": {"type": "ObjectRef",
                "objectRef": {"kind": "ClusterVirtualImage", "name": "ubuntu"}}}})]);
        assert_eq!(names(images_waiting_on(&namespaced, ready_cluster)), ["dev/copy"]);
    }

    #[test]
    fn a_usable_disk_or_image_wakes_the_machines_booting_from_it() {
        let machine = |namespace: &str, name: &str, devices: serde_json::Value| {
            json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"runPolicy": "Manual", "cpu": {"cores": 1}, "memory": {"size": "1Gi"},
                    "blockDeviceRefs": devices}})
        };
        let machines = store::<VirtualMachine>(vec![
            machine("vms", "web", json!([{"kind": "VirtualDisk", "name": "root"},
                {"kind": "ClusterVirtualImage", "name": "iso"}])),
            machine("vms", "db", json!([{"kind": "VirtualImage", "name": "root"}])),
            machine("dev", "web", json!([{"kind": "VirtualDisk", "name": "root"}])),
        ]);
        let root: VirtualDisk = serde_json::from_value({
            let mut root = disk("vms", "root", json!({"kind": "VirtualImage", "name": "ubuntu"}));
            root["status"] = json!({"phase": "WaitForFirstConsumer"});
            root
        })
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(names(machines_waiting_on(&machines, Target::usable_disk(&root))), ["vms/web"]);
        let iso = Target {
            kind: ObjectRefKind::ClusterVirtualImage,
            namespace: None,
            name: "iso".into(),
        };
        assert_eq!(names(machines_waiting_on(&machines, Some(iso))), ["vms/web"]);
        let image_root = Target::ready_image(&image("vms", "root", "Ready"));
        assert_eq!(names(machines_waiting_on(&machines, image_root)), ["vms/db"]);
        let mut provisioning = root;
        provisioning.status = serde_json::from_value(json!({"phase": "Provisioning"})).ok();
        assert!(Target::usable_disk(&provisioning).is_none());
    }
}
