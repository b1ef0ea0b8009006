use std::fmt;

use crate::StorageError;

/// A checked, `/`-separated path relative to a driver's root.
///
/// Every component is non-empty, is neither `.` nor `..`, and holds no NUL
/// or backslash, so no path built from a request can leave the driver's root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoragePath(String);

impl StoragePath {
    /// Checks `path` and wraps it. The empty string is the root.
    pub fn new(path: &str) -> Result<Self, StorageError> {
        let trimmed = path.trim_matches('/');
        if trimmed.is_empty() {
            return Ok(StoragePath(String::new()));
        }
        for component in trimmed.split('/') {
            check_component(path, component)?;
        }
        Ok(StoragePath(trimmed.to_string()))
    }

    /// The root of the driver.
    pub fn root() -> Self {
        StoragePath(String::new())
    }

    /// This path with `child` (one or more components) appended.
    pub fn join(&self, child: &str) -> Result<Self, StorageError> {
        let child = StoragePath::new(child)?;
        if self.0.is_empty() {
            return Ok(child);
        }
        if child.0.is_empty() {
            return Ok(self.clone());
        }
        Ok(StoragePath(format!("{}/{}", self.0, child.0)))
    }

    /// The path as a string, without leading or trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent path, or `None` at the root.
    pub fn parent(&self) -> Option<StoragePath> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(index) => StoragePath(self.0[..index].to_string()),
            None => StoragePath(String::new()),
        })
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        match self.0.rfind('/') {
            Some(index) => &self.0[index + 1..],
            None => &self.0,
        }
    }

    /// The components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|component| !component.is_empty())
    }
}

fn check_component(path: &str, component: &str) -> Result<(), StorageError> {
    let reason = if component.is_empty() {
        "empty path component"
    } else if component == "." || component == ".." {
        "`.` and `..` are not allowed"
    } else if component.contains(['\0', '\\']) {
        "NUL and backslash are not allowed"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidPath {
        path: path.to_string(),
        reason,
    })
}

impl fmt::Display for StoragePath {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "/{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_paths_and_normalises_slashes() {
        let path = StoragePath::new("/a/b/c/").unwrap();
        assert_eq!(path.as_str(), "a/b/c");
        assert_eq!(path.file_name(), "c");
        assert_eq!(path.parent().unwrap().as_str(), "a/b");
        assert_eq!(path.join("d/e").unwrap().as_str(), "a/b/c/d/e");
        assert!(StoragePath::new("").unwrap().is_root());
        assert_eq!(StoragePath::root().join("x").unwrap().as_str(), "x");
    }

    #[test]
    fn refuses_escapes() {
        for bad in ["a/../b", "..", "a//b", "./a", "a/\0", "a\\b"] {
            assert!(
                matches!(StoragePath::new(bad), Err(StorageError::InvalidPath { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(StoragePath::new("a").unwrap().join("../x").is_err());
    }
}
