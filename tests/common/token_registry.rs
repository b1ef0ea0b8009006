//! `dvcr serve` on 127.0.0.1 taking only scoped tokens, with the key that
//! signs them, as the controller's registry.

use std::path::PathBuf;
use std::process::Command;

use super::{run, Server, DVCR};

/// A registry that takes only scoped tokens, and the key to mint them.
pub struct TokenRegistry {
    _directory: tempfile::TempDir,
    /// A folder for the test's files.
    pub root: PathBuf,
    /// The registry.
    pub server: Server,
    /// The PEM private key signing tokens.
    pub private_key: PathBuf,
    /// The PEM public key the registry checks tokens with.
    pub public_key: Vec<u8>,
}

impl TokenRegistry {
    /// Makes a key pair and starts the registry.
    pub fn start() -> TokenRegistry {
        let directory = tempfile::tempdir().unwrap();
        let root = directory.path().to_path_buf();
        let (private_key, public_key) = (root.join("signing.key"), root.join("signing.pub"));
        run(Command::new(DVCR)
            .args(["token", "keygen", "--private-key"])
            .arg(&private_key)
            .arg("--public-key")
            .arg(&public_key));
        let public = std::fs::read(&public_key).unwrap();
        let public_key = public_key.display().to_string();
        let server = Server::start_free(&root.join("data"), &["--token-public-key", &public_key]);
        TokenRegistry {
            _directory: directory,
            root,
            server,
            private_key,
            public_key: public,
        }
    }

    /// A token for `access` entries (`repository:vi/ns/x:pull,push`).
    pub fn token(&self, access: &[&str]) -> String {
        let mut command = Command::new(DVCR);
        command.args(["token", "issue", "--subject", "a test", "--private-key"]).arg(&self.private_key);
        for entry in access {
            command.args(["--access", entry]);
        }
        run(&mut command).trim().to_string()
    }
}
