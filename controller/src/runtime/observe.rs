//! Pure translations between Kubernetes objects and the reconcilers'
//! inputs and outputs: a worker Pod to a [`WorkerState`], a referenced
//! image's status to a [`SourceImage`], and a status change to the merge
//! patch that makes it.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Map, Value};

use crate::api::image::{ImagePhase, ImageStatus};
use crate::reconcile::image::SourceImage;
use crate::reconcile::provision::ImageLocation;
use crate::reconcile::WorkerState;

/// What a worker Pod says about its work. `metrics` is its progress page,
/// read by the caller while it runs.
pub fn worker_state(pod: Option<&Pod>, metrics: Option<String>) -> WorkerState {
    let Some(pod) = pod else {
        return WorkerState::Absent;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return WorkerState::Pending {
            waiting: Some("the previous Pod is being deleted".into()),
        };
    }
    let status = pod.status.clone().unwrap_or_default();
    let container = status.container_statuses.as_ref().and_then(|statuses| statuses.first());
    let state = container.and_then(|container| container.state.as_ref());
    let terminated = state.and_then(|state| state.terminated.as_ref());
    let report = terminated
        .and_then(|terminated| terminated.message.clone())
        .filter(|message| !message.trim().is_empty());
    match status.phase.as_deref() {
        Some("Succeeded") => WorkerState::Succeeded {
            report: report.unwrap_or_default(),
        },
        Some("Failed") => {
            let mut reasons: Vec<String> = Vec::new();
            for text in [&status.reason, &status.message].into_iter().flatten() {
                reasons.push(text.clone());
            }
            if let Some(terminated) = terminated {
                if let Some(reason) = &terminated.reason {
                    reasons.push(reason.clone());
                }
                reasons.push(format!("exit code {}", terminated.exit_code));
            }
            WorkerState::Failed {
                report,
                reason: if reasons.is_empty() { "no reason given".into() } else { reasons.join(": ") },
            }
        }
        Some("Running") => WorkerState::Running { metrics },
        _ => {
            let waiting = state
                .and_then(|state| state.waiting.as_ref())
                .and_then(|waiting| {
                    let reason = waiting.reason.clone()?;
                    Some(match &waiting.message {
                        Some(message) => format!("{reason}: {message}"),
                        None => reason,
                    })
                })
                .or_else(|| {
                    let conditions = status.conditions.as_ref()?;
                    let unscheduled = conditions
                        .iter()
                        .find(|condition| condition.type_ == "PodScheduled" && condition.status == "False")?;
                    Some(format!(
                        "{}: {}",
                        unscheduled.reason.as_deref().unwrap_or("Unschedulable"),
                        unscheduled.message.as_deref().unwrap_or("not scheduled")
                    ))
                });
            WorkerState::Pending { waiting }
        }
    }
}

/// The state of an image an `objectRef` names, from its status; a
/// VirtualImage's `namespace` is where its PVC is, when it is kept in one.
pub fn source_image(status: Option<&ImageStatus>, uid: Option<&str>, namespace: Option<&str>) -> SourceImage {
    let Some(status) = status else {
        return SourceImage::NotReady(None);
    };
    let target = status.target.as_ref();
    let location = match (target.and_then(|target| target.registry_url.clone()), namespace) {
        (Some(registry_url), _) => Some(ImageLocation::Registry(registry_url)),
        (None, Some(namespace)) => target
            .and_then(|target| target.persistent_volume_claim_name.clone())
            .map(|name| ImageLocation::Claim {
                namespace: namespace.to_string(),
                name,
            }),
        (None, None) => None,
    };
    match (status.phase, location, uid) {
        (Some(ImagePhase::Ready), Some(location), Some(uid)) => SourceImage::Ready {
            location,
            uid: uid.to_string(),
            size: status.size.clone(),
            format: status.format.clone(),
            cdrom: status.cdrom,
        },
        (phase, _, _) => SourceImage::NotReady(phase.map(|phase| format!("{phase:?}"))),
    }
}

