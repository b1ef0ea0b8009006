//! The controller's I/O layer against a recorded Kubernetes API (kube's
//! documented approach: a `tower-test` mock service answering each request
//! the controller makes, checked in order, with nothing else allowed) and a
//! real registry (`dvcr serve` with scoped tokens on 127.0.0.1) for the
//! registry side: presence checks, deletion and copies by mount.

mod common;

use dvcr_controller::reconcile::provision::ImageLocation;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::image::pseudo_random;
use common::token_registry::TokenRegistry;
use common::{run, DVCR};
use dvcr_controller::api::{ClusterVirtualImage, VirtualImage};
use dvcr_controller::reconcile::FINALIZER;
use dvcr_controller::runtime::images::{reconcile_cluster_virtual_image, reconcile_virtual_image};
use dvcr_controller::runtime::{Context, Settings};
use dvcr_controller::workload::{VolumeMode, WorkerConfig};
use dvcr_registry::auth::token::TokenVerifier;
use http::{Request, Response};
use dvcr_controller::kube::client::Body;
use serde_json::{json, Value};

const UID: &str = "3d6f1a2b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
const SOURCE_UID: &str = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b";
const GROUP_PATH: &str = "/apis/virtualization.deckhouse.io/v1alpha2";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Checks a request's query string and JSON body.
type RequestCheck = Box<dyn Fn(&str, &Value) + Send>;

/// One request the controller must make, and the API's answer.
struct Exchange {
    method: &'static str,
    path: String,
    /// Checks the request: its query string and JSON body.
    check: RequestCheck,
    status: u16,
    answer: Value,
}

fn expect(method: &'static str, path: impl Into<String>, status: u16, answer: Value) -> Exchange {
    Exchange {
        method,
        path: path.into(),
        check: Box::new(|_, _| {}),
        status,
        answer,
    }
}

impl Exchange {
    fn checking(mut self, check: impl Fn(&str, &Value) + Send + 'static) -> Exchange {
        self.check = Box::new(check);
        self
    }
}

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} not found"), "reason": "NotFound", "code": 404})
}

/// The RBAC verb and resource of a request, checked against what the
/// controller's ClusterRole grants (`runtime::PERMISSIONS`).
fn assert_permitted(method: &str, path: &str, query: &str) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("{path} is not a Kubernetes API path"),
    };
    let rest = match rest {
        ["namespaces", _, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, subresource] => (format!("{resource}/{subresource}"), true),
        _ => panic!("{path} names no resource"),
    };
    let verbs: &[&str] = match (method, named) {
        ("GET", true) => &["get"],
        ("GET", false) if query.contains("watch=true") => &["watch"],
        ("GET", false) => &["list"],
        ("POST", _) => &["create"],
        // A server-side apply creates what is missing: both verbs.
        ("PATCH", _) if query.contains("fieldManager=") => &["patch", "create"],
        ("PATCH", _) => &["patch"],
        ("DELETE", true) => &["delete"],
        ("PUT", true) => &["update"],
        _ => panic!("{method} {path}: not a request the controller should make"),
    };
    for verb in verbs {
        let granted = dvcr_controller::runtime::PERMISSIONS
            .iter()
            .any(|(g, r, granted)| *g == group && *r == resource && granted.contains(verb));
        assert!(granted, "{method} {path} needs {verb} on {group}/{resource}, which the controller's role lacks");
    }
}

/// Answers `exchanges` in order, then fails on any further request.
async fn serve(mut handle: Handle, exchanges: Vec<Exchange>) {
    for (index, exchange) in exchanges.into_iter().enumerate() {
        let next = tokio::time::timeout(Duration::from_secs(20), handle.next_request()).await;
        let Ok(Some((request, respond))) = next else {
            panic!("request {index} ({} {}) never came", exchange.method, exchange.path);
        };
        let (method, path, query) = (
            request.method().to_string(),
            request.uri().path().to_string(),
            request.uri().query().unwrap_or_default().to_string(),
        );
        assert_eq!(
            (method.as_str(), path.as_str()),
            (exchange.method, exchange.path.as_str()),
            "request {index} is not the expected one"
        );
        assert_permitted(&method, &path, &query);
        let body = request.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (exchange.check)(&query, &body);
        let response = Response::builder()
            .status(exchange.status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&exchange.answer).unwrap_or_default()))
            .expect("a valid response");
        respond.send_response(response);
    }
    if let Ok(Some((request, _))) = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await {
        panic!("an unexpected request: {} {}", request.method(), request.uri());
    }
}

/// A registry taking tokens signed by a fresh key, and a context whose
/// Kubernetes client is the mock.
struct Setup(TokenRegistry);

impl std::ops::Deref for Setup {
    type Target = TokenRegistry;

    fn deref(&self) -> &TokenRegistry {
        &self.0
    }
}

impl Setup {
    fn new() -> Setup {
        Setup(TokenRegistry::start())
    }

    fn context(&self) -> (Arc<Context>, Handle) {
        self.context_with_addresses(None, &[])
    }

