//! Authentication and TLS, end to end: the real `dvcr serve` with an
//! htpasswd file, scoped tokens from `dvcr token`, a test CA, and the real
//! clients (skopeo, containerd's ctr, curl, `dvcr import`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::containerd::{pull_with_and_compare, Containerd};
use common::image::{self, pseudo_random, write_oci_layout};
use common::pki::TestPki;
use common::{free_port, require_tool, run, Server, DVCR};
use serde_json::Value;

const ADMIN: &str = "admin:admin-secret";
const PULLER: &str = "node-puller:pull-secret";

/// An htpasswd file with a read-write admin and the nodes' read-only user,
/// hashed at bcrypt's default cost as `htpasswd -B` does.
fn htpasswd(directory: &Path) -> PathBuf {
    let line = |credentials: &str| {
        let (user, password) = credentials.split_once(':').unwrap();
        format!("{user}:{}\n", bcrypt::hash(password, bcrypt::DEFAULT_COST).unwrap().replacen("$2b$", "$2y$", 1))
    };
    let path = directory.join("htpasswd");
    std::fs::write(&path, format!("{}{}", line(ADMIN), line(PULLER))).unwrap();
    path
}

/// `dvcr serve` with the htpasswd users (node-puller read-only) and `extra`.
fn start_with_users(dir: &Path, extra: &[String]) -> Server {
    let mut arguments = vec![
        "--htpasswd".to_string(),
        htpasswd(dir).display().to_string(),
        "--read-only-user".into(),
        "node-puller".into(),
    ];
    arguments.extend_from_slice(extra);
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    Server::start_free(&dir.join("data"), &arguments)
}

/// Imports `size` pseudo-random bytes as `<repository>:v1` (disk file
/// `<name>.img`) as the admin, through a pull secret; returns the disk.
fn import_as_admin(server: &Server, dir: &Path, name: &str, size: usize, extra: &[&str]) -> Vec<u8> {
    let disk = pseudo_random(size, size as u64);
    let disk_path = dir.join(format!("{name}.img"));
    std::fs::write(&disk_path, &disk).unwrap();
    let auth_file = dir.join("config.json");
    let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ADMIN);
    std::fs::write(&auth_file, format!(r#"{{"auths":{{"{}":{{"auth":"{basic}"}}}}}}"#, server.address)).unwrap();
    let output = Command::new(DVCR)
        .args(["import", &disk_path.display().to_string(), &format!("{}/vi/ns/{name}:v1", server.address)])
        .args(["--auth-file", &auth_file.display().to_string()])
        .args(extra)
        .output()
        .unwrap();
    succeeded(&output, &format!("import of {name}"));
    disk
}

fn keygen(directory: &Path, name: &str) -> (PathBuf, PathBuf) {
    let private = directory.join(format!("{name}.key"));
    let public = directory.join(format!("{name}.pub"));
    run(Command::new(DVCR).args(["token", "keygen", "--private-key"]).arg(&private).arg("--public-key").arg(&public));
    (private, public)
}

fn token(private_key: &Path, access: &[&str]) -> String {
    let mut command = Command::new(DVCR);
    command.args(["token", "issue", "--subject", "a test", "--private-key"]).arg(private_key);
    for entry in access {
        command.args(["--access", entry]);
    }
    run(&mut command).trim().to_string()
}

fn curl(arguments: &[&str]) -> (u16, String) {
    let output = Command::new(require_tool("curl"))
        .args(["-s", "-o", "/dev/stderr", "-w", "%{http_code}"])
        .args(arguments)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&output.stdout).parse().unwrap_or(0);
    (status, String::from_utf8_lossy(&output.stderr).into_owned())
}

fn skopeo(arguments: &[&str]) -> Output {
    Command::new(require_tool("skopeo")).arg("--insecure-policy").args(arguments).output().unwrap()
}

