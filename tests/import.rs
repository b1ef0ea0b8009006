//! `dvcr import` end to end: a real HTTP server (Python's, with the
//! misbehaviours of tests/support/http_server.py), the real `dvcr serve`,
//! and skopeo and containerd reading what was stored.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::containerd::{pull_and_compare, Containerd};
use common::image::{self, pseudo_random};
use common::file_server::FileServer;
use common::{compress_file, require_tool, run, Server, DVCR};
use serde_json::Value;

/// A qcow2 of 64 MiB virtual size with 6 MiB of data, made by qemu-img.
fn make_qcow2(directory: &Path, name: &str) -> PathBuf {
    let raw = directory.join(format!("{name}.raw"));
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&pseudo_random(4 << 20, 11), 0).unwrap();
    file.write_all_at(&pseudo_random(2 << 20, 12), 40 << 20).unwrap();
    let image = directory.join(name);
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "qcow2"]).arg(&raw).arg(&image));
    std::fs::remove_file(raw).unwrap();
    image
}

fn dvcr_import(source: &str, destination: &str, extra: &[&str]) -> Output {
    Command::new(DVCR)
        .args(["import", source, destination, "--retry-delay-ms", "50"])
        .args(extra)
        .output()
        .unwrap()
}

fn import_ok(source: &str, destination: &str, extra: &[&str]) -> Value {
    let output = dvcr_import(source, destination, extra);
    assert!(
        output.status.success(),
        "import of {source} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the report is JSON")
}

fn curl(url: &str) -> Vec<u8> {
    let output = Command::new(require_tool("curl")).args(["-sf", url]).output().unwrap();
    assert!(output.status.success(), "curl {url} failed");
    output.stdout
}

fn tags(server: &Server, repository: &str) -> Vec<String> {
    let output = Command::new(require_tool("curl"))
        .args(["-s", &server.url(&format!("/v2/{repository}/tags/list"))])
        .output()
        .unwrap();
    let value: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    value["tags"]
        .as_array()
        .map(|tags| tags.iter().filter_map(|tag| tag.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// The entries of the stored artifact's one layer: (path, mode, bytes).
fn stored_disk(server: &Server, repository: &str, tag: &str) -> Vec<(String, u32, Vec<u8>)> {
    let manifest: Value = serde_json::from_slice(&curl(&server.url(&format!("/v2/{repository}/manifests/{tag}")))).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "exactly one layer");
    let digest = layers[0]["digest"].as_str().unwrap();
    let blob = curl(&server.url(&format!("/v2/{repository}/blobs/{digest}")));
    let media_type = layers[0]["mediaType"].as_str().unwrap();
    let tar_bytes = if media_type.ends_with("gzip") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(blob.as_slice()).read_to_end(&mut out).unwrap();
        out
    } else if media_type.ends_with("zstd") {
        zstd::decode_all(blob.as_slice()).unwrap()
    } else {
        blob
    };
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    archive
        .entries()
        .unwrap()
        .map(|entry| {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mode = entry.header().mode().unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            (path, mode, data)
        })
        .collect()
}

fn assert_disk(server: &Server, repository: &str, tag: &str, name: &str, expected: &[u8]) {
    let entries = stored_disk(server, repository, tag);
    assert_eq!(entries.len(), 2, "{repository}:{tag}: disk/ and one file");
    assert_eq!((entries[0].0.as_str(), entries[0].1), ("disk/", 0o755));
    assert_eq!((entries[1].0.as_str(), entries[1].1), (format!("disk/{name}").as_str(), 0o644));
    assert!(entries[1].2 == expected, "{repository}:{tag}: stored disk differs from the source");
}

#[test]
fn http_imports_are_stored_unpacked_and_pullable_by_skopeo_and_containerd() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = make_qcow2(&files, "disk.qcow2");
    let expected = std::fs::read(&qcow2).unwrap();
    for extension in ["gz", "xz", "zst"] {
        compress_file(&qcow2, extension);
    }
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));
    let registry = &server.address;

    // The layer digest comes from the registry's report (containerd checks
    // it against the config's diff_id below), or is also computed by the
    // importer and checked against that report (--verify-layer-digest).
    for (index, (name, compression, verify)) in [
        ("disk.qcow2", "none", false),
        ("disk.qcow2.gz", "gzip", false),
        ("disk.qcow2.xz", "zstd", true),
        ("disk.qcow2.zst", "none", true),
    ]
    .iter()
    .enumerate()
    {
        let tag = format!("uid-{index}");
        let mut flags = vec!["--layer-compression", compression];
        if *verify {
            flags.push("--verify-layer-digest");
        }
        let report = import_ok(&web.url("plain", name), &format!("{registry}/vi/vms/ubuntu:{tag}"), &flags);
        assert_eq!(report["source-image-format"], "qcow2", "{name}");
        assert_eq!(report["source-image-size"], expected.len() as u64, "{name}");
        assert_eq!(report["source-image-virtual-size"], 64u64 << 20, "{name}");
        assert_eq!(report["cdrom"], false);
        assert_disk(&server, "vi/vms/ubuntu", &tag, "disk.qcow2", &expected);
    }

    let inspected = run(Command::new(require_tool("skopeo")).args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{registry}/vi/vms/ubuntu:uid-1"),
    ]));
    let inspected: Value = serde_json::from_str(&inspected).unwrap();
    let labels = &inspected["Labels"];
    assert_eq!(labels["source-image-format"], "qcow2");
    assert_eq!(labels["source-image-size"], expected.len().to_string());
    assert_eq!(labels["source-image-virtual-size"], (64u64 << 20).to_string());
    assert_eq!(inspected["Architecture"], "amd64");

    let containerd = Containerd::start(&directory.path().join("containerd"));
    for tag in ["uid-0", "uid-1", "uid-2"] {
        pull_and_compare(
            &containerd,
            &format!("{registry}/vi/vms/ubuntu:{tag}"),
            &directory.path().join(format!("mount-{tag}")),
            &[("disk/disk.qcow2", &expected)],
        );
    }
}

