//! What an operator watches: Prometheus metrics, health and readiness
//! probes, and a request id on every request and its log lines.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry as MetricRegistry;
use tracing::Instrument;

use crate::api::Route;
use crate::Registry;

const REQUEST_ID: &str = "x-request-id";
/// How long the readiness probe waits for the storage.
const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

/// Storage operations that failed, counted wherever a storage error turns
/// into an answer (one count per process, as Prometheus expects).
pub static STORAGE_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Garbage collections run.
pub static GC_RUNS: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Bytes garbage collection freed.
pub static GC_BYTES_FREED: LazyLock<Counter> = LazyLock::new(Counter::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: &'static str,
}

/// The registry's metrics.
pub struct Metrics {
    registry: MetricRegistry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    bytes_received: Counter,
    bytes_sent: Counter,
    uploads_in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = MetricRegistry::with_prefix("dvcr");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by method, route and status", requests.clone());
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)));
        registry.register(
            "http_request_duration_seconds",
            "Time until the answer's headers, by method and route",
            latency.clone(),
        );
        let bytes_received = Counter::default();
        registry.register("http_received_bytes", "Request body bytes received", bytes_received.clone());
        let bytes_sent = Counter::default();
        registry.register("http_sent_bytes", "Response body bytes sent", bytes_sent.clone());
        let uploads_in_flight = Gauge::default();
        registry.register("uploads_in_flight", "Blob and manifest upload requests being received", uploads_in_flight.clone());
        registry.register("storage_errors", "Storage operations that failed", STORAGE_ERRORS.clone());
        registry.register("gc_runs", "Garbage collections run", GC_RUNS.clone());
        registry.register("gc_freed_bytes", "Bytes freed by garbage collection", GC_BYTES_FREED.clone());
        Metrics {
            registry,
            requests,
            latency,
            bytes_received,
            bytes_sent,
            uploads_in_flight,
        }
    }
}

impl Metrics {
    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// A label for the route, from a fixed set (never the path itself).
fn route_label(path: &str) -> &'static str {
    match Route::parse(path) {
        Ok(Some(Route::Base)) => "base",
        Ok(Some(Route::Catalog)) => "catalog",
        Ok(Some(Route::Tags(_))) => "tags",
        Ok(Some(Route::Manifest(..))) => "manifest",
        Ok(Some(Route::Blob(..))) => "blob",
        Ok(Some(Route::UploadStart(_))) => "upload_start",
        Ok(Some(Route::Upload(..))) => "upload",
        Ok(Some(Route::Referrers(..))) => "referrers",
        Ok(None) | Err(_) => match path {
            "/metrics" => "metrics",
            "/healthz" | "/readyz" => "health",
            _ => "other",
        },
    }
}

fn method_label(method: &axum::http::Method) -> String {
    match method.as_str() {
        known @ ("GET" | "HEAD" | "PUT" | "POST" | "PATCH" | "DELETE" | "OPTIONS") => known.to_string(),
        _ => "other".into(),
    }
}

/// A request id from the client when it is short and plain, else a new one.
fn request_id(request: &Request) -> String {
    let given = request.headers().get(REQUEST_ID).and_then(|value| value.to_str().ok()).filter(|id| {
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
    });
    match given {
        Some(id) => id.to_string(),
        None => hex::encode(rand::random::<[u8; 8]>()),
    }
}

/// One request counted in a gauge for as long as it lives.
struct InFlight(Gauge);

impl InFlight {
    fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn set_request_id(headers: &mut axum::http::HeaderMap, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert(REQUEST_ID, value);
    }
}

/// `body`, adding the bytes of its data frames to `counter` as they pass.
fn counted(body: Body, counter: &Counter) -> Body {
    let counter = counter.clone();
    Body::new(body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            counter.inc_by(data.len() as u64);
        }
        frame
    }))
}

/// Middleware: request id, a span carrying it for every log line of the
/// request, counts, latency and body bytes.
pub async fn observe(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    let method = method_label(request.method());
    let route = route_label(request.uri().path());
    let path = request.uri().path().to_string();
    let uploading = matches!(route, "upload" | "upload_start") || (route == "manifest" && method == "PUT");
    let (mut parts, body) = request.into_parts();
    set_request_id(&mut parts.headers, &id);
    let request = Request::from_parts(parts, counted(body, &metrics.bytes_received));
    // A guard, so a request dropped midway (the client went away) still
    // leaves the gauge.
    let in_flight = uploading.then(|| InFlight::enter(&metrics.uploads_in_flight));
    let span = tracing::info_span!("request", id = %id, method = %method, path = %path, who = tracing::field::Empty);
    let response = next.run(request).instrument(span.clone()).await;
    drop(in_flight);
    let elapsed = started.elapsed();
    let status = response.status();
    metrics
        .latency
        .get_or_create(&RouteLabels { method: method.clone(), route })
        .observe(elapsed.as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels { method: method.clone(), route, status: status.as_u16() })
        .inc();
    span.in_scope(|| tracing::info!(status = status.as_u16(), route, ms = elapsed.as_millis() as u64, "request"));
    let (mut parts, body) = response.into_parts();
    set_request_id(&mut parts.headers, &id);
    Response::from_parts(parts, counted(body, &metrics.bytes_sent))
}

/// `GET /metrics`.
pub async fn metrics_text(State(registry): State<Arc<Registry>>) -> Response {
    let mut response = registry.metrics.render().into_response();
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /healthz`: the process serves requests.
pub async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// `GET /readyz`: the storage answers within a few seconds.
pub async fn readyz(State(registry): State<Arc<Registry>>) -> Response {
    match tokio::time::timeout(READINESS_TIMEOUT, registry.store.probe()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(error)) => {
            tracing::warn!(%error, "not ready: the storage fails");
            (StatusCode::SERVICE_UNAVAILABLE, format!("storage fails: {error}\n")).into_response()
        }
        Err(_) => {
            tracing::warn!("not ready: the storage does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, format!("storage does not answer within {READINESS_TIMEOUT:?}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_become_a_few_labels() {
        assert_eq!(route_label("/v2/"), "base");
        assert_eq!(route_label("/v2/vi/a/b/blobs/sha256:00"), "blob");
        assert_eq!(route_label("/v2/vi/a/b/blobs/uploads/"), "upload_start");
        assert_eq!(route_label("/v2/vi/a/b/manifests/v1"), "manifest");
        assert_eq!(route_label("/v2/UPPER/manifests/v1"), "other");
        assert_eq!(route_label("/anything/else"), "other");
        assert_eq!(route_label("/metrics"), "metrics");
    }
}
