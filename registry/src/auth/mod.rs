//! Who may do what: Basic credentials from an htpasswd file, scoped ES256
//! tokens, and the actions each API request needs.
//!
//! The rules, in one place:
//! - a request needs [`Need`]s read from its route and method (pull for
//!   reads, push for writes, delete for deletes, the catalog for
//!   `/v2/_catalog`); `/v2/` needs only an identity;
//! - a read-write user may do anything, a read-only user may only pull;
//! - a token may do exactly what its `access` claim lists;
//! - no credentials, or wrong ones, get 401 with the challenge; credentials
//!   that do not cover the request get 403.

pub mod htpasswd;
pub mod token;
pub mod token_service;

use std::collections::HashSet;

use axum::http::{header, HeaderMap, Method, StatusCode};
use base64::Engine;

use crate::api::Route;
use crate::error::{ErrorCode, RegistryError};

pub use htpasswd::{Htpasswd, HtpasswdError};
pub use token::{AccessEntry, TokenError, TokenIssuer, TokenVerifier};
pub use token_service::TokenService;

/// An action on a repository, as token `access` claims name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read manifests, blobs, tags and referrers.
    Pull,
    /// Upload blobs and manifests.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
}

impl Action {
    /// The action's name in a token.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

/// Something a request needs to be allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// An action on a repository.
    Repository(String, Action),
    /// Listing every repository (`/v2/_catalog`).
    Catalog,
}

impl std::fmt::Display for Need {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Repository(name, action) => write!(formatter, "{} on {name}", action.as_str()),
            Need::Catalog => formatter.write_str("listing the catalog"),
        }
    }
}

/// What a request to `route` with `method` needs. A cross-repository
/// mount's source is not listed: without pull on it the mount falls back to
/// an ordinary upload (see [`Identity::allows`]).
pub fn needs(route: &Route, method: &Method) -> Vec<Need> {
    let repository = |name: &crate::names::RepositoryName, action| vec![Need::Repository(name.to_string(), action)];
    let reading = matches!(*method, Method::GET | Method::HEAD);
    match route {
        Route::Base => Vec::new(),
        Route::Catalog => vec![Need::Catalog],
        Route::Tags(name) | Route::Referrers(name, _) => repository(name, Action::Pull),
        Route::Manifest(name, _) | Route::Blob(name, _) if reading => repository(name, Action::Pull),
        Route::Manifest(name, _) | Route::Blob(name, _) if *method == Method::DELETE => repository(name, Action::Delete),
        Route::Manifest(name, _) | Route::Blob(name, _) => repository(name, Action::Push),
        Route::UploadStart(name) | Route::Upload(name, _) => repository(name, Action::Push),
    }
}

/// Who sent a request.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Authentication is off (the embedded default on loopback).
    Anyone,
    /// A user from the htpasswd file.
    User {
        /// The user name.
        name: String,
        /// Whether the user may only pull.
        read_only: bool,
    },
    /// A verified token.
    Token {
        /// The token's subject, for logs.
        subject: String,
        /// The token's `access` claim.
        access: Vec<AccessEntry>,
    },
}

impl Identity {
    /// Whether this identity may do `need`.
    pub fn allows(&self, need: &Need) -> bool {
        match (self, need) {
            (Identity::Anyone, _) => true,
            (Identity::User { .. }, Need::Repository(_, Action::Pull)) => true,
            (Identity::User { read_only, .. }, _) => !read_only,
            (Identity::Token { access, .. }, need) => access.iter().any(|entry| entry.covers(need)),
        }
    }

    /// A name for logs.
    pub fn describe(&self) -> String {
        match self {
            Identity::Anyone => "anyone".into(),
            Identity::User { name, read_only: true } => format!("read-only user {name}"),
            Identity::User { name, .. } => format!("user {name}"),
            Identity::Token { subject, .. } => format!("token for {subject}"),
        }
    }
}

/// Checks requests against the configured credentials.
pub struct Authenticator {
    htpasswd: Option<Htpasswd>,
    read_only_users: HashSet<String>,
    tokens: Vec<TokenVerifier>,
    pub(crate) token_service: Option<TokenService>,
    realm: String,
}