#[test]
fn sources_that_misbehave_are_resumed_retried_or_followed() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = make_qcow2(&files, "disk.qcow2");
    let expected = std::fs::read(&qcow2).unwrap();
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));
    let sha256 = format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&expected)));
    for mode in ["cut", "flaky", "redirect", "chunked", "noranges"] {
        let destination = format!("{}/vi/vms/{mode}:uid", server.address);
        let report = import_ok(&web.url(mode, "disk.qcow2"), &destination, &["--checksum", &sha256]);
        assert_eq!(report["source-image-size"], expected.len() as u64, "{mode}");
        assert_disk(&server, &format!("vi/vms/{mode}"), "uid", "disk.qcow2", &expected);
    }
}

#[test]
fn failed_imports_say_why_and_tag_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = make_qcow2(&files, "disk.qcow2");
    let backed = files.join("backed.qcow2");
    run(Command::new(require_tool("qemu-img"))
        .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&qcow2)
        .arg(&backed));
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));
    let wrong = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(String, Vec<&str>, i32, &str, &str)> = vec![
        (web.url("plain", "disk.qcow2"), vec!["--checksum", &wrong], 1, "BadImageChecksum", "checksum of the downloaded bytes"),
        (web.url("plain", "nothere.qcow2"), vec![], 1, "SourceUnavailable", "answered HTTP 404"),
        (web.url("cutnoranges", "disk.qcow2"), vec![], 75, "SourceReadFailed", "does not support Range requests"),
        (web.url("plain", "backed.qcow2"), vec![], 1, "BadImage", "has a backing file"),
    ];
    for (index, (url, extra, code, reason, message)) in cases.into_iter().enumerate() {
        let report_file = directory.path().join(format!("report-{index}.json"));
        let mut arguments = extra.clone();
        let report_text = report_file.display().to_string();
        arguments.extend_from_slice(&["--report-file", &report_text]);
        let output = dvcr_import(&url, &format!("{}/vi/vms/failed:uid-{index}", server.address), &arguments);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{url}: {stderr}");
        assert!(stderr.contains(message), "{url}: expected {message:?} in {stderr}");
        let report: Value = serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
        assert_eq!(report["reason"], reason, "{url}");
        assert!(report["error-message"].as_str().unwrap().contains(message), "{url}");
    }
    assert!(tags(&server, "vi/vms/failed").is_empty(), "a failed import left a tag");
}