    /// A context whose controller hands out addresses of `cidrs`, with
    /// `leases` (name, holder claim in namespace `vms`) in its lease cache.
    fn context_with_addresses(
        &self,
        cidrs: Option<&[&str]>,
        leases: &[(&str, Option<&str>)],
    ) -> (Arc<Context>, Handle) {
        use dvcr_controller::kube::runtime::{reflector, watcher};
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for (name, holder) in leases {
            writer.apply_watcher_event(&watcher::Event::InitApply(lease(name, *holder, "1")));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let address_pool = cidrs.map(|cidrs| dvcr_controller::ipam::AddressPool::parse(cidrs).unwrap());
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = dvcr_controller::kube::Client::new(service, "default");
        let settings = Settings {
            workers: WorkerConfig {
                registry_host: self.server.address.clone(),
                registry_ca_bundle: None,
                registry_plain_http: true,
                dvcr_image: "registry.example/dvcr:1.0".into(),
                controller_namespace: "dvcr".into(),
                upload_ingress: None,
                upload_timeout_seconds: 900,
                disk_volume_mode: VolumeMode::Filesystem,
            },
            token_private_key: std::fs::read(&self.private_key).unwrap(),
            worker_token_lifetime: Duration::from_secs(3600),
            address_pool,
            instance: Some("dvcr-controller-0".into()),
        };
        (Arc::new(Context::new(client, settings, store).unwrap()), handle)
    }

    /// Stores an image at `repository:tag` with `dvcr import`.
    fn store(&self, repository: &str, tag: &str) {
        let directory = tempfile::tempdir().unwrap();
        let disk = directory.path().join("disk.img");
        std::fs::write(&disk, pseudo_random(1 << 20, 9)).unwrap();
        let token_file = directory.path().join("token");
        std::fs::write(&token_file, self.token(&[&format!("repository:{repository}:pull,push")])).unwrap();
        run(Command::new(DVCR)
            .arg("import")
            .arg(&disk)
            .arg(format!("{}/{repository}:{tag}", self.server.address))
            .arg("--registry-token-file")
            .arg(&token_file));
    }

    /// Whether `repository:tag` is in the registry.
    fn stored(&self, repository: &str, tag: &str) -> bool {
        let bearer = format!("Authorization: Bearer {}", self.token(&[&format!("repository:{repository}:pull")]));
        let output = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-I", "-H", &bearer])
            .arg(self.server.url(&format!("/v2/{repository}/manifests/{tag}")))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim() == "200"
    }
}

fn virtual_image(finalizers: &[&str], spec: Value, status: Value) -> VirtualImage {
    serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualImage",
        "metadata": {"name": "ubuntu", "namespace": "vms", "uid": UID, "generation": 1,
            "resourceVersion": "41", "finalizers": finalizers},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

fn http_spec() -> Value {
    json!({"dataSource": {"type": "HTTP", "http": {"url": "https://images.example/noble.qcow2"}}})
}

fn image_path(suffix: &str) -> String {
    format!("{GROUP_PATH}/namespaces/vms/virtualimages/ubuntu{suffix}")
}

fn importer_pod_path() -> String {
    format!("/api/v1/namespaces/vms/pods/dvcr-importer-{UID}")
}

/// The importer Pod of `UID`, exited 0 with `report` as its termination message.
fn finished_importer(report: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("dvcr-importer-{UID}"),
        "namespace": "vms"}, "status": {"phase": "Succeeded", "containerStatuses": [{"name": "importer",
        "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "message": report}}}]}})
}

/// The deletions of `UID`'s workers (`DeleteWorker`), in order; those in
/// `found` exist ("importer", "uploader", "provisioner", "secret").
fn worker_deletions(found: &[&str]) -> Vec<Exchange> {
    let pod = |name: &str| {
        let path = format!("/api/v1/namespaces/vms/pods/dvcr-{name}-{UID}");
        match found.contains(&name) {
            true => expect("DELETE", path, 200, json!({})),
            false => expect("DELETE", path, 404, not_found("pods")),
        }
    };
    vec![
        pod("importer"),
        pod("uploader"),
        pod("provisioner"),
        expect("DELETE", format!("/api/v1/namespaces/vms/services/dvcr-uploader-{UID}"), 404, not_found("services")),
        expect(
            "DELETE",
            format!("/apis/networking.k8s.io/v1/namespaces/vms/ingresses/dvcr-uploader-{UID}"),
            404,
            not_found("ingresses"),
        ),
        match found.contains(&"secret") {
            true => expect("DELETE", format!("/api/v1/namespaces/vms/secrets/dvcr-worker-{UID}"), 200, json!({})),
            false => expect(
                "DELETE",
                format!("/api/v1/namespaces/vms/secrets/dvcr-worker-{UID}"),
                404,
                not_found("secrets"),
            ),
        },
    ]
}

async fn reconcile_with(
    context: Arc<Context>,
    handle: Handle,
    image: VirtualImage,
    exchanges: Vec<Exchange>,
) -> String {
    let (outcome, ()) = tokio::join!(reconcile_virtual_image(Arc::new(image), context), serve(handle, exchanges));
    match outcome {
        Ok(requeue) => format!("{requeue:?}"),
        Err(error) => format!("error: {error}"),
    }
}

#[tokio::test]
async fn a_new_image_gets_its_finalizer_a_verified_token_secret_an_importer_and_a_status() {
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let image = virtual_image(&[], http_spec(), json!({}));
    let public_key = setup.public_key.clone();
    let registry = setup.server.address.clone();
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("PATCH", image_path(""), 200, serde_json::to_value(&image).unwrap()).checking(|_, body| {
            assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]));
            assert_eq!(body["metadata"]["resourceVersion"], "41", "the patch is guarded by the resourceVersion");
        }),
        expect("PATCH", format!("/api/v1/namespaces/vms/secrets/dvcr-worker-{UID}"), 200, json!({}))
            .checking(move |query, body| {
                assert!(query.contains("fieldManager=dvcr-controller") && query.contains("force=true"), "{query}");
                assert_eq!(body["kind"], "Secret");
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], UID);
                let token = body["data"]["registry-token"].as_str().unwrap_or_default();
                let token = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, token).unwrap();
                let verifier = TokenVerifier::new(&public_key, "virtualization-controller", "dvcr").unwrap();
                let claims = verifier.verify(&String::from_utf8_lossy(&token)).expect("a token the registry accepts");
                assert_eq!(claims.access.len(), 1);
                assert_eq!(claims.access[0].name, "vi/vms/ubuntu");
                assert_eq!(claims.access[0].actions, vec!["pull", "push"]);
            }),
        expect("POST", "/api/v1/namespaces/vms/pods", 201, json!({})).checking(move |_, body| {
            assert_eq!(body["metadata"]["name"], format!("dvcr-importer-{UID}"));
            let args = &body["spec"]["containers"][0]["args"];
            assert_eq!(args[1], "https://images.example/noble.qcow2");
            assert_eq!(args[2], format!("{registry}/vi/vms/ubuntu:{UID}"));
        }),
        expect("PATCH", image_path("/status"), 200, serde_json::to_value(&image).unwrap()).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "Provisioning");
            assert_eq!(body["status"]["observedGeneration"], 1);
        }),
    ];
    let outcome = reconcile_with(context, handle, image, exchanges).await;
    assert!(outcome.contains("requeue_after: Some(3s)"), "{outcome}");
}

#[tokio::test]
async fn a_finished_importer_is_removed_and_its_report_becomes_the_status() {
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let image = virtual_image(&[FINALIZER], http_spec(), json!({"phase": "Provisioning", "progress": "97.0%",
        "downloadSpeed": {"avg": "1.0Mi/s", "avgBytes": "1048576", "current": "3.0Mi/s", "currentBytes": "3145728"}}));
    let report = r#"{"source-image-size":1048576,"source-image-virtual-size":2097152,"source-image-format":"qcow2",
        "duration":1,"average-speed":1048576}"#;
    let pod = finished_importer(report);
    let registry = setup.server.address.clone();
    let mut exchanges = vec![expect("GET", importer_pod_path(), 200, pod)];
    exchanges.extend(worker_deletions(&["importer", "secret"]));
    exchanges.extend([
        expect("PATCH", image_path("/status"), 200, serde_json::to_value(&image).unwrap()).checking(move |_, body| {
            let status = &body["status"];
            assert_eq!(status["phase"], "Ready");
            assert_eq!(status["progress"], "100%");
            assert_eq!(status["format"], "qcow2");
            assert_eq!(status["size"]["unpackedBytes"], "2097152");
            assert_eq!(status["target"]["registryURL"], format!("{registry}/vi/vms/ubuntu:{UID}"));
            assert_eq!(status["downloadSpeed"], json!({"current": null, "currentBytes": null}), "only changes");
        }),
    ]);
    let outcome = reconcile_with(context, handle, image, exchanges).await;
    assert!(outcome.contains("requeue_after: Some(300s)"), "{outcome}");
}

#[tokio::test]
async fn ready_images_are_looked_for_in_the_real_registry() {
    let setup = Setup::new();
    let ready = |url: &str| json!({"phase": "Ready", "observedGeneration": 1, "target": {"registryURL": url}});
    let url = format!("{}/vi/vms/ubuntu:{UID}", setup.server.address);

    // Stored: nothing to write.
    setup.store("vi/vms/ubuntu", UID);
    let (context, handle) = setup.context();
    let image = virtual_image(&[FINALIZER], http_spec(), ready(&url));
    let exchanges = vec![expect("GET", importer_pod_path(), 404, not_found("pods"))];
    let outcome = reconcile_with(context, handle, image.clone(), exchanges).await;
    assert!(outcome.contains("300s"), "{outcome}");

    // Gone from the registry: ImageLost.
    let mut delete = Command::new("curl");
    let bearer = format!("Authorization: Bearer {}", setup.token(&["repository:vi/vms/ubuntu:*"]));
    delete.args(["-sf", "-X", "DELETE", "-H", &bearer]);
    run(delete.arg(setup.server.url(&format!("/v2/vi/vms/ubuntu/manifests/{UID}"))));
    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("PATCH", image_path("/status"), 200, serde_json::to_value(&image).unwrap()).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "ImageLost");
            assert_eq!(body["status"]["conditions"][0]["reason"], "ImageLost");
        }),
    ];
    reconcile_with(context, handle, image, exchanges).await;
}

#[tokio::test]
async fn deletion_removes_the_workers_and_the_registry_image_then_the_finalizer() {
    let setup = Setup::new();
    setup.store("vi/vms/ubuntu", UID);
    assert!(setup.stored("vi/vms/ubuntu", UID));
    let (context, handle) = setup.context();
    let mut image = virtual_image(&[FINALIZER, "example.com/other"], http_spec(), json!({"phase": "Ready"}));
    image.metadata.deletion_timestamp = Some(dvcr_controller::k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        dvcr_controller::k8s_openapi::jiff::Timestamp::now(),
    ));
    let mut exchanges = worker_deletions(&[]);
    exchanges.push(
        expect("PATCH", image_path(""), 200, serde_json::to_value(&image).unwrap()).checking(|_, body| {
            assert_eq!(body["metadata"]["finalizers"], json!(["example.com/other"]), "only ours goes");
        }),
    );
    let outcome = reconcile_with(context, handle, image, exchanges).await;
    assert!(outcome.contains("await_change") || outcome.contains("requeue_after: None"), "{outcome}");
    assert!(!setup.stored("vi/vms/ubuntu", UID), "the registry image is deleted");
}

