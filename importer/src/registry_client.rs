//! A small OCI Distribution client: what an import needs to push an
//! artifact (streamed blob uploads, cross-repository mounts, manifests) and
//! to pull one (manifests, streamed blobs), with Basic and Bearer-token
//! authentication as registries challenge for it.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::Stream;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::reference::ImageReference;

/// What can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or the exchange broke.
    #[error("registry {host}: {action}: {source}")]
    Transport {
        /// The registry.
        host: String,
        /// What was being done.
        action: String,
        /// The HTTP client's error.
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("registry {host}: {action}: HTTP {status}: {body}")]
    Status {
        /// The registry.
        host: String,
        /// What was being done.
        action: String,
        /// The status.
        status: StatusCode,
        /// The start of the answer's body.
        body: String,
    },
    /// The registry refused the credentials, or none were given.
    #[error("registry {host}: {action}: access denied (HTTP {status}): check the credentials (--auth-file) and their scope")]
    Denied {
        /// The registry.
        host: String,
        /// What was being done.
        action: String,
        /// 401 or 403.
        status: StatusCode,
    },
    /// The CA bundle could not be used.
    #[error("cannot use the CA bundle: {0}")]
    CaBundle(String),
    /// A registry answer did not make sense.
    #[error("registry {host}: {reason}")]
    Protocol {
        /// The registry.
        host: String,
        /// What was wrong.
        reason: String,
    },
}

/// Credentials for one registry host.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl Credentials {
    /// The credentials for `host` in a dockerconfigjson document (the
    /// content of a Kubernetes pull secret), if it has any.
    pub fn from_docker_config(document: &[u8], host: &str) -> Result<Option<Credentials>, String> {
        let value: serde_json::Value =
            serde_json::from_slice(document).map_err(|error| format!("not a dockerconfigjson document: {error}"))?;
        let auths = value.get("auths").and_then(|auths| auths.as_object()).ok_or("no `auths` object")?;
        for (key, entry) in auths {
            let key_host = key.trim_start_matches("https://").trim_start_matches("http://");
            let key_host = key_host.split('/').next().unwrap_or_default();
            if key_host != host {
                continue;
            }
            if let (Some(username), Some(password)) = (
                entry.get("username").and_then(|v| v.as_str()),
                entry.get("password").and_then(|v| v.as_str()),
            ) {
                return Ok(Some(Credentials {
                    username: username.into(),
                    password: password.into(),
                }));
            }
            if let Some(auth) = entry.get("auth").and_then(|v| v.as_str()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .map_err(|_| format!("the `auth` of {key} is not base64"))?;
                let decoded = String::from_utf8(decoded).map_err(|_| format!("the `auth` of {key} is not UTF-8"))?;
                let (username, password) = decoded.split_once(':').ok_or(format!("the `auth` of {key} is not user:password"))?;
                return Ok(Some(Credentials {
                    username: username.into(),
                    password: password.into(),
                }));
            }
        }
        Ok(None)
    }
}

/// A client for one registry host and repository.
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    host: String,
    credentials: Option<Credentials>,
    authorization: Option<HeaderValue>,
}

/// Connection settings.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// PEM CA certificates to trust besides the system's.
    pub ca_bundle: Option<Vec<u8>>,
    /// Speak plain HTTP (loopback hosts do too unless a CA bundle is given).
    pub plain_http: bool,
    /// Credentials.
    pub credentials: Option<Credentials>,
    /// A registry token (such as one from `dvcr token issue` or the
    /// controller), sent as `Authorization: Bearer` with every request.
    pub bearer_token: Option<String>,
}

/// Builds an HTTP client trusting `ca_bundle` besides the system roots.
pub fn http_client(ca_bundle: Option<&[u8]>) -> Result<reqwest::Client, RegistryError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::limited(10));
    if let Some(pem) = ca_bundle {
        let certificates = reqwest::Certificate::from_pem_bundle(pem).map_err(|error| RegistryError::CaBundle(error.to_string()))?;
        if certificates.is_empty() {
            return Err(RegistryError::CaBundle("it holds no PEM certificate".into()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|error| RegistryError::CaBundle(error.to_string()))
}

fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host });
    name == "localhost" || name.starts_with("127.") || name == "[::1]"
}