#[test]
fn progress_gauges_are_served_while_importing() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("slow.img"), pseudo_random(3 << 20, 5)).unwrap();
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));
    let metrics_port = common::free_port();
    let mut child = Command::new(DVCR)
        .args(["import", &web.url("slow", "slow.img"), &format!("{}/cvi/slow:uid", server.address)])
        .args(["--owner-uid", "1234-abcd", "--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let output = Command::new(require_tool("curl"))
            .args(["-s", &format!("http://127.0.0.1:{metrics_port}/metrics")])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("registry_progress{ownerUID=\"1234-abcd\"} ") {
                seen.push(value.parse::<f64>().unwrap());
            }
        }
        if text.contains("registry_average_speed{ownerUID=\"1234-abcd\"}") {
            assert!(text.contains("registry_current_speed{ownerUID=\"1234-abcd\"}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(child.wait().unwrap().success());
    assert!(seen.iter().any(|value| *value > 0.0 && *value < 100.0), "no progress between 0 and 100 seen: {seen:?}");
    assert!(seen.windows(2).all(|pair| pair[0] <= pair[1]), "progress went backwards: {seen:?}");
    assert!(seen.iter().all(|value| *value < 100.0), "100% before the image was stored: {seen:?}");
}

#[test]
fn local_files_standard_input_and_copies_within_the_registry() {
    let directory = tempfile::tempdir().unwrap();
    let qcow2 = make_qcow2(directory.path(), "local.qcow2");
    let expected = std::fs::read(&qcow2).unwrap();
    let server = Server::start(&directory.path().join("registry"));
    let registry = &server.address;
    import_ok(&qcow2.display().to_string(), &format!("{registry}/vi/vms/local:uid"), &[]);
    assert_disk(&server, "vi/vms/local", "uid", "local.qcow2", &expected);

    // --format raw: stored converted, as qemu-img converts it.
    let expected_raw = directory.path().join("expected.raw");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&expected_raw));
    let report = import_ok(&qcow2.display().to_string(), &format!("{registry}/vi/vms/raw:uid"), &["--format", "raw"]);
    assert_eq!(report["source-image-format"], "raw");
    assert_eq!(report["source-image-virtual-size"], 64u64 << 20);
    assert_disk(&server, "vi/vms/raw", "uid", "local.img", &std::fs::read(&expected_raw).unwrap());

    let xz = compress_file(&qcow2, "xz");
    let output = Command::new(DVCR)
        .args(["import", "-", &format!("{registry}/vd/vms/piped:uid")])
        .stdin(std::fs::File::open(&xz).unwrap())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_disk(&server, "vd/vms/piped", "uid", "disk.img", &expected);

    let report = import_ok(
        &format!("docker://{registry}/vi/vms/local:uid"),
        &format!("{registry}/cvi/copied:uid2"),
        &[],
    );
    assert_eq!(report["source-image-format"], "qcow2");
    assert_eq!(report["source-image-size"], expected.len() as u64);
    assert_disk(&server, "cvi/copied", "uid2", "local.qcow2", &expected);
    assert!(server.log().contains("blob mounted"), "the copy moved data instead of mounting");
}

/// `--source-format raw|iso` stores a file as it is, never unwrapped or
/// probed (how the controller stores an image kept in a PVC, whose raw
/// disk may start with anything its guest wrote), and `--source-length`
/// reads only the image's length of a larger device.
#[test]
fn known_formats_are_stored_unprobed_and_cut_to_their_length() {
    let directory = tempfile::tempdir().unwrap();
    let qcow2 = make_qcow2(directory.path(), "looks-like.qcow2");
    let expected = std::fs::read(&qcow2).unwrap();
    let server = Server::start(&directory.path().join("registry"));
    let registry = &server.address;

    let report = import_ok(&qcow2.display().to_string(), &format!("{registry}/vi/vms/raw:uid"), &["--source-format", "raw"]);
    assert_eq!(report["source-image-format"], "raw");
    assert_eq!(report["source-image-virtual-size"], expected.len() as u64, "a raw disk is as large as it is");
    assert_disk(&server, "vi/vms/raw", "uid", "looks-like.qcow2", &expected);

    // A volume larger than the image: only the image is stored.
    let volume = directory.path().join("volume");
    std::fs::copy(&qcow2, &volume).unwrap();
    std::fs::OpenOptions::new().append(true).open(&volume).unwrap().write_all(&pseudo_random(1 << 20, 13)).unwrap();
    let length = expected.len().to_string();
    let report = import_ok(
        &volume.display().to_string(),
        &format!("{registry}/vi/vms/cut:uid"),
        &["--source-format", "iso", "--source-length", &length],
    );
    assert_eq!((report["source-image-format"].as_str(), report["source-image-virtual-size"].as_u64()), (Some("iso"), Some(expected.len() as u64)));
    assert_disk(&server, "vi/vms/cut", "uid", "volume", &expected);

    let too_long = (expected.len() as u64 + (2 << 20)).to_string();
    let output = dvcr_import(&volume.display().to_string(), &format!("{registry}/vi/vms/long:uid"), &["--source-length", &too_long]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains(&format!("--source-length {too_long} is longer than")));
    let output = Command::new(DVCR)
        .args(["import", "-", &format!("{registry}/vi/vms/piped:uid"), "--source-format", "raw"])
        .stdin(std::fs::File::open(&qcow2).unwrap())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs a source of known length"));
    for repository in ["vi/vms/long", "vi/vms/piped"] {
        assert!(tags(&server, repository).is_empty(), "{repository}: a refused import tagged something");
    }
}

/// A boot sector that prints `DVCR-BOOT-OK` on the first serial port and
/// halts (16-bit real mode, hand-assembled; see the comments).
fn boot_sector() -> Vec<u8> {
    let mut sector = vec![
        0xfa, // cli
        0x31, 0xc0, // xor ax, ax
        0x8e, 0xd8, // mov ds, ax
        0xfc, // cld
        0xba, 0xf8, 0x03, // mov dx, 0x3f8 (COM1)
        0xbe, 0x17, 0x7c, // mov si, 0x7c17 (the message)
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xf4, // done: hlt
        0xeb, 0xfd, // jmp done
    ];
    sector.extend_from_slice(b"DVCR-BOOT-OK\r\n\0");
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xaa]);
    sector
}