impl Authenticator {
    /// An authenticator with Basic users from `htpasswd` (those in
    /// `read_only_users` may only pull) and/or tokens checked by `tokens`.
    /// At least one must be given.
    pub fn new(htpasswd: Option<Htpasswd>, read_only_users: HashSet<String>, tokens: Option<TokenVerifier>) -> Result<Self, String> {
        if htpasswd.is_none() && tokens.is_none() {
            return Err("authentication needs an htpasswd file or a token public key".into());
        }
        if let Some(file) = &htpasswd {
            if let Some(missing) = read_only_users.iter().find(|user| !file.has_user(user)) {
                return Err(format!("read-only user {missing:?} is not in the htpasswd file {}", file.path().display()));
            }
        } else if !read_only_users.is_empty() {
            return Err("read-only users need an htpasswd file".into());
        }
        Ok(Authenticator {
            htpasswd,
            read_only_users,
            tokens: tokens.into_iter().collect(),
            token_service: None,
            realm: "dvcr".into(),
        })
    }

    /// Issues tokens to users at [`token_service::TOKEN_PATH`] and sends
    /// clients there with a Bearer challenge. The tokens are checked with
    /// `verifier` (the public half of the service's key).
    pub fn with_token_service(mut self, service: TokenService, verifier: TokenVerifier) -> Result<Self, String> {
        if self.htpasswd.is_none() {
            return Err("issuing tokens needs users to issue them to (an htpasswd file)".into());
        }
        self.tokens.push(verifier);
        self.token_service = Some(service);
        Ok(self)
    }

    /// The `WWW-Authenticate` challenge: Basic when users can log in, so
    /// docker-style clients and containerd send their credentials unasked;
    /// Bearer when only tokens are accepted.
    pub fn challenge(&self, headers: &HeaderMap) -> String {
        if let Some(service) = &self.token_service {
            format!("Bearer realm=\"{}\",service=\"{}\"", service.realm(headers), self.realm)
        } else if self.htpasswd.is_some() || self.tokens.is_empty() {
            self.basic_challenge()
        } else {
            format!("Bearer realm=\"{}\",service=\"{}\"", self.realm, self.realm)
        }
    }

    fn basic_challenge(&self) -> String {
        format!("Basic realm=\"{}\", charset=\"UTF-8\"", self.realm)
    }