impl RegistryClient {
    /// A client for the registry of `reference`.
    pub fn new(reference: &ImageReference, options: &ClientOptions) -> Result<Self, RegistryError> {
        let plain = options.plain_http || (is_loopback(&reference.host) && options.ca_bundle.is_none());
        let scheme = if plain { "http" } else { "https" };
        let authorization = match &options.bearer_token {
            Some(token) => Some(HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| RegistryError::Protocol {
                host: reference.host.clone(),
                reason: "the registry token holds characters a header cannot carry".into(),
            })?),
            None => None,
        };
        Ok(RegistryClient {
            http: http_client(options.ca_bundle.as_deref())?,
            base: format!("{scheme}://{}", reference.host),
            host: reference.host.clone(),
            credentials: options.credentials.clone(),
            authorization,
        })
    }

    /// The registry host.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn transport(&self, action: &str) -> impl FnOnce(reqwest::Error) -> RegistryError + '_ {
        let action = action.to_string();
        move |source| RegistryError::Transport {
            host: self.host.clone(),
            action,
            source,
        }
    }

    async fn failure(&self, action: &str, response: Response) -> RegistryError {
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return RegistryError::Denied {
                host: self.host.clone(),
                action: action.to_string(),
                status,
            };
        }
        let body = response.text().await.unwrap_or_default();
        RegistryError::Status {
            host: self.host.clone(),
            action: action.to_string(),
            status,
            body: body.chars().take(300).collect(),
        }
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let mut builder = self.http.request(method, url);
        if let Some(value) = &self.authorization {
            builder = builder.header(AUTHORIZATION, value.clone());
        }
        builder
    }

    /// Answers the registry's challenge (if any) for `actions` on
    /// `repositories` before anything is streamed, since a streamed body
    /// cannot be sent twice.
    pub async fn authorize(&mut self, repositories: &[&str], actions: &str) -> Result<(), RegistryError> {
        if self.authorization.as_ref().is_some_and(|value| value.as_bytes().starts_with(b"Bearer ")) && self.credentials.is_none() {
            // A token given up front is the whole authorization.
            return Ok(());
        }
        let response = self
            .http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(self.transport("checking the API version"))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(());
        }
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let Some(credentials) = self.credentials.clone() else {
            if !challenge.to_ascii_lowercase().starts_with("bearer") {
                return Err(RegistryError::Denied {
                    host: self.host.clone(),
                    action: "authenticating (no credentials given)".into(),
                    status: StatusCode::UNAUTHORIZED,
                });
            }
            return self.bearer(&challenge, None, repositories, actions).await;
        };
        if challenge.to_ascii_lowercase().starts_with("bearer") {
            return self.bearer(&challenge, Some(&credentials), repositories, actions).await;
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", credentials.username, credentials.password));
        self.authorization = HeaderValue::from_str(&format!("Basic {token}")).ok();
        Ok(())
    }

    async fn bearer(
        &mut self,
        challenge: &str,
        credentials: Option<&Credentials>,
        repositories: &[&str],
        actions: &str,
    ) -> Result<(), RegistryError> {
        let parameters = parse_challenge(challenge);
        let realm = parameters
            .iter()
            .find(|(key, _)| key == "realm")
            .map(|(_, value)| value.clone())
            .ok_or_else(|| RegistryError::Protocol {
                host: self.host.clone(),
                reason: format!("a Bearer challenge without a realm: {challenge}"),
            })?;
        let mut query: Vec<(String, String)> = parameters.into_iter().filter(|(key, _)| key == "service").collect();
        for repository in repositories {
            query.push(("scope".into(), format!("repository:{repository}:{actions}")));
        }
        let mut request = self.http.get(&realm).query(&query);
        if let Some(credentials) = credentials {
            request = request.basic_auth(&credentials.username, Some(&credentials.password));
        }
        let response = request.send().await.map_err(self.transport("fetching a token"))?;
        if !response.status().is_success() {
            return Err(self.failure("fetching a token", response).await);
        }
        let body: serde_json::Value = response.json().await.map_err(self.transport("reading the token"))?;
        let token = body
            .get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|token| token.as_str())
            .ok_or_else(|| RegistryError::Protocol {
                host: self.host.clone(),
                reason: "the token answer has no token".into(),
            })?;
        self.authorization = HeaderValue::from_str(&format!("Bearer {token}")).ok();
        Ok(())
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        }
    }

    fn location(&self, response: &Response) -> Result<String, RegistryError> {
        response
            .headers()
            .get(LOCATION)
            .and_then(|value| value.to_str().ok())
            .map(|location| self.absolute(location))
            .ok_or_else(|| RegistryError::Protocol {
                host: self.host.clone(),
                reason: "an upload answer has no Location".into(),
            })
    }

    /// Starts a blob upload; returns its location.
    pub async fn start_upload(&self, repository: &str) -> Result<String, RegistryError> {
        Ok(self.start_reported_upload(repository).await?.0)
    }

    /// Starts a blob upload; returns its location and whether the registry
    /// reports the digest of what it receives (DVCR does, in
    /// `Dvcr-Upload-Digest`; other registries do not).
    pub async fn start_reported_upload(&self, repository: &str) -> Result<(String, bool), RegistryError> {
        let request = self
            .request(Method::POST, &format!("{}/v2/{repository}/blobs/uploads/", self.base))
            .header(CONTENT_LENGTH, "0");
        let response = self
            .exchange(&format!("starting an upload to {repository}"), request, StatusCode::ACCEPTED)
            .await?;
        let reports_digest = reported_digest(&response).is_some();
        Ok((self.location(&response)?, reports_digest))
    }

    /// Sends a whole stream as one chunk of the upload at `location`;
    /// returns the next location and the digest of everything the upload
    /// holds when the registry reports it.
    pub async fn upload_stream<S>(&self, location: &str, body: S) -> Result<(String, Option<String>), RegistryError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let request = self
            .request(Method::PATCH, location)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body));
        let response = self.exchange("sending the layer", request, StatusCode::ACCEPTED).await?;
        Ok((self.location(&response)?, reported_digest(&response)))
    }

    /// Sends `request`; an answer other than `expected` is an error naming
    /// `action`.
    async fn exchange(&self, action: &str, request: reqwest::RequestBuilder, expected: StatusCode) -> Result<Response, RegistryError> {
        let response = request.send().await.map_err(self.transport(action))?;
        if response.status() != expected {
            return Err(self.failure(action, response).await);
        }
        Ok(response)
    }

    /// Completes the upload at `location` as blob `digest`.
    pub async fn finish_upload(&self, location: &str, digest: &str, last: Bytes) -> Result<(), RegistryError> {
        let separator = if location.contains('?') { '&' } else { '?' };
        let request = self
            .request(Method::PUT, &format!("{location}{separator}digest={digest}"))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(last);
        self.exchange(&format!("completing the upload of {digest}"), request, StatusCode::CREATED)
            .await
            .map(drop)
    }

    /// Cancels the upload at `location` (best effort).
    pub async fn cancel_upload(&self, location: &str) -> Result<(), RegistryError> {
        self.request(Method::DELETE, location)
            .send()
            .await
            .map_err(self.transport("cancelling an upload"))?;
        Ok(())
    }

    /// Pushes a small blob in one request.
    pub async fn push_blob(&self, repository: &str, digest: &str, content: Bytes) -> Result<(), RegistryError> {
        let location = self.start_upload(repository).await?;
        self.finish_upload(&location, digest, content).await
    }

    /// Mounts `digest` from `from` into `repository`; false when the
    /// registry did not mount it (it then opened an upload, cancelled here).
    pub async fn mount_blob(&self, repository: &str, from: &str, digest: &str) -> Result<bool, RegistryError> {
        let action = format!("mounting {digest} from {from}");
        let response = self
            .request(
                Method::POST,
                &format!("{}/v2/{repository}/blobs/uploads/?mount={digest}&from={from}", self.base),
            )
            .header(CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(self.transport(&action))?;
        match response.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                if let Ok(location) = self.location(&response) {
                    let _ = self.request(Method::DELETE, &location).send().await;
                }
                Ok(false)
            }
            _ => Err(self.failure(&action, response).await),
        }
    }

    /// Stores a manifest under `reference` (a tag or digest).
    pub async fn put_manifest(&self, repository: &str, reference: &str, media_type: &str, content: Bytes) -> Result<(), RegistryError> {
        let request = self
            .request(Method::PUT, &format!("{}/v2/{repository}/manifests/{reference}", self.base))
            .header(CONTENT_TYPE, media_type)
            .body(content);
        self.exchange(&format!("storing the manifest {repository}:{reference}"), request, StatusCode::CREATED)
            .await
            .map(drop)
    }

    /// The `Accept` header of manifest requests: every manifest form.
    fn manifest_accept() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static(
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json",
            ),
        );
        headers
    }

    /// Whether a manifest is stored under `reference` (a `HEAD`).
    pub async fn manifest_exists(&self, repository: &str, reference: &str) -> Result<bool, RegistryError> {
        let action = format!("looking for the manifest {repository}:{reference}");
        let response = self
            .request(Method::HEAD, &format!("{}/v2/{repository}/manifests/{reference}", self.base))
            .headers(Self::manifest_accept())
            .send()
            .await
            .map_err(self.transport(&action))?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.failure(&action, response).await),
        }
    }

    /// Deletes the tag or manifest `reference`; `false` when it was not
    /// there. The blobs stay for the garbage collector.
    pub async fn delete_manifest(&self, repository: &str, reference: &str) -> Result<bool, RegistryError> {
        let action = format!("deleting the manifest {repository}:{reference}");
        let response = self
            .request(Method::DELETE, &format!("{}/v2/{repository}/manifests/{reference}", self.base))
            .send()
            .await
            .map_err(self.transport(&action))?;
        match response.status() {
            StatusCode::ACCEPTED | StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.failure(&action, response).await),
        }
    }

    /// Fetches a manifest: its media type and bytes.
    pub async fn get_manifest(&self, repository: &str, reference: &str) -> Result<(String, Bytes), RegistryError> {
        let action = format!("fetching the manifest {repository}:{reference}");
        let response = self
            .request(Method::GET, &format!("{}/v2/{repository}/manifests/{reference}", self.base))
            .headers(Self::manifest_accept())
            .send()
            .await
            .map_err(self.transport(&action))?;
        if response.status() != StatusCode::OK {
            return Err(self.failure(&action, response).await);
        }
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = response.bytes().await.map_err(self.transport(&action))?;
        Ok((media_type, body))
    }

    /// The URL of a blob.
    pub fn blob_url(&self, repository: &str, digest: &str) -> String {
        format!("{}/v2/{repository}/blobs/{digest}", self.base)
    }

    /// The Authorization header the registry's challenge produced, if any.
    pub fn authorization(&self) -> Option<HeaderValue> {
        self.authorization.clone()
    }

    /// Opens a blob for streaming.
    pub async fn get_blob(&self, repository: &str, digest: &str) -> Result<Response, RegistryError> {
        let request = self.request(Method::GET, &format!("{}/v2/{repository}/blobs/{digest}", self.base));
        self.exchange(&format!("fetching the blob {digest} of {repository}"), request, StatusCode::OK)
            .await
    }
}

