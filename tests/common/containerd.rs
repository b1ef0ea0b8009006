//! A containerd daemon of the test's own, and pulls through it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{require_tool, run};

/// A containerd daemon rooted in a temporary folder, stopped when dropped.
pub struct Containerd {
    child: Child,
    socket: String,
}

impl Containerd {
    /// Starts containerd with its state under `root`, native snapshotter.
    pub fn start(root: &Path) -> Containerd {
        let binary = require_tool("containerd");
        std::fs::create_dir_all(root).unwrap();
        let socket = root.join("containerd.sock").display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = "{socket}.debug"
"#,
            root = root.display(),
        );
        let config_path = root.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(root.join("containerd.log")).unwrap();
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start containerd");
        let daemon = Containerd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(require_tool("ctr"))
                .args(["--address", &daemon.socket, "version"])
                .output()
                .is_ok_and(|output| output.status.success());
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not start; log:\n{}",
                std::fs::read_to_string(root.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    /// Runs `ctr` against this daemon in the test namespace.
    pub fn ctr(&self, arguments: &[&str]) -> String {
        let mut command = Command::new(require_tool("ctr"));
        command
            .args(["--address", &self.socket, "--namespace", "dvcr-test"])
            .args(arguments);
        run(&mut command)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pulls `reference` over plain HTTP, mounts it and compares files.
pub fn pull_and_compare(containerd: &Containerd, reference: &str, mount_point: &Path, expected: &[(&str, &[u8])]) {
    pull_with_and_compare(containerd, &["--plain-http"], reference, mount_point, expected);
}

/// Pulls `reference` with extra `ctr images pull` flags (credentials, CA),
/// mounts it and compares files.
pub fn pull_with_and_compare(
    containerd: &Containerd,
    flags: &[&str],
    reference: &str,
    mount_point: &Path,
    expected: &[(&str, &[u8])],
) {
    let mut arguments = vec!["images", "pull"];
    arguments.extend_from_slice(flags);
    arguments.extend_from_slice(&["--snapshotter", "native", reference]);
    containerd.ctr(&arguments);
    std::fs::create_dir_all(mount_point).unwrap();
    containerd.ctr(&[
        "images",
        "mount",
        "--snapshotter",
        "native",
        reference,
        &mount_point.display().to_string(),
    ]);
    let compared: Vec<Result<(), String>> = expected
        .iter()
        .map(|(path, content)| match std::fs::read(mount_point.join(path)) {
            Ok(found) if found == *content => Ok(()),
            Ok(found) => Err(format!(
                "{path}: {} bytes differ from the {} pushed",
                found.len(),
                content.len()
            )),
            Err(error) => Err(format!("{path}: {error}")),
        })
        .collect();
    containerd.ctr(&["images", "unmount", "--rm", &mount_point.display().to_string()]);
    for result in compared {
        result.unwrap();
    }
}
