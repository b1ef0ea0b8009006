//! Scoped registry tokens: ES256 JWTs as DVP's controller issues them
//! (issuer `virtualization-controller`, audience `dvcr`, key id `dvcr`,
//! an `access` claim listing repositories and actions).
//!
//! Verification and signing use `jsonwebtoken` (on `ring`); key pairs are
//! generated with `ring` and written as PEM (PKCS#8 private key, SPKI
//! public key), the forms `openssl` reads and writes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::Need;

/// The issuer DVP's controller writes into its tokens.
pub const DEFAULT_ISSUER: &str = "virtualization-controller";
/// The audience of registry tokens.
pub const DEFAULT_AUDIENCE: &str = "dvcr";
/// The key id in the token header.
pub const KEY_ID: &str = "dvcr";
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

/// Why a token or key was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The PEM key cannot be used.
    #[error("cannot use the key: {0}")]
    Key(String),
    /// The token's signature, time window or claims are wrong.
    #[error("{0}")]
    Invalid(String),
    /// An access entry written as text is malformed.
    #[error("access {0:?} is not TYPE:NAME:ACTION[,ACTION...] (e.g. repository:vi/ns/name:pull,push)")]
    AccessSyntax(String),
}

/// One entry of the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    /// `repository`, or `registry` for the catalog.
    #[serde(rename = "type")]
    pub kind: String,
    /// The repository name, or `catalog`.
    pub name: String,
    /// `pull`, `push`, `delete` or `*`.
    #[serde(default)]
    pub actions: Vec<String>,
}

impl AccessEntry {
    /// An entry for `actions` on repository `name`.
    pub fn repository(name: &str, actions: &[&str]) -> Self {
        AccessEntry {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.iter().map(|action| action.to_string()).collect(),
        }
    }

    /// Reads `repository:vi/ns/name:pull,push` (the scope syntax of the
    /// Docker token protocol).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let syntax = || TokenError::AccessSyntax(text.to_string());
        let (kind, rest) = text.split_once(':').ok_or_else(syntax)?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(syntax)?;
        let actions: Vec<String> = actions.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
        let known = |action: &String| matches!(action.as_str(), "pull" | "push" | "delete" | "*");
        if kind.is_empty() || name.is_empty() || actions.is_empty() || !actions.iter().all(known) {
            return Err(syntax());
        }
        Ok(AccessEntry {
            kind: kind.into(),
            name: name.into(),
            actions,
        })
    }

    fn grants(&self, action: &str) -> bool {
        self.actions.iter().any(|granted| granted == action || granted == "*")
    }

    /// Whether this entry allows `need`.
    pub fn covers(&self, need: &Need) -> bool {
        match need {
            Need::Repository(name, action) => self.kind == "repository" && self.name == *name && self.grants(action.as_str()),
            Need::Catalog => self.kind == "registry" && self.name == "catalog" && self.grants("*"),
        }
    }
}

/// A token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Subject (who the token is for), optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// What the token allows.
    #[serde(default)]
    pub access: Vec<AccessEntry>,
}

/// Checks tokens against a public key.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// A verifier for tokens signed by the key whose public half is the PEM
    /// `public_key` (SPKI, `-----BEGIN PUBLIC KEY-----`).
    pub fn new(public_key: &[u8], issuer: &str, audience: &str) -> Result<Self, TokenError> {
        let key = DecodingKey::from_ec_pem(public_key).map_err(|error| TokenError::Key(format!("not a PEM EC P-256 public key: {error}")))?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        Ok(TokenVerifier { key, validation })
    }

    /// The claims of `token` when its signature, issuer, audience and time
    /// window are right.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                TokenError::Invalid(match error.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".into(),
                    ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
                    ErrorKind::InvalidIssuer => "the token's issuer is not the expected one".into(),
                    ErrorKind::InvalidAudience => "the token's audience is not this registry".into(),
                    ErrorKind::InvalidSignature => "the token's signature does not match the registry's key".into(),
                    ErrorKind::InvalidAlgorithm => "the token is not signed with ES256".into(),
                    ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
                    _ => format!("the token is malformed: {error}"),
                })
            })
    }
}

/// Mints tokens with a private key.
pub struct TokenIssuer {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

impl TokenIssuer {
    /// An issuer signing with the PEM PKCS#8 EC P-256 `private_key`.
    pub fn new(private_key: &[u8], issuer: &str, audience: &str) -> Result<Self, TokenError> {
        let key = EncodingKey::from_ec_pem(private_key)
            .map_err(|error| TokenError::Key(format!("not a PEM PKCS#8 EC P-256 private key: {error}")))?;
        Ok(TokenIssuer {
            key,
            issuer: issuer.into(),
            audience: audience.into(),
        })
    }

    /// A token for `access`, valid for `lifetime` from now.
    pub fn issue(&self, subject: Option<&str>, access: Vec<AccessEntry>, lifetime: Duration) -> Result<String, TokenError> {
        let now = now_seconds();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: subject.map(String::from),
            exp: now + lifetime.as_secs(),
            nbf: Some(now),
            iat: Some(now),
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KEY_ID.into());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|error| TokenError::Key(error.to_string()))
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(&String::from_utf8_lossy(line));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// The DER prefix of a SubjectPublicKeyInfo for an uncompressed P-256
/// point (id-ecPublicKey, prime256v1, a 66-byte BIT STRING).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
    0x01, 0x07, 0x03, 0x42, 0x00,
];

