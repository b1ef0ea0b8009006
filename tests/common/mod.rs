//! Shared pieces of the end-to-end tests: the real `dvcr` binary started on
//! 127.0.0.1, tool checks, and image fixtures built at test time.

#![allow(dead_code)]

pub mod containerd;
pub mod file_server;
pub mod image;
pub mod pki;
pub mod storage;
pub mod token_registry;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// The `dvcr` binary cargo built for these tests.
pub const DVCR: &str = env!("CARGO_BIN_EXE_dvcr");

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("no free port on 127.0.0.1")
}

/// The path of a tool the test needs. A missing tool fails the test: the
/// README's test command installs every tool, so missing means broken setup.
pub fn require_tool(name: &str) -> PathBuf {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    for directory in std::env::split_paths(&paths).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]) {
        let candidate = directory.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required tool `{name}` is not installed: run the README's test command (scripts/test.sh), which installs it"
    );
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A running `dvcr serve` on 127.0.0.1, killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:PORT`
    pub address: String,
    /// The storage folder (on S3, the name of the bucket's stand-in).
    pub storage: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `dvcr serve` on a free port over `storage`.
    pub fn start(storage: &Path) -> Server {
        Server::start_free(storage, &[])
    }

    /// Starts `dvcr serve` with `extra` arguments on a free port. A port
    /// found free can be taken by another test before the server binds it:
    /// then the server is started again on another one (up to 5 times).
    pub fn start_free(storage: &Path, extra: &[&str]) -> Server {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Server::launch(storage, free_port(), extra) {
                Ok(server) => return server,
                Err(log) if attempts < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
    }

    /// Starts `dvcr serve` on `port` over `storage` and waits until it answers.
    pub fn start_on(storage: &Path, port: u16) -> Server {
        Server::start_with(storage, port, &[])
    }

    /// As [`Server::start_on`], with more `dvcr serve` arguments.
    pub fn start_with(storage: &Path, port: u16, extra: &[&str]) -> Server {
        Server::launch(storage, port, extra).unwrap_or_else(|log| panic!("{log}"))
    }

    /// Starts `dvcr serve` and waits until it answers; the failure and the
    /// server's log otherwise.
    fn launch(storage: &Path, port: u16, extra: &[&str]) -> Result<Server, String> {
        let address = format!("127.0.0.1:{port}");
        let log = storage.with_extension(format!("{port}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("cannot create the server log");
        let mut command = Command::new(DVCR);
        command.args(["serve", "--listen", &address]);
        storage::configure(&mut command, storage);
        let child = command
            .args(extra)
            .env("DVCR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .expect("cannot start dvcr serve");
        let mut server = Server {
            child: Some(child),
            address,
            storage: storage.to_path_buf(),
            log,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("dvcr serve exited with {status}; log:\n{}", self.log()));
                }
            }
            let log = self.log();
            if log.contains("registry serving") && std::net::TcpStream::connect(&self.address).is_ok() {
                // The S3 run must really be on S3, never quietly on a folder.
                let expected = if storage::on_s3() { "s3 bucket" } else { "folder" };
                assert!(
                    log.contains(expected),
                    "the server does not say it stores in a {expected}:\n{log}"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(format!(
            "dvcr serve did not listen on {} within 20 s; log:\n{}",
            self.address,
            self.log()
        ))
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.address, path)
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits (at most 20 s) until something listens on 127.0.0.1:`port`.
pub fn wait_for_listener(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `skopeo copy` between two references, TLS checks off (loopback).
pub fn skopeo_copy(source: &str, destination: &str) -> String {
    run(Command::new(require_tool("skopeo")).args([
        "--insecure-policy",
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        source,
        destination,
    ]))
}

/// The value of `name` in the Prometheus text, summed over the series
/// whose labels include every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.split(['{', ' ']).next() == Some(name))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next().and_then(|value| value.parse::<f64>().ok()))
        .sum()
}

/// Runs a command and returns its stdout, failing the test with its output
/// when it fails.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Pushes an image fixture to `repository:tag` with plain HTTP requests
/// (monolithic blob uploads, then the manifest).
pub async fn push_image(client: &reqwest::Client, server: &Server, repository: &str, tag: &str, image: &image::Image) {
    for blob in image.blobs() {
        let url = server.url(&format!(
            "/v2/{repository}/blobs/uploads/?digest={}",
            sha256_digest(blob)
        ));
        let response = client.post(url).body(blob.to_vec()).send().await.expect("blob push");
        assert_eq!(response.status(), 201, "blob push: {:?}", response.text().await);
    }
    let response = put_manifest(client, server, repository, tag, image)
        .await
        .expect("manifest push");
    assert_eq!(response.status(), 201, "manifest push: {:?}", response.text().await);
}

/// The manifest types a test GET accepts: OCI's and Docker's.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// GETs the manifest `reference` (a tag or a digest) of `repository`.
pub async fn get_manifest(
    client: &reqwest::Client,
    server: &Server,
    repository: &str,
    reference: &str,
) -> reqwest::Result<reqwest::Response> {
    client
        .get(server.url(&format!("/v2/{repository}/manifests/{reference}")))
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
}

/// PUTs the manifest of `image` as `repository:tag`.
pub async fn put_manifest(
    client: &reqwest::Client,
    server: &Server,
    repository: &str,
    tag: &str,
    image: &image::Image,
) -> reqwest::Result<reqwest::Response> {
    client
        .put(server.url(&format!("/v2/{repository}/manifests/{tag}")))
        .header("Content-Type", &image.manifest_media_type)
        .body(image.manifest.clone())
        .send()
        .await
}

/// Writes `path` compressed as `<path>.<wrapper>` (gz, xz, zst, bz2) with
/// the crates the converter unpacks with, and returns that path.
pub fn compress_file(path: &Path, wrapper: &str) -> PathBuf {
    let data = std::fs::read(path).unwrap();
    let packed: Vec<u8> = match wrapper {
        "gz" => {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut encoder, &data).unwrap();
            encoder.finish().unwrap()
        }
        "xz" => {
            let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 1);
            std::io::Write::write_all(&mut encoder, &data).unwrap();
            encoder.finish().unwrap()
        }
        "zst" => zstd::encode_all(data.as_slice(), 1).unwrap(),
        "bz2" => {
            let mut encoder = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
            std::io::Write::write_all(&mut encoder, &data).unwrap();
            encoder.finish().unwrap()
        }
        other => panic!("unknown wrapper {other}"),
    };
    let wrapped = PathBuf::from(format!("{}.{wrapper}", path.display()));
    std::fs::write(&wrapped, packed).unwrap();
    wrapped
}
