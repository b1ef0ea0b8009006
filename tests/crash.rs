//! `kill -9` at the worst moments: nothing partial may ever be visible
//! after a restart, and an interrupted upload can be resumed.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::image::{self, pseudo_random};
use common::storage::StoredView;
use common::{push_image, sha256_digest, Server};
use futures::StreamExt;
use reqwest::Client;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const CHUNK: usize = 1 << 20;

/// A body of `chunks` pseudo-random MiB, counting what was handed to the
/// client and flagging when the last chunk went out.
fn counted_body(chunks: usize, seed: u64, sent: Arc<AtomicU64>, finished: Arc<AtomicBool>) -> reqwest::Body {
    let stream = futures::stream::iter(0..chunks).map(move |index| {
        let chunk = Bytes::from(pseudo_random(CHUNK, seed + index as u64));
        sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if index + 1 == chunks {
            finished.store(true, Ordering::SeqCst);
        }
        Ok::<_, std::io::Error>(chunk)
    });
    reqwest::Body::wrap_stream(stream)
}

fn body_digest(chunks: usize, seed: u64) -> String {
    let mut hasher = Sha256::new();
    for index in 0..chunks {
        hasher.update(pseudo_random(CHUNK, seed + index as u64));
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// Checks the whole store on disk: every blob file hashes to its name, and
/// every tag leads to a stored manifest whose blobs are all linked and
/// stored. Returns (blobs, tags).
fn verify_store(storage: &Path) -> (usize, usize) {
    let stored = StoredView::of(storage);
    let root = "docker/registry/v2";
    let mut blobs = 0;
    for file in stored.files(&format!("{root}/blobs/sha256")) {
        // A kill between creating a blob's folder and moving its data into
        // it leaves a folder without data: not a blob, invisible through
        // the API, and garbage for collection.
        let Some(name) = file.strip_suffix("/data").and_then(|folder| folder.rsplit('/').next()) else { continue };
        let Some(data) = stored.read(&file) else { continue };
        assert_eq!(sha256_digest(&data), format!("sha256:{name}"), "a partial or corrupt blob is stored");
        blobs += 1;
    }
    let blob_path = |digest: &str| {
        let hex = &digest["sha256:".len()..];
        format!("{root}/blobs/sha256/{}/{hex}/data", &hex[..2])
    };
    let mut tags = 0;
    let mut pending = vec![format!("{root}/repositories")];
    while let Some(folder) = pending.pop() {
        for name in stored.list(&folder) {
            let entry = format!("{folder}/{name}");
            if name != "_manifests" {
                if !name.starts_with('_') {
                    pending.push(entry);
                }
                continue;
            }
            for tag in stored.list(&format!("{entry}/tags")) {
                let Some(digest) = stored.read(&format!("{entry}/tags/{tag}/current/link")) else { continue };
                let digest = String::from_utf8(digest).expect("a link is text");
                let hex = &digest["sha256:".len()..];
                assert!(
                    stored.exists(&format!("{entry}/revisions/sha256/{hex}/link")),
                    "tag {tag:?} points to a manifest the repository does not have"
                );
                let manifest = stored.read(&blob_path(&digest)).expect("a tagged manifest is stored");
                let manifest: Value = serde_json::from_slice(&manifest).unwrap();
                let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
                for descriptor in std::iter::once(&manifest["config"]).chain(layers.iter()) {
                    let blob = descriptor["digest"].as_str().unwrap();
                    assert!(stored.exists(&blob_path(blob)), "tagged manifest refers to missing blob {blob}");
                    let layer_link = format!("{folder}/_layers/sha256/{}/link", &blob["sha256:".len()..]);
                    assert!(stored.exists(&layer_link), "tagged manifest refers to unlinked blob {blob}");
                }
                tags += 1;
            }
        }
    }
    (blobs, tags)
}

async fn wait_until(deadline: Duration, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < deadline, "condition not reached within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_a_large_upload_leaves_nothing_visible_and_the_upload_resumes() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let client = Client::new();
    let chunks = 256;
    let digest = body_digest(chunks, 1);

    // A monolithic upload killed a quarter of the way.
    let mut server = Server::start(&storage);
    let sent = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let request = client
        .post(server.url(&format!("/v2/vi/ns/big/blobs/uploads/?digest={digest}")))
        .body(counted_body(chunks, 1, sent.clone(), finished.clone()))
        .send();
    let upload = tokio::spawn(request);
    wait_until(Duration::from_secs(60), || sent.load(Ordering::SeqCst) >= 64 << 20).await;
    server.kill9();
    assert!(upload.await.unwrap().is_err(), "the killed server cannot have answered");

    // A chunked upload killed in the middle of a PATCH.
    let server = Server::start(&storage);
    let response = client.post(server.url("/v2/vi/ns/big/blobs/uploads/")).send().await.unwrap();
    let location = response.headers()["Location"].to_str().unwrap().to_string();
    let mut server = server;
    let sent = Arc::new(AtomicU64::new(0));
    let patch = client
        .patch(server.url(&location))
        .body(counted_body(chunks, 1, sent.clone(), finished.clone()))
        .send();
    let upload = tokio::spawn(patch);
    wait_until(Duration::from_secs(60), || sent.load(Ordering::SeqCst) >= 100 << 20).await;
    server.kill9();
    let _ = upload.await;

    let server = Server::start(&storage);
    let response = client.head(server.url(&format!("/v2/vi/ns/big/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(response.status(), 404, "a partial blob is visible");
    assert_eq!(verify_store(&storage), (0, 0));

    // The chunked upload resumes from what the registry says it has.
    let response = client.get(server.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let range = response.headers()["Range"].to_str().unwrap().to_string();
    let end: usize = range.trim_start_matches("0-").parse().unwrap();
    let have = if end == 0 { 0 } else { end + 1 };
    assert!(have as u64 <= sent.load(Ordering::SeqCst), "the registry claims bytes it was never sent");
    let mut rest = Vec::new();
    for index in have / CHUNK..chunks {
        rest.extend_from_slice(&pseudo_random(CHUNK, 1 + index as u64));
    }
    let rest = rest.split_off(have % CHUNK);
    let response = client
        .put(server.url(&format!("{location}?digest={digest}")))
        .header("Content-Range", format!("{have}-{}", chunks * CHUNK - 1))
        .body(rest)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "resumed upload after a crash: {:?}", response.text().await);
    let response = client.get(server.url(&format!("/v2/vi/ns/big/blobs/{digest}"))).send().await.unwrap();
    let mut hasher = Sha256::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        hasher.update(chunk.unwrap());
    }
    assert_eq!(format!("sha256:{}", hex::encode(hasher.finalize())), digest);
    assert_eq!(verify_store(&storage), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_commit_leaves_a_blob_whole_or_absent() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let client = Client::new();
    let chunks = 48;
    let (mut whole, mut absent) = (0, 0);
    // Delays after the last byte landed in the upload file: from inside the
    // fsync/hash/rename to well after the commit.
    let delays_ms = [0u64, 1, 2, 4, 8, 16, 50, 400];
    for (round, delay) in delays_ms.into_iter().enumerate() {
        let seed = 1000 * (round as u64 + 1);
        let digest = body_digest(chunks, seed);
        let mut server = Server::start(&storage);
        let sent = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let request = client
            .post(server.url(&format!("/v2/vd/ns/disk/blobs/uploads/?digest={digest}")))
            .body(counted_body(chunks, seed, sent, finished.clone()))
            .send();
        let upload = tokio::spawn(request);
        let uploads = "docker/registry/v2/repositories/vd/ns/disk/_uploads";
        let total = (chunks * CHUNK) as u64;
        let stored = StoredView::of(&storage);
        // On S3 the data becomes visible only when the upload pauses or
        // ends, so there the wait ends when the request does.
        let all_written = || {
            stored
                .list(uploads)
                .iter()
                .any(|upload| stored.size(&format!("{uploads}/{upload}/data")) == Some(total))
        };
        wait_until(Duration::from_secs(60), || all_written() || upload.is_finished()).await;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill9();
        let _ = upload.await;

        let server = Server::start(&storage);
        let response = client.get(server.url(&format!("/v2/vd/ns/disk/blobs/{digest}"))).send().await.unwrap();
        match response.status().as_u16() {
            200 => {
                let content = response.bytes().await.unwrap();
                assert_eq!(sha256_digest(&content), digest, "round {round}: visible blob is not whole");
                whole += 1;
            }
            404 => absent += 1,
            other => panic!("round {round}: unexpected status {other}"),
        }
        verify_store(&storage);
    }
    eprintln!("after kill -9 during commit: {whole} blobs whole, {absent} absent");
    assert_eq!(whole + absent, delays_ms.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_manifest_and_tag_writes_never_leaves_a_broken_tag() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let client = Client::new();
    for round in 0..6u64 {
        let mut server = Server::start(&storage);
        let address = server.address.clone();
        let pushing = {
            let client = client.clone();
            tokio::spawn(async move {
                for index in 0..10_000u64 {
                    let disk = pseudo_random(64 << 10, round * 10_000 + index);
                    let image = image::disk_image("disk.img", &disk);
                    for blob in image.blobs() {
                        let url = format!(
                            "http://{address}/v2/vi/ns/img{round}/blobs/uploads/?digest={}",
                            sha256_digest(blob)
                        );
                        if client.post(url).body(blob.to_vec()).send().await.is_err() {
                            return;
                        }
                    }
                    let url = format!("http://{address}/v2/vi/ns/img{round}/manifests/t{index}");
                    let sent = client
                        .put(url)
                        .header("Content-Type", &image.manifest_media_type)
                        .body(image.manifest.clone())
                        .send()
                        .await;
                    if sent.is_err() {
                        return;
                    }
                }
            })
        };
        // Kill once some tags exist, at a different moment each round.
        let tags = format!("docker/registry/v2/repositories/vi/ns/img{round}/_manifests/tags");
        let stored = StoredView::of(&storage);
        wait_until(Duration::from_secs(60), || stored.list(&tags).len() >= 2).await;
        tokio::time::sleep(Duration::from_millis(round * 23)).await;
        server.kill9();
        pushing.await.unwrap();
        let server = Server::start(&storage);
        let (_, tags) = verify_store(&storage);
        assert!(tags > 0, "round {round}: nothing was pushed before the kill");
        // What the API serves agrees with what is on disk.
        let response = client.get(server.url(&format!("/v2/vi/ns/img{round}/tags/list"))).send().await.unwrap();
        let listed: Value = response.json().await.unwrap();
        for tag in listed["tags"].as_array().unwrap() {
            let response = client
                .get(server.url(&format!("/v2/vi/ns/img{round}/manifests/{}", tag.as_str().unwrap())))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "tag {tag} is listed but not served");
        }
    }
    // A push after all the crashes still works.
    let server = Server::start(&storage);
    push_image(&client, &server, "vi/ns/after", "v1", &image::disk_image("d.img", b"after")).await;
    verify_store(&storage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_garbage_collection_loses_no_tagged_image() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let client = Client::new();
    let mut server = Server::start(&storage);
    for index in 0..12u64 {
        let image = image::image(
            vec![image::tar(&[("f", 0o644, Some(&pseudo_random(30_000, 500 + index)))])],
            false,
            false,
            serde_json::json!({ "index": index }),
        );
        push_image(&client, &server, "vi/ns/keep", &format!("v{index}"), &image).await;
        push_image(&client, &server, "vi/ns/drop", &format!("v{index}"), &image).await;
    }
    // Garbage: blobs no manifest names, enough to keep a collection busy
    // (a delete on S3 is a few requests, on a folder a few system calls).
    let garbage_count = if common::storage::on_s3() { 300 } else { 1500 };
    let garbage = futures::stream::iter(0..garbage_count)
        .map(|index| {
            let (client, url) = (client.clone(), server.url(""));
            async move {
                let blob = pseudo_random(512, 10_000 + index);
                let response = client
                    .post(format!("{url}/v2/vi/ns/keep/blobs/uploads/?digest={}", sha256_digest(&blob)))
                    .body(blob)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>();
    garbage.await;
    server.kill9();
    let (blobs_before, tags_before) = verify_store(&storage);
    assert_eq!(tags_before, 24);
    let live = directory.path().join("live");
    std::fs::write(&live, "vi/ns/keep\n").unwrap();
    let live = live.display().to_string();
    let collecting = ["--gc-interval", "30ms", "--gc-grace", "0s", "--gc-live-repositories", &live];

    // Kill the collector at different moments: in even rounds after a
    // fixed delay (anywhere from listing to sweeping), in odd rounds as
    // soon as the sweep is seen deleting blobs. After each restart every
    // tagged image in the live repository is whole.
    let stored = StoredView::of(&storage);
    let blob_count = || {
        let files = stored.files("docker/registry/v2/blobs/sha256");
        files.iter().filter(|file| file.ends_with("/data")).count()
    };
    let mut interrupted = 0;
    let mut last = blobs_before;
    for round in 0..8u64 {
        let mut server = Server::start_free(&storage, &collecting);
        if round % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(35 + round * 13)).await;
        } else {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(60)
                && !server.log().contains("garbage collection finished")
                && blob_count() >= last
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let finished = server.log().matches("garbage collection finished").count();
        server.kill9();
        let (blobs, tags) = verify_store(&storage);
        assert!((12..=24).contains(&tags), "tags: {tags}");
        if blobs < last && finished == 0 {
            interrupted += 1;
        }
        last = blobs;
        let server = Server::start(&storage);
        for index in 0..12 {
            let response = client.get(server.url(&format!("/v2/vi/ns/keep/manifests/v{index}"))).send().await.unwrap();
            assert_eq!(response.status(), 200, "vi/ns/keep:v{index} after kill {round}");
        }
        drop(server);
    }

    // A collection that runs to the end leaves the live images and nothing else.
    let server = Server::start_free(&storage, &collecting);
    wait_until(Duration::from_secs(120), || server.log().contains("garbage collection finished")).await;
    drop(server);
    let (blobs, tags) = verify_store(&storage);
    assert_eq!(tags, 12, "the repository without an owner is gone, the live one whole");
    // Per live image: config, one layer, the manifest.
    assert_eq!(blobs, 36, "only the live images' blobs are left (started with {blobs_before})");
    assert!(interrupted >= 1, "no kill landed inside a collection that was deleting");
}
