//! DVCR's OCI Distribution v1.1 registry.
//!
//! Layers, one way down: [`api`] (HTTP) uses [`store`] (the registry model),
//! which uses [`layout`] (where things live) over a
//! [`dvcr_storage::StorageDriver`]. [`names`] and [`manifest`] check input
//! before it goes any further.

pub mod api;
pub mod auth;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod names;
pub mod observe;
pub mod store;
pub mod tls;

use std::sync::Arc;

use axum::routing::get;
use axum::{middleware, Router};
use dvcr_storage::StorageDriver;

pub use store::Store;

/// What the HTTP handlers share.
pub struct Registry {
    /// The registry model over the storage driver.
    pub store: Store,
    /// Who may do what; `None` lets anyone do anything (loopback only).
    pub auth: Option<auth::Authenticator>,
}

/// The registry's HTTP service over `driver`, open to anyone.
pub fn router(driver: Arc<dyn StorageDriver>) -> Router {
    router_with_auth(driver, None)
}

/// The registry's HTTP service over `driver`, checking requests with
/// `auth` when given.
pub fn router_with_auth(driver: Arc<dyn StorageDriver>, auth: Option<auth::Authenticator>) -> Router {
    let registry = Arc::new(Registry {
        store: Store::new(driver),
        auth,
    });
    let metrics = Arc::new(observe::Metrics::default());
    let metrics_route = Router::new().route("/metrics", get(observe::metrics_text)).with_state(metrics.clone());
    Router::new()
        .route("/healthz", get(observe::healthz))
        .route("/readyz", get(observe::readyz))
        .fallback(api::handle)
        .with_state(registry)
        .merge(metrics_route)
        .layer(middleware::from_fn_with_state(metrics, observe::observe))
}