#[tokio::test]
async fn an_object_ref_copies_the_ready_source_in_the_registry_without_a_pod() {
    let setup = Setup::new();
    setup.store("cvi/base", SOURCE_UID);
    let (context, handle) = setup.context();
    let source_url = format!("{}/cvi/base:{SOURCE_UID}", setup.server.address);
    let source: ClusterVirtualImage = serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "ClusterVirtualImage",
        "metadata": {"name": "base", "uid": SOURCE_UID},
        "spec": {"dataSource": {"type": "HTTP", "http": {"url": "https://images.example/base.img"}}},
        "status": {"phase": "Ready", "format": "raw", "cdrom": false, "size": {"storedBytes": "1048576"},
            "target": {"registryURL": source_url}}}))
    .unwrap();
    let image = virtual_image(
        &[FINALIZER],
        json!({"dataSource": {"type": "ObjectRef", "objectRef": {"kind": "ClusterVirtualImage", "name": "base"}}}),
        json!({}),
    );
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", format!("{GROUP_PATH}/clustervirtualimages/base"), 200, serde_json::to_value(&source).unwrap()),
        expect("PATCH", image_path("/status"), 200, serde_json::to_value(&image).unwrap()).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "Ready");
            assert_eq!(body["status"]["sourceUID"], SOURCE_UID);
            assert_eq!(body["status"]["size"]["storedBytes"], "1048576");
        }),
    ];
    reconcile_with(context, handle, image, exchanges).await;
    assert!(setup.stored("vi/vms/ubuntu", UID), "the copy is tagged in the registry");
}

#[tokio::test]
async fn pull_secrets_are_copied_into_the_worker_secret_and_a_missing_one_is_an_error() {
    let setup = Setup::new();
    let spec = json!({"dataSource": {"type": "ContainerImage", "containerImage": {
        "image": "quay.example/images/noble:24.04", "imagePullSecret": {"name": "pull"}}}});
    let image = virtual_image(&[FINALIZER], spec, json!({}));
    let pull = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pull", "namespace": "vms"},
        "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": "eyJhdXRocyI6e319"}});
    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", "/api/v1/namespaces/vms/secrets/pull", 200, pull),
        expect("PATCH", format!("/api/v1/namespaces/vms/secrets/dvcr-worker-{UID}"), 200, json!({}))
            .checking(|_, body| assert_eq!(body["data"]["auth.json"], "eyJhdXRocyI6e319")),
        expect("POST", "/api/v1/namespaces/vms/pods", 201, json!({})).checking(|_, body| {
            let args = body["spec"]["containers"][0]["args"].as_array().cloned().unwrap_or_default();
            assert!(args.contains(&json!("--auth-file=/var/run/dvcr/auth.json")), "{args:?}");
        }),
        expect("PATCH", image_path("/status"), 200, serde_json::to_value(&image).unwrap()),
    ];
    reconcile_with(context, handle, image.clone(), exchanges).await;

    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", "/api/v1/namespaces/vms/secrets/pull", 404, not_found("secrets")),
    ];
    let outcome = reconcile_with(context, handle, image.clone(), exchanges).await;
    assert_eq!(outcome, "error: the pull secret vms/pull does not exist");

    // As the controller runs it, the failure becomes a Warning Event on the
    // image, so that `kubectl describe vi` says what is wrong.
    let (context, handle) = setup.context();
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "ubuntu.1", "namespace": "vms"}, "eventTime": "2026-11-23T10:00:00.000000Z"});
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", "/api/v1/namespaces/vms/secrets/pull", 404, not_found("secrets")),
        expect("POST", "/apis/events.k8s.io/v1/namespaces/vms/events", 201, event).checking(|_, body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "PullSecretUnusable");
            assert_eq!(body["note"], "the pull secret vms/pull does not exist");
            assert_eq!(body["regarding"]["kind"], "VirtualImage");
            assert_eq!(body["regarding"]["name"], "ubuntu");
            assert_eq!(body["regarding"]["uid"], UID);
            assert_eq!(body["reportingController"], "dvcr-controller");
            assert_eq!(body["reportingInstance"], "dvcr-controller-0");
        }),
    ];
    let reported = dvcr_controller::runtime::reported(Arc::new(image), context, reconcile_virtual_image);
    let (outcome, ()) = tokio::join!(reported, serve(handle, exchanges));
    assert!(outcome.is_err(), "{outcome:?}");
}

#[tokio::test]
async fn cluster_images_run_their_workers_in_the_controller_namespace() {
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let image: ClusterVirtualImage = serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "ClusterVirtualImage",
        "metadata": {"name": "noble", "uid": UID, "generation": 3, "resourceVersion": "7", "finalizers": [FINALIZER]},
        "spec": {"dataSource": {"type": "Upload"}}}))
    .unwrap();
    let answer = serde_json::to_value(&image).unwrap();
    let exchanges = vec![
        expect("GET", format!("/api/v1/namespaces/dvcr/pods/dvcr-uploader-{UID}"), 404, not_found("pods")),
        expect("PATCH", format!("/api/v1/namespaces/dvcr/secrets/dvcr-worker-{UID}"), 200, json!({})),
        expect("POST", "/api/v1/namespaces/dvcr/pods", 201, json!({})).checking(|_, body| {
            assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "ClusterVirtualImage");
            assert_eq!(body["spec"]["containers"][0]["args"][0], "upload-server");
        }),
        expect("PATCH", format!("/api/v1/namespaces/dvcr/services/dvcr-uploader-{UID}"), 200, json!({})),
        expect("PATCH", format!("{GROUP_PATH}/clustervirtualimages/noble/status"), 200, answer)
            .checking(|_, body| {
                assert_eq!(body["status"]["phase"], "WaitForUserUpload");
                assert_eq!(
                    body["status"]["imageUploadURLs"]["inCluster"],
                    format!("http://dvcr-uploader-{UID}.dvcr.svc/upload")
                );
            }),
    ];
    let (outcome, ()) = tokio::join!(
        reconcile_cluster_virtual_image(Arc::new(image), context),
        serve(handle, exchanges)
    );
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[test]
fn controller_run_names_a_bad_key_and_an_unreachable_cluster() {
    let setup = Setup::new();
    let directory = tempfile::tempdir().unwrap();
    let bad_key = directory.path().join("bad.key");
    std::fs::write(&bad_key, "not a key").unwrap();
    let controller = |key: &std::path::Path| {
        Command::new(DVCR)
            .args(["controller", "run", "--registry-host", "dvcr.dvcr.svc", "--dvcr-image", "dvcr:1"])
            .arg("--token-private-key")
            .arg(key)
            .env("KUBECONFIG", directory.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HOME", directory.path())
            .output()
            .unwrap()
    };
    let output = controller(&bad_key);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.key cannot sign tokens"), "{stderr}");
    let output = controller(&setup.private_key);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach the Kubernetes API"), "{stderr}");
}

#[tokio::test]
async fn the_controller_finds_its_own_image_in_its_pod() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = dvcr_controller::kube::Client::new(service, "default");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dvcr-controller-x", "namespace": "dvcr"},
        "spec": {"containers": [{"name": "sidecar", "image": "other:1"},
            {"name": "controller", "image": "registry.example/dvcr@sha256:abc"}]}});
    let exchanges = vec![expect("GET", "/api/v1/namespaces/dvcr/pods/dvcr-controller-x", 200, pod)];
    let (image, ()) = tokio::join!(
        dvcr_controller::runtime::own_image(&client, "dvcr", "dvcr-controller-x"),
        serve(handle, exchanges)
    );
    assert_eq!(image.ok().as_deref(), Some("registry.example/dvcr@sha256:abc"));
}

