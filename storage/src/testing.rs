//! A real S3 server for tests: a single-node Garage on 127.0.0.1, with its
//! own folder, ports, key and buckets, stopped when dropped.
//!
//! The binary is `$DVCR_GARAGE`, else `garage` on the `PATH`, else the one
//! the test command caches in `${DVCR_CACHE:-~/.cache/dvcr}/garage-<version>/bin`. A test
//! that needs Garage fails, with a message saying how to get it, when none
//! is found; it never skips.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::s3::S3Options;

/// The Garage release the test command installs.
pub const GARAGE_VERSION: &str = "2.5.0";

/// A running single-node Garage.
pub struct Garage {
    child: Child,
    binary: PathBuf,
    config: PathBuf,
    /// `http://127.0.0.1:<port>`, the S3 endpoint.
    pub endpoint: String,
    /// The S3 region Garage answers to.
    pub region: String,
    /// The access key id of the key that owns every bucket made here.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    _folder: tempfile::TempDir,
}

/// Where the Garage binary is, or why there is none.
pub fn garage_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DVCR_GARAGE") {
        return Ok(PathBuf::from(path));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for folder in std::env::split_paths(&paths) {
            let candidate = folder.join("garage");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let cache = match std::env::var_os("DVCR_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache/dvcr"),
    };
    let cached = cache.join(format!("garage-{GARAGE_VERSION}/bin/garage"));
    if cached.is_file() {
        return Ok(cached);
    }
    Err(format!(
        "Garage (the S3 server the S3 tests run against) is not installed: run the test command \
         (bash scripts/test.sh), which builds it into {}, or set DVCR_GARAGE to a garage binary",
        cached.display()
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or_else(|error| panic!("no free port on 127.0.0.1: {error}"))
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

impl Garage {
    /// Starts Garage, gives it a layout and a key. Panics (this is for
    /// tests) with Garage's own words when any step fails.
    pub fn start() -> Garage {
        let mut refused = String::new();
        for _ in 0..5 {
            match Self::try_start() {
                Ok(garage) => return garage,
                // A port `free_port` found was taken by a test running beside
                // this one before Garage bound it: start again on others.
                Err(reason) if reason.contains("Address already in use") => refused = reason,
                Err(reason) => panic!("{reason}"),
            }
        }
        panic!("garage found its ports taken 5 times: {refused}");
    }

    fn try_start() -> Result<Garage, String> {
        let binary = garage_binary().unwrap_or_else(|reason| panic!("{reason}"));
        let folder = tempfile::tempdir().unwrap_or_else(|error| panic!("no temporary folder: {error}"));
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = folder.path().join("garage.toml");
        let text = format!(
            r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
            root = folder.path().display(),
            secret = random_hex(32),
        );
        std::fs::write(&config, text).unwrap_or_else(|error| panic!("cannot write the Garage config: {error}"));
        let log = std::fs::File::create(folder.path().join("garage.log"))
            .unwrap_or_else(|error| panic!("cannot create the Garage log: {error}"));
        let mut command = Command::new(&binary);
        command
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(Stdio::null())
            .stderr(log);
        // Garage dies with the thread that started it, even when a test
        // process ends without dropping it (a static shared by its tests).
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let mut garage = Garage {
            child,
            binary,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: "garage".into(),
            access_key_id: format!("GK{}", random_hex(12)),
            secret_access_key: random_hex(32),
            _folder: folder,
        };
        let node = garage.wait_for_node()?;
        garage.run(&["layout", "assign", "-z", "dc1", "-c", "10G", &node]);
        garage.run(&["layout", "apply", "--version", "1"]);
        let (id, secret) = (garage.access_key_id.clone(), garage.secret_access_key.clone());
        garage.run(&["key", "import", "--yes", "-n", "dvcr-tests", &id, &secret]);
        garage.wait_for_s3()?;
        Ok(garage)
    }

    /// Garage's exit at start, with its log.
    fn exited(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!("garage exited at start ({status}): {}", self.log())),
            _ => Ok(()),
        }
    }

    /// Runs a `garage` admin command; panics with its output when it fails.
    pub fn run(&self, arguments: &[&str]) -> String {
        let output = self
            .admin(arguments)
            .output()
            .unwrap_or_else(|error| panic!("cannot run garage {arguments:?}: {error}"));
        if !output.status.success() {
            panic!(
                "garage {arguments:?} failed: {}{}\n(server log: {})",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A `garage` admin command against this server.
    fn admin(&self, arguments: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&self.config).args(arguments);
        command
    }

    /// What the server wrote to its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.config.parent().unwrap_or(Path::new("/")).join("garage.log")
    }

    fn wait_for_node(&mut self) -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.exited()?;
            let admin = |arguments: &[&str]| self.admin(arguments).output().ok().filter(|output| output.status.success());
            // `node id` can answer from the key on disk before the RPC
            // server listens; `status` needs the server (a CI run's `layout
            // assign` was refused right after `node id` answered).
            if let Some(output) = admin(&["node", "id", "-q"]) {
                let text = String::from_utf8_lossy(&output.stdout);
                if let Some(id) = text.trim().split('@').next().filter(|id| !id.is_empty()) {
                    if admin(&["status"]).is_some() {
                        return Ok(id.to_string());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!("garage did not answer within 30 s: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the S3 endpoint answers HTTP, not merely until its port
    /// is open.
    fn wait_for_s3(&mut self) -> Result<(), String> {
        let address = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        let answers = || -> std::io::Result<bool> {
            use std::io::{Read, Write};
            let mut connection = std::net::TcpStream::connect(&address)?;
            connection.set_read_timeout(Some(Duration::from_secs(2)))?;
            connection.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut start = [0u8; 5];
            connection.read_exact(&mut start)?;
            Ok(&start == b"HTTP/")
        };
        while !answers().unwrap_or(false) {
            self.exited()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "garage's S3 endpoint {address} did not open within 30 s: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Another server may hold the S3 port and have answered: Garage,
        // failing to bind it, has exited by now.
        std::thread::sleep(Duration::from_millis(200));
        self.exited()
    }

    /// Creates a bucket owned by the test key.
    pub fn create_bucket(&self, name: &str) {
        self.run(&["bucket", "create", name]);
        self.run(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            &self.access_key_id,
        ]);
    }

    /// Driver options for `bucket`, with the default part sizes.
    pub fn options(&self, bucket: &str) -> S3Options {
        let mut options = S3Options::new(bucket, &self.region, &self.access_key_id, &self.secret_access_key);
        options.endpoint = Some(self.endpoint.clone());
        options
    }

    /// Garage's configuration file, for `garage -c` by hand.
    pub fn config_path(&self) -> &Path {
        &self.config
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
