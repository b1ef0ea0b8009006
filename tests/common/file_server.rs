//! tests/support/http_server.py, a real HTTP server with chosen
//! misbehaviours, as a source of imports.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::require_tool;

/// tests/support/http_server.py serving `root` on 127.0.0.1.
pub struct FileServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl FileServer {
    pub fn start(root: &Path) -> FileServer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/http_server.py");
        let mut child = Command::new(require_tool("python3"))
            .arg(script)
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the test HTTP server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("port line");
        let port = line.trim().parse().expect("the test HTTP server did not print its port");
        FileServer { child, port }
    }

    /// `http://127.0.0.1:PORT/<mode>/<name>`: `mode` picks a behaviour of the script (`plain`, ...).
    pub fn url(&self, mode: &str, name: &str) -> String {
        format!("http://127.0.0.1:{}/{mode}/{name}", self.port)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
