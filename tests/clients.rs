//! The registry with the real clients people use: skopeo and containerd.

mod common;

use std::path::Path;
use std::process::Command;

use common::image::{self, pseudo_random, write_oci_layout};
use common::containerd::{pull_and_compare, Containerd};
use common::{push_image, require_tool, run, skopeo_copy, Server};
use serde_json::Value;

fn layout_manifest_digest(layout: &Path) -> String {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}


#[test]
fn skopeo_copies_in_and_out_identically_and_mounts_across_repositories() {
    require_tool("skopeo");
    let directory = tempfile::tempdir().unwrap();
    let server = Server::start(&directory.path().join("data"));
    let image = image::multi_layer_image(42);
    let source = directory.path().join("source");
    write_oci_layout(&source, "v1", &image);

    let first = format!("docker://{}/vi/ns/first:v1", server.address);
    skopeo_copy(&format!("oci:{}:v1", source.display()), &first);

    let back = directory.path().join("back");
    skopeo_copy(&first, &format!("oci:{}:v1", back.display()));
    assert_eq!(layout_manifest_digest(&back), image.digest(), "manifest digest changed on the round trip");
    for blob in image.blobs() {
        let digest = common::sha256_digest(blob);
        let copied = std::fs::read(back.join("blobs/sha256").join(&digest["sha256:".len()..])).unwrap();
        assert_eq!(copied, blob, "blob {digest} differs after the round trip");
    }

    // A second copy of the same image into another repository: skopeo knows
    // the blobs are in vi/ns/first and mounts them instead of uploading.
    let before = server.log().matches("blob mounted").count();
    skopeo_copy(&format!("oci:{}:v1", source.display()), &format!("docker://{}/vi/ns/second:v1", server.address));
    let log = server.log();
    let mounts: Vec<&str> = log.lines().filter(|line| line.contains("blob mounted")).skip(before).collect();
    // skopeo uploads the (small) config again and mounts every layer.
    assert_eq!(mounts.len(), image.layers.len(), "every layer should be mounted; log:\n{log}");
    for (_, layer) in &image.layers {
        let digest = common::sha256_digest(layer);
        assert!(
            mounts.iter().any(|line| line.contains(&digest) && line.contains("from=vi/ns/first") && line.contains("repository=vi/ns/second")),
            "layer {digest} was not mounted; log:\n{log}"
        );
    }

    let raw = run(Command::new(require_tool("skopeo")).args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{}/vi/ns/second:v1", server.address),
    ]));
    assert_eq!(raw.trim_end().as_bytes(), image.manifest.as_slice(), "stored manifest differs");
    let tags = run(Command::new(require_tool("skopeo")).args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/vi/ns/second", server.address),
    ]));
    assert!(tags.contains("\"v1\""), "{tags}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_vm_images_and_the_disk_file_is_identical() {
    let directory = tempfile::tempdir().unwrap();
    let server = Server::start(&directory.path().join("data"));
    let containerd = Containerd::start(&directory.path().join("containerd"));
    let client = reqwest::Client::new();

    // The DVCR artifact: Docker schema 2, one uncompressed layer, disk/<file>.
    let disk = pseudo_random(9 << 20, 77);
    let artifact = image::disk_image("ubuntu.qcow2", &disk);
    push_image(&client, &server, "vi/vms/ubuntu", "a1b2c3", &artifact).await;
    pull_and_compare(
        &containerd,
        &format!("{}/vi/vms/ubuntu:a1b2c3", server.address),
        &directory.path().join("mnt1"),
        &[("disk/ubuntu.qcow2", &disk)],
    );

    // An OCI image with gzip layers, pulled by digest.
    let oci = image::multi_layer_image(78);
    push_image(&client, &server, "cvi/tools", "v1", &oci).await;
    let random = pseudo_random(3 << 20, 78);
    pull_and_compare(
        &containerd,
        &format!("{}/cvi/tools@{}", server.address, oci.digest()),
        &directory.path().join("mnt2"),
        &[("etc/hostname", b"dvcr-test\n"), ("data/random.bin", &random)],
    );
}