#[test]
fn an_imported_image_pulled_by_containerd_boots_in_qemu() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let raw = files.join("boot.raw");
    let mut disk = boot_sector();
    disk.resize(1 << 20, 0);
    std::fs::write(&raw, disk).unwrap();
    let qcow2 = files.join("boot.qcow2");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));
    let reference = format!("{}/vi/vms/bootable:uid", server.address);
    import_ok(&web.url("plain", "boot.qcow2"), &reference, &[]);

    let containerd = Containerd::start(&directory.path().join("containerd"));
    containerd.ctr(&["images", "pull", "--plain-http", "--snapshotter", "native", &reference]);
    let mount_point = directory.path().join("mount");
    std::fs::create_dir_all(&mount_point).unwrap();
    let mount_text = mount_point.display().to_string();
    containerd.ctr(&["images", "mount", "--snapshotter", "native", &reference, &mount_text]);
    let pulled = mount_point.join("disk/boot.qcow2");
    assert!(pulled.is_file(), "the pulled image has no disk/boot.qcow2");

    let serial = directory.path().join("serial.log");
    let mut qemu = Command::new(require_tool("qemu-system-x86_64"))
        .args(["-machine", "pc", "-accel", "tcg", "-m", "32", "-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=ide,snapshot=on", pulled.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut booted = false;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&serial).is_ok_and(|text| text.contains("DVCR-BOOT-OK")) {
            booted = true;
            break;
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            panic!("qemu exited with {status} before booting");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.kill();
    let output = qemu.wait_with_output().unwrap();
    containerd.ctr(&["images", "unmount", "--rm", &mount_text]);
    assert!(
        booted,
        "no boot marker on the serial console within 60 s; serial: {:?}; qemu: {}",
        std::fs::read_to_string(&serial).unwrap_or_default(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `dvcr convert` reading a URL with Range requests, and the disk inside an
/// image in the registry in place, agrees with qemu-img on the local file.
#[test]
fn convert_reads_urls_and_registry_images_in_place() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = make_qcow2(&files, "disk.qcow2");
    let compressed = files.join("compressed.qcow2");
    run(Command::new(require_tool("qemu-img"))
        .args(["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd"])
        .arg(&qcow2)
        .arg(&compressed));
    let expected = directory.path().join("expected.raw");
    run(Command::new(require_tool("qemu-img")).args(["convert", "-O", "raw"]).arg(&qcow2).arg(&expected));
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));

    let convert = |source: &str, name: &str| -> (Output, PathBuf) {
        let destination = directory.path().join(name);
        let output = Command::new(DVCR).args(["convert", source]).arg(&destination).output().unwrap();
        (output, destination)
    };
    for name in ["disk.qcow2", "compressed.qcow2"] {
        let (output, converted) = convert(&web.url("plain", name), &format!("{name}.http.raw"));
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        run(Command::new(require_tool("cmp")).arg(&expected).arg(&converted));
    }
    let (output, converted) = convert(&web.url("noranges", "disk.qcow2"), "noranges.raw");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not support Range requests"));
    assert!(!converted.exists());

    // With --metrics-listen, the reads of the source are the importer's gauges
    // (the provisioner's progress); a slow server makes them observable midway.
    let port = common::free_port();
    let destination = directory.path().join("slow.raw");
    let mut converting = Command::new(DVCR)
        .args(["convert", &web.url("slow", "disk.qcow2")])
        .arg(&destination)
        .args(["--owner-uid", "disk-1", "--metrics-listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen: Vec<f64> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while converting.try_wait().unwrap().is_none() && Instant::now() < deadline {
        let page = Command::new(require_tool("curl"))
            .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .unwrap();
        let page = String::from_utf8_lossy(&page.stdout).to_string();
        let value = page
            .lines()
            .find_map(|line| line.strip_prefix("registry_progress{ownerUID=\"disk-1\"} "))
            .and_then(|value| value.trim().parse::<f64>().ok());
        seen.extend(value);
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = converting.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    run(Command::new(require_tool("cmp")).arg(&expected).arg(&destination));
    assert!(seen.windows(2).all(|pair| pair[0] <= pair[1]), "progress went back: {seen:?}");
    assert!(seen.iter().any(|percent| *percent > 0.0 && *percent < 100.0), "no progress midway: {seen:?}");
    // A local source (a PVC a provisioner clones) reports its reads too;
    // standard input cannot (no size, no offsets): refused, not ignored.
    let local_destination = directory.path().join("local-metrics.raw");
    let local = Command::new(DVCR)
        .args(["convert", &format!("{}/disk.qcow2", files.display())])
        .arg(&local_destination)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    run(Command::new(require_tool("cmp")).arg(&expected).arg(&local_destination));
    let piped = Command::new(DVCR)
        .args(["convert", "-"])
        .arg(directory.path().join("stdin-metrics.raw"))
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdin(std::fs::File::open(format!("{}/disk.qcow2", files.display())).unwrap())
        .output()
        .unwrap();
    assert_eq!(piped.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&piped.stderr).contains("not standard input"));

    let reference = format!("{}/vi/vms/inplace:uid", server.address);
    import_ok(&web.url("plain", "compressed.qcow2"), &reference, &[]);
    let (output, converted) = convert(&format!("docker://{reference}"), "registry.raw");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    run(Command::new(require_tool("cmp")).arg(&expected).arg(&converted));

    let gzip_reference = format!("{}/vi/vms/gzipped:uid", server.address);
    import_ok(&web.url("plain", "disk.qcow2"), &gzip_reference, &["--layer-compression", "gzip"]);
    let (output, _) = convert(&format!("docker://{gzip_reference}"), "gzipped.raw");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("only an uncompressed layer can be read in place"));
}

/// A tar entry whose name is written raw, so that hostile names (`..`,
/// absolute paths) can be made; `link` makes a symbolic link.
fn raw_tar_entry(name: &str, content: &[u8], link: Option<&str>) -> Vec<u8> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_mode(0o644);
    header.set_mtime(0);
    match link {
        Some(target) => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_link_name(target).unwrap();
        }
        None => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(content.len() as u64);
        }
    }
    header.set_cksum();
    let mut entry = header.as_bytes().to_vec();
    entry.extend_from_slice(content);
    entry.resize(entry.len().div_ceil(512) * 512, 0);
    entry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_images_in_another_registry_are_pulled_and_hostile_ones_refused() {
    let directory = tempfile::tempdir().unwrap();
    let qcow2 = make_qcow2(directory.path(), "vm.qcow2");
    let disk = std::fs::read(&qcow2).unwrap();
    let other = Server::start(&directory.path().join("other"));
    let ours = Server::start(&directory.path().join("ours"));
    let client = reqwest::Client::new();

    // Two gzip layers: an unrelated file first, the disk in the second.
    let first = image::tar(&[("etc", 0o755, None), ("etc/os-release", 0o644, Some(b"ID=test\n".as_slice()))]);
    let second = image::tar(&[("disk", 0o755, None), ("disk/vm.qcow2", 0o644, Some(disk.as_slice()))]);
    let container = image::image(vec![first, second], true, false, serde_json::json!({}));
    common::push_image(&client, &other, "images/vm", "v1", &container).await;
    let source = format!("docker://{}/images/vm:v1", other.address);
    let destination = format!("{}/vi/vms/pulled:uid", ours.address);
    let (source_text, destination_text) = (source.clone(), destination.clone());
    let report = tokio::task::spawn_blocking(move || import_ok(&source_text, &destination_text, &[])).await.unwrap();
    assert_eq!(report["source-image-format"], "qcow2");
    assert_eq!(report["source-image-size"], disk.len() as u64);
    assert_disk(&ours, "vi/vms/pulled", "uid", "vm.qcow2", &disk);

    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", raw_tar_entry("disk/../../etc/passwd", b"x", None), "with a `..` component"),
        ("absolute", raw_tar_entry("/disk/vm.img", b"x", None), "with an absolute path"),
        ("link", raw_tar_entry("disk/vm.img", b"", Some("/etc/shadow")), "a link \"disk/vm.img\" under disk/"),
    ];
    for (name, mut layer, message) in hostile {
        layer.extend_from_slice(&[0u8; 1024]);
        let container = image::image(vec![layer], true, true, serde_json::json!({}));
        common::push_image(&client, &other, &format!("images/{name}"), "v1", &container).await;
        let source = format!("docker://{}/images/{name}:v1", other.address);
        let destination = format!("{}/vi/vms/{name}:uid", ours.address);
        let output = tokio::task::spawn_blocking(move || dvcr_import(&source, &destination, &[])).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(message), "{name}: expected {message:?} in {stderr}");
        assert!(tags(&ours, &format!("vi/vms/{name}")).is_empty(), "{name}: tagged");
    }
}

