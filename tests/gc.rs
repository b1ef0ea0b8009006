//! Garbage collection: `dvcr gc` and the collector of `dvcr serve`, with
//! pushes and pulls going on.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::image::{self, pseudo_random, Image};
use common::storage::{configure, StoredView};
use common::{free_port, get_manifest, metric, push_image, put_manifest, run, sha256_digest, Server, DVCR};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

fn blob_files(storage: &Path) -> usize {
    StoredView::of(storage)
        .files("docker/registry/v2/blobs")
        .iter()
        .filter(|file| file.ends_with("/data"))
        .count()
}

fn small_image(seed: u64, label: &str) -> Image {
    let layers = vec![
        image::tar(&[("a.bin", 0o644, Some(&pseudo_random(200_000 + (seed % 7) as usize * 1000, seed)))]),
        image::tar(&[("b.bin", 0o644, Some(&pseudo_random(50_000, seed + 1000)))]),
    ];
    image::image(layers, false, false, json!({ "label": label }))
}

/// Pulls `repository:tag` and checks that every blob hashes to its digest.
async fn verify(client: &Client, server: &Server, repository: &str, tag: &str) -> Result<(), String> {
    let response = get_manifest(client, server, repository, tag).await.map_err(|error| error.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("{repository}:{tag}: manifest answered {}", response.status()));
    }
    let manifest: Value = response.json().await.map_err(|error| error.to_string())?;
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap_or_default().to_string()];
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        digests.push(layer["digest"].as_str().unwrap_or_default().to_string());
    }
    for digest in digests {
        let response = client
            .get(server.url(&format!("/v2/{repository}/blobs/{digest}")))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("{repository}:{tag}: blob {digest} answered {}", response.status()));
        }
        let content = response.bytes().await.map_err(|error| error.to_string())?;
        if sha256_digest(&content) != digest {
            return Err(format!("{repository}:{tag}: blob {digest} does not hash to its digest"));
        }
    }
    Ok(())
}

