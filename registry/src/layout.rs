//! Where the registry keeps things in storage.
//!
//! The layout is CNCF Distribution's (`docker/registry/v2/...`), so that a
//! volume written by DVP's registry is served as it is, and back:
//!
//! ```text
//! docker/registry/v2/blobs/<alg>/<hex[0..2]>/<hex>/data             blob content, shared
//! docker/registry/v2/repositories/<name>/_layers/<alg>/<hex>/link   blob visible in <name>
//! .../<name>/_manifests/revisions/<alg>/<hex>/link                  manifest in <name>
//! .../<name>/_manifests/tags/<tag>/current/link                     what <tag> points to
//! .../<name>/_manifests/tags/<tag>/index/<alg>/<hex>/link           every digest <tag> had
//! .../<name>/_uploads/<id>/{data,startedat}                         uploads in progress
//! .../<name>/_referrers/<alg>/<subject hex>/<alg>/<hex>/link         referrers (DVCR only)
//! ```
//!
//! Link files hold the digest as text, as Distribution writes them.

use dvcr_storage::{StoragePath, StorageError};

use crate::names::{Digest, RepositoryName, Tag};

const ROOT: &str = "docker/registry/v2";

fn path(text: String) -> Result<StoragePath, StorageError> {
    StoragePath::new(&text)
}

/// The folder holding every repository.
pub fn repositories() -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories"))
}

/// The folder of one repository.
pub fn repository(name: &RepositoryName) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}"))
}

/// The content of a blob.
pub fn blob_data(digest: &Digest) -> Result<StoragePath, StorageError> {
    let hex = digest.hex();
    path(format!("{ROOT}/blobs/{}/{}/{hex}/data", digest.algorithm().name(), &hex[..2]))
}

/// The folder of every blob's content.
pub fn blobs() -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/blobs"))
}

/// The folder of a repository's manifest revision links.
pub fn revisions(name: &RepositoryName) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_manifests/revisions"))
}

/// The folder of a repository's uploads in progress.
pub fn uploads(name: &RepositoryName) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_uploads"))
}

/// The digest a link path names: `.../<algorithm>/<hex>/link` (revision
/// and layer links).
pub fn digest_of_link(path: &StoragePath) -> Option<Digest> {
    let mut parts = path.as_str().rsplit('/');
    let (Some("link"), Some(hex), Some(algorithm)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    format!("{algorithm}:{hex}").parse().ok()
}

/// The digest whose content `path` holds, when it is a path [`blob_data`]
/// makes: `.../<algorithm>/<hex[0..2]>/<hex>/data`.
pub fn digest_of_blob_data(path: &StoragePath) -> Option<Digest> {
    let mut parts = path.as_str().rsplit('/');
    let (Some("data"), Some(hex), Some(_), Some(algorithm)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    format!("{algorithm}:{hex}").parse().ok()
}

/// The link that makes a blob visible in a repository.
pub fn layer_link(name: &RepositoryName, digest: &Digest) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_layers/{}/{}/link", digest.algorithm().name(), digest.hex()))
}

/// The link that makes a manifest part of a repository.
pub fn revision_link(name: &RepositoryName, digest: &Digest) -> Result<StoragePath, StorageError> {
    path(format!(
        "{ROOT}/repositories/{name}/_manifests/revisions/{}/{}/link",
        digest.algorithm().name(),
        digest.hex()
    ))
}

/// The folder of a repository's tags.
pub fn tags(name: &RepositoryName) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_manifests/tags"))
}

/// The folder of one tag.
pub fn tag(name: &RepositoryName, tag: &Tag) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_manifests/tags/{}", tag.as_str()))
}

/// The link naming the manifest a tag points to now.
pub fn tag_current_link(name: &RepositoryName, tag: &Tag) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_manifests/tags/{}/current/link", tag.as_str()))
}

/// The record that a tag once pointed to a manifest.
pub fn tag_index_link(name: &RepositoryName, tag: &Tag, digest: &Digest) -> Result<StoragePath, StorageError> {
    path(format!(
        "{ROOT}/repositories/{name}/_manifests/tags/{}/index/{}/{}/link",
        tag.as_str(),
        digest.algorithm().name(),
        digest.hex()
    ))
}

/// The folder of manifests that name `subject` as their subject.
pub fn referrers(name: &RepositoryName, subject: &Digest) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_referrers/{}/{}", subject.algorithm().name(), subject.hex()))
}

/// The link recording that `referrer` names `subject`.
pub fn referrer_link(name: &RepositoryName, subject: &Digest, referrer: &Digest) -> Result<StoragePath, StorageError> {
    path(format!(
        "{ROOT}/repositories/{name}/_referrers/{}/{}/{}/{}/link",
        subject.algorithm().name(),
        subject.hex(),
        referrer.algorithm().name(),
        referrer.hex()
    ))
}

/// The folder of one upload.
pub fn upload(name: &RepositoryName, id: &str) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_uploads/{id}"))
}

/// The data of an upload in progress.
pub fn upload_data(name: &RepositoryName, id: &str) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_uploads/{id}/data"))
}

/// When an upload started (RFC 3339 text), for collecting stale uploads.
pub fn upload_started_at(name: &RepositoryName, id: &str) -> Result<StoragePath, StorageError> {
    path(format!("{ROOT}/repositories/{name}/_uploads/{id}/startedat"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Algorithm;

    #[test]
    fn paths_match_distribution() {
        let name = RepositoryName::parse("vi/ns/img").unwrap();
        let digest = Algorithm::Sha256.digest(b"");
        assert_eq!(
            blob_data(&digest).unwrap().as_str(),
            "docker/registry/v2/blobs/sha256/e3/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/data"
        );
        assert_eq!(
            layer_link(&name, &digest).unwrap().as_str(),
            "docker/registry/v2/repositories/vi/ns/img/_layers/sha256/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/link"
        );
        assert_eq!(digest_of_blob_data(&blob_data(&digest).unwrap()), Some(digest.clone()));
        assert_eq!(digest_of_link(&layer_link(&name, &digest).unwrap()), Some(digest.clone()));
        assert_eq!(digest_of_link(&revision_link(&name, &digest).unwrap()), Some(digest.clone()));
        assert_eq!(digest_of_link(&blob_data(&digest).unwrap()), None);
        assert_eq!(digest_of_blob_data(&StoragePath::new("x/sha256/e3/nothex/data").unwrap()), None);
        let tag = Tag::parse("v1").unwrap();
        assert_eq!(
            tag_current_link(&name, &tag).unwrap().as_str(),
            "docker/registry/v2/repositories/vi/ns/img/_manifests/tags/v1/current/link"
        );
    }
}
