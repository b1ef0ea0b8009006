//! Uploads with the real curl: `dvcr upload-server` and the upload
//! sessions of `dvcr serve`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::image::pseudo_random;
use common::{free_port, metric, require_tool, run, wait_for_listener, Server, DVCR};
use serde_json::Value;

/// A qcow2 with some data, made by qemu-img.
fn make_qcow2(directory: &Path, data_mib: usize) -> Vec<u8> {
    let raw = directory.join("upload.raw");
    std::fs::write(&raw, pseudo_random(data_mib << 20, 21)).unwrap();
    let image = directory.join("upload.qcow2");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "qcow2"]).arg(&raw).arg(&image));
    std::fs::read(image).unwrap()
}

/// A running `dvcr upload-server`, killed when dropped.
struct UploadServer {
    child: Option<Child>,
    url: String,
}

impl Drop for UploadServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl UploadServer {
    fn start(destination: &str, extra: &[&str]) -> UploadServer {
        let port = free_port();
        let child = Command::new(DVCR)
            .args(["upload-server", "--listen", &format!("127.0.0.1:{port}"), "--destination", destination])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/upload");
        wait_for_listener(port, "upload-server");
        UploadServer { child: Some(child), url }
    }

    fn wait(mut self) -> Output {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("upload-server did not exit");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        child.wait_with_output().unwrap()
    }
}

/// curl with its HTTP status as the last line of stdout.
fn curl(arguments: &[&str]) -> (u16, String) {
    let output = Command::new(require_tool("curl"))
        .args(["-s", "-w", "\n%{http_code}"])
        .args(arguments)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn stored_file(server: &Server, repository: &str, tag: &str) -> Vec<u8> {
    let (status, manifest) = curl(&[&server.url(&format!("/v2/{repository}/manifests/{tag}"))]);
    assert_eq!(status, 200, "{repository}:{tag} is not tagged");
    let manifest: Value = serde_json::from_str(&manifest).unwrap();
    let digest = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    let output = Command::new(require_tool("curl"))
        .args(["-sf", &server.url(&format!("/v2/{repository}/blobs/{digest}"))])
        .output()
        .unwrap();
    let mut archive = tar::Archive::new(output.stdout.as_slice());
    let mut entries = archive.entries().unwrap();
    let _directory = entries.next().unwrap().unwrap();
    let mut file = entries.next().unwrap().unwrap();
    assert_eq!(file.path().unwrap().display().to_string(), "disk/disk.img");
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut data).unwrap();
    data
}

#[test]
fn curl_uploads_with_put_and_chunked_post() {
    let directory = tempfile::tempdir().unwrap();
    let image = make_qcow2(directory.path(), 3);
    let image_path = directory.path().join("upload.qcow2");
    let server = Server::start(&directory.path().join("registry"));

    let uploader = UploadServer::start(&format!("{}/vi/vms/put:uid", server.address), &[]);
    assert_eq!(curl(&[&uploader.url]).0, 200, "GET /upload is the readiness probe");
    let (status, body) = curl(&["-T", &image_path.display().to_string(), &uploader.url]);
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(report["source-image-format"], "qcow2");
    let output = uploader.wait();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stored_file(&server, "vi/vms/put", "uid"), image);

    let uploader = UploadServer::start(&format!("{}/vi/vms/post:uid", server.address), &[]);
    let (status, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", image_path.display()),
        &uploader.url,
    ]);
    assert_eq!(status, 200, "{body}");
    assert!(uploader.wait().status.success());
    assert_eq!(stored_file(&server, "vi/vms/post", "uid"), image);
}

