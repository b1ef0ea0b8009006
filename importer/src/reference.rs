//! Image references: `HOST[:PORT]/REPOSITORY[:TAG][@DIGEST]`.

use std::fmt;

/// A reference to an image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// `host[:port]`.
    pub host: String,
    /// `vi/ns/name`, `library/alpine`, ...
    pub repository: String,
    /// A tag or `sha256:...` digest.
    pub reference: String,
}

/// Why a reference was not understood.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an image reference of the form HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]: {1}")]
pub struct ReferenceError(pub String, pub &'static str);

impl ImageReference {
    /// Parses `HOST/REPOSITORY[:TAG][@DIGEST]`; a missing tag is `latest`.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let error = |reason| ReferenceError(text.to_string(), reason);
        let (host, rest) = text.split_once('/').ok_or_else(|| error("no registry host"))?;
        if host.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(error("the first part must be a registry host (with a dot or a port, or localhost)"));
        }
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            (name, digest.to_string())
        } else {
            match rest.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, tag.to_string()),
                _ => (rest, "latest".to_string()),
            }
        };
        let valid_name = !name.is_empty()
            && name.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"._-".contains(&byte))
            });
        if !valid_name {
            return Err(error("repository names are lowercase letters, digits and . _ - separated by /"));
        }
        if reference.is_empty() || reference.len() > 128 + 7 {
            return Err(error("empty or overlong tag"));
        }
        Ok(ImageReference {
            host: host.to_string(),
            repository: name.to_string(),
            reference,
        })
    }

    /// `HOST/REPOSITORY`.
    pub fn repository_url(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let separator = if self.reference.contains(':') { '@' } else { ':' };
        write!(formatter, "{}/{}{separator}{}", self.host, self.repository, self.reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shapes_in_use() {
        let full = ImageReference::parse("dvcr.d8-virtualization.svc/vi/vms/ubuntu:1234-abcd").unwrap();
        assert_eq!(full.host, "dvcr.d8-virtualization.svc");
        assert_eq!(full.repository, "vi/vms/ubuntu");
        assert_eq!(full.reference, "1234-abcd");
        let port = ImageReference::parse("127.0.0.1:5000/cvi/debian").unwrap();
        assert_eq!((port.host.as_str(), port.reference.as_str()), ("127.0.0.1:5000", "latest"));
        let digest = ImageReference::parse("localhost/a/b@sha256:00").unwrap();
        assert_eq!(digest.reference, "sha256:00");
        assert_eq!(digest.to_string(), "localhost/a/b@sha256:00");
        for bad in ["ubuntu", "vi/vms/ubuntu", "host.example/", "host.example/UPPER", "host.example//x", "h.x/a:"] {
            assert!(ImageReference::parse(bad).is_err(), "{bad}");
        }
    }
}