#[tokio::test]
async fn a_disk_from_a_ready_image_gets_its_pvc_a_pull_token_and_a_provisioner() {
    use dvcr_controller::api::VirtualDisk;
    use dvcr_controller::runtime::disks::reconcile_virtual_disk;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let source_url = format!("{}/cvi/noble:{SOURCE_UID}", setup.server.address);
    let source: ClusterVirtualImage = serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "ClusterVirtualImage",
        "metadata": {"name": "noble", "uid": SOURCE_UID},
        "spec": {"dataSource": {"type": "Upload"}},
        "status": {"phase": "Ready", "format": "qcow2", "size": {"unpackedBytes": "2147483648"},
            "target": {"registryURL": source_url}}}))
    .unwrap();
    let disk: VirtualDisk = serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualDisk",
        "metadata": {"name": "root", "namespace": "vms", "uid": UID, "generation": 1, "resourceVersion": "5",
            "finalizers": [FINALIZER]},
        "spec": {"persistentVolumeClaim": {"storageClassName": "fast"},
            "dataSource": {"type": "ObjectRef", "objectRef": {"kind": "ClusterVirtualImage", "name": "noble"}}}}))
    .unwrap();
    let answer = serde_json::to_value(&disk).unwrap();
    let claim = format!("vd-root-{UID}");
    let public_key = setup.public_key.clone();
    let registry = setup.server.address.clone();
    let exchanges = vec![
        expect("GET", format!("/api/v1/namespaces/vms/pods/dvcr-provisioner-{UID}"), 404, not_found("pods")),
        expect("GET", format!("/api/v1/namespaces/vms/persistentvolumeclaims/{claim}"), 404, not_found("pvc")),
        expect("GET", format!("{GROUP_PATH}/clustervirtualimages/noble"), 200, serde_json::to_value(&source).unwrap()),
        expect("POST", "/api/v1/namespaces/vms/persistentvolumeclaims", 201, json!({})).checking(|_, body| {
            let bytes = body["spec"]["resources"]["requests"]["storage"].as_str().unwrap_or_default();
            let bytes: u64 = bytes.parse().unwrap_or(0);
            assert!(bytes > 2 << 30, "a Filesystem PVC is larger than the 2 GiB disk: {bytes}");
            assert_eq!(body["spec"]["volumeMode"], "Filesystem");
            assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "VirtualDisk");
        }),
        expect("PATCH", format!("/api/v1/namespaces/vms/secrets/dvcr-worker-{UID}"), 200, json!({}))
            .checking(move |_, body| {
                let token = body["data"]["registry-token"].as_str().unwrap_or_default();
                let token = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, token).unwrap();
                let verifier = TokenVerifier::new(&public_key, "virtualization-controller", "dvcr").unwrap();
                let claims = verifier.verify(&String::from_utf8_lossy(&token)).expect("a valid token");
                assert_eq!(claims.access[0].name, "cvi/noble");
                assert_eq!(claims.access[0].actions, vec!["pull"]);
            }),
        expect("POST", "/api/v1/namespaces/vms/pods", 201, json!({})).checking(move |_, body| {
            let args = &body["spec"]["containers"][0]["args"];
            assert_eq!(args[0], "convert");
            assert_eq!(args[1], format!("docker://{registry}/cvi/noble:{SOURCE_UID}"));
            assert_eq!(args[2], "/disk/disk.img");
        }),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/root/status"), 200, answer).checking(
            |_, body| {
                assert_eq!(body["status"]["phase"], "Provisioning");
                assert_eq!(body["status"]["target"]["persistentVolumeClaimName"], format!("vd-root-{UID}"));
            },
        ),
    ];
    let (outcome, ()) = tokio::join!(reconcile_virtual_disk(Arc::new(disk), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_pending_pvc_of_a_wait_for_first_consumer_class_is_reported_so() {
    use dvcr_controller::api::VirtualDisk;
    use dvcr_controller::runtime::disks::reconcile_virtual_disk;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let disk: VirtualDisk = serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualDisk",
        "metadata": {"name": "blank", "namespace": "vms", "uid": UID, "generation": 1, "finalizers": [FINALIZER]},
        "spec": {"persistentVolumeClaim": {"size": "10Gi"}},
        "status": {"phase": "Provisioning"}}))
    .unwrap();
    let answer = serde_json::to_value(&disk).unwrap();
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("vd-blank-{UID}"), "namespace": "vms"},
        "spec": {"storageClassName": "local", "resources": {"requests": {"storage": "10Gi"}}},
        "status": {"phase": "Pending"}});
    let class = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "local"},
        "provisioner": "rancher.io/local-path", "volumeBindingMode": "WaitForFirstConsumer"});
    let exchanges = vec![
        expect("GET", format!("/api/v1/namespaces/vms/pods/dvcr-provisioner-{UID}"), 404, not_found("pods")),
        expect("GET", format!("/api/v1/namespaces/vms/persistentvolumeclaims/vd-blank-{UID}"), 200, claim),
        expect("GET", "/apis/storage.k8s.io/v1/storageclasses/local", 200, class),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/blank/status"), 200, answer).checking(
            |_, body| {
                assert_eq!(body["status"]["phase"], "WaitForFirstConsumer");
                assert_eq!(body["status"]["storageClassName"], "local");
            },
        ),
    ];
    let (outcome, ()) = tokio::join!(reconcile_virtual_disk(Arc::new(disk), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_disk_from_a_url_gets_its_pvc_from_the_import_report_and_its_copy_is_deleted_when_ready() {
    use dvcr_controller::api::VirtualDisk;
    use dvcr_controller::runtime::disks::reconcile_virtual_disk;
    let setup = Setup::new();
    let disk_at = |status: Value| -> VirtualDisk {
        serde_json::from_value(json!({
            "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualDisk",
            "metadata": {"name": "root", "namespace": "vms", "uid": UID, "generation": 1, "resourceVersion": "5",
                "finalizers": [FINALIZER]},
            "spec": {"dataSource": {"type": "HTTP", "http": {"url": "https://images.example/noble.qcow2"}}},
            "status": status}))
        .unwrap()
    };
    let claim_path = format!("/api/v1/namespaces/vms/persistentvolumeclaims/vd-root-{UID}");
    let status_path = format!("{GROUP_PATH}/namespaces/vms/virtualdisks/root/status");

    // The importer finished: a PVC of the reported virtual size, the importer removed.
    let disk = disk_at(json!({"phase": "Provisioning", "progress": "49.0%", "observedGeneration": 1}));
    let answer = serde_json::to_value(&disk).unwrap();
    let report = r#"{"source-image-size":1048576,"source-image-virtual-size":2147483648,"source-image-format":"qcow2",
        "duration":1,"average-speed":1048576}"#;
    let importer = finished_importer(report);
    let mut exchanges = vec![
        expect("GET", format!("/api/v1/namespaces/vms/pods/dvcr-provisioner-{UID}"), 404, not_found("pods")),
        expect("GET", claim_path.clone(), 404, not_found("pvc")),
        expect("GET", importer_pod_path(), 200, importer),
        expect("POST", "/api/v1/namespaces/vms/persistentvolumeclaims", 201, json!({})).checking(|_, body| {
            let bytes = body["spec"]["resources"]["requests"]["storage"].as_str().unwrap_or_default();
            assert_eq!(bytes.parse::<u64>().ok(), Some(VolumeMode::Filesystem.claim_bytes(2 << 30)));
        }),
    ];
    exchanges.extend(worker_deletions(&["importer", "secret"]));
    exchanges.push(expect("PATCH", status_path.clone(), 200, answer).checking(|_, body| {
        assert_eq!(body["status"].get("phase"), None, "still Provisioning: {body}");
        assert_eq!(body["status"]["progress"], "50.0%");
        let conditions = body["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let read = |condition: &&Value| condition["type"] == "DatasourceReady" && condition["status"] == "True";
        assert!(conditions.iter().any(|condition| read(&condition)));
    }));
    let (context, handle) = setup.context();
    let (outcome, ()) = tokio::join!(reconcile_virtual_disk(Arc::new(disk), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");

    // The provisioner finished: the copy is deleted from the real registry, then the workers.
    setup.store("vd/vms/root", UID);
    assert!(setup.stored("vd/vms/root", UID));
    let disk = disk_at(json!({"phase": "Provisioning", "progress": "50.0%", "observedGeneration": 1}));
    let answer = serde_json::to_value(&disk).unwrap();
    let provisioner = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("dvcr-provisioner-{UID}"),
        "namespace": "vms"}, "status": {"phase": "Succeeded"}});
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("vd-root-{UID}"), "namespace": "vms"},
        "spec": {"resources": {"requests": {"storage": "2Gi"}}},
        "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}}});
    let mut exchanges = vec![
        expect("GET", format!("/api/v1/namespaces/vms/pods/dvcr-provisioner-{UID}"), 200, provisioner),
        expect("GET", claim_path, 200, claim),
        expect("GET", importer_pod_path(), 404, not_found("pods")),
    ];
    exchanges.extend(worker_deletions(&["provisioner", "secret"]));
    exchanges.push(expect("PATCH", status_path, 200, answer).checking(|_, body| {
        assert_eq!(body["status"]["phase"], "Ready");
        assert_eq!(body["status"]["progress"], "100%");
    }));
    let (context, handle) = setup.context();
    let (outcome, ()) = tokio::join!(reconcile_virtual_disk(Arc::new(disk), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(!setup.stored("vd/vms/root", UID), "the intermediate copy is deleted");
}

#[tokio::test]
async fn an_image_kept_in_a_pvc_is_ready_when_written_and_lost_with_its_pvc() {
    let setup = Setup::new();
    let spec = json!({"storage": "PersistentVolumeClaim", "persistentVolumeClaim": {"storageClassName": "replicated"},
        "dataSource": {"type": "HTTP", "http": {"url": "https://images.example/noble.qcow2"}}});
    let claim_path = format!("/api/v1/namespaces/vms/persistentvolumeclaims/vi-ubuntu-{UID}");
    let provisioner_path = format!("/api/v1/namespaces/vms/pods/dvcr-provisioner-{UID}");
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("vi-ubuntu-{UID}"), "namespace": "vms"},
        "spec": {"storageClassName": "replicated", "resources": {"requests": {"storage": "2Gi"}}},
        "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}}});

    // The provisioner finished: the copy is deleted from the real registry,
    // then the workers; Ready with the PVC as its target.
    setup.store("vi/vms/ubuntu", UID);
    let image = virtual_image(
        &[FINALIZER],
        spec.clone(),
        json!({"phase": "Provisioning", "progress": "80.0%", "observedGeneration": 1, "format": "qcow2",
            "size": {"unpackedBytes": "2147483648"},
            "target": {"persistentVolumeClaimName": format!("vi-ubuntu-{UID}")}}),
    );
    let answer = serde_json::to_value(&image).unwrap();
    let provisioner = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("dvcr-provisioner-{UID}"),
        "namespace": "vms"}, "status": {"phase": "Succeeded"}});
    let mut exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", provisioner_path.clone(), 200, provisioner),
        expect("GET", claim_path.clone(), 200, claim),
    ];
    exchanges.extend(worker_deletions(&["provisioner", "secret"]));
    exchanges.push(expect("PATCH", image_path("/status"), 200, answer).checking(|_, body| {
        assert_eq!(body["status"]["phase"], "Ready");
        assert_eq!(body["status"]["progress"], "100%");
        assert_eq!(body["status"]["storageClassName"], "replicated");
        assert_eq!(body["status"].get("target"), None, "the PVC target stays as it was: {body}");
    }));
    let (context, handle) = setup.context();
    let outcome = reconcile_with(context, handle, image, exchanges).await;
    assert!(!outcome.starts_with("error"), "{outcome}");
    assert!(!setup.stored("vi/vms/ubuntu", UID), "the intermediate copy is deleted");

    // Ready, and its PVC is gone: PVCLost, and the registry is not asked
    // (the image was never meant to stay there).
    let image = virtual_image(
        &[FINALIZER],
        spec,
        json!({"phase": "Ready", "progress": "100%", "observedGeneration": 1,
            "target": {"persistentVolumeClaimName": format!("vi-ubuntu-{UID}")}}),
    );
    let answer = serde_json::to_value(&image).unwrap();
    let exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", provisioner_path, 404, not_found("pods")),
        expect("GET", claim_path, 404, not_found("persistentvolumeclaims")),
        expect("PATCH", image_path("/status"), 200, answer).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "PVCLost");
            let conditions = body["status"]["conditions"].as_array().cloned().unwrap_or_default();
            assert!(conditions.iter().any(|condition| condition["reason"] == "PVCLost"), "{body}");
        }),
    ];
    let (context, handle) = setup.context();
    let outcome = reconcile_with(context, handle, image, exchanges).await;
    assert!(!outcome.starts_with("error"), "{outcome}");

    // Failed, then its spec changed: the workers and the failed attempt's
    // PVC are deleted before it starts again.
    let mut image = virtual_image(
        &[FINALIZER],
        json!({"storage": "PersistentVolumeClaim",
            "dataSource": {"type": "HTTP", "http": {"url": "https://images.example/other.qcow2"}}}),
        json!({"phase": "Failed", "observedGeneration": 1}),
    );
    image.metadata.generation = Some(2);
    let answer = serde_json::to_value(&image).unwrap();
    let claim_path = format!("/api/v1/namespaces/vms/persistentvolumeclaims/vi-ubuntu-{UID}");
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("vi-ubuntu-{UID}"), "namespace": "vms"}, "status": {"phase": "Bound"}});
    let mut exchanges = vec![
        expect("GET", importer_pod_path(), 404, not_found("pods")),
        expect("GET", format!("/api/v1/namespaces/vms/pods/dvcr-provisioner-{UID}"), 404, not_found("pods")),
        expect("GET", claim_path.clone(), 200, claim.clone()),
    ];
    exchanges.extend(worker_deletions(&[]));
    exchanges.push(expect("DELETE", claim_path, 200, claim));
    exchanges.push(expect("PATCH", image_path("/status"), 200, answer).checking(|_, body| {
        assert_eq!(body["status"]["phase"], "Pending");
    }));
    let (context, handle) = setup.context();
    let outcome = reconcile_with(context, handle, image, exchanges).await;
    assert!(!outcome.starts_with("error"), "{outcome}");
}

