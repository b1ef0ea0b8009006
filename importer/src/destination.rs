//! Where an import's artifact goes: a registry over HTTP
//! ([`RegistryClient`]), or, for the upload sessions of `dvcr serve`, the
//! registry's own store in the same process (implemented by the `dvcr`
//! binary, which knows both crates), so that an upload's bytes are not sent
//! through a loopback connection and received a second time.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::registry_client::{RegistryClient, RegistryError};

/// The layer blob's bytes, as the pipeline produces them; an `Err` item
/// aborts the upload.
pub type LayerBody = BoxStream<'static, std::io::Result<Bytes>>;

/// The registry operations an import needs, in the order it uses them.
#[async_trait]
pub trait Destination: Send + Sync {
    /// Starts the layer's upload in `repository`: its location, and
    /// whether the digest of what it receives will be reported (so that
    /// the pipeline need not hash the layer itself).
    async fn begin_layer(&self, repository: &str) -> Result<(String, bool), RegistryError>;

    /// Sends the whole layer to the upload at `location`: the location to
    /// complete it at, and the digest of what was received when reported.
    async fn send_layer(&self, location: &str, body: LayerBody) -> Result<(String, Option<String>), RegistryError>;

    /// Completes the upload at `location` as blob `digest`.
    async fn complete_layer(&self, location: &str, digest: &str) -> Result<(), RegistryError>;

    /// Drops the upload at `location` (best effort).
    async fn abandon_layer(&self, location: &str);

    /// Stores a small blob (the config).
    async fn store_blob(&self, repository: &str, digest: &str, content: Bytes) -> Result<(), RegistryError>;

    /// Stores the manifest under `reference`: the tag appears here, last.
    async fn store_manifest(&self, repository: &str, reference: &str, media_type: &str, content: Bytes) -> Result<(), RegistryError>;
}

#[async_trait]
impl Destination for RegistryClient {
    async fn begin_layer(&self, repository: &str) -> Result<(String, bool), RegistryError> {
        self.start_reported_upload(repository).await
    }

    async fn send_layer(&self, location: &str, body: LayerBody) -> Result<(String, Option<String>), RegistryError> {
        self.upload_stream(location, body).await
    }

    async fn complete_layer(&self, location: &str, digest: &str) -> Result<(), RegistryError> {
        self.finish_upload(location, digest, Bytes::new()).await
    }

    async fn abandon_layer(&self, location: &str) {
        let _ = self.cancel_upload(location).await;
    }

    async fn store_blob(&self, repository: &str, digest: &str, content: Bytes) -> Result<(), RegistryError> {
        self.push_blob(repository, digest, content).await
    }

    async fn store_manifest(&self, repository: &str, reference: &str, media_type: &str, content: Bytes) -> Result<(), RegistryError> {
        self.put_manifest(repository, reference, media_type, content).await
    }
}
