//! Registry errors and their JSON form, as the OCI Distribution spec gives.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dvcr_storage::StorageError;
use serde_json::json;

use crate::names::NameError;

/// The spec's error codes, plus `RANGE_INVALID` for unsatisfiable reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content.
    DigestInvalid,
    /// Manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// The operation is unsupported.
    Unsupported,
    /// A requested range cannot be satisfied.
    RangeInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// Anything the server did wrong.
    Internal,
}

impl ErrorCode {
    /// The code as it appears in the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Internal => "UNKNOWN",
        }
    }
}

/// A failed request: a status, a spec code and a message for the user.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RegistryError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// The spec's code.
    pub code: ErrorCode,
    /// What went wrong, in words a user can act on.
    pub message: String,
    /// Extra headers (such as `Range` on a 416 for an upload).
    pub headers: Vec<(&'static str, String)>,
}

impl RegistryError {
    /// An error with the given status, code and message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header to the answer.
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 404 `BLOB_UNKNOWN`.
    pub fn blob_unknown(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, format!("blob unknown to registry: {what}"))
    }

    /// 404 `BLOB_UPLOAD_UNKNOWN`.
    pub fn upload_unknown(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadUnknown,
            format!("blob upload {id:?} unknown to registry: it finished, was cancelled, or never started"),
        )
    }

    /// 400 `BLOB_UPLOAD_INVALID`.
    pub fn upload_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BlobUploadInvalid, message)
    }

    /// 400 `DIGEST_INVALID`.
    pub fn digest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, message)
    }

    /// 400 `MANIFEST_INVALID`.
    pub fn manifest_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid, message)
    }

    /// 404 `MANIFEST_UNKNOWN`.
    pub fn manifest_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, message)
    }

    /// 404 `NAME_UNKNOWN`.
    pub fn name_unknown(name: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            format!("repository {name} is not known to this registry"),
        )
    }

    /// 400 `SIZE_INVALID`.
    pub fn size_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::SizeInvalid, message)
    }

    /// 405 `UNSUPPORTED`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported, message)
    }

    /// 404 for a path that is no part of the API.
    pub fn not_found_route(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::Unsupported, format!("no such API endpoint: {path}"))
    }
}

impl From<NameError> for RegistryError {
    fn from(error: NameError) -> Self {
        let code = match error {
            NameError::Repository { .. } => ErrorCode::NameInvalid,
            NameError::Tag(_) => ErrorCode::ManifestInvalid,
            NameError::Digest { .. } | NameError::UnsupportedAlgorithm(_) => ErrorCode::DigestInvalid,
        };
        RegistryError::new(StatusCode::BAD_REQUEST, code, error.to_string())
    }
}

impl From<StorageError> for RegistryError {
    fn from(error: StorageError) -> Self {
        crate::observe::STORAGE_ERRORS.inc();
        match &error {
            StorageError::OutOfSpace(_) => RegistryError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::Internal,
                format!("DVCR is out of space: {error}"),
            ),
            _ => {
                tracing::error!(%error, "storage failure");
                RegistryError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, error.to_string())
            }
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let body = json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }]
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

/// Result of a handler.
pub type RegistryResult<T> = Result<T, RegistryError>;
