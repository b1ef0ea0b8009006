//! HTTP-level tests of the OCI Distribution API against the real `dvcr serve`.

mod common;

use std::io::{Read, Write};

use common::image::{self, pseudo_random};
use common::storage::{break_storage, StoredView};
use common::{metric, push_image, sha256_digest, Server};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha512};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

fn setup() -> (tempfile::TempDir, Server, Client) {
    let directory = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&directory.path().join("data"));
    (directory, server, Client::new())
}

fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Checks an error answer: status, spec JSON body and code.
async fn expect_error(response: Response, status: StatusCode, code: &str) -> String {
    assert_eq!(response.status(), status, "wrong status for expected {code}");
    let body: Value = response.json().await.expect("error body is JSON");
    let first = &body["errors"][0];
    assert_eq!(first["code"], code, "body: {body}");
    let message = first["message"].as_str().expect("message").to_string();
    assert!(!message.is_empty());
    message
}

async fn push_blob(client: &Client, server: &Server, repository: &str, data: &[u8]) -> String {
    let digest = sha256_digest(data);
    let response = client
        .post(server.url(&format!("/v2/{repository}/blobs/uploads/?digest={digest}")))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    digest
}

/// The body of a GET of `path`.
async fn get_bytes(client: &Client, server: &Server, path: &str) -> bytes::Bytes {
    client.get(server.url(path)).send().await.unwrap().bytes().await.unwrap()
}

/// Every blob file in the store, as (digest text, content digest).
fn stored_blob_files(server: &Server) -> Vec<(String, String)> {
    let stored = StoredView::of(&server.storage);
    let mut found = Vec::new();
    for file in stored.files("docker/registry/v2/blobs/sha256") {
        let Some(name) = file.strip_suffix("/data").and_then(|folder| folder.rsplit('/').next()) else { continue };
        let data = stored.read(&file).expect("a listed blob is readable");
        found.push((format!("sha256:{name}"), sha256_digest(&data)));
    }
    found
}

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let (_directory, server, client) = setup();
    for request in [client.get(server.url("/v2/")), client.head(server.url("/v2/"))] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "Docker-Distribution-API-Version"), "registry/2.0");
    }
    let response = client.get(server.url("/nothing")).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn monolithic_blob_push_head_get_and_ranges() {
    let (_directory, server, client) = setup();
    let data = pseudo_random(1_000_003, 1);
    let digest = sha256_digest(&data);
    let response = client
        .post(server.url(&format!("/v2/vi/ns/img/blobs/uploads/?digest={digest}")))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "Location"), format!("/v2/vi/ns/img/blobs/{digest}"));
    assert_eq!(header(&response, "Docker-Content-Digest"), digest);

    let blob_url = server.url(&format!("/v2/vi/ns/img/blobs/{digest}"));
    let response = client.head(&blob_url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "Content-Length"), data.len().to_string());
    assert_eq!(header(&response, "Docker-Content-Digest"), digest);
    let response = client.get(&blob_url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), data);

    let ranges = [
        ("bytes=0-9", 0, 10),
        ("bytes=1000000-", 1_000_000, 3),
        ("bytes=-5", data.len() - 5, 5),
        ("bytes=999990-2000000", 999_990, 13),
    ];
    for (range, start, length) in ranges {
        let response = client.get(&blob_url).header("Range", range).send().await.unwrap();
        assert_eq!(response.status(), 206, "{range}");
        assert_eq!(
            header(&response, "Content-Range"),
            format!("bytes {start}-{}/{}", start + length - 1, data.len())
        );
        assert_eq!(response.bytes().await.unwrap(), &data[start..start + length], "{range}");
    }
    for unsatisfiable in ["bytes=1000003-", "bytes=5000000-5000010"] {
        let response = client.get(&blob_url).header("Range", unsatisfiable).send().await.unwrap();
        assert_eq!(response.status(), 416, "{unsatisfiable}");
        assert_eq!(header(&response, "Content-Range"), format!("bytes */{}", data.len()));
    }

    // Another repository never had it: HEAD and GET are 404 BLOB_UNKNOWN.
    let other = server.url(&format!("/v2/vi/ns/other/blobs/{digest}"));
    let response = client.head(&other).send().await.unwrap();
    assert_eq!(response.status(), 404);
    expect_error(client.get(&other).send().await.unwrap(), StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
}