/// An xz source whose index can be read first (a Range request, or the end
/// of a local file) streams straight into the registry: with a scratch
/// folder that does not exist it still imports, where a gzip source (whose
/// unpacked length is unknown until its end) needs the scratch folder.
#[test]
fn xz_sources_stream_without_a_scratch_copy() {
    let directory = tempfile::tempdir().unwrap();
    let files = directory.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let qcow2 = make_qcow2(&files, "disk.qcow2");
    let expected = std::fs::read(&qcow2).unwrap();
    let xz = compress_file(&qcow2, "xz");
    compress_file(&qcow2, "gz");
    let web = FileServer::start(&files);
    let server = Server::start(&directory.path().join("registry"));
    let no_scratch = ["--scratch-dir", "/nonexistent/dvcr-scratch"];

    let report = import_ok(&web.url("plain", "disk.qcow2.xz"), &format!("{}/vi/vms/xz:uid", server.address), &no_scratch);
    assert_eq!(report["source-image-size"], expected.len() as u64);
    assert_disk(&server, "vi/vms/xz", "uid", "disk.qcow2", &expected);
    import_ok(&xz.display().to_string(), &format!("{}/vi/vms/xzfile:uid", server.address), &no_scratch);
    assert_disk(&server, "vi/vms/xzfile", "uid", "disk.qcow2", &expected);

    for (mode, name) in [("plain", "disk.qcow2.gz"), ("noranges", "disk.qcow2.xz")] {
        let output = dvcr_import(&web.url(mode, name), &format!("{}/vi/vms/spooled:uid", server.address), &no_scratch);
        assert_eq!(output.status.code(), Some(1), "{mode}/{name}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("cannot use the scratch folder /nonexistent/dvcr-scratch"),
            "{mode}/{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
