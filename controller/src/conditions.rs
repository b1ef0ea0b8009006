//! `status.conditions`: setting one condition the way Kubernetes' own
//! `meta.SetStatusCondition` does (the transition time moves only when the
//! status changes).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types of images and disks.
pub mod types {
    /// The data source is usable (reachable, uploaded, the referenced object Ready).
    pub const DATASOURCE_READY: &str = "DatasourceReady";
    /// The image or disk is usable.
    pub const READY: &str = "Ready";
    /// A disk's PVC has the requested size.
    pub const RESIZED: &str = "Resized";
}

/// `"True"` or `"False"`.
pub fn status_text(value: bool) -> String {
    if value { "True" } else { "False" }.to_string()
}

/// One condition to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired<'a> {
    /// The condition type (`Ready`, ...).
    pub condition_type: &'a str,
    /// Whether it holds.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: &'a str,
    /// A sentence for people.
    pub message: String,
}

/// Sets conditions as of one generation and time, as each reconcile does.
#[derive(Debug, Clone, Copy)]
pub struct Setter {
    /// `metadata.generation` of the object.
    pub generation: Option<i64>,
    /// The time now.
    pub now: Timestamp,
}

impl Setter {
    /// Sets the condition `condition_type` (see [`set`]).
    pub fn set(
        &self,
        conditions: &mut Vec<Condition>,
        condition_type: &str,
        holds: bool,
        reason: &str,
        message: String,
    ) {
        set(
            conditions,
            Desired {
                condition_type,
                status: holds,
                reason,
                message,
            },
            self.generation,
            self.now,
        )
    }
}

/// Sets `desired` in `conditions`: added when missing; replaced when present,
/// keeping `lastTransitionTime` when the status did not change.
pub fn set(conditions: &mut Vec<Condition>, desired: Desired<'_>, generation: Option<i64>, now: Timestamp) {
    let status = status_text(desired.status);
    let previous = conditions
        .iter()
        .position(|condition| condition.type_ == desired.condition_type);
    let last_transition_time = match previous.map(|index| &conditions[index]) {
        Some(existing) if existing.status == status => existing.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: desired.condition_type.to_string(),
        status,
        reason: desired.reason.to_string(),
        message: desired.message,
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(index) => conditions[index] = condition,
        None => conditions.push(condition),
    }
}

/// The condition of `condition_type`, if set.
pub fn find<'a>(conditions: &'a [Condition], condition_type: &str) -> Option<&'a Condition> {
    conditions.iter().find(|condition| condition.type_ == condition_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: bool, reason: &str) -> Desired<'_> {
        Desired {
            condition_type: types::READY,
            status,
            reason,
            message: format!("{reason} happened"),
        }
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let first = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let later = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let mut conditions = Vec::new();
        set(&mut conditions, ready(false, "Provisioning"), Some(1), first);
        assert_eq!(conditions.len(), 1);
        set(&mut conditions, ready(false, "StillProvisioning"), Some(2), later);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(first));
        assert_eq!(conditions[0].reason, "StillProvisioning");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set(&mut conditions, ready(true, "Ready"), Some(2), later);
        assert_eq!(conditions[0].last_transition_time, Time(later));
        assert_eq!(conditions[0].status, "True");
        set(
            &mut conditions,
            Desired {
                condition_type: types::DATASOURCE_READY,
                status: true,
                reason: "Ready",
                message: String::new(),
            },
            Some(2),
            later,
        );
        assert_eq!(conditions.len(), 2);
        assert_eq!(
            find(&conditions, types::READY).map(|condition| condition.status.as_str()),
            Some("True")
        );
    }
}