fn machine_fixtures() -> (Value, Value) {
    let disk = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualDisk",
        "metadata": {"name": "root", "namespace": "vms", "uid": SOURCE_UID},
        "spec": {"persistentVolumeClaim": {"size": "10Gi"}},
        "status": {"phase": "Ready", "target": {"persistentVolumeClaimName": "vd-root-pvc"}}});
    let iso = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "ClusterVirtualImage",
        "metadata": {"name": "installer", "uid": SOURCE_UID},
        "spec": {"dataSource": {"type": "Upload"}},
        "status": {"phase": "Ready", "cdrom": true, "target": {"registryURL": "dvcr.dvcr.svc/cvi/installer:x"}}});
    (disk, iso)
}

fn virtual_machine_object(policy: &str) -> dvcr_controller::api::VirtualMachine {
    serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "vms", "uid": UID, "generation": 1},
        "spec": {"runPolicy": policy, "cpu": {"cores": 2, "coreFraction": "50%"}, "memory": {"size": "2Gi"},
            "blockDeviceRefs": [{"kind": "VirtualDisk", "name": "root"},
                {"kind": "ClusterVirtualImage", "name": "installer"}]}}))
    .unwrap()
}

#[tokio::test]
async fn a_machine_is_applied_to_kubevirt_once_its_devices_are_ready() {
    use dvcr_controller::runtime::machines::reconcile_virtual_machine;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let (disk, iso) = machine_fixtures();
    let machine = virtual_machine_object("AlwaysOnUnlessStoppedManually");
    let answer = serde_json::to_value(&machine).unwrap();
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/root"), 200, disk),
        expect("GET", format!("{GROUP_PATH}/clustervirtualimages/installer"), 200, iso),
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/web", 404, not_found("virtualmachines")),
        expect("PATCH", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/web", 200, json!({}))
            .checking(|query, body| {
                assert!(query.contains("fieldManager=dvcr-controller"), "{query}");
                assert_eq!(body["kind"], "VirtualMachine");
                assert_eq!(body["spec"]["runStrategy"], "Always");
                let template = &body["spec"]["template"]["spec"];
                assert_eq!(template["domain"]["resources"]["requests"]["cpu"], "1000m");
                assert_eq!(template["volumes"][0]["persistentVolumeClaim"]["claimName"], "vd-root-pvc");
                assert_eq!(template["domain"]["devices"]["disks"][1]["cdrom"]["bus"], "sata");
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], UID);
            }),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualmachines/web/status"), 200, answer)
            .checking(|_, body| assert_eq!(body["status"]["phase"], "Starting")),
    ];
    let (outcome, ()) =
        tokio::join!(reconcile_virtual_machine(Arc::new(machine), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn an_always_on_machine_that_stopped_is_started_through_kubevirt() {
    use dvcr_controller::kubevirt::{virtual_machine, ResolvedDevice};
    use dvcr_controller::runtime::machines::reconcile_virtual_machine;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let (disk, iso) = machine_fixtures();
    let machine = virtual_machine_object("AlwaysOn");
    let devices = [
        ResolvedDevice::Disk {
            claim_name: "vd-root-pvc".into(),
        },
        ResolvedDevice::Image {
            location: ImageLocation::Registry("dvcr.dvcr.svc/cvi/installer:x".into()),
            cdrom: true,
        },
    ];
    let mut kubevirt = virtual_machine("web", "vms", UID, &machine.spec, &devices).unwrap();
    // As the controller renders it: the template stamped with its hash.
    dvcr_controller::kubevirt::stamp_template(&mut kubevirt);
    kubevirt["status"] = json!({"printableStatus": "Stopped"});
    let answer = serde_json::to_value(&machine).unwrap();
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/root"), 200, disk),
        expect("GET", format!("{GROUP_PATH}/clustervirtualimages/installer"), 200, iso),
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/web", 200, kubevirt),
        expect(
            "GET",
            "/apis/kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web",
            404,
            not_found("virtualmachineinstances"),
        ),
        expect("PUT", "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachines/web/start", 202, json!({})),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualmachines/web/status"), 200, answer)
            .checking(|_, body| assert_eq!(body["status"]["phase"], "Stopped")),
    ];
    let (outcome, ()) =
        tokio::join!(reconcile_virtual_machine(Arc::new(machine), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

fn operation(operation_type: &str, status: Value) -> dvcr_controller::api::VirtualMachineOperation {
    serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineOperation",
        "metadata": {"name": "op", "namespace": "vms", "uid": SOURCE_UID, "generation": 1},
        "spec": {"type": operation_type, "virtualMachineName": "web"},
        "status": status}))
    .unwrap()
}

#[tokio::test]
async fn operations_are_sent_once_and_kubevirts_answer_recorded() {
    use dvcr_controller::runtime::operations::reconcile_operation;
    let setup = Setup::new();
    let machine = serde_json::to_value(virtual_machine_object("Manual")).unwrap();
    let operations_path = format!("{GROUP_PATH}/namespaces/vms/virtualmachineoperations/op/status");

    let restart = operation("Restart", json!({}));
    let (context, handle) = setup.context();
    let answer = serde_json::to_value(&restart).unwrap();
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualmachines/web"), 200, machine.clone()),
        expect("PUT", "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachines/web/restart", 202, json!({})),
        expect("PATCH", operations_path.clone(), 200, answer.clone()).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "InProgress");
            assert_eq!(body["status"]["conditions"][0]["type"], "SignalSent");
        }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_operation(Arc::new(restart), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");

    // Accepted a minute ago; KubeVirt shows a new instance running since
    // 30 seconds: done, without sending anything again.
    let ago = |seconds: i64| {
        let now = dvcr_controller::k8s_openapi::jiff::Timestamp::now().as_second();
        dvcr_controller::k8s_openapi::jiff::Timestamp::from_second(now - seconds).unwrap().to_string()
    };
    let sent = json!({"phase": "InProgress", "conditions": [{"type": "SignalSent", "status": "True",
        "reason": "SignalSent", "message": "", "lastTransitionTime": ago(60)}]});
    let following = operation("Restart", sent);
    let (context, handle) = setup.context();
    let kubevirt = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "web", "namespace": "vms"}, "status": {"printableStatus": "Running"}});
    let instance = |created: &str| json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "web", "namespace": "vms", "creationTimestamp": created}, "status": {}});
    let exchanges = vec![
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/web", 200, kubevirt.clone()),
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web", 200,
            instance(&ago(30))),
        expect("PATCH", operations_path.clone(), 200, answer.clone()).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "Completed");
        }),
    ];
    let reconciled = reconcile_operation(Arc::new(following.clone()), context);
    let (outcome, ()) = tokio::join!(reconciled, serve(handle, exchanges));
    let over = dvcr_controller::kube::runtime::controller::Action::await_change();
    assert_eq!(format!("{:?}", outcome.unwrap()), format!("{over:?}"));

    // The old instance (created before the request) is not the restart's.
    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/web", 200, kubevirt),
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web", 200,
            instance(&ago(3600))),
    ];
    let (outcome, ()) = tokio::join!(reconcile_operation(Arc::new(following), context), serve(handle, exchanges));
    let again = dvcr_controller::kube::runtime::controller::Action::requeue(Duration::from_secs(3));
    assert_eq!(format!("{:?}", outcome.unwrap()), format!("{again:?}"), "looked at again, nothing written");

    // KubeVirt refuses: the operation fails with its message, and is over.
    let start = operation("Start", json!({}));
    let (context, handle) = setup.context();
    let refusal = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Always does not support manual start requests", "reason": "Conflict", "code": 409});
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualmachines/web"), 200, machine),
        expect("PUT", "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachines/web/start", 409, refusal),
        expect("PATCH", operations_path, 200, answer).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "Failed");
            let message = body["status"]["conditions"][1]["message"].as_str().unwrap_or_default();
            assert!(message.ends_with("Always does not support manual start requests"), "{message}");
        }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_operation(Arc::new(start), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");

    // A finished operation makes no request at all.
    let (context, handle) = setup.context();
    let done = operation("Stop", json!({"phase": "Completed"}));
    let (outcome, ()) = tokio::join!(reconcile_operation(Arc::new(done), context), serve(handle, Vec::new()));
    assert!(outcome.is_ok(), "{outcome:?}");
}

