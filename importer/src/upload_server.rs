//! Uploads: the body of a `PUT` or `POST` (what `curl -T` and
//! `curl --data-binary` send, with a Content-Length or chunked) runs
//! through the import pipeline into the registry.
//!
//! Two shapes share [`UploadSlot`]: `dvcr upload-server` (one slot at
//! `/upload`, the process ends when the image is stored), and the sessions
//! `dvcr serve` hands out (`/upload/<32 random alphanumerics>`, one slot
//! each, usable once).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use rand::distr::{Alphanumeric, SampleString};
use tokio::sync::{mpsc, Notify};

use crate::channel_io::{ChannelReader, CHANNEL_DEPTH};
use crate::import::{push_stream, report};
use crate::pipeline::PipelineOptions;
use crate::progress::{Progress, Report};
use crate::reference::ImageReference;
use crate::destination::Destination;
use crate::ImportError;

enum SlotState {
    Waiting,
    Receiving,
    Stored(Report),
}

/// One destination that accepts one successful upload.
pub struct UploadSlot {
    client: Arc<dyn Destination>,
    destination: ImageReference,
    options: PipelineOptions,
    state: Mutex<SlotState>,
    /// The progress of the current or last upload.
    pub progress: Mutex<Arc<Progress>>,
    /// Notified when an image has been stored.
    pub stored: Notify,
}

