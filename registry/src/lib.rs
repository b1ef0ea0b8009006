//! DVCR's OCI Distribution v1.1 registry.
//!
//! Layers, one way down: [`api`] (HTTP) uses [`store`] (the registry model),
//! which uses [`layout`] (where things live) over a
//! [`dvcr_storage::StorageDriver`]. [`names`] and [`manifest`] check input
//! before it goes any further.

pub mod api;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod names;
pub mod store;

use std::sync::Arc;

use axum::Router;
use dvcr_storage::StorageDriver;
use tower_http::trace::TraceLayer;

pub use store::Store;

/// The registry's HTTP service over `driver`.
pub fn router(driver: Arc<dyn StorageDriver>) -> Router {
    let store = Arc::new(Store::new(driver));
    Router::new()
        .fallback(api::handle)
        .with_state(store)
        .layer(TraceLayer::new_for_http())
}
