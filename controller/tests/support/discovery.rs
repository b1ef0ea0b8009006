//! An API server for `kubectl apply --dry-run=client`, in-process, on
//! loopback: no kube-apiserver can be installed here, and a client dry run
//! asks a server only two things. Discovery (which kinds exist, under which
//! group and version, namespaced or not) is answered for Kubernetes' own
//! kinds from k8s-openapi's types (Kubernetes 1.33's API), as a fresh
//! cluster answers: custom resources are unknown until their CRDs exist.
//! Every object is absent (404 with a `Status`), so kubectl plans to create
//! it. Anything else is a 404 too, and every request is recorded.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope, Resource};
use serde_json::{json, Value};

/// Whether a scope is namespaced.
pub trait Scope {
    /// Namespaced.
    const NAMESPACED: bool;
}

impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// One kind as discovery lists it.
#[derive(Clone, Debug)]
pub struct Kind {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
}

/// The discovery entry of `K`.
pub fn kind<K>() -> Kind
where
    K: Resource,
    K::Scope: Scope,
{
    Kind {
        group: K::GROUP,
        version: K::VERSION,
        kind: K::KIND,
        plural: K::URL_PATH_SEGMENT,
        namespaced: <K::Scope as Scope>::NAMESPACED,
    }
}

/// The running server; stopped when dropped.
pub struct DiscoveryServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the server runs at most, whatever the test does.
const LIFETIME: Duration = Duration::from_secs(300);

impl DiscoveryServer {
    /// Serves discovery of `kinds` on a free loopback port.
    pub fn start(kinds: Vec<Kind>) -> DiscoveryServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + LIFETIME;
            while !stopping.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &kinds, &seen),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(error) => panic!("accept: {error}"),
                }
            }
        });
        DiscoveryServer {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// The requests so far, as `METHOD PATH`.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|requests| requests.clone()).unwrap_or_default()
    }

    /// A kubeconfig file naming this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url
        );
        std::fs::write(path, config).unwrap();
    }
}

impl Drop for DiscoveryServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(mut stream: TcpStream, kinds: &[Kind], seen: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    if let Ok(mut seen) = seen.lock() {
        seen.push(format!("{method} {path}"));
    }
    let (status, body) = match (method, discovery(path, kinds)) {
        ("GET", Some(body)) => (200, body),
        _ => (404, not_found(path)),
    };
    let body = body.to_string();
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

fn not_found(path: &str) -> Value {
    let name = path.rsplit('/').next().unwrap_or_default();
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{path} not found"), "reason": "NotFound", "details": {"name": name}, "code": 404})
}

fn group_versions(kinds: &[Kind]) -> Vec<(&'static str, &'static str)> {
    let mut found: Vec<(&'static str, &'static str)> =
        kinds.iter().map(|kind| (kind.group, kind.version)).collect();
    found.sort();
    found.dedup();
    found
}

fn resources(kinds: &[Kind], group: &str, version: &str) -> Option<Value> {
    let listed: Vec<Value> = kinds
        .iter()
        .filter(|kind| kind.group == group && kind.version == version)
        .map(|kind| {
            json!({"name": kind.plural, "singularName": kind.kind.to_lowercase(), "namespaced": kind.namespaced,
                "kind": kind.kind, "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        })
        .collect();
    let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    (!listed.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": listed})
    })
}

fn discovery(path: &str, kinds: &[Kind]) -> Option<Value> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["version"] => Some(json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"})),
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        ["api", version] => resources(kinds, "", version),
        ["apis"] => {
            let mut groups: Vec<Value> = Vec::new();
            for (group, version) in group_versions(kinds).into_iter().filter(|(group, _)| !group.is_empty()) {
                let entry = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                groups.push(json!({"name": group, "versions": [entry.clone()], "preferredVersion": entry}));
            }
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", group, version] => resources(kinds, group, version),
        _ => None,
    }
}