/// `Bearer realm="...",service="...",scope="..."` as key/value pairs.
fn parse_challenge(challenge: &str) -> Vec<(String, String)> {
    let rest = challenge.split_once(' ').map_or("", |(_, rest)| rest);
    let mut pairs = Vec::new();
    let mut remaining = rest.trim();
    while let Some((key, after)) = remaining.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, next)) => (value.to_string(), next),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((value, next)) => (value.trim().to_string(), next),
                None => (after.trim().to_string(), ""),
            }
        };
        pairs.push((key, value));
        remaining = next.trim_start_matches(',').trim();
    }
    pairs
}

/// The digest a DVCR registry reports for what an upload holds.
fn reported_digest(response: &Response) -> Option<String> {
    response
        .headers()
        .get(UPLOAD_DIGEST)
        .and_then(|value| value.to_str().ok())
        .filter(|digest| digest.starts_with("sha256:"))
        .map(str::to_string)
}

/// DVCR's header with the digest of the bytes an upload holds.
pub const UPLOAD_DIGEST: &str = "Dvcr-Upload-Digest";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_and_docker_configs() {
        let pairs = parse_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#);
        assert_eq!(pairs[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(pairs[1], ("service".into(), "registry.example".into()));
        assert_eq!(pairs[2].0, "scope");
        let config = br#"{"auths":{"https://registry.example:5000":{"auth":"dXNlcjpwYXNz"},"other.example":{"username":"u","password":"p"}}}"#;
        let found = Credentials::from_docker_config(config, "registry.example:5000").unwrap().unwrap();
        assert_eq!((found.username.as_str(), found.password.as_str()), ("user", "pass"));
        assert!(Credentials::from_docker_config(config, "third.example").unwrap().is_none());
        assert!(Credentials::from_docker_config(b"[]", "x").is_err());
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost") && !is_loopback("dvcr.svc:5000"));
    }
}
