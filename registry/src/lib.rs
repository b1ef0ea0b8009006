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
    pub store: Arc<Store>,
    /// Who may do what; `None` lets anyone do anything (loopback only).
    pub auth: Option<auth::Authenticator>,
}

impl Registry {
    /// A registry over `driver`, checking requests with `auth` when given.
    pub fn new(driver: Arc<dyn StorageDriver>, auth: Option<auth::Authenticator>) -> Arc<Self> {
        Arc::new(Registry {
            store: Arc::new(Store::new(driver)),
            auth,
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
    let metrics = Arc::new(observe::Metrics::default());
    let metrics_route = Router::new().route("/metrics", get(observe::metrics_text)).with_state(metrics.clone());
    Router::new()
        .route("/healthz", get(observe::healthz))
        .route("/readyz", get(observe::readyz))
        .route(auth::token_service::TOKEN_PATH, get(auth::token_service::issue))
        .fallback(api::handle)
        .with_state(registry)
        .merge(metrics_route)
        .layer(middleware::from_fn_with_state(metrics, observe::observe))
}
