//! Basic users from an htpasswd file (bcrypt lines, as `htpasswd -B`
//! writes them).
//!
//! bcrypt is slow on purpose (tens of milliseconds), and containerd sends
//! the same credentials with every blob request, so a password that
//! verified once is remembered as a keyed SHA-256 and later requests are
//! compared against that in constant time. The file is read again when it
//! changes (a Kubernetes Secret updated in place), at most every few
//! seconds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// How often the file's modification time is looked at.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Why an htpasswd file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    /// The file cannot be read.
    #[error("cannot read the htpasswd file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not `user:bcrypt-hash`.
    #[error("htpasswd file {path}, line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file has no users.
    #[error("the htpasswd file {0} holds no users")]
    Empty(PathBuf),
}

struct Loaded {
    /// User name to bcrypt hash.
    users: HashMap<String, String>,
    modified: Option<SystemTime>,
    checked: Instant,
    /// User name to keyed SHA-256 of the password that last verified.
    verified: HashMap<String, [u8; 32]>,
}

/// The users of an htpasswd file.
pub struct Htpasswd {
    path: PathBuf,
    /// Random per process, so the remembered digests are useless elsewhere.
    cache_key: [u8; 32],
    /// A hash of a random password, checked for unknown users.
    decoy_hash: String,
    state: Mutex<Loaded>,
}

fn parse(path: &Path, text: &str) -> Result<HashMap<String, String>, HtpasswdError> {
    let mut users = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let failure = |reason: &str| HtpasswdError::Line {
            path: path.to_path_buf(),
            line: index + 1,
            reason: reason.to_string(),
        };
        let (user, hash) = line.split_once(':').ok_or_else(|| failure("expected user:hash"))?;
        if user.is_empty() {
            return Err(failure("empty user name"));
        }
        if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
            return Err(failure("only bcrypt hashes are accepted (htpasswd -B); MD5, SHA-1 and crypt hashes are too weak"));
        }
        if hash.parse::<bcrypt::HashParts>().is_err() {
            return Err(failure("the bcrypt hash is malformed"));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    if users.is_empty() {
        return Err(HtpasswdError::Empty(path.to_path_buf()));
    }
    Ok(users)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok()
}

impl Htpasswd {
    /// Reads the users of `path`.
    pub fn load(path: &Path) -> Result<Self, HtpasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let users = parse(path, &text)?;
        let decoy: [u8; 16] = rand::random();
        let decoy_hash = bcrypt::hash(hex::encode(decoy), bcrypt::DEFAULT_COST).map_err(|error| HtpasswdError::Line {
            path: path.to_path_buf(),
            line: 0,
            reason: format!("bcrypt failed: {error}"),
        })?;
        Ok(Htpasswd {
            path: path.to_path_buf(),
            cache_key: rand::random(),
            decoy_hash,
            state: Mutex::new(Loaded {
                users,
                modified: modified(path),
                checked: Instant::now(),
                verified: HashMap::new(),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `user` has a line in the file.
    pub fn has_user(&self, user: &str) -> bool {
        self.state.lock().is_ok_and(|state| state.users.contains_key(user))
    }

    fn keyed_digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.cache_key);
        hasher.update((user.len() as u64).to_le_bytes());
        hasher.update(user.as_bytes());
        hasher.update(password.as_bytes());
        hasher.finalize().into()
    }

    /// Re-reads the file when it changed; keeps the old users when the new
    /// file is unreadable or broken (and says so).
    fn refresh(&self, state: &mut Loaded) {
        if state.checked.elapsed() < RELOAD_CHECK_INTERVAL {
            return;
        }
        state.checked = Instant::now();
        let now = modified(&self.path);
        if now == state.modified {
            return;
        }
        match std::fs::read_to_string(&self.path)
            .map_err(|source| HtpasswdError::Read { path: self.path.clone(), source })
            .and_then(|text| parse(&self.path, &text))
        {
            Ok(users) => {
                tracing::info!(file = %self.path.display(), users = users.len(), "htpasswd file reloaded");
                state.users = users;
                state.verified.clear();
                state.modified = now;
            }
            Err(error) => tracing::error!(%error, "keeping the previous users"),
        }
    }

    /// Whether `password` is `user`'s.
    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let digest = self.keyed_digest(user, password);
        let hash = {
            let Ok(mut state) = self.state.lock() else { return false };
            self.refresh(&mut state);
            if let Some(known) = state.verified.get(user) {
                if bool::from(known.ct_eq(&digest)) {
                    return true;
                }
            }
            state.users.get(user).cloned()
        };
        // An unknown user costs a bcrypt run too, so timing does not tell
        // which user names exist.
        let known_user = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy_hash.clone());
        let password = password.to_string();
        let verified = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false)
            && known_user;
        if verified {
            if let Ok(mut state) = self.state.lock() {
                state.verified.insert(user.to_string(), digest);
            }
        }
        verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("htpasswd");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn bcrypt_users_verify_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let admin = bcrypt::hash("s3cret", 4).unwrap();
        // `htpasswd -B -C 4 -b f node-puller pull` writes the $2y$ form.
        let puller = bcrypt::hash("pull", 4).unwrap().replacen("$2b$", "$2y$", 1);
        let path = write(dir.path(), &format!("# users\nadmin:{admin}\n\nnode-puller:{puller}\n"));
        let file = Htpasswd::load(&path).unwrap();
        assert!(file.has_user("admin") && file.has_user("node-puller") && !file.has_user("nobody"));
        assert!(file.verify("admin", "s3cret").await);
        assert!(file.verify("admin", "s3cret").await, "the remembered digest matches again");
        assert!(!file.verify("admin", "s3cret ").await);
        assert!(!file.verify("admin", "pull").await);
        assert!(file.verify("node-puller", "pull").await);
        assert!(!file.verify("nobody", "pull").await);
        assert!(!file.verify("nobody", "").await);
    }

    #[test]
    fn weak_or_broken_lines_are_refused_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = format!("ok:{}\nadmin:$apr1$x$y\n", bcrypt::hash("x", 4).unwrap());
        for (text, expected) in [
            ("admin:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "line 1: only bcrypt"),
            (good.as_str(), "line 2: only bcrypt"),
            ("admin\n", "line 1: expected user:hash"),
            ("admin:$2y$99$short\n", "line 1: the bcrypt hash is malformed"),
            ("# nobody\n", "holds no users"),
        ] {
            let path = write(dir.path(), text);
            let error = Htpasswd::load(&path).err().expect(text).to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[tokio::test]
    async fn a_changed_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &format!("admin:{}\n", bcrypt::hash("one", 4).unwrap()));
        let file = Htpasswd::load(&path).unwrap();
        assert!(file.verify("admin", "one").await);
        std::fs::write(&path, format!("admin:{}\n", bcrypt::hash("two", 4).unwrap())).unwrap();
        let later = SystemTime::now() + Duration::from_secs(10);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(later).unwrap();
        if let Ok(mut state) = file.state.lock() {
            state.checked = Instant::now() - RELOAD_CHECK_INTERVAL * 2;
        }
        assert!(file.verify("admin", "two").await);
        assert!(!file.verify("admin", "one").await, "the old password is forgotten with the old file");
    }
}
