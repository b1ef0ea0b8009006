//! The registry's own store as an import destination: what the upload
//! sessions of `dvcr serve` write into. The same calls an HTTP push makes
//! (an upload, its digest reported, the config blob, the manifest with
//! the tag last), without sending every byte through a loopback connection
//! to be received, gathered and parsed a second time by the same process.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use dvcr_importer::destination::{Destination, LayerBody};
use dvcr_importer::registry_client::RegistryError as ClientError;
use dvcr_registry::error::RegistryError;
use dvcr_registry::names::{Algorithm, Digest, Reference, RepositoryName};
use dvcr_registry::Store;

/// What errors name as the registry.
const HOST: &str = "this registry";

/// Stores into `store` directly.
pub struct StoreDestination {
    store: Arc<Store>,
}

impl StoreDestination {
    /// A destination writing into `store`.
    pub fn new(store: Arc<Store>) -> Self {
        StoreDestination { store }
    }
}

/// The registry's refusal as the importer reports a registry's answer, so
/// that its hints (such as "out of space" for 507) apply alike.
fn refused(action: &str) -> impl FnOnce(RegistryError) -> ClientError + '_ {
    move |error| ClientError::Status {
        host: HOST.to_string(),
        action: action.to_string(),
        status: error.status,
        body: error.message,
    }
}

/// A location is `<repository>@<upload id>`: repository names have no `@`.
fn location(name: &RepositoryName, id: &str) -> String {
    format!("{name}@{id}")
}

fn parse_location(location: &str) -> Result<(RepositoryName, &str), ClientError> {
    let protocol = |reason: String| ClientError::Protocol {
        host: HOST.to_string(),
        reason,
    };
    let (name, id) = location
        .rsplit_once('@')
        .ok_or_else(|| protocol(format!("not an upload location: {location}")))?;
    let name = RepositoryName::parse(name).map_err(|error| protocol(error.to_string()))?;
    Ok((name, id))
}

fn repository(name: &str, action: &str) -> Result<RepositoryName, ClientError> {
    RepositoryName::parse(name).map_err(|error| refused(action)(error.into()))
}

fn digest(text: &str, action: &str) -> Result<Digest, ClientError> {
    text.parse::<Digest>().map_err(|error| refused(action)(error.into()))
}

fn one_chunk(content: Bytes) -> futures::stream::Once<std::future::Ready<Result<Bytes, std::io::Error>>> {
    futures::stream::once(std::future::ready(Ok(content)))
}

#[async_trait]
impl Destination for StoreDestination {
    async fn begin_layer(&self, repository_name: &str) -> Result<(String, bool), ClientError> {
        let action = format!("starting an upload to {repository_name}");
        let name = repository(repository_name, &action)?;
        let id = self.store.start_upload(&name, Algorithm::Sha256).await.map_err(refused(&action))?;
        Ok((location(&name, &id), true))
    }

    async fn send_layer(&self, location: &str, body: LayerBody) -> Result<(String, Option<String>), ClientError> {
        let (name, id) = parse_location(location)?;
        let (_, received) = self
            .store
            .append_upload(&name, id, None, body)
            .await
            .map_err(refused("sending the layer"))?;
        Ok((location.to_string(), received.map(|digest| digest.to_string())))
    }

    async fn complete_layer(&self, location: &str, digest_text: &str) -> Result<(), ClientError> {
        let action = format!("completing the upload of {digest_text}");
        let (name, id) = parse_location(location)?;
        let digest = digest(digest_text, &action)?;
        self.store
            .finish_upload(&name, id, &digest, None, one_chunk(Bytes::new()))
            .await
            .map(drop)
            .map_err(refused(&action))
    }

    async fn abandon_layer(&self, location: &str) {
        if let Ok((name, id)) = parse_location(location) {
            let _ = self.store.cancel_upload(&name, id).await;
        }
    }

    async fn store_blob(&self, repository_name: &str, digest_text: &str, content: Bytes) -> Result<(), ClientError> {
        let action = format!("storing blob {digest_text}");
        let name = repository(repository_name, &action)?;
        let digest = digest(digest_text, &action)?;
        let id = self.store.start_upload(&name, digest.algorithm()).await.map_err(refused(&action))?;
        self.store
            .finish_upload(&name, &id, &digest, None, one_chunk(content))
            .await
            .map(drop)
            .map_err(refused(&action))
    }

    async fn store_manifest(&self, repository_name: &str, reference: &str, media_type: &str, content: Bytes) -> Result<(), ClientError> {
        let action = format!("storing the manifest {repository_name}:{reference}");
        let name = repository(repository_name, &action)?;
        let reference = Reference::parse(reference).map_err(|error| refused(&action)(error.into()))?;
        dvcr_registry::api::store_manifest(&self.store, &name, &reference, Vec::new(), Some(media_type), content)
            .await
            .map(drop)
            .map_err(refused(&action))
    }
}