impl UploadSlot {
    /// A slot pushing to `destination` through `client`.
    pub fn new(client: Arc<dyn Destination>, destination: ImageReference, options: PipelineOptions) -> Self {
        UploadSlot {
            client,
            destination,
            options,
            state: Mutex::new(SlotState::Waiting),
            progress: Mutex::new(Arc::new(Progress::default())),
            stored: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether no upload is under way and none was stored.
    pub fn is_waiting(&self) -> bool {
        matches!(&*self.lock(), SlotState::Waiting)
    }

    /// The report of the stored image, once there is one.
    pub fn stored_report(&self) -> Option<Report> {
        match &*self.lock() {
            SlotState::Stored(report) => Some(report.clone()),
            _ => None,
        }
    }

    /// Takes one upload body: 503 while another is in progress, 409 once an
    /// image is stored, 200 with the report when this one is stored.
    pub async fn receive(self: Arc<Self>, headers: HeaderMap, body: Body) -> Response {
        {
            let mut state = self.lock();
            match &*state {
                SlotState::Receiving => {
                    return (StatusCode::SERVICE_UNAVAILABLE, "another upload to this destination is in progress\n").into_response()
                }
                SlotState::Stored(_) => {
                    return (StatusCode::CONFLICT, "an image was already uploaded here; create a new upload\n").into_response()
                }
                SlotState::Waiting => *state = SlotState::Receiving,
            }
        }
        let length = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        let progress = Arc::new(Progress::default());
        progress.set_total(length);
        *self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = progress.clone();
        let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_DEPTH);
        tokio::spawn(async move {
            let mut stream = body.into_data_stream();
            while let Some(chunk) = stream.next().await {
                let item = chunk.map_err(|error| io::Error::other(format!("the upload was interrupted: {error}")));
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        let mut options = self.options.clone();
        options.file_name = "disk.img".into();
        let outcome = push_stream(
            self.client.as_ref(),
            &self.destination,
            Box::new(ChannelReader::new(receiver)),
            length,
            options,
            &progress,
        )
        .await;
        match outcome {
            Ok(facts) => {
                progress.finish();
                let stored = report(&facts, &self.destination, &progress);
                *self.lock() = SlotState::Stored(stored.clone());
                self.stored.notify_waiters();
                tracing::info!(destination = %self.destination, "upload stored");
                let text = serde_json::to_string(&stored).unwrap_or_default();
                (StatusCode::OK, text + "\n").into_response()
            }
            Err(error) => {
                *self.lock() = SlotState::Waiting;
                tracing::warn!(destination = %self.destination, %error, "upload failed");
                (failure_status(&error), format!("{error}\n")).into_response()
            }
        }
    }
}

fn failure_status(error: &ImportError) -> StatusCode {
    match error {
        ImportError::BadChecksum { .. }
        | ImportError::Converter(_)
        | ImportError::TooLarge(_)
        | ImportError::SourceRead(_)
        | ImportError::EmptySource => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The router of `dvcr upload-server`: `GET /upload` answers 200 (a
/// readiness probe), `PUT`/`POST /upload` take the image. With a
/// `path_token`, `/upload/<path_token>` does the same: the external URL an
/// Ingress passes on unchanged, so no rewrite is needed in front.
pub fn single_upload_router(slot: Arc<UploadSlot>, path_token: Option<&str>) -> Router {
    let route = || {
        get(|| async { "ready for an upload: curl -T IMAGE URL\n" })
            .put(receive_single)
            .post(receive_single)
    };
    let mut router = Router::new().route("/upload", route());
    if let Some(token) = path_token {
        router = router.route(&format!("/upload/{token}"), route());
    }
    router.with_state(slot)
}

async fn receive_single(State(slot): State<Arc<UploadSlot>>, headers: HeaderMap, body: Body) -> Response {
    slot.receive(headers, body).await
}

/// Upload sessions handed out by `dvcr serve`.
pub struct UploadSessions {
    client: Arc<dyn Destination>,
    host: String,
    options: PipelineOptions,
    /// How long a session waits for its upload, and how long a finished
    /// one keeps answering 409.
    lifetime: std::time::Duration,
    sessions: Mutex<HashMap<String, (std::time::Instant, Arc<UploadSlot>)>>,
}

impl UploadSessions {
    /// Sessions storing into the registry at `host` through `client`, each
    /// forgotten `lifetime` after it was created unless an upload is under
    /// way then.
    pub fn new(client: Arc<dyn Destination>, host: String, options: PipelineOptions, lifetime: std::time::Duration) -> Self {
        UploadSessions {
            client,
            host,
            options,
            lifetime,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The live session of `token`; expired sessions are dropped on the way.
    fn find(&self, token: &str) -> Option<Arc<UploadSlot>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.prune(&mut sessions);
        sessions.get(token).map(|(_, slot)| slot.clone())
    }

    fn prune(&self, sessions: &mut HashMap<String, (std::time::Instant, Arc<UploadSlot>)>) {
        sessions.retain(|_, (created, slot)| {
            let receiving = !slot.is_waiting() && slot.stored_report().is_none();
            created.elapsed() < self.lifetime || receiving
        });
    }
}

#[derive(serde::Deserialize)]
struct CreateQuery {
    destination: String,
}

/// `POST /dvcr/uploads?destination=REPOSITORY:TAG` creates a session and
/// answers `{"url": "/upload/<token>"}`; `GET`, `PUT` and `POST` on that
/// URL behave as `dvcr upload-server`'s `/upload`.
pub fn session_router(sessions: Arc<UploadSessions>) -> Router {
    Router::new()
        .route("/dvcr/uploads", post(create_session))
        .route("/upload/{token}", get(session_ready).put(session_receive).post(session_receive))
        .with_state(sessions)
}

async fn create_session(State(sessions): State<Arc<UploadSessions>>, Query(query): Query<CreateQuery>) -> Response {
    let reference = format!("{}/{}", sessions.host, query.destination);
    let destination = match ImageReference::parse(&reference) {
        Ok(destination) if query.destination.contains(':') => destination,
        Ok(_) => return (StatusCode::BAD_REQUEST, "the destination needs a tag: REPOSITORY:TAG\n").into_response(),
        Err(error) => return (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    };
    let token = Alphanumeric.sample_string(&mut rand::rng(), 32);
    let slot = Arc::new(UploadSlot::new(sessions.client.clone(), destination, sessions.options.clone()));
    let mut live = sessions.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    sessions.prune(&mut live);
    live.insert(token.clone(), (std::time::Instant::now(), slot));
    drop(live);
    let body = serde_json::json!({ "url": format!("/upload/{token}") });
    (StatusCode::CREATED, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn session_ready(State(sessions): State<Arc<UploadSessions>>, Path(token): Path<String>) -> Response {
    match sessions.find(&token) {
        Some(_) => (StatusCode::OK, "ready for an upload: curl -T IMAGE URL\n").into_response(),
        None => (StatusCode::NOT_FOUND, "no such upload (or it expired): create a new one\n").into_response(),
    }
}

async fn session_receive(
    State(sessions): State<Arc<UploadSessions>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match sessions.find(&token) {
        Some(slot) => slot.receive(headers, body).await,
        None => (StatusCode::NOT_FOUND, "no such upload (or it expired): create a new one\n").into_response(),
    }
}