fn public_pem_of(pkcs8: &[u8]) -> Result<String, TokenError> {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let random = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &random)
        .map_err(|_| TokenError::Key("not a PKCS#8 EC P-256 private key".into()))?;
    let mut spki = P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    Ok(pem("PUBLIC KEY", &spki))
}

/// A new P-256 key pair as PEM: (PKCS#8 private key, SPKI public key).
pub fn generate_key_pair() -> Result<(String, String), TokenError> {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let random = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random)
        .map_err(|_| TokenError::Key("key generation failed".into()))?;
    Ok((pem("PRIVATE KEY", pkcs8.as_ref()), public_pem_of(pkcs8.as_ref())?))
}

/// The PEM public key of a PEM PKCS#8 P-256 private key.
pub fn public_key_of(private_key: &[u8]) -> Result<String, TokenError> {
    let text = std::str::from_utf8(private_key).map_err(|_| TokenError::Key("the private key is not PEM text".into()))?;
    let body: String = text
        .lines()
        .skip_while(|line| !line.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|_| TokenError::Key("no PEM PKCS#8 private key (-----BEGIN PRIVATE KEY-----)".into()))?;
    public_pem_of(&der)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TokenIssuer, TokenVerifier) {
        let (private, public) = generate_key_pair().unwrap();
        (
            TokenIssuer::new(private.as_bytes(), DEFAULT_ISSUER, DEFAULT_AUDIENCE).unwrap(),
            TokenVerifier::new(public.as_bytes(), DEFAULT_ISSUER, DEFAULT_AUDIENCE).unwrap(),
        )
    }

    #[test]
    fn issued_tokens_verify_with_their_access() {
        let (issuer, verifier) = pair();
        let access = vec![AccessEntry::repository("vi/ns/name", &["pull", "push"])];
        let token = issuer.issue(Some("importer"), access.clone(), Duration::from_secs(600)).unwrap();
        let claims = verifier.verify(&token).unwrap();
        assert_eq!(claims.access, access);
        assert_eq!(claims.sub.as_deref(), Some("importer"));
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!((header.alg, header.kid.as_deref()), (Algorithm::ES256, Some(KEY_ID)));
    }

    #[test]
    fn wrong_keys_issuers_audiences_and_old_tokens_are_refused() {
        let (issuer, verifier) = pair();
        let (other_issuer, _) = pair();
        let access = vec![AccessEntry::repository("vi/a/x", &["pull"])];
        let foreign = other_issuer.issue(None, access.clone(), Duration::from_secs(60)).unwrap();
        assert!(verifier.verify(&foreign).unwrap_err().to_string().contains("signature"));

        let (private, public) = generate_key_pair().unwrap();
        let verifier = TokenVerifier::new(public.as_bytes(), DEFAULT_ISSUER, DEFAULT_AUDIENCE).unwrap();
        let stranger = TokenIssuer::new(private.as_bytes(), "someone-else", DEFAULT_AUDIENCE).unwrap();
        let token = stranger.issue(None, access.clone(), Duration::from_secs(60)).unwrap();
        assert!(verifier.verify(&token).unwrap_err().to_string().contains("issuer"));
        let elsewhere = TokenIssuer::new(private.as_bytes(), DEFAULT_ISSUER, "another-registry").unwrap();
        let token = elsewhere.issue(None, access.clone(), Duration::from_secs(60)).unwrap();
        assert!(verifier.verify(&token).unwrap_err().to_string().contains("audience"));

        let key = EncodingKey::from_ec_pem(private.as_bytes()).unwrap();
        let expired = Claims {
            iss: DEFAULT_ISSUER.into(),
            aud: DEFAULT_AUDIENCE.into(),
            sub: None,
            exp: now_seconds() - 3600,
            nbf: None,
            iat: None,
            access: access.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &expired, &key).unwrap();
        assert!(verifier.verify(&token).unwrap_err().to_string().contains("expired"));

        for garbage in ["", "a.b.c", "not a token", "eyJhbGciOiJub25lIn0.eyJleHAiOjF9."] {
            assert!(verifier.verify(garbage).is_err(), "{garbage:?}");
        }
        let _ = issuer;
    }

    #[test]
    fn access_text_is_read_like_docker_scopes() {
        assert_eq!(
            AccessEntry::parse("repository:vi/ns/name:pull,push").unwrap(),
            AccessEntry::repository("vi/ns/name", &["pull", "push"])
        );
        assert_eq!(AccessEntry::parse("registry:catalog:*").unwrap().kind, "registry");
        for bad in ["", "repository", "repository:vi/a", "repository:vi/a:", "repository:vi/a:fly", ":x:pull"] {
            assert!(AccessEntry::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_public_key_is_derived_from_the_private_one() {
        let (private, public) = generate_key_pair().unwrap();
        assert_eq!(public_key_of(private.as_bytes()).unwrap(), public);
        assert!(public_key_of(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_err());
        assert!(public_key_of(b"nothing").is_err());
    }

    #[test]
    fn keys_that_are_not_p256_pem_are_refused() {
        assert!(TokenVerifier::new(b"not a key", DEFAULT_ISSUER, DEFAULT_AUDIENCE).is_err());
        assert!(TokenIssuer::new(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", DEFAULT_ISSUER, DEFAULT_AUDIENCE).is_err());
    }
}
