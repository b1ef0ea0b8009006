//! Several `dvcr serve` processes on one S3 bucket (Garage on 127.0.0.1)
//! behave as one registry: pushes through one are pullable through another
//! at once, uploads continue on another replica, and a replica that dies
//! mid-push leaves nothing visible and nothing that collection cannot free.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::image::{self, pseudo_random, write_oci_layout};
use common::storage::{configure, force_s3, StoredView};
use common::{free_port, get_manifest, push_image, run, sha256_digest, skopeo_copy, Server, DVCR};
use reqwest::{Client, StatusCode};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_through_one_replica_is_pullable_through_another_at_once() {
    force_s3();
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("bucket");
    let (first, second) = (Server::start(&storage), Server::start(&storage));
    // Layers above the first part size, so they go up as multipart uploads.
    let image = image::image(
        vec![
            image::tar(&[("disk/disk.img", 0o644, Some(&pseudo_random(19 << 20, 7)))]),
            image::tar(&[("small", 0o644, Some(&pseudo_random(1000, 8)))]),
        ],
        // skopeo pushes uncompressed layers gzipped: give it gzipped ones.
        true,
        false,
        serde_json::json!({}),
    );
    let source = directory.path().join("source");
    write_oci_layout(&source, "v1", &image);
    skopeo_copy(
        &format!("oci:{}:v1", source.display()),
        &format!("docker://{}/vi/ns/shared:v1", first.address),
    );

    let back = directory.path().join("back");
    skopeo_copy(
        &format!("docker://{}/vi/ns/shared:v1", second.address),
        &format!("oci:{}:v1", back.display()),
    );
    let index: Value = serde_json::from_slice(&std::fs::read(back.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"].as_str().unwrap(), image.digest());
    for blob in image.blobs() {
        let digest = sha256_digest(blob);
        let copied = std::fs::read(back.join("blobs/sha256").join(&digest["sha256:".len()..])).unwrap();
        assert!(
            copied == blob,
            "blob {digest} differs when pulled through the other replica"
        );
    }
    // A tag deleted through the second replica is gone from the first.
    let client = Client::new();
    let deleted = client
        .delete(second.url(&format!("/v2/vi/ns/shared/manifests/{}", image.digest())))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let gone = client
        .get(first.url("/v2/vi/ns/shared/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert!(
        StoredView::of(&storage).incomplete_uploads().is_empty(),
        "every multipart upload was completed"
    );
}

/// A replica reads a tag together with the manifest it named last time;
/// that guess must never outlive a change made through another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_or_removed_through_one_replica_is_seen_through_another_at_once() {
    force_s3();
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("bucket");
    let (writer, reader) = (Server::start(&storage), Server::start(&storage));
    let client = Client::new();
    let images: Vec<_> = (0..3).map(|seed| image::disk_image("disk.img", &pseudo_random(5000, seed))).collect();
    async fn read_tag(client: &Client, server: &Server) -> (StatusCode, Option<String>, bytes::Bytes) {
        let response = get_manifest(client, server, "vi/ns/moving", "latest").await.unwrap();
        let status = response.status();
        let digest = response.headers().get("Docker-Content-Digest").map(|value| value.to_str().unwrap().to_string());
        (status, digest, response.bytes().await.unwrap())
    }
    for image in &images {
        push_image(&client, &writer, "vi/ns/moving", "latest", image).await;
        // Twice through the reader: the second read goes by its guess.
        for _ in 0..2 {
            let (status, digest, body) = read_tag(&client, &reader).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(digest.as_deref(), Some(image.digest().as_str()), "the reader sees where the tag points now");
            assert!(body == image.manifest, "and that manifest's bytes");
        }
    }
    // The tag back on an earlier manifest.
    push_image(&client, &writer, "vi/ns/moving", "latest", &images[0]).await;
    assert_eq!(read_tag(&client, &reader).await.1.as_deref(), Some(images[0].digest().as_str()));
    // The manifest the tag names deleted: the reader's guess is gone too.
    let deleted = client
        .delete(writer.url(&format!("/v2/vi/ns/moving/manifests/{}", images[0].digest())))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    assert_eq!(read_tag(&client, &reader).await.0, StatusCode::NOT_FOUND);
    // Pushed again under the tag, and readable by digest as well.
    push_image(&client, &writer, "vi/ns/moving", "latest", &images[1]).await;
    assert_eq!(read_tag(&client, &reader).await.1.as_deref(), Some(images[1].digest().as_str()));
    let by_digest = get_manifest(&client, &reader, "vi/ns/moving", &images[2].digest()).await.unwrap();
    assert_eq!(by_digest.status(), StatusCode::OK, "an untagged manifest stays readable by digest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_continues_on_another_replica() {
    force_s3();
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("bucket");
    let (first, second) = (Server::start(&storage), Server::start(&storage));
    let client = Client::new();
    let content = pseudo_random((10 << 20) + (7 << 20) + (1 << 20), 11);
    let digest = sha256_digest(&content);
    let (one, two) = (10 << 20, 17 << 20);

    let started = client
        .post(first.url("/v2/vd/ns/disk/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::ACCEPTED);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let on = |server: &Server| {
        if location.starts_with("http") {
            location.replacen(
                &format!("http://{}", first.address),
                &format!("http://{}", server.address),
                1,
            )
        } else {
            server.url(&location)
        }
    };
    let patch = |server: &Server, range: std::ops::Range<usize>| {
        client
            .patch(on(server))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{}-{}", range.start, range.end - 1))
            .body(content[range].to_vec())
            .send()
    };
    let answer = patch(&first, 0..one).await.unwrap();
    assert_eq!(answer.status(), StatusCode::ACCEPTED, "{:?}", answer.text().await);
    let answer = patch(&second, one..two).await.unwrap();
    assert_eq!(answer.status(), StatusCode::ACCEPTED, "{:?}", answer.text().await);
    assert_eq!(answer.headers()["range"], format!("0-{}", two - 1).as_str());
    // The first replica sees what the second received.
    let status = client.get(on(&first)).send().await.unwrap();
    assert_eq!(status.status(), StatusCode::NO_CONTENT);
    assert_eq!(status.headers()["range"], format!("0-{}", two - 1).as_str());

    let finish = format!(
        "{}{}digest={digest}",
        on(&second),
        if location.contains('?') { "&" } else { "?" }
    );
    let answer = client
        .put(finish)
        .header("Content-Range", format!("{two}-{}", content.len() - 1))
        .body(content[two..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::CREATED, "{:?}", answer.text().await);
    let pulled = client
        .get(first.url(&format!("/v2/vd/ns/disk/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(pulled.status(), StatusCode::OK);
    assert!(
        pulled.bytes().await.unwrap() == content,
        "the blob read through the first replica differs"
    );
    assert!(StoredView::of(&storage).incomplete_uploads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_push_leaves_nothing_visible_and_collection_frees_its_parts() {
    force_s3();
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("bucket");
    let mut dying = Server::start(&storage);
    let surviving = Server::start_free(&storage, &[]);
    let client = Client::new();
    let content = pseudo_random(48 << 20, 21);
    let digest = sha256_digest(&content);

    // A monolithic push killed once more than two parts went up.
    let sent = Arc::new(AtomicU64::new(0));
    let body = {
        let (content, sent) = (content.clone(), sent.clone());
        futures::stream::iter((0..content.len()).step_by(1 << 20).map(move |start| {
            let chunk = content[start..(start + (1 << 20)).min(content.len())].to_vec();
            sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            Ok::<_, std::io::Error>(chunk)
        }))
    };
    let push = tokio::spawn(
        client
            .post(dying.url(&format!("/v2/vd/ns/big/blobs/uploads/?digest={digest}")))
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    let started = Instant::now();
    let stored = StoredView::of(&storage);
    while stored.incomplete_uploads().is_empty() || sent.load(Ordering::SeqCst) < 30 << 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "the push never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    dying.kill9();
    assert!(push.await.unwrap().is_err(), "a killed replica cannot have answered");

    let response = client
        .get(surviving.url(&format!("/v2/vd/ns/big/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "a half-pushed blob is visible"
    );
    assert_eq!(
        stored.incomplete_uploads().len(),
        1,
        "the dead replica's parts are still in the bucket"
    );

    // A collection frees them: the upload is idle, its parts are aborted.
    let mut command = Command::new(DVCR);
    command.arg("gc");
    configure(&mut command, &storage);
    let report: Value = serde_json::from_str(&run(command.args(["--gc-upload-max-age", "0s"]))).unwrap();
    assert_eq!(report["uploads-removed"].as_u64(), Some(1), "{report}");
    assert!(
        stored.incomplete_uploads().is_empty(),
        "collection left the dead upload's parts"
    );

    // The surviving replica takes the same push whole.
    let response = client
        .post(surviving.url(&format!("/v2/vd/ns/big/blobs/uploads/?digest={digest}")))
        .body(content.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let pulled = client
        .get(surviving.url(&format!("/v2/vd/ns/big/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert!(pulled.bytes().await.unwrap() == content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_answers_late_is_waited_for_and_one_that_never_does_stops_the_server() {
    force_s3();
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("bucket");
    let serve = |port: u16| {
        let mut command = Command::new(DVCR);
        command.args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
        configure(&mut command, &storage);
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        command
    };

    // Refused throughout: the server gives up, naming the bucket and why.
    common::storage::break_storage(&storage, true);
    let started = Instant::now();
    let output = serve(free_port()).output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(log.contains("does not answer yet; trying again"), "{log}");
    assert!(log.contains("cannot use the s3 bucket dvcr-") && log.contains("(6 attempts)"), "{log}");
    assert!(started.elapsed() < Duration::from_secs(60), "gave up after {:?}", started.elapsed());

    // Refused for the first seconds only: the server waits and then serves.
    let port = free_port();
    let mut child = serve(port).stderr(std::process::Stdio::null()).spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    common::storage::break_storage(&storage, false);
    let client = Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answered = loop {
        if let Ok(response) = client.get(format!("http://127.0.0.1:{port}/v2/")).send().await {
            break response.status();
        }
        assert!(child.try_wait().unwrap().is_none(), "the server stopped although the bucket came back");
        assert!(Instant::now() < deadline, "the server did not start within 30 s of the bucket coming back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answered, StatusCode::OK);
    child.kill().unwrap();
    let _ = child.wait();
}
