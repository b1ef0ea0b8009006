//! Leader election over a `coordination.k8s.io/v1` Lease, as Kubernetes'
//! own controllers do it: of several replicas one holds the Lease and runs
//! the controllers, renewing it every [`RENEW_INTERVAL`]; the others look
//! every [`RETRY_INTERVAL`] and take it over once it has not been renewed for
//! [`LEASE_DURATION`]. Every write carries the `resourceVersion` it read, so
//! two replicas can never both take it. A leader that cannot renew in time
//! stops (the process exits, Kubernetes starts it again as a candidate)
//! rather than run beside a new leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{PostParams, ResourceExt};
use kube::{Api, Client};

use super::Error;

/// How long a Lease not renewed keeps others out.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// How often a candidate looks.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// The Lease's name, in the controller's namespace.
pub const LEASE_NAME: &str = "dvcr-controller";

/// What a replica does about the Lease it read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Write this spec (create the Lease, or replace it with the
    /// `resourceVersion` read): to take it or to renew it.
    Write(Box<LeaseSpec>),
    /// Another replica holds it; look again later.
    Wait {
        /// The holder.
        holder: String,
    },
}

/// Decides, from the Lease as read (`None`: absent), what replica
/// `identity` does at `now`.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let duration = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(i32::MAX);
    let fresh = |transitions: i32| LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(duration),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(lease) = lease else {
        return Decision::Write(Box::new(fresh(0)));
    };
    let holder = lease.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        let mut renewed = lease.clone();
        renewed.renew_time = Some(MicroTime(now));
        renewed.lease_duration_seconds = Some(duration);
        return Decision::Write(Box::new(renewed));
    }
    let held_for = i64::from(lease.lease_duration_seconds.unwrap_or(duration).max(0));
    let expired = match &lease.renew_time {
        // The holder's clock wrote it; skew beyond the duration is not guarded.
        Some(MicroTime(renewed)) => now.as_second() >= renewed.as_second().saturating_add(held_for),
        None => true,
    };
    if holder.is_empty() || expired {
        let transitions = lease.lease_transitions.unwrap_or(0).saturating_add(1);
        Decision::Write(Box::new(fresh(transitions)))
    } else {
        Decision::Wait {
            holder: holder.to_string(),
        }
    }
}

/// One look at the Lease: `Ok(true)` when `identity` holds it afterwards.
/// A write lost to another replica (409) is `Ok(false)`.
pub async fn try_acquire_or_renew(client: &Client, namespace: &str, identity: &str) -> Result<bool, Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let current = api
        .get_opt(LEASE_NAME)
        .await
        .map_err(Error::kube(format!("reading the Lease {namespace}/{LEASE_NAME}")))?;
    let spec = current.as_ref().and_then(|lease| lease.spec.as_ref());
    let Decision::Write(spec) = decide(spec, identity, Timestamp::now()) else {
        return Ok(false);
    };
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(LEASE_NAME.into()),
            namespace: Some(namespace.into()),
            resource_version: current.as_ref().and_then(|lease| lease.resource_version()),
            ..ObjectMeta::default()
        },
        spec: Some(*spec),
    };
    let written = match current {
        None => api.create(&PostParams::default(), &lease).await,
        Some(_) => api.replace(LEASE_NAME, &PostParams::default(), &lease).await,
    };
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(answer)) if answer.is_conflict() || answer.is_already_exists() => Ok(false),
        Err(error) => Err(Error::Kube {
            action: format!("writing the Lease {namespace}/{LEASE_NAME}"),
            source: error,
        }),
    }
}

/// Waits until `identity` holds the Lease. API errors are logged and
/// retried: a candidate has nothing better to do.
pub async fn acquire(client: &Client, namespace: &str, identity: &str) {
    let mut announced = false;
    loop {
        match try_acquire_or_renew(client, namespace, identity).await {
            Ok(true) => {
                tracing::info!(identity, "leading: this replica runs the controllers");
                return;
            }
            Ok(false) if !announced => {
                tracing::info!(identity, "standing by: another replica leads");
                announced = true;
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot take the lead yet"),
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
    }
}

/// Renews the Lease until that fails for longer than the Lease lasts (or
/// another replica took it); then returns the reason, and the leader stops.
pub async fn keep(client: &Client, namespace: &str, identity: &str) -> Error {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(RENEW_INTERVAL).await;
        // A request hanging must not keep this replica leading past its Lease.
        let renewal = tokio::time::timeout(RENEW_INTERVAL, try_acquire_or_renew(client, namespace, identity));
        let renewed = renewal
            .await
            .unwrap_or_else(|_| Err(Error::LeadershipLost(format!("no answer within {RENEW_INTERVAL:?}"))));
        match renewed {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => return Error::LeadershipLost("another replica holds the Lease".into()),
            Err(error) => {
                tracing::warn!(%error, "cannot renew the Lease");
                // Stop before the Lease can run out, so no second leader overlaps.
                if last_renewal.elapsed() + RENEW_INTERVAL >= LEASE_DURATION {
                    return Error::LeadershipLost(format!("the Lease could not be renewed in time: {error}"));
                }
            }
        }
    }
}

/// Gives the Lease up on a clean stop, so a standby leads at once instead of
/// after [`LEASE_DURATION`]. Failures are only logged: the Lease runs out.
pub async fn release(client: &Client, namespace: &str, identity: &str) {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let released = async {
        let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        api.replace(LEASE_NAME, &PostParams::default(), &lease).await.map(drop)
    };
    match released.await {
        Ok(()) => tracing::info!(identity, "gave up the lead"),
        Err(error) => tracing::warn!(%error, "cannot give up the Lease; it runs out by itself"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn an_absent_lease_is_taken() {
        let Decision::Write(spec) = decide(None, "a", at(0)) else {
            panic!("not taken");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn a_live_lease_of_another_is_waited_for_and_an_expired_one_taken() {
        let lease = held_by("b", 10);
        assert_eq!(decide(Some(&lease), "a", at(24)), Decision::Wait { holder: "b".into() });
        let Decision::Write(spec) = decide(Some(&lease), "a", at(25)) else {
            panic!("an expired lease is taken");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(25))));
        // A released lease (no holder) is taken at once.
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("b", 10)
        };
        assert!(matches!(decide(Some(&released), "a", at(11)), Decision::Write(_)));
    }

    #[test]
    fn the_holder_renews_keeping_its_acquire_time() {
        let lease = held_by("a", 10);
        let Decision::Write(spec) = decide(Some(&lease), "a", at(14)) else {
            panic!("not renewed");
        };
        assert_eq!(spec.renew_time, Some(MicroTime(at(14))));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(spec.lease_transitions, Some(3));
    }
}