#[test]
fn the_path_token_url_takes_the_upload_and_other_paths_do_not() {
    let directory = tempfile::tempdir().unwrap();
    let image = make_qcow2(directory.path(), 1);
    let image_path = directory.path().join("upload.qcow2").display().to_string();
    let server = Server::start(&directory.path().join("registry"));
    let token = "Ab3".repeat(11) + "x";
    let destination = format!("{}/vi/vms/ingress:uid", server.address);
    let uploader = UploadServer::start(&destination, &["--path-token", &token]);
    let external = format!("{}/{token}", uploader.url);
    assert_eq!(curl(&[&external]).0, 200, "GET on the token path is ready too");
    let wrong = format!("{}/{}", uploader.url, "B".repeat(34));
    assert_eq!(curl(&["-T", &image_path, &wrong]).0, 404, "another token is not an upload URL");
    let (status, body) = curl(&["-T", &image_path, &external]);
    assert_eq!(status, 200, "{body}");
    assert!(uploader.wait().status.success());
    assert_eq!(stored_file(&server, "vi/vms/ingress", "uid"), image);

    let refused = Command::new(DVCR)
        .args(["upload-server", "--destination", &destination, "--path-token", "../etc"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not a path token"));
}

#[test]
fn concurrent_interrupted_and_late_uploads() {
    let directory = tempfile::tempdir().unwrap();
    let image = make_qcow2(directory.path(), 4);
    let image_path = directory.path().join("upload.qcow2").display().to_string();
    let server = Server::start(&directory.path().join("registry"));
    let uploader = UploadServer::start(&format!("{}/vi/vms/busy:uid", server.address), &["--keep-running"]);

    // Cut off after a second: nothing is tagged, and the slot stays open.
    let (status, _) = curl(&["--limit-rate", "1M", "--max-time", "1", "-T", &image_path, &uploader.url]);
    assert!(status == 0 || status == 100, "the interrupted upload got an answer: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tags = String::new();
    while Instant::now() < deadline {
        tags = curl(&[&server.url("/v2/vi/vms/busy/tags/list")]).1;
        // The failed pipeline must have released the slot before the next upload.
        let (probe, body) = curl(&["-X", "PUT", "--data-binary", "", &uploader.url]);
        if probe != 503 {
            assert_eq!(probe, 400, "an empty upload: {body}");
            assert!(body.contains("the image is empty"), "{body}");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!tags.contains("uid"), "an interrupted upload left a tag: {tags}");

    // A slow upload, and a second one while it runs: 503.
    let slow = Command::new(require_tool("curl"))
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--limit-rate", "2M", "-T", &image_path, &uploader.url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (second, _) = curl(&["-T", &image_path, &uploader.url]);
    assert_eq!(second, 503, "a concurrent upload was not refused");
    let slow = slow.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&slow.stdout), "200");
    assert_eq!(stored_file(&server, "vi/vms/busy", "uid"), image);

    let (late, _) = curl(&["-T", &image_path, &uploader.url]);
    assert_eq!(late, 409, "an upload after the image was stored was not refused");
}

#[test]
fn upload_server_gives_up_after_its_timeout() {
    let directory = tempfile::tempdir().unwrap();
    let server = Server::start(&directory.path().join("registry"));
    let report = directory.path().join("report.json");
    let uploader = UploadServer::start(
        &format!("{}/vi/vms/late:uid", server.address),
        &["--timeout", "1s", "--report-file", &report.display().to_string()],
    );
    let output = uploader.wait();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no image was uploaded within 1s"));
    let report: Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    assert_eq!(report["reason"], "WaitForUserUploadTimeout");
}

#[test]
fn serve_hands_out_single_use_upload_urls() {
    let directory = tempfile::tempdir().unwrap();
    let image = make_qcow2(directory.path(), 2);
    let image_path = directory.path().join("upload.qcow2").display().to_string();
    let server = Server::start(&directory.path().join("registry"));
    let (status, body) = curl(&["-X", "POST", &server.url("/dvcr/uploads?destination=vi/vms/session:uid")]);
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let path = created["url"].as_str().unwrap().to_string();
    let token = path.strip_prefix("/upload/").unwrap();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|byte| byte.is_ascii_alphanumeric()));
    let url = server.url(&path);
    assert_eq!(curl(&[&url]).0, 200);
    // Cut off half-way: nothing is tagged, no upload is left open, and the
    // session takes the next upload.
    let (status, _) = curl(&["--limit-rate", "1M", "--max-time", "1", "-T", &image_path, &url]);
    assert!(status == 0 || status == 100, "the interrupted upload got an answer: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(&["-X", "PUT", "--data-binary", "", &url]).0 == 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let tags = curl(&[&server.url("/v2/vi/vms/session/tags/list")]).1;
    assert!(!tags.contains("uid"), "an interrupted upload left a tag: {tags}");
    let left = common::storage::StoredView::of(&server.storage).files("docker/registry/v2/repositories/vi/vms/session/_uploads");
    assert!(left.is_empty(), "the interrupted upload's data was left: {left:?}");
    let (status, body) = curl(&["-T", &image_path, &url]);
    assert_eq!(status, 200, "{body}");
    // The session stores straight into the registry's store: no push to
    // itself over HTTP; the session's own requests are counted.
    let (_, metrics) = curl(&[&server.url("/metrics")]);
    let other = metric(&metrics, "dvcr_http_requests_total", &["route=\"other\""]);
    assert!(other >= 3.0, "session creation, its GET and the upload: {metrics}");
    assert!(metric(&metrics, "dvcr_http_received_bytes_total", &[]) >= image.len() as f64, "{metrics}");
    for route in ["upload_start", "upload", "manifest"] {
        let label = format!("route=\"{route}\"");
        assert_eq!(metric(&metrics, "dvcr_http_requests_total", &[&label]), 0.0, "{metrics}");
    }
    assert_eq!(stored_file(&server, "vi/vms/session", "uid"), image);
    assert_eq!(curl(&["-T", &image_path, &url]).0, 409);
    assert_eq!(curl(&[&server.url("/upload/notatoken")]).0, 404);
    assert_eq!(curl(&["-X", "POST", &server.url("/dvcr/uploads?destination=vi/vms/x")]).0, 400);
}

#[test]
fn upload_sessions_expire() {
    let directory = tempfile::tempdir().unwrap();
    let server = Server::start_free(&directory.path().join("registry"), &["--upload-session-lifetime", "1s"]);
    let base = format!("http://{}", server.address);
    let (status, body) = curl(&["-X", "POST", &format!("{base}/dvcr/uploads?destination=vi/vms/late:uid")]);
    assert_eq!(status, 201);
    let url = format!("{base}{}", serde_json::from_str::<Value>(&body).unwrap()["url"].as_str().unwrap());
    assert_eq!(curl(&[&url]).0, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = curl(&[&url]);
    assert_eq!(status, 404, "an expired session still answers");
    assert!(body.contains("expired"), "{body}");
}
