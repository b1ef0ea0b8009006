//! The Docker token protocol, served by the registry itself: a client
//! challenged with `Bearer realm=".../dvcr/token"` logs in there with its
//! user name and password and gets a short-lived token for the scopes it
//! asked for, cut down to what the user may do.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::token::{AccessEntry, TokenIssuer};
use super::{Action, Identity, Need};
use crate::error::{ErrorCode, RegistryError};
use crate::Registry;

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/dvcr/token";

/// Tokens the registry issues to its users.
pub struct TokenService {
    pub(crate) issuer: TokenIssuer,
    pub(crate) lifetime: Duration,
    /// Whether the registry is reached over TLS (for the realm URL).
    pub(crate) https: bool,
}

impl TokenService {
    /// A service signing with `issuer`, tokens valid for `lifetime`.
    pub fn new(issuer: TokenIssuer, lifetime: Duration, https: bool) -> Self {
        TokenService { issuer, lifetime, https }
    }

    /// The realm URL for a request that came with `headers`.
    pub(crate) fn realm(&self, headers: &HeaderMap) -> String {
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .filter(|host| host.bytes().all(|byte| byte.is_ascii_alphanumeric() || b".-:[]".contains(&byte)))
            .unwrap_or("localhost");
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{host}{TOKEN_PATH}")
    }
}

/// What `identity` may have of a requested `repository:NAME:ACTIONS` scope.
fn grant(identity: &Identity, scope: &str) -> Option<AccessEntry> {
    let requested = AccessEntry::parse(scope).ok()?;
    let allowed = |action: Action| match requested.kind.as_str() {
        "repository" => identity.allows(&Need::Repository(requested.name.clone(), action)),
        _ => false,
    };
    let mut actions = Vec::new();
    for action in &requested.actions {
        let granted: &[Action] = match action.as_str() {
            "pull" => &[Action::Pull],
            "push" => &[Action::Push],
            "delete" => &[Action::Delete],
            "*" => &[Action::Pull, Action::Push, Action::Delete],
            _ => &[],
        };
        for action in granted.iter().copied().filter(|action| allowed(*action)) {
            if !actions.iter().any(|known: &String| known == action.as_str()) {
                actions.push(action.as_str().to_string());
            }
        }
    }
    if requested.kind == "registry" && requested.name == "catalog" && identity.allows(&Need::Catalog) {
        actions.push("*".into());
    }
    (!actions.is_empty()).then_some(AccessEntry {
        kind: requested.kind,
        name: requested.name,
        actions,
    })
}

/// `GET /dvcr/token?service=dvcr&scope=repository:vi/ns/name:pull,push`.
pub async fn issue(State(registry): State<std::sync::Arc<Registry>>, request: Request) -> Response {
    let Some(auth) = &registry.auth else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(service) = auth.token_service.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let identity = match auth.identify_user(request.headers()).await {
        Ok(identity) => identity,
        Err(error) => return error.into_response(),
    };
    let scopes: Vec<String> = form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
        .filter(|(key, _)| key == "scope")
        .flat_map(|(_, value)| value.split(' ').map(String::from).collect::<Vec<_>>())
        .collect();
    let access: Vec<AccessEntry> = scopes.iter().filter_map(|scope| grant(&identity, scope)).collect();
    let subject = match &identity {
        Identity::User { name, .. } => name.clone(),
        other => other.describe(),
    };
    match service.issuer.issue(Some(&subject), access, service.lifetime) {
        Ok(token) => {
            tracing::info!(who = %identity.describe(), scopes = ?scopes, "token issued");
            axum::Json(json!({
                "token": token,
                "access_token": token,
                "expires_in": service.lifetime.as_secs(),
            }))
            .into_response()
        }
        Err(error) => RegistryError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, error.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_cut_down_to_what_the_user_may_do() {
        let admin = Identity::User { name: "admin".into(), read_only: false };
        let puller = Identity::User { name: "node-puller".into(), read_only: true };
        let scope = "repository:vi/a/x:pull,push";
        assert_eq!(grant(&admin, scope).unwrap().actions, ["pull", "push"]);
        assert_eq!(grant(&puller, scope).unwrap().actions, ["pull"]);
        assert!(grant(&puller, "repository:vi/a/x:push").is_none());
        assert_eq!(grant(&admin, "repository:vi/a/x:*").unwrap().actions, ["pull", "push", "delete"]);
        assert_eq!(grant(&admin, "registry:catalog:*").unwrap().actions, ["*"]);
        assert!(grant(&puller, "registry:catalog:*").is_none());
        assert!(grant(&admin, "nonsense").is_none());
    }
}