/// Blob bodies on plain HTTP/1 connections go out by `sendfile` from a
/// queue of file segments kept per connection (registry/src/zero_copy.rs):
/// requests in sequence and pipelined on one connection, many downloads at
/// once, and HTTP/2 (which streams from memory) must all get exact bytes.
#[tokio::test]
async fn blob_downloads_are_exact_in_sequence_pipelined_concurrent_and_over_http2() {
    let (_directory, server, client) = setup();
    let data = pseudo_random((5 << 20) / 2 + 12_345, 7);
    let digest = push_blob(&client, &server, "vi/ns/big", &data).await;
    let path = format!("/v2/vi/ns/big/blobs/{digest}");
    let ranges: [(usize, usize); 4] = [(0, data.len()), (1 << 20, (1 << 20) + 3), (17, data.len()), (data.len() - 1, data.len())];

    // One connection, every request sent before any answer is read.
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    let mut requests = String::new();
    for (start, end) in ranges {
        requests.push_str(&format!("GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes={start}-{}\r\n\r\n", end - 1));
        requests.push_str(&format!("HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    }
    requests.push_str(&format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    stream.write_all(requests.as_bytes()).unwrap();
    let mut answers = Vec::new();
    stream.read_to_end(&mut answers).unwrap();
    let mut rest = &answers[..];
    let mut expected: Vec<(u16, &[u8])> = Vec::new();
    for (start, end) in ranges {
        expected.push((206, &data[start..end]));
        expected.push((200, &[]));
    }
    expected.push((200, &data[..]));
    for (index, (status, body)) in expected.into_iter().enumerate() {
        let head_end = rest.windows(4).position(|window| window == b"\r\n\r\n").expect("a response head") + 4;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "answer {index}: {head}");
        let length: usize = head
            .lines()
            .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length: ").map(|value| value.trim().parse().unwrap()))
            .expect("content-length");
        let is_head = index % 2 == 1 && index < 8;
        let body_length = if is_head { 0 } else { length };
        assert!(rest[head_end..head_end + body_length] == *body, "answer {index} carried other bytes");
        rest = &rest[head_end + body_length..];
    }
    assert!(rest.is_empty(), "{} bytes after the last answer", rest.len());

    // Many at once, over HTTP/1.1 and HTTP/2.
    let http2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let mut downloads = Vec::new();
    for round in 0..12 {
        let (start, end) = ranges[round % ranges.len()];
        let client = if round % 3 == 2 { http2.clone() } else { client.clone() };
        let url = server.url(&path);
        downloads.push(tokio::spawn(async move {
            let response = client.get(url).header("Range", format!("bytes={start}-{}", end - 1)).send().await.unwrap();
            (response.version(), start, end, response.bytes().await.unwrap())
        }));
    }
    let mut versions = std::collections::HashSet::new();
    for download in downloads {
        let (version, start, end, body) = download.await.unwrap();
        versions.insert(format!("{version:?}"));
        assert!(body[..] == data[start..end], "{version:?} bytes {start}-{end} differ");
    }
    assert_eq!(versions.len(), 2, "both protocols were used: {versions:?}");
}

#[tokio::test]
async fn digest_mismatch_is_refused_and_stores_nothing() {
    let (_directory, server, client) = setup();
    let data = pseudo_random(200_000, 2);
    let wrong = sha256_digest(b"something else");
    let response = client
        .post(server.url(&format!("/v2/a/blobs/uploads/?digest={wrong}")))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    for digest in [&wrong, &sha256_digest(&data)] {
        let response = client.head(server.url(&format!("/v2/a/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(response.status(), 404);
    }
    assert!(stored_blob_files(&server).is_empty(), "a blob file was stored");

    // The same through a chunked upload: the upload is gone afterwards.
    let response = client.post(server.url("/v2/a/blobs/uploads/")).send().await.unwrap();
    let location = header(&response, "Location");
    let response = client
        .put(server.url(&format!("{location}?digest={wrong}")))
        .body(data)
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let response = client.get(server.url(&location)).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert!(stored_blob_files(&server).is_empty());

    // Malformed and unsupported digests.
    for bad in ["sha256:xyz", "md5:d41d8cd98f00b204e9800998ecf8427e", "nocolon"] {
        let response = client
            .post(server.url(&format!("/v2/a/blobs/uploads/?digest={bad}")))
            .body("x")
            .send()
            .await
            .unwrap();
        expect_error(response, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    }
}

#[tokio::test]
async fn chunked_upload_with_status_out_of_order_and_finish() {
    let (_directory, server, client) = setup();
    let data = pseudo_random(3_000_000, 3);
    let digest = sha256_digest(&data);

    let response = client.post(server.url("/v2/vd/ns/disk/blobs/uploads/")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let location = header(&response, "Location");
    assert!(location.starts_with("/v2/vd/ns/disk/blobs/uploads/"), "{location}");
    assert!(!header(&response, "Docker-Upload-UUID").is_empty());
    assert_eq!(header(&response, "Range"), "0-0");
    // DVCR reports the digest of what an upload holds, from the start.
    assert_eq!(header(&response, "Dvcr-Upload-Digest"), sha256_digest(b""));

    // First chunk with Content-Range.
    let response = client
        .patch(server.url(&location))
        .header("Content-Range", "0-999999")
        .header("Content-Type", "application/octet-stream")
        .body(data[..1_000_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "Range"), "0-999999");
    assert_eq!(header(&response, "Dvcr-Upload-Digest"), sha256_digest(&data[..1_000_000]));
    let location = header(&response, "Location");

    // Out of order: 416 with the current range.
    let response = client
        .patch(server.url(&location))
        .header("Content-Range", "1500000-1999999")
        .body(data[1_500_000..2_000_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 416);
    assert_eq!(header(&response, "Range"), "0-999999");

    // Status.
    let response = client.get(server.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "Range"), "0-999999");
    assert_eq!(header(&response, "Location"), location);

    // Second chunk streamed without Content-Range.
    let response = client
        .patch(server.url(&location))
        .body(data[1_000_000..2_500_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(header(&response, "Range"), "0-2499999");
    assert_eq!(header(&response, "Dvcr-Upload-Digest"), sha256_digest(&data[..2_500_000]));

    // A Content-Range that disagrees with Content-Length.
    let response = client
        .patch(server.url(&location))
        .header("Content-Range", "2500000-2500009")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Finish without a digest: refused, upload kept.
    let response = client.put(server.url(&location)).send().await.unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;

    // Finish with the last chunk.
    let response = client
        .put(server.url(&format!("{location}?digest={digest}")))
        .header("Content-Range", "2500000-2999999")
        .body(data[2_500_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "Docker-Content-Digest"), digest);
    assert_eq!(header(&response, "Location"), format!("/v2/vd/ns/disk/blobs/{digest}"));
    let fetched = get_bytes(&client, &server, &format!("/v2/vd/ns/disk/blobs/{digest}")).await;
    assert_eq!(fetched, data);
    let response = client.get(server.url(&location)).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
}

/// Uploads in chunks of odd sizes, starting at odd offsets, are stored
/// byte for byte whether blob writes go around the page cache (the default,
/// `O_DIRECT` with a staging buffer for what is not aligned) or through it
/// (`--storage-page-cache`).
#[tokio::test]
async fn odd_chunks_are_stored_exactly_around_and_through_the_page_cache() {
    for extra in [&[][..], &["--storage-page-cache"][..]] {
        let directory = tempfile::tempdir().unwrap();
        let server = Server::start_free(&directory.path().join("data"), extra);
        let client = Client::new();
        let data = pseudo_random(5_000_000 + 4_097, 9);
        let digest = sha256_digest(&data);
        let response = client.post(server.url("/v2/vi/ns/odd/blobs/uploads/")).send().await.unwrap();
        assert_eq!(response.status(), 202);
        let mut location = header(&response, "Location");
        let cuts = [0, 4_095, 4_096 + 1_048_577, 3_000_000, 4_194_304, data.len() - 1];
        for window in cuts.windows(2) {
            let response = client
                .patch(server.url(&location))
                .body(data[window[0]..window[1]].to_vec())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "{extra:?}");
            assert_eq!(header(&response, "Range"), format!("0-{}", window[1] - 1));
            location = header(&response, "Location");
        }
        let response = client
            .put(server.url(&format!("{location}?digest={digest}")))
            .body(data[data.len() - 1..].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{extra:?}");
        let fetched = get_bytes(&client, &server, &format!("/v2/vi/ns/odd/blobs/{digest}")).await;
        assert!(fetched == data, "{extra:?}: the blob read back differs");
        assert_eq!(stored_blob_files(&server), vec![(digest.clone(), digest)], "{extra:?}");
    }
}

#[tokio::test]
async fn upload_survives_a_restart_and_can_be_cancelled() {
    let directory = tempfile::tempdir().unwrap();
    let storage = directory.path().join("data");
    let client = Client::new();
    let data = pseudo_random(500_000, 4);
    let digest = sha256_digest(&data);
    let location = {
        let server = Server::start(&storage);
        let response = client.post(server.url("/v2/a/blobs/uploads/")).send().await.unwrap();
        let location = header(&response, "Location");
        let response = client.patch(server.url(&location)).body(data[..200_000].to_vec()).send().await.unwrap();
        assert_eq!(response.status(), 202);
        location
    };
    let server = Server::start(&storage);
    let response = client.get(server.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(header(&response, "Range"), "0-199999");
    let response = client
        .put(server.url(&format!("{location}?digest={digest}")))
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "resumed upload finishes with the hash re-read from storage");

    let response = client.post(server.url("/v2/a/blobs/uploads/")).send().await.unwrap();
    let location = header(&response, "Location");
    let response = client.delete(server.url(&location)).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let response = client.get(server.url(&location)).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    let response = client.delete(server.url(&location)).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    let response = client
        .patch(server.url("/v2/a/blobs/uploads/../../etc"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn cross_repository_mount() {
    let (_directory, server, client) = setup();
    let digest = push_blob(&client, &server, "vi/ns/source", b"shared layer").await;
    let response = client
        .post(server.url(&format!("/v2/vi/ns/target/blobs/uploads/?mount={digest}&from=vi/ns/source")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "Location"), format!("/v2/vi/ns/target/blobs/{digest}"));
    assert_eq!(header(&response, "Docker-Content-Digest"), digest);
    let response = client.head(server.url(&format!("/v2/vi/ns/target/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // From a repository that does not have it: an ordinary upload starts.
    let response = client
        .post(server.url(&format!("/v2/vi/ns/third/blobs/uploads/?mount={digest}&from=vi/ns/empty")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(header(&response, "Location").starts_with("/v2/vi/ns/third/blobs/uploads/"));
    let response = client.head(server.url(&format!("/v2/vi/ns/third/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn sha512_digests() {
    let (_directory, server, client) = setup();
    let data = pseudo_random(70_000, 5);
    let digest = format!("sha512:{}", hex::encode(Sha512::digest(&data)));
    let response = client
        .post(server.url(&format!("/v2/a/blobs/uploads/?digest={digest}")))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = client.get(server.url(&format!("/v2/a/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "Docker-Content-Digest"), digest);
    assert_eq!(response.bytes().await.unwrap(), data);

    // A chunked upload hashed as sha256 while streaming, finished as sha512.
    let other = pseudo_random(90_000, 6);
    let other_digest = format!("sha512:{}", hex::encode(Sha512::digest(&other)));
    let response = client.post(server.url("/v2/a/blobs/uploads/")).send().await.unwrap();
    let location = header(&response, "Location");
    client.patch(server.url(&location)).body(other.clone()).send().await.unwrap();
    let response = client.put(server.url(&format!("{location}?digest={other_digest}"))).send().await.unwrap();
    assert_eq!(response.status(), 201);

    // A manifest addressed by a sha512 digest.
    let config = push_blob(&client, &server, "a", b"{}").await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": data.len()}],
    }))
    .unwrap();
    let manifest_digest = format!("sha512:{}", hex::encode(Sha512::digest(&manifest)));
    let response = client
        .put(server.url(&format!("/v2/a/manifests/{manifest_digest}")))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "Docker-Content-Digest"), manifest_digest);
    let response = client.get(server.url(&format!("/v2/a/manifests/{manifest_digest}"))).send().await.unwrap();
    assert_eq!(response.bytes().await.unwrap(), manifest);
}

#[tokio::test]
async fn blob_delete_unlinks_from_the_repository() {
    let (_directory, server, client) = setup();
    let digest = push_blob(&client, &server, "a", b"to delete").await;
    push_blob(&client, &server, "b", b"to delete").await;
    let url = server.url(&format!("/v2/a/blobs/{digest}"));
    let response = client.delete(&url).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(client.head(&url).send().await.unwrap().status(), 404);
    expect_error(client.delete(&url).send().await.unwrap(), StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    let response = client.head(server.url(&format!("/v2/b/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(response.status(), 200, "other repositories keep the blob");
}

#[tokio::test]
async fn manifests_by_tag_and_digest_with_negotiation() {
    let (_directory, server, client) = setup();
    let oci = image::multi_layer_image(7);
    push_image(&client, &server, "vi/ns/img", "v1", &oci).await;
    let digest = oci.digest();

    for reference in ["v1", digest.as_str()] {
        let url = server.url(&format!("/v2/vi/ns/img/manifests/{reference}"));
        let response = client.get(&url).header("Accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "Content-Type"), OCI_MANIFEST);
        assert_eq!(header(&response, "Docker-Content-Digest"), digest);
        assert_eq!(response.bytes().await.unwrap(), oci.manifest);
        let response = client.head(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "Content-Length"), oci.manifest.len().to_string());
        assert_eq!(header(&response, "Docker-Content-Digest"), digest);
        // A client that takes only Docker types does not get an OCI manifest.
        let response = client.get(&url).header("Accept", DOCKER_MANIFEST).send().await.unwrap();
        expect_error(response, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
        let response = client
            .get(&url)
            .header("Accept", format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    // Docker schema 2, and a Docker manifest list over it.
    let docker = image::disk_image("disk.img", &pseudo_random(10_000, 8));
    push_image(&client, &server, "vi/ns/img", "docker", &docker).await;
    let response = client
        .get(server.url("/v2/vi/ns/img/manifests/docker"))
        .header("Accept", DOCKER_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "Content-Type"), DOCKER_MANIFEST);
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": docker.digest(), "size": docker.manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }))
    .unwrap();
    let response = client
        .put(server.url("/v2/vi/ns/img/manifests/list"))
        .header("Content-Type", DOCKER_LIST)
        .body(list.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "Location"), format!("/v2/vi/ns/img/manifests/{}", sha256_digest(&list)));
    let response = client.get(server.url("/v2/vi/ns/img/manifests/list")).send().await.unwrap();
    assert_eq!(header(&response, "Content-Type"), DOCKER_LIST);

    // An OCI index whose child is missing, then present.
    let index = |child: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": child, "size": 10}],
        }))
        .unwrap()
    };
    let response = client
        .put(server.url("/v2/vi/ns/img/manifests/index"))
        .header("Content-Type", OCI_INDEX)
        .body(index(&sha256_digest(b"missing")))
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await;
    let response = client
        .put(server.url("/v2/vi/ns/img/manifests/index"))
        .header("Content-Type", OCI_INDEX)
        .body(index(&digest))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    // Unknown references.
    let response = client.get(server.url("/v2/vi/ns/img/manifests/nope")).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let response = client.get(server.url(&format!("/v2/vi/ns/other/manifests/{digest}"))).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_put_rules() {
    let (_directory, server, client) = setup();
    let oci = image::multi_layer_image(9);
    // Blobs in another repository only: HEAD says 404 here, and so does PUT.
    for blob in oci.blobs() {
        push_blob(&client, &server, "elsewhere", blob).await;
    }
    let put = |reference: &str, body: Vec<u8>, content_type: &str| {
        client
            .put(server.url(&format!("/v2/here/manifests/{reference}")))
            .header("Content-Type", content_type.to_string())
            .body(body)
    };
    let response = put("v1", oci.manifest.clone(), OCI_MANIFEST).send().await.unwrap();
    let message = expect_error(response, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await;
    assert!(message.contains("sha256:"), "{message}");

    // Digest in the URL that does not match the body.
    push_image(&client, &server, "here", "v1", &oci).await;
    let response = put(&sha256_digest(b"other"), oci.manifest.clone(), OCI_MANIFEST).send().await.unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let response = put(&oci.digest(), oci.manifest.clone(), OCI_MANIFEST).send().await.unwrap();
    assert_eq!(response.status(), 201);

    // Too large.
    let mut huge = br#"{"schemaVersion":2,"annotations":{"x":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 4 << 20));
    huge.extend_from_slice(br#""}}"#);
    // A client of its own: the server answers before reading the body and
    // then closes the connection, which a pooled client would reuse.
    let response = Client::new()
        .put(server.url("/v2/here/manifests/huge"))
        .header("Content-Type", OCI_MANIFEST)
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<Value>().await.unwrap()["errors"][0]["code"], "MANIFEST_INVALID");

    // Malformed bodies, wrong types, schema 1.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), OCI_MANIFEST),
        (b"[]".to_vec(), OCI_MANIFEST),
        (oci.manifest.clone(), OCI_INDEX),
        (br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_vec(), "application/vnd.docker.distribution.manifest.v1+prettyjws"),
        (br#"{"schemaVersion":2,"mediaType":"application/x-unknown"}"#.to_vec(), "application/x-unknown"),
        (br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{}}"#.to_vec(), OCI_MANIFEST),
    ];
    for (body, content_type) in cases {
        let response = put("bad", body, content_type).send().await.unwrap();
        expect_error(response, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await;
    }
    let response = put("bad:tag", oci.manifest.clone(), OCI_MANIFEST).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let response = client.get(server.url("/v2/here/manifests/bad")).send().await.unwrap();
    assert_eq!(response.status(), 404, "no refused manifest got tagged");
}

#[tokio::test]
async fn manifest_and_tag_delete() {
    let (_directory, server, client) = setup();
    let first = image::disk_image("a.img", b"first disk");
    let second = image::disk_image("b.img", b"second disk");
    push_image(&client, &server, "vi/ns/img", "one", &first).await;
    push_image(&client, &server, "vi/ns/img", "also-one", &first).await;
    push_image(&client, &server, "vi/ns/img", "two", &second).await;

    // Deleting a tag leaves the manifest.
    let response = client.delete(server.url("/v2/vi/ns/img/manifests/two")).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(client.get(server.url("/v2/vi/ns/img/manifests/two")).send().await.unwrap().status(), 404);
    let by_digest = server.url(&format!("/v2/vi/ns/img/manifests/{}", second.digest()));
    assert_eq!(client.get(&by_digest).send().await.unwrap().status(), 200);

    // Deleting by digest removes the manifest and every tag on it.
    let response = client
        .delete(server.url(&format!("/v2/vi/ns/img/manifests/{}", first.digest())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    for tag in ["one", "also-one"] {
        let response = client.get(server.url(&format!("/v2/vi/ns/img/manifests/{tag}"))).send().await.unwrap();
        assert_eq!(response.status(), 404, "{tag}");
    }
    let tags: Value = client.get(server.url("/v2/vi/ns/img/tags/list")).send().await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"], json!([]));
    let response = client
        .delete(server.url(&format!("/v2/vi/ns/img/manifests/{}", first.digest())))
        .send()
        .await
        .unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn tags_and_catalog_pagination() {
    let (_directory, server, client) = setup();
    let image = image::disk_image("d.img", b"disk");
    for tag in ["e", "a", "c", "b", "d"] {
        push_image(&client, &server, "cvi/ubuntu", tag, &image).await;
    }
    for repository in ["vi/ns/x", "vi/ns/y", "vd/ns/z"] {
        push_image(&client, &server, repository, "t", &image).await;
    }

    let response = client.get(server.url("/v2/cvi/ubuntu/tags/list")).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"name": "cvi/ubuntu", "tags": ["a", "b", "c", "d", "e"]}));

    let mut seen = Vec::new();
    let mut next = Some("/v2/cvi/ubuntu/tags/list?n=2".to_string());
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        assert!(pages <= 5, "pagination does not end");
        let response = client.get(server.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let link = header(&response, "Link");
        let body: Value = response.json().await.unwrap();
        let page: Vec<String> = serde_json::from_value(body["tags"].clone()).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page);
        if !link.is_empty() {
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            next = Some(link[1..link.find('>').unwrap()].to_string());
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    assert_eq!(pages, 3);

    let response = client.get(server.url("/v2/cvi/ubuntu/tags/list?n=10&last=c")).send().await.unwrap();
    assert!(header(&response, "Link").is_empty());
    assert_eq!(response.json::<Value>().await.unwrap()["tags"], json!(["d", "e"]));
    let response = client.get(server.url("/v2/cvi/ubuntu/tags/list?n=0")).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["tags"], json!([]));
    let response = client.get(server.url("/v2/cvi/none/tags/list")).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;

    let response = client.get(server.url("/v2/_catalog")).send().await.unwrap();
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"repositories": ["cvi/ubuntu", "vd/ns/z", "vi/ns/x", "vi/ns/y"]})
    );
    let response = client.get(server.url("/v2/_catalog?n=2")).send().await.unwrap();
    let link = header(&response, "Link");
    assert_eq!(link, "</v2/_catalog?n=2&last=vd%2Fns%2Fz>; rel=\"next\"");
    assert_eq!(response.json::<Value>().await.unwrap()["repositories"], json!(["cvi/ubuntu", "vd/ns/z"]));
    let response = client.get(server.url(&link[1..link.find('>').unwrap()])).send().await.unwrap();
    assert!(header(&response, "Link").is_empty());
    assert_eq!(response.json::<Value>().await.unwrap()["repositories"], json!(["vi/ns/x", "vi/ns/y"]));
}

#[tokio::test]
async fn referrers_api_with_artifact_type_filter() {
    let (_directory, server, client) = setup();
    let subject = image::disk_image("s.img", b"subject disk");
    push_image(&client, &server, "vi/ns/img", "v1", &subject).await;
    let empty = push_blob(&client, &server, "vi/ns/img", b"{}").await;
    let signature = push_blob(&client, &server, "vi/ns/img", b"signature bytes").await;

    let artifact = |artifact_type: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": signature, "size": 15}],
            "subject": {"mediaType": DOCKER_MANIFEST, "digest": subject.digest(), "size": subject.manifest.len()},
            "annotations": {"org.example.kind": artifact_type},
        }))
        .unwrap()
    };
    let mut pushed = Vec::new();
    for artifact_type in ["application/vnd.example.signature", "application/vnd.example.sbom"] {
        let body = artifact(artifact_type);
        let digest = sha256_digest(&body);
        let response = client
            .put(server.url(&format!("/v2/vi/ns/img/manifests/{digest}")))
            .header("Content-Type", OCI_MANIFEST)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(header(&response, "OCI-Subject"), subject.digest());
        pushed.push((digest, body.len(), artifact_type));
    }

    let url = server.url(&format!("/v2/vi/ns/img/referrers/{}", subject.digest()));
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "Content-Type"), OCI_INDEX);
    assert!(header(&response, "OCI-Filters-Applied").is_empty());
    let index: Value = response.json().await.unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let mut listed: Vec<(String, u64, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|descriptor| {
            assert_eq!(descriptor["mediaType"], OCI_MANIFEST);
            assert_eq!(descriptor["annotations"]["org.example.kind"], descriptor["artifactType"]);
            (
                descriptor["digest"].as_str().unwrap().to_string(),
                descriptor["size"].as_u64().unwrap(),
                descriptor["artifactType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    listed.sort();
    let mut expected: Vec<(String, u64, String)> =
        pushed.iter().map(|(digest, size, kind)| (digest.clone(), *size as u64, kind.to_string())).collect();
    expected.sort();
    assert_eq!(listed, expected);

    let response = client
        .get(format!("{url}?artifactType=application/vnd.example.sbom"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "OCI-Filters-Applied"), "artifactType");
    let index: Value = response.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["artifactType"], "application/vnd.example.sbom");

    // No referrers: an empty index, not 404. A bad digest: 400.
    let response = client
        .get(server.url(&format!("/v2/vi/ns/img/referrers/{}", sha256_digest(b"nothing"))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["manifests"], json!([]));
    let response = client.get(server.url("/v2/vi/ns/img/referrers/sha256:zz")).send().await.unwrap();
    expect_error(response, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;

    // Deleting a referrer removes it from the list.
    let response = client
        .delete(server.url(&format!("/v2/vi/ns/img/manifests/{}", pushed[0].0)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let index: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
}

/// Sends a request line as it is, so that paths no HTTP library would send
/// (`..`, `//`) reach the server.
fn raw_status(server: &Server, method: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(&server.address).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, answer)
}

#[tokio::test]
async fn repository_names_are_checked_before_storage() {
    let (_directory, server, client) = setup();
    let long = format!("{}/x", "a".repeat(254));
    let digest = sha256_digest(b"x");
    for path in [
        format!("/v2/UPPER/blobs/{digest}"),
        format!("/v2/a/../b/blobs/{digest}"),
        format!("/v2/../../../etc/blobs/{digest}"),
        "/v2/a//b/manifests/latest".to_string(),
        "/v2/a/-b/manifests/latest".to_string(),
        "/v2/a%2F..%2Fb/manifests/latest".to_string(),
        format!("/v2/{long}/tags/list"),
    ] {
        let (status, answer) = raw_status(&server, "GET", &path);
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(answer.contains("NAME_INVALID"), "{path}: {answer}");
    }
    let (status, _) = raw_status(&server, "POST", "/v2/a/../b/blobs/uploads/");
    assert_eq!(status, 400);
    let ok_name = format!("{}/x", "a".repeat(253));
    let response = client.get(server.url(&format!("/v2/{ok_name}/tags/list"))).send().await.unwrap();
    expect_error(response, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;
    assert!(
        !StoredView::of(&server.storage).exists("docker/registry/v2/repositories/b"),
        "a refused name reached storage"
    );
    // Methods the API does not have.
    let response = client.put(server.url(&format!("/v2/a/blobs/{digest}"))).send().await.unwrap();
    expect_error(response, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await;
}

#[tokio::test]
async fn metrics_health_readiness_and_request_ids() {
    let (directory, server, client) = setup();
    assert_eq!(client.get(server.url("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(client.get(server.url("/readyz")).send().await.unwrap().status(), StatusCode::OK);

    let data = pseudo_random(1 << 20, 3);
    let digest = push_blob(&client, &server, "vi/ns/metrics", &data).await;
    let response = client.get(server.url(&format!("/v2/vi/ns/metrics/blobs/{digest}"))).send().await.unwrap();
    let id = header(&response, "x-request-id");
    assert_eq!(id.len(), 16, "a request id is given to every answer");
    assert_eq!(response.bytes().await.unwrap().len(), data.len());
    let response = client
        .get(server.url("/v2/vi/ns/metrics/manifests/missing"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "x-request-id"), "trace-me-42", "a plain id from the client is kept");
    let response = client.get(server.url("/v2/")).header("x-request-id", "bad id\"").send().await.unwrap();
    assert_ne!(header(&response, "x-request-id"), "bad id\"");
    let log = server.log();
    assert!(
        log.lines().any(|line| line.contains(&id) && line.contains("status=200")),
        "the request id is in the log:\n{log}"
    );
    assert!(log.contains("trace-me-42"), "{log}");

    let text = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let requests = "dvcr_http_requests_total";
    assert_eq!(metric(&text, requests, &["method=\"GET\"", "route=\"blob\"", "status=\"200\""]), 1.0, "{text}");
    assert_eq!(metric(&text, requests, &["route=\"manifest\"", "status=\"404\""]), 1.0, "{text}");
    assert!(metric(&text, requests, &["route=\"upload_start\""]) >= 1.0, "{text}");
    assert!(metric(&text, "dvcr_http_sent_bytes_total", &[]) >= data.len() as f64, "{text}");
    assert!(metric(&text, "dvcr_http_received_bytes_total", &[]) >= data.len() as f64, "{text}");
    assert!(metric(&text, "dvcr_http_request_duration_seconds_count", &["route=\"blob\""]) >= 1.0, "{text}");
    assert!(text.contains("dvcr_http_request_duration_seconds_bucket{"), "{text}");
    assert_eq!(metric(&text, "dvcr_uploads_in_flight", &[]), 0.0, "{text}");
    assert_eq!(metric(&text, "dvcr_storage_errors_total", &[]), 0.0, "{text}");

    // An upload in flight is counted, and no longer once its client is gone.
    let gauge = |client: Client, server_url: String| async move {
        let text = client.get(format!("{server_url}/metrics")).send().await.unwrap().text().await.unwrap();
        metric(&text, "dvcr_uploads_in_flight", &[])
    };
    let response = client.post(server.url("/v2/vi/ns/metrics/blobs/uploads/")).send().await.unwrap();
    let location = header(&response, "location");
    let (mut sender, receiver) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let upload = tokio::spawn(client.patch(server.url(&location)).body(reqwest::Body::wrap_stream(receiver)).send());
    futures::SinkExt::send(&mut sender, Ok(vec![1u8; 4096])).await.unwrap();
    let mut seen = 0.0;
    for _ in 0..200 {
        seen = gauge(client.clone(), server.url("")).await;
        if seen == 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 1.0, "the upload is in flight");
    upload.abort();
    drop(sender);
    for _ in 0..200 {
        seen = gauge(client.clone(), server.url("")).await;
        if seen == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 0.0, "an upload whose client went away is not counted");

    // Storage that fails makes the registry unready and is counted.
    let storage = directory.path().join("data");
    break_storage(&storage, true);
    let response = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.text().await.unwrap().contains("storage fails"));
    assert_eq!(client.get(server.url("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    let response = client.get(server.url(&format!("/v2/vi/ns/metrics/blobs/{digest}"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let text = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric(&text, "dvcr_storage_errors_total", &[]) >= 1.0, "{text}");
    break_storage(&storage, false);
    assert_eq!(client.get(server.url("/readyz")).send().await.unwrap().status(), StatusCode::OK);
}