fn lease(name: &str, holder: Option<&str>, version: &str) -> dvcr_controller::api::VirtualMachineIPAddressLease {
    serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineIPAddressLease",
        "metadata": {"name": name, "uid": SOURCE_UID, "resourceVersion": version, "generation": 1},
        "spec": {"virtualMachineIPAddressRef": holder.map(|holder| json!({"name": holder, "namespace": "vms"}))}}))
    .unwrap()
}

fn address_claim(finalizers: &[&str], deleting: bool, status: Value) -> dvcr_controller::api::VirtualMachineIPAddress {
    let mut metadata = json!({"name": "web", "namespace": "vms", "uid": UID, "generation": 1,
        "resourceVersion": "30", "finalizers": finalizers});
    if deleting {
        metadata["deletionTimestamp"] = json!("2026-11-23T10:00:00Z");
    }
    serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineIPAddress",
        "metadata": metadata, "spec": {"type": "Auto"}, "status": status}))
    .unwrap()
}

const LEASES_PATH: &str = "/apis/virtualization.deckhouse.io/v1alpha2/virtualmachineipaddressleases";

#[tokio::test]
async fn a_claim_leases_the_first_free_address_and_a_lost_race_chooses_again() {
    use dvcr_controller::runtime::addresses::reconcile_address;
    let setup = Setup::new();
    let machines = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineList",
        "metadata": {}, "items": [serde_json::to_value(virtual_machine_object("Manual")).unwrap()]});
    let claims_path = format!("{GROUP_PATH}/namespaces/vms/virtualmachineipaddresses/web");
    let machines_path = format!("{GROUP_PATH}/namespaces/vms/virtualmachines");

    // 10.66.10.1 is leased in the cache; 10.66.10.2 was just taken by
    // another controller, which the cache does not show yet.
    let (context, handle) = setup.context_with_addresses(Some(&["10.66.10.0/29"]), &[("ip-10-66-10-1", Some("db"))]);
    let claim = address_claim(&[], false, json!({}));
    let answer = serde_json::to_value(&claim).unwrap();
    let exists = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "virtualmachineipaddressleases \"ip-10-66-10-2\" already exists", "reason": "AlreadyExists",
        "code": 409});
    let exchanges = vec![
        expect("GET", machines_path.clone(), 200, machines.clone()),
        expect("PATCH", claims_path.clone(), 200, answer.clone())
            .checking(|_, body| assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]))),
        expect("GET", format!("{LEASES_PATH}/ip-10-66-10-2"), 404, not_found("lease")),
        expect("POST", LEASES_PATH, 409, exists).checking(|_, body| {
            assert_eq!(body["metadata"]["name"], "ip-10-66-10-2");
            assert_eq!(body["spec"]["virtualMachineIPAddressRef"], json!({"name": "web", "namespace": "vms"}));
        }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_address(Arc::new(claim), context.clone()), serve(handle, exchanges));
    let error = outcome.expect_err("a lost race is an error, retried at once");
    assert_eq!(
        error.to_string(),
        "10.66.10.2 was leased to another VirtualMachineIPAddress (created at the same time) first; choosing again"
    );
    let claim = Arc::new(address_claim(&[], false, json!({})));
    let retry = dvcr_controller::runtime::images::error_policy(claim, &error, context);
    let at_once = dvcr_controller::kube::runtime::controller::Action::requeue(Duration::from_secs(1));
    assert_eq!(format!("{retry:?}"), format!("{at_once:?}"));

    // Retried with the cache up to date: the next address, and the status.
    let (context, handle) = setup.context_with_addresses(
        Some(&["10.66.10.0/29"]),
        &[("ip-10-66-10-1", Some("db")), ("ip-10-66-10-2", Some("app"))],
    );
    let claim = address_claim(&[FINALIZER], false, json!({}));
    let exchanges = vec![
        expect("GET", machines_path, 200, machines),
        expect("GET", format!("{LEASES_PATH}/ip-10-66-10-3"), 404, not_found("lease")),
        expect("POST", LEASES_PATH, 201, serde_json::to_value(lease("ip-10-66-10-3", Some("web"), "5")).unwrap()),
        expect("PATCH", format!("{claims_path}/status"), 200, answer).checking(|_, body| {
            assert_eq!(body["status"]["address"], "10.66.10.3");
            assert_eq!(body["status"]["phase"], "Attached");
            assert_eq!(body["status"]["virtualMachineName"], "web");
        }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_address(Arc::new(claim), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_deleted_claim_releases_its_lease_with_a_precondition_then_its_finalizer() {
    use dvcr_controller::runtime::addresses::reconcile_address;
    let setup = Setup::new();
    let (context, handle) = setup.context_with_addresses(Some(&["10.66.10.0/29"]), &[("ip-10-66-10-3", Some("web"))]);
    let claim = address_claim(&[FINALIZER, "other.example/keep"], true, json!({"address": "10.66.10.3"}));
    let held = lease("ip-10-66-10-3", Some("web"), "12");
    let released = serde_json::to_value(lease("ip-10-66-10-3", None, "13")).unwrap();
    let answer = serde_json::to_value(&claim).unwrap();
    let exchanges = vec![
        expect("GET", format!("{LEASES_PATH}/ip-10-66-10-3"), 200, serde_json::to_value(held).unwrap()),
        expect("PATCH", format!("{LEASES_PATH}/ip-10-66-10-3"), 200, released).checking(|_, body| {
            assert_eq!(body["metadata"]["resourceVersion"], "12");
            assert_eq!(body["spec"]["virtualMachineIPAddressRef"], Value::Null);
        }),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualmachineipaddresses/web"), 200, answer)
            .checking(|_, body| assert_eq!(body["metadata"]["finalizers"], json!(["other.example/keep"]))),
    ];
    let (outcome, ()) = tokio::join!(reconcile_address(Arc::new(claim), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_lease_whose_claim_is_gone_is_released() {
    use dvcr_controller::runtime::addresses::reconcile_lease;
    let setup = Setup::new();
    let (context, handle) = setup.context_with_addresses(Some(&["10.66.10.0/29"]), &[]);
    let orphan = lease("ip-10-66-10-4", Some("gone"), "8");
    let answer = serde_json::to_value(&orphan).unwrap();
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualmachineipaddresses/gone"), 404, not_found("claim")),
        expect("GET", format!("{LEASES_PATH}/ip-10-66-10-4"), 200, answer.clone()),
        expect("PATCH", format!("{LEASES_PATH}/ip-10-66-10-4"), 200, answer.clone())
            .checking(|_, body| assert_eq!(body["spec"]["virtualMachineIPAddressRef"], Value::Null)),
        expect("PATCH", format!("{LEASES_PATH}/ip-10-66-10-4/status"), 200, answer).checking(|_, body| {
            assert_eq!(body["status"]["phase"], "Released");
            assert_eq!(body["status"]["conditions"][0]["reason"], "ClaimDeleted");
        }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_lease(Arc::new(orphan), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_machine_creates_its_own_claim_then_carries_its_address_to_kubevirt() {
    use dvcr_controller::runtime::machines::reconcile_virtual_machine;
    let setup = Setup::new();
    let (disk, iso) = machine_fixtures();
    let machine = virtual_machine_object("AlwaysOnUnlessStoppedManually");
    let answer = serde_json::to_value(&machine).unwrap();
    let claim_path = format!("{GROUP_PATH}/namespaces/vms/virtualmachineipaddresses/web");
    let kubevirt_path = "/apis/kubevirt.io/v1/namespaces/vms/virtualmachines/web";

    let (context, handle) = setup.context_with_addresses(Some(&["10.66.10.0/29"]), &[]);
    let created = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineIPAddress",
        "metadata": {"name": "web", "namespace": "vms", "uid": SOURCE_UID}, "spec": {"type": "Auto"}});
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/root"), 200, disk.clone()),
        expect("GET", format!("{GROUP_PATH}/clustervirtualimages/installer"), 200, iso.clone()),
        expect("GET", kubevirt_path, 404, not_found("virtualmachines")),
        expect("GET", claim_path.clone(), 404, not_found("virtualmachineipaddresses")),
        expect("POST", format!("{GROUP_PATH}/namespaces/vms/virtualmachineipaddresses"), 201, created)
            .checking(|_, body| {
                assert_eq!(body["metadata"]["name"], "web");
                assert_eq!(body["spec"]["type"], "Auto");
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], UID);
            }),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualmachines/web/status"), 200, answer.clone())
            .checking(|_, body| {
                assert_eq!(body["status"]["phase"], "Pending");
                let ready = body["status"]["conditions"].as_array().unwrap().iter()
                    .find(|condition| condition["type"] == "IPAddressReady").cloned().unwrap_or_default();
                assert_eq!(ready["message"], "creating VirtualMachineIPAddress web");
            }),
    ];
    let (outcome, ()) =
        tokio::join!(reconcile_virtual_machine(Arc::new(machine.clone()), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");

    let (context, handle) = setup.context_with_addresses(Some(&["10.66.10.0/29"]), &[]);
    let bound = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineIPAddress",
        "metadata": {"name": "web", "namespace": "vms", "uid": SOURCE_UID},
        "spec": {"type": "Auto"},
        "status": {"address": "10.66.10.1", "phase": "Attached", "virtualMachineName": "web"}});
    let exchanges = vec![
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/root"), 200, disk),
        expect("GET", format!("{GROUP_PATH}/clustervirtualimages/installer"), 200, iso),
        expect("GET", kubevirt_path, 404, not_found("virtualmachines")),
        expect("GET", claim_path, 200, bound),
        expect("PATCH", kubevirt_path, 200, json!({})).checking(|_, body| {
            let annotations = &body["spec"]["template"]["metadata"]["annotations"];
            assert_eq!(annotations["cni.cilium.io/ipAddress"], "10.66.10.1");
        }),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualmachines/web/status"), 200, answer)
            .checking(|_, body| {
                assert_eq!(body["status"]["ipAddress"], "10.66.10.1");
                assert_eq!(body["status"]["virtualMachineIPAddressName"], "web");
            }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_virtual_machine(Arc::new(machine), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn one_replica_leads_through_a_lease_and_a_lost_write_is_not_leading() {
    use dvcr_controller::runtime::leader::try_acquire_or_renew;
    let setup = Setup::new();
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/dvcr/leases/dvcr-controller";
    let lease = |holder: &str, renewed: &str| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "dvcr-controller", "namespace": "dvcr", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed,
                "acquireTime": "2026-11-23T10:00:00.000000Z", "leaseTransitions": 2}})
    };
    let now = dvcr_controller::k8s_openapi::jiff::Timestamp::now().to_string();

    // No Lease: created, held.
    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", lease_path, 404, not_found("leases")),
        expect("POST", "/apis/coordination.k8s.io/v1/namespaces/dvcr/leases", 201, lease("a", &now))
            .checking(|_, body| assert_eq!(body["spec"]["holderIdentity"], "a")),
    ];
    let (outcome, ()) = tokio::join!(try_acquire_or_renew(&context.client, "dvcr", "a"), serve(handle, exchanges));
    assert!(outcome.unwrap(), "an absent Lease is taken");

    // Held and fresh: only read.
    let (context, handle) = setup.context();
    let exchanges = vec![expect("GET", lease_path, 200, lease("b", &now))];
    let (outcome, ()) = tokio::join!(try_acquire_or_renew(&context.client, "dvcr", "a"), serve(handle, exchanges));
    assert!(!outcome.unwrap(), "a live Lease of another replica is left alone");

    // Expired: replaced with the version read; another replica won (409).
    let (context, handle) = setup.context();
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "the object has been modified", "reason": "Conflict", "code": 409});
    let exchanges = vec![
        expect("GET", lease_path, 200, lease("b", "2026-11-23T10:00:00.000000Z")),
        expect("PUT", lease_path, 409, conflict).checking(|_, body| {
            assert_eq!(body["metadata"]["resourceVersion"], "7");
            assert_eq!(body["spec"]["holderIdentity"], "a");
            assert_eq!(body["spec"]["leaseTransitions"], 3);
        }),
    ];
    let (outcome, ()) = tokio::join!(try_acquire_or_renew(&context.client, "dvcr", "a"), serve(handle, exchanges));
    assert!(!outcome.unwrap(), "a write lost to another replica is not leading");
}

#[tokio::test]
async fn a_discovery_class_lists_the_nodes_and_writes_its_available_nodes_and_common_features() {
    use dvcr_controller::runtime::classes::reconcile_class;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let class: dvcr_controller::api::VirtualMachineClass = serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineClass",
        "metadata": {"name": "generic", "uid": UID, "generation": 3, "resourceVersion": "12"},
        "spec": {"cpu": {"type": "Discovery", "discovery": {"nodeSelector": {"matchLabels": {"rack": "r1"}}}},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"}]},
    }))
    .unwrap();
    let node = |name: &str, rack: &str, features: &[&str], taint: Option<(&str, &str)>| {
        let mut labels = serde_json::Map::new();
        labels.insert("rack".into(), json!(rack));
        for feature in features {
            labels.insert(format!("cpu-feature.node.kubevirt.io/{feature}"), json!("true"));
        }
        let taints: Vec<Value> = taint
            .map(|(key, value)| json!({"key": key, "value": value, "effect": "NoSchedule"}))
            .into_iter()
            .collect();
        json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}})
    };
    let nodes = json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "90"}, "items": [
        node("n1", "r1", &["aes", "avx2", "sse4.2"], None),
        node("n2", "r1", &["aes", "sse4.2"], Some(("dedicated", "vms"))),
        node("n3", "r2", &["aes"], Some(("dedicated", "db"))),
    ]});
    let answer = serde_json::to_value(&class).unwrap();
    let exchanges = vec![
        expect("GET", "/api/v1/nodes", 200, nodes),
        expect("PATCH", format!("{GROUP_PATH}/virtualmachineclasses/generic/status"), 200, answer).checking(
            |_, body| {
                let status = &body["status"];
                assert_eq!(status["phase"], "Ready");
                assert_eq!(status["availableNodes"], json!(["n1", "n2"]), "n3's taint is not tolerated");
                assert_eq!(status["cpuFeatures"]["enabled"], json!(["aes", "sse4.2"]));
                assert_eq!(status["observedGeneration"], 3);
                assert_eq!(status["conditions"][0]["type"], "Discovered");
                assert_eq!(status["conditions"][0]["status"], "True");
            },
        ),
    ];
    let (outcome, ()) = tokio::join!(reconcile_class(Arc::new(class), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

fn attachment_object(deleting: bool) -> dvcr_controller::api::VirtualMachineBlockDeviceAttachment {
    let mut metadata = json!({"name": "hot", "namespace": "vms", "uid": UID, "generation": 1,
        "resourceVersion": "40", "finalizers": [FINALIZER]});
    if deleting {
        metadata["deletionTimestamp"] = json!("2026-12-07T05:00:00Z");
    }
    serde_json::from_value(json!({
        "apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineBlockDeviceAttachment",
        "metadata": metadata,
        "spec": {"virtualMachineName": "web", "blockDeviceRef": {"kind": "VirtualDisk", "name": "data"}},
        "status": {"phase": if deleting { "Attached" } else { "Pending" }},
    }))
    .unwrap()
}

/// KubeVirt's running instance of `web`, with the volume `vd-data` when
/// `plugged`.
fn running_instance(plugged: bool) -> Value {
    let mut volumes = vec![json!({"name": "vd-root", "persistentVolumeClaim": {"claimName": "vd-root-pvc"}})];
    let mut statuses = vec![json!({"name": "vd-root", "phase": "Ready", "target": "vda"})];
    if plugged {
        let claim = json!({"claimName": "vd-data-pvc", "hotpluggable": true});
        volumes.push(json!({"name": "vd-data", "persistentVolumeClaim": claim}));
        statuses.push(json!({"name": "vd-data", "phase": "Ready", "target": "sda", "hotplugVolume": {}}));
    }
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "web", "namespace": "vms", "uid": SOURCE_UID},
        "spec": {"volumes": volumes}, "status": {"phase": "Running", "volumeStatus": statuses}})
}

