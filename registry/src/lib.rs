//! DVCR's OCI Distribution v1.1 registry.
//!
//! Layers, one way down: [`api`] (HTTP) uses [`store`] (the registry model),
//! which uses [`layout`] (where things live) over a
//! [`dvcr_storage::StorageDriver`]. [`names`] and [`manifest`] check input
//! before it goes any further.

pub mod api;
pub mod auth;
pub mod error;
pub mod gc;
pub mod layout;
pub mod manifest;
pub mod names;
pub mod observe;
pub mod recent;
pub mod server;
pub mod store;
pub mod tls;
pub mod zero_copy;

use std::sync::Arc;

use axum::routing::get;
use axum::{middleware, Router};
use dvcr_storage::StorageDriver;

pub use store::Store;

/// The guard of `mutex`, also after a thread panicked holding it: what the
/// registry keeps under its locks (queues, caches, counts) stays usable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the HTTP handlers share.
pub struct Registry {
    /// The registry model over the storage driver.
    pub store: Arc<Store>,
    /// Who may do what; `None` lets anyone do anything (loopback only).
    pub auth: Option<auth::Authenticator>,
    /// What the requests and the collector counted.
    pub metrics: Arc<observe::Metrics>,
}

impl Registry {
    /// A registry over `driver`, checking requests with `auth` when given.
    pub fn new(driver: Arc<dyn StorageDriver>, auth: Option<auth::Authenticator>) -> Arc<Self> {
        Arc::new(Registry {
            store: Arc::new(Store::new(driver)),
            auth,
            metrics: Arc::new(observe::Metrics::default()),
        })
    }
}

/// The registry's HTTP service over `driver`, open to anyone.
pub fn router(driver: Arc<dyn StorageDriver>) -> Router {
    router_for(Registry::new(driver, None))
}

/// The HTTP service of `registry`: the OCI API, `/metrics`, `/healthz` and
/// `/readyz`.
pub fn router_for(registry: Arc<Registry>) -> Router {
    router_with(registry, Router::new())
}

/// As [`router_for`], with `extra` routes (the upload sessions of the
/// embedded default) counted and logged as the registry's own requests.
pub fn router_with(registry: Arc<Registry>, extra: Router) -> Router {
    let metrics = registry.metrics.clone();
    Router::new()
        .route(auth::token_service::TOKEN_PATH, get(auth::token_service::issue))
        .fallback(api::handle)
        .with_state(registry.clone())
        .merge(probes_router(registry))
        .merge(extra)
        .layer(middleware::from_fn_with_state(metrics, observe::observe))
}

/// `/metrics`, `/healthz` and `/readyz` of `registry` alone, for a listener
/// of their own (plain HTTP for Prometheus and the kubelet, when the
/// registry's listener asks for client certificates).
pub fn probes_router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(observe::metrics_text))
        .route("/healthz", get(observe::healthz))
        .route("/readyz", get(observe::readyz))
        .with_state(registry)
}