async fn delete_manifest(client: &Client, server: &Server, repository: &str, image: &Image) {
    let response = client
        .delete(server.url(&format!("/v2/{repository}/manifests/{}", image.digest())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

fn gc_report(storage: &Path, extra: &[&str]) -> Value {
    let mut command = Command::new(DVCR);
    command.arg("gc");
    configure(&mut command, storage);
    let output = run(command.args(extra));
    serde_json::from_str(&output).expect("the report is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dvcr_gc_removes_unowned_repositories_idle_uploads_and_unreferenced_blobs() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let server = Server::start(&storage);
    let client = Client::new();
    let kept = small_image(1, "kept");
    let dropped = small_image(2, "dropped");
    let orphan = small_image(3, "orphan");
    push_image(&client, &server, "vi/ns/live", "v1", &kept).await;
    push_image(&client, &server, "vi/ns/live", "v2", &dropped).await;
    delete_manifest(&client, &server, "vi/ns/live", &dropped).await;
    push_image(&client, &server, "vi/ns/gone", "v1", &orphan).await;
    let response = client.post(server.url("/v2/vi/ns/live/blobs/uploads/")).send().await.unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let response = client.patch(server.url(&location)).body(vec![7u8; 4096]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let live = directory.path().join("live");
    std::fs::write(&live, "# owned\nvi/ns/live\n").unwrap();
    let live = live.display().to_string();
    let rules = ["--gc-grace", "0s", "--gc-upload-max-age", "0s", "--gc-live-repositories", &live];

    // Within the grace window nothing goes.
    let report = gc_report(&storage, &["--gc-live-repositories", &live]);
    assert_eq!(report["blobs-removed"], 0, "{report}");
    assert_eq!(report["repositories-removed"], json!([]), "{report}");

    let before = blob_files(&storage);
    let mut dry = rules.to_vec();
    dry.push("--dry-run");
    let report = gc_report(&storage, &dry);
    assert_eq!(blob_files(&storage), before, "a dry run removes nothing");
    // dropped: config, 2 layers, manifest; orphan: the same.
    assert_eq!(report["blobs-removed"], 8, "{report}");
    assert_eq!(report["repositories-removed"], json!(["vi/ns/gone"]), "{report}");
    assert_eq!(report["uploads-removed"], 1, "{report}");

    let report = gc_report(&storage, &rules);
    assert_eq!(report["blobs-removed"], 8, "{report}");
    assert_eq!(report["blobs-kept"], 4, "{report}");
    assert_eq!(blob_files(&storage), before - 8);
    let freed = report["bytes-freed"].as_u64().unwrap();
    let garbage: usize = dropped.blobs().chain(orphan.blobs()).map(<[u8]>::len).sum::<usize>() + dropped.manifest.len() + orphan.manifest.len();
    assert!(freed >= garbage as u64, "freed {freed} of at least {garbage}");
    verify(&client, &server, "vi/ns/live", "v1").await.unwrap();
    assert_eq!(client.get(server.url("/v2/vi/ns/gone/tags/list")).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(client.get(server.url(&location)).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let again = gc_report(&storage, &rules);
    assert_eq!((again["blobs-removed"].as_u64(), again["uploads-removed"].as_u64()), (Some(0), Some(0)), "{again}");

    let empty = directory.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let mut command = Command::new(DVCR);
    command.arg("gc");
    configure(&mut command, &storage);
    let output = command
        .arg("--gc-live-repositories")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("names no repository"));
}

/// Pushes the blobs of `image` like skopeo does: a blob the registry says
/// it has is not sent. Returns how many were skipped and when the first of
/// them was seen.
async fn push_blobs_skipping_known(client: &Client, server: &Server, repository: &str, image: &Image) -> Result<(usize, Option<Instant>), String> {
    let mut skipped = 0;
    let mut first_seen: Option<Instant> = None;
    for blob in image.blobs() {
        let digest = sha256_digest(blob);
        let head = client
            .head(server.url(&format!("/v2/{repository}/blobs/{digest}")))
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if head.status() == StatusCode::OK {
            skipped += 1;
            first_seen.get_or_insert_with(Instant::now);
            continue;
        }
        let response = client
            .post(server.url(&format!("/v2/{repository}/blobs/uploads/?digest={digest}")))
            .body(blob.to_vec())
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if response.status() != StatusCode::CREATED {
            return Err(format!("blob push answered {}: {:?}", response.status(), response.text().await));
        }
    }
    Ok((skipped, first_seen))
}

/// The collector's grace window in `collection_while_pushing_and_pulling_loses_nothing`.
const GRACE: Duration = Duration::from_secs(2);

/// Pushes the manifest of `image`. A blob seen by a HEAD is promised to
/// stay for the grace window only: when the manifest goes out later than
/// that (a loaded machine), `MANIFEST_BLOB_UNKNOWN` is allowed and
/// reported as `Ok(false)`; any other refusal is an error that says how
/// long ago the first reused blob was seen.
async fn push_manifest_after(client: &Client, server: &Server, repository: &str, tag: &str, image: &Image, first_seen: Option<Instant>) -> Result<bool, String> {
    let late = first_seen.is_some_and(|seen| seen.elapsed() > GRACE);
    let response = put_manifest(client, server, repository, tag, image).await.map_err(|error| error.to_string())?;
    if response.status() == StatusCode::CREATED {
        return Ok(true);
    }
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if late && status == StatusCode::BAD_REQUEST && body.contains("MANIFEST_BLOB_UNKNOWN") {
        eprintln!("{repository}:{tag}: the manifest came later than the grace window after the HEADs and was refused: {body}");
        return Ok(false);
    }
    let seen = first_seen.map_or("none".to_string(), |seen| format!("{:?} ago", seen.elapsed()));
    Err(format!("{repository}:{tag}: manifest push answered {status} (first reused blob seen {seen}): {body}"))
}

/// Pushes like skopeo does; returns how many blobs the registry already
/// had. A push refused for coming later than the grace window is done
/// again, uploading what is missing.
async fn push_skipping_known_blobs(client: &Client, server: &Server, repository: &str, tag: &str, image: &Image) -> Result<usize, String> {
    for _attempt in 0..3 {
        let (skipped, first_seen) = push_blobs_skipping_known(client, server, repository, image).await?;
        if push_manifest_after(client, server, repository, tag, image, first_seen).await? {
            return Ok(skipped);
        }
    }
    Err(format!("{repository}:{tag}: three pushes in a row came later than the grace window"))
}

async fn gc_runs(client: &Client, server: &Server) -> f64 {
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    metric(&metrics, "dvcr_gc_runs_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_while_pushing_and_pulling_loses_nothing() {
    const PUSHERS: u64 = 3;
    const RUN_FOR: Duration = Duration::from_secs(10);
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let live = directory.path().join("live");
    std::fs::write(&live, (0..PUSHERS).map(|pusher| format!("vi/ns/p{pusher}\n")).collect::<String>()).unwrap();
    let server = Arc::new(Server::start_with(
        &storage,
        free_port(),
        &[
            "--gc-interval",
            "150ms",
            "--gc-grace",
            &format!("{}s", GRACE.as_secs()),
            "--gc-upload-max-age",
            "1h",
            "--gc-live-repositories",
            &live.display().to_string(),
        ],
    ));
    let client = Client::new();
    push_image(&client, &server, "vi/ns/orphan", "v1", &small_image(99, "orphan")).await;

    // Tags that are never deleted, which pullers check while it all runs.
    let permanent: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let deadline = Instant::now() + RUN_FOR;
    let mut tasks = Vec::new();
    for pusher in 0..PUSHERS {
        let (client, server, permanent) = (client.clone(), server.clone(), permanent.clone());
        tasks.push(tokio::spawn(async move {
            let repository = format!("vi/ns/p{pusher}");
            let mut condemned: Vec<(Instant, Image, u64)> = Vec::new();
            let mut held: Option<(Instant, Image, u64)> = None;
            let (mut pushes, mut reused, mut exposed) = (0u64, 0usize, 0u64);
            let mut round = 0u64;
            while Instant::now() < deadline {
                round += 1;
                let seed = pusher * 1_000_000 + round;
                let image = small_image(seed, "first");
                push_skipping_known_blobs(&client, &server, &repository, &format!("r{round}"), &image).await?;
                pushes += 1;
                if round.is_multiple_of(2) {
                    permanent.lock().unwrap().push((repository.clone(), format!("r{round}")));
                } else {
                    // Untag it: its blobs are garbage once the grace window passes...
                    delete_manifest(&client, &server, &repository, &image).await;
                    condemned.push((Instant::now(), image, seed));
                }
                // ...unless a new manifest reuses them first (a race with
                // the collector: either outcome is fine, a loss is not).
                if let Some(index) = condemned.iter().position(|(when, ..)| when.elapsed() > GRACE + Duration::from_millis(100)) {
                    let (_, _, seed) = condemned.remove(index);
                    let again = small_image(seed, "again");
                    let tag = format!("again{round}");
                    reused += push_skipping_known_blobs(&client, &server, &repository, &tag, &again).await?;
                    permanent.lock().unwrap().push((repository.clone(), tag));
                }
                // A handover, with no race: a push finds the layers of a
                // tagged image older than the grace window, that image is
                // untagged, and the new manifest comes only after two
                // collections finished; the second one marked without the
                // old manifest, so only the notes of the push's HEADs kept
                // the layers.
                match held.take() {
                    None => {
                        let seed = pusher * 1_000_000 + 500_000 + round;
                        let image = small_image(seed, "held");
                        push_skipping_known_blobs(&client, &server, &repository, &format!("held{round}"), &image).await?;
                        held = Some((Instant::now(), image, seed));
                    }
                    Some((since, old, seed)) if since.elapsed() > GRACE + Duration::from_millis(200) => {
                        let new = small_image(seed, "handover");
                        let (found, first_seen) = push_blobs_skipping_known(&client, &server, &repository, &new).await?;
                        if found != new.layers.len() {
                            return Err(format!("{repository}: {found} layers of a tagged image found, not {}", new.layers.len()));
                        }
                        delete_manifest(&client, &server, &repository, &old).await;
                        let runs_before = gc_runs(&client, &server).await;
                        let pause_until = Instant::now() + Duration::from_millis(1200);
                        let mut runs_during = 0.0;
                        while runs_during < 2.0 && Instant::now() < pause_until {
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            runs_during = gc_runs(&client, &server).await - runs_before;
                        }
                        let tag = format!("handover{round}");
                        if !push_manifest_after(&client, &server, &repository, &tag, &new, first_seen).await? {
                            push_skipping_known_blobs(&client, &server, &repository, &tag, &new).await?;
                        } else if runs_during >= 2.0 {
                            exposed += 1;
                        }
                        reused += found;
                        permanent.lock().unwrap().push((repository.clone(), tag));
                    }
                    still_young => held = still_young,
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok::<(u64, usize, u64), String>((pushes, reused, exposed))
        }));
    }
    let mut pullers = Vec::new();
    for puller in 0..2u64 {
        let (client, server, permanent) = (client.clone(), server.clone(), permanent.clone());
        pullers.push(tokio::spawn(async move {
            let mut pulls = 0u64;
            while Instant::now() < deadline {
                let pick = {
                    let tags = permanent.lock().unwrap();
                    (!tags.is_empty()).then(|| tags[(pulls as usize * 7 + puller as usize) % tags.len()].clone())
                };
                if let Some((repository, tag)) = pick {
                    verify(&client, &server, &repository, &tag).await?;
                    pulls += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<u64, String>(pulls)
        }));
    }
    let (mut pushes, mut reused, mut exposed, mut pulls) = (0, 0, 0, 0);
    for task in tasks {
        let (count, skipped, handovers) = task.await.unwrap().unwrap();
        pushes += count;
        reused += skipped;
        exposed += handovers;
    }
    for task in pullers {
        pulls += task.await.unwrap().unwrap();
    }
    // Let collections run on the final state too.
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;

    let tags = permanent.lock().unwrap().clone();
    let mut failures = Vec::new();
    for (repository, tag) in &tags {
        if let Err(error) = verify(&client, &server, repository, tag).await {
            failures.push(error);
        }
    }
    assert!(failures.is_empty(), "images lost or damaged: {failures:#?}");
    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let (runs, freed) = (metric(&metrics, "dvcr_gc_runs_total", &[]), metric(&metrics, "dvcr_gc_freed_bytes_total", &[]));
    eprintln!(
        "{pushes} pushes, {reused} blobs reused by HEAD, {exposed} handovers with two collections in between, \
         {pulls} pulls verified, {} tags checked, {runs} collections, {freed} bytes freed",
        tags.len()
    );
    assert!(runs >= 20.0, "the collector ran {runs} times");
    assert!(freed > 0.0, "the collector freed nothing");
    assert!(pushes >= 30 && pulls >= 30, "too little load: {pushes} pushes, {pulls} pulls");
    assert!(exposed > 0, "no handover had two collections between the untag and the new manifest");
    let catalog: Value = client.get(server.url("/v2/_catalog")).send().await.unwrap().json().await.unwrap();
    let names: HashSet<&str> = catalog["repositories"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(!names.contains("vi/ns/orphan"), "the repository without an owner is still there: {names:?}");
    let log = server.log();
    assert!(log.contains("garbage collection finished"), "{log}");
}