/// The exchanges observing a new attachment of disk `data` to the running
/// `web`: its instance, the disk, the machines, the attachments.
fn attachment_observation() -> Vec<Exchange> {
    let (mut disk, _) = machine_fixtures();
    disk["metadata"]["name"] = json!("data");
    disk["status"]["target"]["persistentVolumeClaimName"] = json!("vd-data-pvc");
    let machine = serde_json::to_value(virtual_machine_object("Manual")).unwrap();
    let machines = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2", "kind": "VirtualMachineList",
        "metadata": {"resourceVersion": "41"}, "items": [machine]});
    let attachments = json!({"apiVersion": "virtualization.deckhouse.io/v1alpha2",
        "kind": "VirtualMachineBlockDeviceAttachmentList", "metadata": {"resourceVersion": "41"},
        "items": [serde_json::to_value(attachment_object(false)).unwrap()]});
    vec![
        expect("GET", "/apis/kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web", 200, running_instance(false)),
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualdisks/data"), 200, disk),
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualmachines"), 200, machines),
        expect("GET", format!("{GROUP_PATH}/namespaces/vms/virtualmachineblockdeviceattachments"), 200, attachments),
    ]
}

const ADD_VOLUME_PATH: &str = "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web/addvolume";
const REMOVE_VOLUME_PATH: &str =
    "/apis/subresources.kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web/removevolume";