/// The JSON merge patch (RFC 7386) turning `old` into `new`: changed
/// fields, and `null` for fields that are gone (a plain serialisation of
/// `new` would leave them in place).
pub fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = Map::new();
            for (key, value) in new {
                match old.get(key) {
                    Some(previous) if previous == value => {}
                    Some(previous) => {
                        patch.insert(key.clone(), merge_patch(previous, value));
                    }
                    None => {
                        patch.insert(key.clone(), value.clone());
                    }
                }
            }
            for key in old.keys().filter(|key| !new.contains_key(*key)) {
                patch.insert(key.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap_or_default()
    }

    #[test]
    fn pods_become_worker_states() {
        assert_eq!(worker_state(None, None), WorkerState::Absent);
        let pulling = pod(json!({"phase": "Pending", "containerStatuses": [{
            "name": "importer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"i\""}}}]}));
        assert_eq!(
            worker_state(Some(&pulling), None),
            WorkerState::Pending {
                waiting: Some("ImagePullBackOff: Back-off pulling image \"i\"".into())
            }
        );
        let unscheduled = pod(json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient memory."}]}));
        assert_eq!(
            worker_state(Some(&unscheduled), None),
            WorkerState::Pending {
                waiting: Some("Unschedulable: 0/3 nodes are available: 3 Insufficient memory.".into())
            }
        );
        let running = pod(json!({"phase": "Running"}));
        assert_eq!(
            worker_state(Some(&running), Some("m".into())),
            WorkerState::Running {
                metrics: Some("m".into())
            }
        );
        let done = pod(json!({"phase": "Succeeded", "containerStatuses": [{
            "name": "importer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": "{\"report\":1}"}}}]}));
        assert_eq!(
            worker_state(Some(&done), None),
            WorkerState::Succeeded {
                report: "{\"report\":1}".into()
            }
        );
        let killed = pod(json!({"phase": "Failed", "containerStatuses": [{
            "name": "importer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "  "}}}]}));
        assert_eq!(
            worker_state(Some(&killed), None),
            WorkerState::Failed {
                report: None,
                reason: "OOMKilled: exit code 137".into()
            }
        );
        let evicted = pod(json!({"phase": "Failed", "reason": "Evicted", "message": "low on ephemeral-storage"}));
        assert_eq!(
            worker_state(Some(&evicted), None),
            WorkerState::Failed {
                report: None,
                reason: "Evicted: low on ephemeral-storage".into()
            }
        );
        let mut leaving = running.clone();
        leaving.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(matches!(worker_state(Some(&leaving), None), WorkerState::Pending { .. }));
    }

    #[test]
    fn source_images_are_ready_only_with_a_registry_url_or_their_pvc() {
        let mut status = ImageStatus {
            phase: Some(ImagePhase::Ready),
            ..ImageStatus::default()
        };
        assert_eq!(source_image(Some(&status), Some("u"), None), SourceImage::NotReady(Some("Ready".into())));
        status.target = Some(crate::api::image::ImageTarget {
            registry_url: None,
            persistent_volume_claim_name: Some("vi-x-u".into()),
        });
        assert!(matches!(
            source_image(Some(&status), Some("u"), Some("vms")),
            SourceImage::Ready { location: ImageLocation::Claim { namespace, name }, .. }
                if namespace == "vms" && name == "vi-x-u"
        ));
        assert_eq!(
            source_image(Some(&status), Some("u"), None),
            SourceImage::NotReady(Some("Ready".into())),
            "a PVC without a namespace (no cluster image is kept in one) is nowhere"
        );
        status.target = Some(crate::api::image::ImageTarget {
            registry_url: Some("r/cvi/x:u".into()),
            persistent_volume_claim_name: None,
        });
        status.format = Some("iso".into());
        assert!(matches!(
            source_image(Some(&status), Some("u"), None),
            SourceImage::Ready { location: ImageLocation::Registry(url), format: Some(format), .. }
                if url == "r/cvi/x:u" && format == "iso"
        ));
        status.phase = Some(ImagePhase::Provisioning);
        assert_eq!(source_image(Some(&status), Some("u"), None), SourceImage::NotReady(Some("Provisioning".into())));
        assert_eq!(source_image(None, Some("u"), None), SourceImage::NotReady(None));
    }

    #[test]
    fn merge_patches_null_what_is_gone_and_leave_what_is_equal() {
        let old = json!({"phase": "Provisioning", "progress": "50.0%",
            "downloadSpeed": {"avg": "1Mi/s", "current": "2Mi/s"}, "format": "qcow2"});
        let new = json!({"phase": "Ready", "progress": "100%", "downloadSpeed": {"avg": "1Mi/s"},
            "format": "qcow2", "cdrom": false});
        assert_eq!(
            merge_patch(&old, &new),
            json!({"phase": "Ready", "progress": "100%", "downloadSpeed": {"current": null}, "cdrom": false})
        );
        assert_eq!(merge_patch(&json!(null), &new), new);
        assert_eq!(merge_patch(&new, &new), json!({}));
    }
}