    fn unauthorized_with(&self, challenge: String, message: impl Into<String>) -> RegistryError {
        RegistryError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).with_header("WWW-Authenticate", challenge)
    }

    /// The user behind Basic credentials (the token endpoint takes nothing
    /// else), challenging for Basic.
    pub async fn identify_user(&self, headers: &HeaderMap) -> Result<Identity, RegistryError> {
        let basic = self.basic_challenge();
        let is_basic = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.get(..6))
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("basic "));
        if !is_basic {
            return Err(self.unauthorized_with(basic, "log in with a user name and password to get a token"));
        }
        self.identify(headers)
            .await
            .map_err(|error| self.unauthorized_with(basic, error.message))
    }

    /// The identity behind the request's `Authorization` header.
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Identity, RegistryError> {
        let unauthorized = |message: &str| self.unauthorized_with(self.challenge(headers), message.to_string());
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized("authentication required: log in to the registry (docker/skopeo/crane login, a pull secret, or a token)"));
        };
        let value = value.to_str().map_err(|_| unauthorized("the Authorization header is not text"))?;
        let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Some(file) = &self.htpasswd else {
                return Err(unauthorized("this registry takes no Basic credentials; present a Bearer token"));
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(credentials)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| unauthorized("Basic credentials are not base64 of user:password"))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| unauthorized("Basic credentials are not base64 of user:password"))?;
            if !file.verify(user, password).await {
                return Err(unauthorized(&format!("wrong user name or password for {user:?}")));
            }
            return Ok(Identity::User {
                name: user.to_string(),
                read_only: self.read_only_users.contains(user),
            });
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            if self.tokens.is_empty() {
                return Err(unauthorized("this registry takes no tokens; log in with a user name and password"));
            }
            let mut outcome = Err(TokenError::Invalid("no key".into()));
            for verifier in &self.tokens {
                outcome = verifier.verify(credentials);
                if outcome.is_ok() {
                    break;
                }
            }
            let claims = outcome.map_err(|error| unauthorized(&format!("token refused: {error}")))?;
            return Ok(Identity::Token {
                subject: claims.sub.unwrap_or_else(|| "(no subject)".into()),
                access: claims.access,
            });
        }
        Err(unauthorized(&format!("unsupported authorization scheme {scheme:?}: use Basic or Bearer")))
    }

    /// The identity behind the request, if it may do everything in `needs`.
    pub async fn authorize(&self, headers: &HeaderMap, needs: &[Need]) -> Result<Identity, RegistryError> {
        let identity = self.identify(headers).await?;
        if let Some(refused) = needs.iter().find(|need| !identity.allows(need)) {
            let message = match &identity {
                Identity::User { name, read_only: true } => format!("user {name} may only pull; {refused} is not allowed"),
                Identity::Token { .. } => format!("the token does not grant {refused}"),
                other => format!("{} may not do {refused}", other.describe()),
            };
            return Err(RegistryError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, message));
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::RepositoryName;

    fn name(text: &str) -> RepositoryName {
        RepositoryName::parse(text).unwrap()
    }

    #[test]
    fn routes_need_the_actions_of_the_spec() {
        let pull = |n: &str| vec![Need::Repository(n.into(), Action::Pull)];
        let push = |n: &str| vec![Need::Repository(n.into(), Action::Push)];
        assert_eq!(needs(&Route::Base, &Method::GET), Vec::new());
        assert_eq!(needs(&Route::Catalog, &Method::GET), vec![Need::Catalog]);
        assert_eq!(needs(&Route::Tags(name("vi/a/x")), &Method::GET), pull("vi/a/x"));
        assert_eq!(needs(&Route::Manifest(name("vi/a/x"), "v1".into()), &Method::HEAD), pull("vi/a/x"));
        assert_eq!(needs(&Route::Manifest(name("vi/a/x"), "v1".into()), &Method::PUT), push("vi/a/x"));
        assert_eq!(
            needs(&Route::Manifest(name("vi/a/x"), "v1".into()), &Method::DELETE),
            vec![Need::Repository("vi/a/x".into(), Action::Delete)]
        );
        assert_eq!(needs(&Route::Blob(name("vi/a/x"), "d".into()), &Method::GET), pull("vi/a/x"));
        assert_eq!(needs(&Route::UploadStart(name("vi/a/x")), &Method::POST), push("vi/a/x"));
        assert_eq!(needs(&Route::Upload(name("vi/a/x"), "id".into()), &Method::GET), push("vi/a/x"));
        assert_eq!(needs(&Route::Upload(name("vi/a/x"), "id".into()), &Method::PATCH), push("vi/a/x"));
        assert_eq!(needs(&Route::Referrers(name("vi/a/x"), "d".into()), &Method::GET), pull("vi/a/x"));
    }

    #[test]
    fn identities_allow_what_they_hold() {
        let read_only = Identity::User { name: "node-puller".into(), read_only: true };
        let admin = Identity::User { name: "admin".into(), read_only: false };
        let pull = Need::Repository("vi/a/x".into(), Action::Pull);
        let push = Need::Repository("vi/a/x".into(), Action::Push);
        let delete = Need::Repository("vi/a/x".into(), Action::Delete);
        assert!(read_only.allows(&pull));
        assert!(!read_only.allows(&push) && !read_only.allows(&delete) && !read_only.allows(&Need::Catalog));
        assert!(admin.allows(&push) && admin.allows(&delete) && admin.allows(&Need::Catalog));
        let token = Identity::Token {
            subject: "t".into(),
            access: vec![AccessEntry::repository("vi/a/x", &["pull", "push"])],
        };
        assert!(token.allows(&pull) && token.allows(&push));
        assert!(!token.allows(&delete));
        assert!(!token.allows(&Need::Repository("vi/a/y".into(), Action::Pull)));
        assert!(!token.allows(&Need::Repository("vi/a/x/y".into(), Action::Pull)));
        assert!(!token.allows(&Need::Catalog));
        let star = Identity::Token {
            subject: "t".into(),
            access: vec![AccessEntry::repository("vi/a/x", &["*"])],
        };
        assert!(star.allows(&delete));
        let catalog = Identity::Token {
            subject: "t".into(),
            access: vec![AccessEntry { kind: "registry".into(), name: "catalog".into(), actions: vec!["*".into()] }],
        };
        assert!(catalog.allows(&Need::Catalog) && !catalog.allows(&pull));
    }
}