const ATTACHMENT_STATUS_PATH: &str =
    "/apis/virtualization.deckhouse.io/v1alpha2/namespaces/vms/virtualmachineblockdeviceattachments/hot/status";

#[tokio::test]
async fn an_attachment_hot_plugs_the_disks_pvc_into_the_running_instance() {
    use dvcr_controller::runtime::attachments::reconcile_attachment;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let attachment = attachment_object(false);
    let answer = serde_json::to_value(&attachment).unwrap();
    let mut exchanges = attachment_observation();
    exchanges.extend([
        expect("PUT", ADD_VOLUME_PATH, 202, json!({})).checking(|_, body| {
            assert_eq!(body["name"], "vd-data");
            assert_eq!(body["disk"]["disk"]["bus"], "scsi");
            assert_eq!(body["volumeSource"]["persistentVolumeClaim"]["claimName"], "vd-data-pvc");
            assert_eq!(body["volumeSource"]["persistentVolumeClaim"]["hotpluggable"], true);
        }),
        expect("PATCH", ATTACHMENT_STATUS_PATH, 200, answer)
            .checking(|_, body| {
                assert_eq!(body["status"]["phase"], "InProgress");
                assert_eq!(body["status"]["virtualMachineName"], "web");
            }),
    ]);
    let (outcome, ()) = tokio::join!(reconcile_attachment(Arc::new(attachment), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_hot_plug_kubevirt_refuses_fails_the_attachment_with_its_message() {
    use dvcr_controller::runtime::attachments::reconcile_attachment;
    let setup = Setup::new();
    let (context, handle) = setup.context();
    let attachment = attachment_object(false);
    let answer = serde_json::to_value(&attachment).unwrap();
    let refusal = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unable to add volume because HotplugVolumes feature gate is not enabled.",
        "reason": "BadRequest", "code": 400});
    let mut exchanges = attachment_observation();
    exchanges.extend([
        expect("PUT", ADD_VOLUME_PATH, 400, refusal),
        expect("PATCH", ATTACHMENT_STATUS_PATH, 200, answer)
            .checking(|_, body| {
                assert_eq!(body["status"]["phase"], "Failed");
                let attached = body["status"]["conditions"]
                    .as_array()
                    .and_then(|conditions| conditions.iter().find(|condition| condition["type"] == "Attached"))
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(attached["reason"], "HotplugRefused");
                let message = attached["message"].as_str().unwrap_or_default();
                assert!(message.contains("HotplugVolumes feature gate is not enabled"), "{message}");
            }),
    ]);
    let (outcome, ()) = tokio::join!(reconcile_attachment(Arc::new(attachment), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_deleted_attachment_unplugs_its_volume_before_releasing_the_finalizer() {
    use dvcr_controller::runtime::attachments::reconcile_attachment;
    let setup = Setup::new();
    let attachment = Arc::new(attachment_object(true));
    let answer = serde_json::to_value(attachment.as_ref()).unwrap();
    let instance_path = "/apis/kubevirt.io/v1/namespaces/vms/virtualmachineinstances/web";

    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", instance_path, 200, running_instance(true)),
        expect("PUT", REMOVE_VOLUME_PATH, 202, json!({}))
            .checking(|_, body| assert_eq!(body, &json!({"name": "vd-data"}))),
        expect("PATCH", ATTACHMENT_STATUS_PATH, 200, answer.clone())
            .checking(|_, body| assert_eq!(body["status"]["phase"], "Terminating")),
    ];
    let (outcome, ()) = tokio::join!(reconcile_attachment(attachment.clone(), context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");

    // Unplugged: the finalizer goes, and nothing more is written.
    let (context, handle) = setup.context();
    let exchanges = vec![
        expect("GET", instance_path, 200, running_instance(false)),
        expect("PATCH", format!("{GROUP_PATH}/namespaces/vms/virtualmachineblockdeviceattachments/hot"), 200, answer)
            .checking(|_, body| {
                assert_eq!(body["metadata"]["finalizers"], json!([]));
                assert_eq!(body["metadata"]["resourceVersion"], "40");
            }),
    ];
    let (outcome, ()) = tokio::join!(reconcile_attachment(attachment, context), serve(handle, exchanges));
    assert!(outcome.is_ok(), "{outcome:?}");
}