fn succeeded(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn layout_digest(layout: &Path) -> String {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}

#[test]
fn users_and_scoped_tokens_get_exactly_what_they_may() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let (private_key, public_key) = keygen(dir, "signing");
    let server = start_with_users(dir, &["--token-public-key".into(), public_key.display().to_string()]);
    let url = |path: &str| server.url(path);

    // The challenge docker-style clients answer, and the spec's error body.
    let output = Command::new(require_tool("curl")).args(["-si", &url("/v2/")]).output().unwrap();
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("www-authenticate: basic realm=\"dvcr\""), "{answer}");
    assert!(answer.contains("\"UNAUTHORIZED\""), "{answer}");
    assert_eq!(curl(&["-u", ADMIN, &url("/v2/")]).0, 200);
    assert_eq!(curl(&["-u", PULLER, &url("/v2/")]).0, 200);
    assert_eq!(curl(&["-u", "admin:wrong", &url("/v2/")]).0, 401);
    assert_eq!(curl(&["-u", "nobody:admin-secret", &url("/v2/")]).0, 401);

    // skopeo: the admin pushes, the read-only user pulls and cannot push,
    // strangers can do neither.
    let image = image::multi_layer_image(5);
    let layout = dir.join("layout");
    write_oci_layout(&layout, "v1", &image);
    let source = format!("oci:{}:v1", layout.display());
    let first = format!("docker://{}/vi/ns/first:v1", server.address);
    succeeded(&skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", ADMIN, &source, &first]), "admin push");
    let refused = skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", PULLER, &source, &format!("docker://{}/vi/ns/second:v1", server.address)]);
    assert!(!refused.status.success(), "the read-only user pushed");
    let back = dir.join("back");
    succeeded(
        &skopeo(&["copy", "--src-tls-verify=false", "--src-creds", PULLER, &first, &format!("oci:{}:v1", back.display())]),
        "read-only pull",
    );
    assert_eq!(layout_digest(&back), image.digest());
    let anonymous = skopeo(&["inspect", "--raw", "--tls-verify=false", &first]);
    assert!(!anonymous.status.success(), "an anonymous pull succeeded");
    assert_eq!(curl(&["-u", PULLER, &url("/v2/vi/ns/second/tags/list")]).0, 404, "nothing of the refused push is tagged");
    assert_eq!(curl(&["-u", PULLER, "-X", "DELETE", &url(&format!("/v2/vi/ns/first/manifests/{}", image.digest()))]).0, 403);
    let (status, body) = curl(&["-u", PULLER, &url("/v2/_catalog")]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("DENIED") && body.contains("node-puller may only pull"), "{body}");
    assert_eq!(curl(&["-u", ADMIN, &url("/v2/_catalog")]).0, 200);
    let log = server.log();
    assert!(log.contains("read-only user node-puller") && log.contains("user admin"), "the log says who:\n{log}");

    // containerd authenticates against the challenge with the nodes' user.
    let disk = pseudo_random(2 << 20, 9);
    let disk_path = dir.join("disk.img");
    std::fs::write(&disk_path, &disk).unwrap();
    let token_x = token(&private_key, &["repository:vi/ns/x:pull,push"]);
    let token_file = dir.join("token-x");
    std::fs::write(&token_file, &token_x).unwrap();
    let import = |destination: &str| {
        Command::new(DVCR)
            .args(["import", &disk_path.display().to_string(), destination, "--registry-token-file"])
            .arg(&token_file)
            .output()
            .unwrap()
    };
    succeeded(&import(&format!("{}/vi/ns/x:v1", server.address)), "import with a token for vi/ns/x");
    let containerd = Containerd::start(&dir.join("containerd"));
    pull_with_and_compare(
        &containerd,
        &["--plain-http", "--user", PULLER],
        &format!("{}/vi/ns/x:v1", server.address),
        &dir.join("mnt"),
        &[("disk/disk.img", &disk)],
    );

    // A token covers its repository and actions, nothing else.
    let elsewhere = import(&format!("{}/vi/ns/y:v1", server.address));
    assert!(!elsewhere.status.success(), "a token for vi/ns/x pushed to vi/ns/y");
    let message = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(message.contains("access denied") && message.contains("403"), "{message}");
    let bearer = |token: &str| format!("Authorization: Bearer {token}");
    assert_eq!(curl(&["-H", &bearer(&token_x), &url("/v2/vi/ns/x/manifests/v1")]).0, 200);
    assert_eq!(curl(&["-H", &bearer(&token_x), &url("/v2/vi/ns/first/manifests/v1")]).0, 403);
    assert_eq!(curl(&["-H", &bearer(&token_x), &url("/v2/vi/ns/x/y/manifests/v1")]).0, 403);
    let (status, body) = curl(&["-H", &bearer(&token_x), "-X", "DELETE", &url("/v2/vi/ns/x/manifests/v1")]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not grant delete on vi/ns/x"), "{body}");
    assert_eq!(curl(&["-H", &bearer(&token_x), &url("/v2/_catalog")]).0, 403);
    let deleter = token(&private_key, &["repository:vi/ns/x:*"]);
    let manifest_digest = {
        let output = Command::new(require_tool("curl"))
            .args(["-sI", "-H", &bearer(&deleter), &url("/v2/vi/ns/x/manifests/v1")])
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
        head.lines()
            .find_map(|line| line.strip_prefix("docker-content-digest: ").map(|value| value.trim().to_string()))
            .expect("a digest header")
    };

    // A cross-repository mount needs pull on the source: without it the
    // registry starts an ordinary upload instead of handing the blob over.
    let layer = common::sha256_digest(&image.layers[1].1);
    let pusher = token(&private_key, &["repository:vi/ns/z:push"]);
    let mount = url(&format!("/v2/vi/ns/z/blobs/uploads/?mount={layer}&from=vi/ns/first"));
    assert_eq!(curl(&["-X", "POST", "-H", &bearer(&pusher), &mount]).0, 202);
    let both = token(&private_key, &["repository:vi/ns/z:push", "repository:vi/ns/first:pull"]);
    assert_eq!(curl(&["-X", "POST", "-H", &bearer(&both), &mount]).0, 201);

    // A token from another key, or garbage, is no identity at all.
    let (stranger_key, _) = keygen(dir, "stranger");
    let forged = token(&stranger_key, &["repository:vi/ns/x:*"]);
    let (status, body) = curl(&["-H", &bearer(&forged), &url("/v2/vi/ns/x/manifests/v1")]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature"), "{body}");
    assert_eq!(curl(&["-H", "Authorization: Bearer not.a.token", &url("/v2/")]).0, 401);
    assert_eq!(curl(&["-H", "Authorization: Digest x", &url("/v2/")]).0, 401);
    assert_eq!(curl(&["-H", &bearer(&deleter), "-X", "DELETE", &url(&format!("/v2/vi/ns/x/manifests/{manifest_digest}"))]).0, 202);
}

#[test]
fn the_registry_is_open_only_on_loopback() {
    let directory = tempfile::tempdir().unwrap();
    let data = directory.path().join("data");
    let output = Command::new(DVCR)
        .args(["serve", "--listen", "0.0.0.0:0", "--storage-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("needs authentication") && message.contains("--htpasswd"), "{message}");
    let output = Command::new(DVCR)
        .args(["serve", "--read-only-user", "node-puller", "--storage-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--read-only-user needs --htpasswd"));
    let weak = directory.path().join("weak");
    std::fs::write(&weak, "admin:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n").unwrap();
    let output = Command::new(DVCR)
        .args(["serve", "--htpasswd"])
        .arg(&weak)
        .arg("--storage-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("line 1") && message.contains("bcrypt"), "{message}");
}

#[test]
fn tls_serves_skopeo_containerd_curl_and_the_importer_and_checks_client_certificates() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let pki = TestPki::create(&dir.join("pki"));
    let tls = |extra: &[&str]| {
        let mut arguments = vec![
            "--tls-cert".to_string(),
            pki.server_cert.display().to_string(),
            "--tls-key".into(),
            pki.server_key.display().to_string(),
        ];
        arguments.extend(extra.iter().map(|text| text.to_string()));
        arguments
    };
    let server = start_with_users(dir, &tls(&[]));
    let https = |path: &str| format!("https://{}{path}", server.address);
    let ca = pki.ca.display().to_string();

    let (status, _) = curl(&["--cacert", &ca, "-u", ADMIN, &https("/v2/")]);
    assert_eq!(status, 200);
    let version = Command::new(require_tool("curl"))
        .args(["-s", "-o", "/dev/null", "-w", "%{http_version}", "--http2", "--cacert", &ca, "-u", ADMIN, &https("/v2/")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout), "2", "HTTP/2 is offered by ALPN");
    let untrusted = Command::new(require_tool("curl")).args(["-s", &https("/v2/")]).output().unwrap();
    assert_eq!(untrusted.status.code(), Some(60), "curl must not trust the test CA by itself");
    assert_eq!(curl(&["--cacert", &ca, &format!("http://{}/v2/", server.address)]).0, 0, "no plain HTTP on a TLS port");

    // skopeo trusts the CA through a certificate folder.
    let image = image::multi_layer_image(6);
    let layout = dir.join("layout");
    write_oci_layout(&layout, "v1", &image);
    let cert_dir = pki.ca_dir.display().to_string();
    let destination = format!("docker://{}/vi/ns/tls:v1", server.address);
    succeeded(
        &skopeo(&["copy", "--dest-cert-dir", &cert_dir, "--dest-creds", ADMIN, &format!("oci:{}:v1", layout.display()), &destination]),
        "skopeo push over TLS",
    );
    let back = dir.join("back");
    succeeded(
        &skopeo(&["copy", "--src-cert-dir", &cert_dir, "--src-creds", PULLER, &destination, &format!("oci:{}:v1", back.display())]),
        "skopeo pull over TLS",
    );
    assert_eq!(layout_digest(&back), image.digest());

    // The importer trusts it through --registry-ca-bundle and logs in with a
    // pull secret; containerd pulls with the CA and the nodes' user.
    let disk = import_as_admin(&server, dir, "tls-disk", 3 << 20, &["--registry-ca-bundle", &ca]);
    // As on a node: a hosts.toml for the registry naming its CA.
    let hosts = dir.join("certs.d");
    std::fs::create_dir_all(hosts.join(&server.address)).unwrap();
    std::fs::write(
        hosts.join(&server.address).join("hosts.toml"),
        format!("server = \"https://{0}\"\n\n[host.\"https://{0}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n", server.address),
    )
    .unwrap();
    let containerd = Containerd::start(&dir.join("containerd"));
    pull_with_and_compare(
        &containerd,
        &["--hosts-dir", &hosts.display().to_string(), "--user", PULLER],
        &format!("{}/vi/ns/tls-disk:v1", server.address),
        &dir.join("mnt"),
        &[("disk/tls-disk.img", &disk)],
    );
    drop(server);

    // With a client CA, a client without a certificate signed by it gets no
    // connection at all.
    let probes = format!("127.0.0.1:{}", free_port());
    let server = start_with_users(dir, &tls(&["--tls-client-ca", &ca, "--metrics-listen", &probes]));
    let https = format!("https://{}/v2/", server.address);
    assert_eq!(curl(&["--cacert", &ca, "-u", ADMIN, &https]).0, 0);
    let with_certificate = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &pki.client_cert.display().to_string(),
        "--key",
        &pki.client_key.display().to_string(),
        "-u",
        ADMIN,
        &https,
    ]);
    assert_eq!(with_certificate.0, 200, "{}", with_certificate.1);

    // Probes and metrics on their own plain listener, for the kubelet and
    // Prometheus, which have no client certificate.
    assert_eq!(curl(&[&format!("http://{probes}/readyz")]).0, 200);
    assert_eq!(curl(&[&format!("http://{probes}/healthz")]).0, 200);
    let (status, metrics) = curl(&[&format!("http://{probes}/metrics")]);
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"dvcr_http_requests_total{method="GET",route="base",status="200"} 1"#),
        "{metrics}"
    );
    assert_eq!(curl(&[&format!("http://{probes}/v2/")]).0, 404, "the probe listener serves no registry API");
}

#[test]
fn the_registry_issues_tokens_to_docker_style_clients() {
    let directory = tempfile::tempdir().unwrap();
    let dir = directory.path();
    let (private_key, _) = keygen(dir, "service");
    let server = start_with_users(dir, &["--token-private-key".into(), private_key.display().to_string()]);
    let url = |path: &str| server.url(path);

    let output = Command::new(require_tool("curl")).args(["-si", &url("/v2/")]).output().unwrap();
    let answer = String::from_utf8_lossy(&output.stdout).to_ascii_lowercase();
    let realm = format!("www-authenticate: bearer realm=\"http://{}/dvcr/token\",service=\"dvcr\"", server.address);
    assert!(answer.contains(&realm), "{answer}");
    let (status, body) = curl(&[&url("/dvcr/token?service=dvcr&scope=repository:vi/ns/t:pull,push")]);
    assert_eq!(status, 401, "{body}");
    assert_eq!(curl(&["-u", "admin:wrong", &url("/dvcr/token?scope=repository:vi/ns/t:pull")]).0, 401);
    let (status, body) = curl(&["-u", PULLER, &url("/dvcr/token?service=dvcr&scope=repository:vi/ns/t:pull,push")]);
    assert_eq!(status, 200, "{body}");
    let puller_token = serde_json::from_str::<Value>(&body).unwrap()["token"].as_str().unwrap().to_string();
    let bearer = format!("Authorization: Bearer {puller_token}");
    assert_eq!(curl(&["-H", &bearer, "-X", "POST", &url("/v2/vi/ns/t/blobs/uploads/")]).0, 403, "a read-only user's token grants pull only");
    assert_eq!(curl(&["-u", ADMIN, &url("/v2/")]).0, 200, "Basic credentials still work directly");

    // skopeo and containerd follow the Bearer challenge to the token endpoint.
    let image = image::multi_layer_image(8);
    let layout = dir.join("layout");
    write_oci_layout(&layout, "v1", &image);
    let destination = format!("docker://{}/vi/ns/t:v1", server.address);
    succeeded(
        &skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", ADMIN, &format!("oci:{}:v1", layout.display()), &destination]),
        "skopeo push with a token",
    );
    let refused = skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", PULLER, &format!("oci:{}:v1", layout.display()), &format!("docker://{}/vi/ns/u:v1", server.address)]);
    assert!(!refused.status.success(), "the read-only user pushed through a token");

    // The importer with a pull secret: the same token flow.
    let disk = import_as_admin(&server, dir, "token-disk", 1 << 20, &[]);
    let containerd = Containerd::start(&dir.join("containerd"));
    pull_with_and_compare(
        &containerd,
        &["--plain-http", "--user", PULLER],
        &format!("{}/vi/ns/token-disk:v1", server.address),
        &dir.join("mnt"),
        &[("disk/token-disk.img", &disk)],
    );
    let log = server.log();
    assert!(log.contains("token issued") && log.contains("token for admin") && log.contains("token for node-puller"), "{log}");
}
