//! Repository names, tags and digests, checked against the OCI
//! Distribution grammar before anything touches storage.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// Longest repository name the spec allows.
pub const MAX_NAME_LENGTH: usize = 255;
/// Longest tag the spec allows.
pub const MAX_TAG_LENGTH: usize = 128;

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The repository name breaks the grammar.
    #[error("invalid repository name {name:?}: {reason}")]
    Repository {
        /// The name as given.
        name: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// The tag breaks the grammar.
    #[error("invalid tag {0:?}: a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with . or -")]
    Tag(String),
    /// The digest is malformed.
    #[error("invalid digest {digest:?}: {reason}")]
    Digest {
        /// The digest as given.
        digest: String,
        /// The rule it broke.
        reason: &'static str,
    },
    /// The digest uses an algorithm this registry does not implement.
    #[error("unsupported digest algorithm {0:?}: use sha256 or sha512")]
    UnsupportedAlgorithm(String),
}

/// A repository name such as `vi/ns/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepositoryName(String);

impl RepositoryName {
    /// Checks `name` against
    /// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`
    /// and the 255-character limit.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let refuse = |reason| NameError::Repository {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(refuse("the name is empty"));
        }
        if name.len() > MAX_NAME_LENGTH {
            return Err(refuse("longer than 255 characters"));
        }
        for component in name.split('/') {
            check_name_component(component).map_err(refuse)?;
        }
        Ok(RepositoryName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_name_component(component: &str) -> Result<(), &'static str> {
    if component.is_empty() {
        return Err("empty path component (leading, trailing or double `/`)");
    }
    let bytes = component.as_bytes();
    let alphanumeric = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    let mut index = 0;
    let mut after_separator = true;
    while index < bytes.len() {
        let byte = bytes[index];
        if alphanumeric(byte) {
            after_separator = false;
            index += 1;
            continue;
        }
        if after_separator {
            return Err("a component must start with [a-z0-9] and a separator must be followed by one");
        }
        match byte {
            b'.' => index += 1,
            b'_' => {
                index += 1;
                if bytes.get(index) == Some(&b'_') {
                    index += 1;
                }
            }
            b'-' => {
                while bytes.get(index) == Some(&b'-') {
                    index += 1;
                }
            }
            _ => return Err("only [a-z0-9] and the separators `.`, `_`, `__`, `-` are allowed"),
        }
        after_separator = true;
    }
    if after_separator {
        return Err("a component must end with [a-z0-9]");
    }
    Ok(())
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(String);

impl Tag {
    /// Checks `tag` against the grammar.
    pub fn parse(tag: &str) -> Result<Self, NameError> {
        let bytes = tag.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= MAX_TAG_LENGTH
            && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
            && bytes
                .iter()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
        if valid {
            Ok(Tag(tag.to_string()))
        } else {
            Err(NameError::Tag(tag.to_string()))
        }
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The digest algorithms this registry implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// SHA-256, the default.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The name used in digests.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_length(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// A hasher for this algorithm.
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Box::new(Sha512::new())),
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(data);
        hasher.finish()
    }
}

/// An incremental hash for one [`Algorithm`].
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(Sha256),
    /// SHA-512 state.
    Sha512(Box<Sha512>),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(state) => state.update(data),
            Hasher::Sha512(state) => state.update(data),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(state) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(state.finalize()),
            },
            Hasher::Sha512(state) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(state.finalize()),
            },
        }
    }

    /// The algorithm this hasher computes.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }
}

/// A content digest, `algorithm:hex`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = NameError;

    fn from_str(text: &str) -> Result<Self, NameError> {
        let refuse = |reason| NameError::Digest {
            digest: text.to_string(),
            reason,
        };
        let (algorithm, hex) = text
            .split_once(':')
            .ok_or_else(|| refuse("expected algorithm:hex"))?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                let well_formed = !other.is_empty()
                    && other.bytes().all(|byte| {
                        byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"+._-".contains(&byte)
                    });
                return Err(if well_formed {
                    NameError::UnsupportedAlgorithm(other.to_string())
                } else {
                    refuse("malformed algorithm")
                });
            }
        };
        if hex.len() != algorithm.hex_length() {
            return Err(refuse("wrong length for its algorithm"));
        }
        if !hex.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)) {
            return Err(refuse("the encoded part must be lowercase hex"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// What a manifest URL names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A tag.
    Tag(Tag),
    /// A digest.
    Digest(Digest),
}

impl Reference {
    /// A digest when the text has a `:`, a tag otherwise.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        if text.contains(':') {
            text.parse().map(Reference::Digest)
        } else {
            Tag::parse(text).map(Reference::Tag)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_grammar() {
        for good in ["a", "vi/ns/name", "a-b/c.d/e_f", "a__b", "a---b", "cvi/ubuntu-22.04", "0/1"] {
            assert!(RepositoryName::parse(good).is_ok(), "{good} refused");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a/../b", "..", "a/./b", "-a", "a-", "a.", "a___b", "a_.b", "a b",
            "a/b:c", "a%2fb",
        ] {
            assert!(RepositoryName::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(RepositoryName::parse(&"a".repeat(255)).is_ok());
        assert!(RepositoryName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_follow_the_grammar() {
        for good in ["latest", "_x", "1.0-rc_1", &"a".repeat(128)] {
            assert!(Tag::parse(good).is_ok(), "{good} refused");
        }
        for bad in ["", ".a", "-a", "a/b", "a:b", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn digests_are_checked_and_computed() {
        let empty = Algorithm::Sha256.digest(b"");
        assert_eq!(
            empty.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(empty.to_string().parse::<Digest>().unwrap(), empty);
        let sha512 = Algorithm::Sha512.digest(b"abc");
        assert!(sha512.to_string().starts_with("sha512:ddaf35a193617aba"));
        assert_eq!(sha512.to_string().parse::<Digest>().unwrap(), sha512);
        assert!(matches!("md5:abc".parse::<Digest>(), Err(NameError::UnsupportedAlgorithm(_))));
        assert!("sha256:ABC".parse::<Digest>().is_err());
        assert!("sha256:".parse::<Digest>().is_err());
        assert!(format!("sha256:{}", "E".repeat(64)).parse::<Digest>().is_err());
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(matches!(Reference::parse(&empty.to_string()), Ok(Reference::Digest(_))));
    }
}
