//! Which storage the registry under test uses, and a way to look into it.
//!
//! `DVCR_TEST_STORAGE=s3` runs the registry tests on S3: one Garage per test
//! process, and one bucket per storage folder a test names (so a server
//! restarted "on the same folder" finds the same bucket, and two servers on
//! one folder are two replicas of one registry). Otherwise the folder itself
//! is the storage. Tests look into what is stored through [`StoredView`],
//! which reads through the same driver kind the server used.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use dvcr_storage::filesystem::FilesystemDriver;
use dvcr_storage::s3::S3Driver;
use dvcr_storage::testing::Garage;
use dvcr_storage::{StorageDriver, StoragePath};
use futures::TryStreamExt;

static FORCED_S3: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Puts this test process on S3 whatever `DVCR_TEST_STORAGE` says, for
/// tests about S3 itself (replicas).
pub fn force_s3() {
    FORCED_S3.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether the tests run on S3 (`DVCR_TEST_STORAGE=s3`, or [`force_s3`]).
pub fn on_s3() -> bool {
    if FORCED_S3.load(std::sync::atomic::Ordering::SeqCst) {
        return true;
    }
    match std::env::var("DVCR_TEST_STORAGE").as_deref() {
        Ok("s3") => true,
        Ok("filesystem") | Err(_) => false,
        Ok(other) => panic!("DVCR_TEST_STORAGE must be `filesystem` or `s3`, not {other:?}"),
    }
}

struct Buckets {
    garage: Garage,
    made: Mutex<HashSet<String>>,
}

/// The Garage of this test process, started on first use. It is started
/// from a thread that never ends, so that Garage's parent-death signal fires
/// only when the whole test process is gone.
fn buckets() -> &'static Buckets {
    static BUCKETS: OnceLock<Buckets> = OnceLock::new();
    BUCKETS.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = std::panic::catch_unwind(Garage::start).map_err(|panic| {
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "Garage did not start".to_string())
            });
            let _ = sender.send(started);
            loop {
                std::thread::park();
            }
        });
        match receiver.recv() {
            Ok(Ok(garage)) => Buckets {
                garage,
                made: Mutex::new(HashSet::new()),
            },
            Ok(Err(reason)) => panic!("{reason}"),
            Err(_) => panic!("the Garage starter thread died"),
        }
    })
}

/// The bucket that stands for `storage`, made on first use.
fn bucket_for(storage: &Path) -> String {
    let hash = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(storage.as_os_str().as_encoded_bytes()))
    };
    let name = format!("dvcr-{}", &hash[..20]);
    let buckets = buckets();
    let mut made = buckets.made.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if made.insert(name.clone()) {
        buckets.garage.create_bucket(&name);
    }
    name
}

/// Arguments of `dvcr serve` / `dvcr gc` that put the data at `storage`, and
/// the environment they need.
pub fn configure(command: &mut Command, storage: &Path) {
    if !on_s3() {
        command.arg("--storage-dir").arg(storage);
        return;
    }
    let bucket = bucket_for(storage);
    let garage = &buckets().garage;
    command
        .args([
            "--s3-bucket",
            &bucket,
            "--s3-endpoint",
            &garage.endpoint,
            "--s3-region",
            &garage.region,
        ])
        .env("AWS_ACCESS_KEY_ID", &garage.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret_access_key);
}

/// Runs an admin command on the test process's Garage (S3 mode only).
pub fn garage_admin(arguments: &[&str]) -> String {
    buckets().garage.run(arguments)
}

/// Takes away, or gives back, the registry's rights on the bucket of
/// `storage`: on S3 the bucket then refuses every request, on a folder the
/// folder is replaced by a file.
pub fn break_storage(storage: &Path, broken: bool) {
    if on_s3() {
        let bucket = bucket_for(storage);
        let key = buckets().garage.access_key_id.clone();
        let verb = if broken { "deny" } else { "allow" };
        garage_admin(&["bucket", verb, "--read", "--write", "--owner", &bucket, "--key", &key]);
        return;
    }
    let (data, moved) = (storage.join("docker"), storage.join("docker.moved"));
    if broken {
        std::fs::rename(&data, &moved).expect("move the data folder away");
        std::fs::write(&data, b"not a folder").expect("put a file in its place");
    } else {
        std::fs::remove_file(&data).expect("remove the file");
        std::fs::rename(&moved, &data).expect("bring the data folder back");
    }
}

/// What is stored at a test's storage, read through a driver of the same
/// kind the server uses.
pub struct StoredView {
    driver: Arc<dyn StorageDriver>,
    s3: Option<S3Driver>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for StoredView {
    fn drop(&mut self) {
        // Views are dropped inside async tests too, where a blocking
        // runtime shutdown is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl StoredView {
    /// A view of `storage` (a folder, or its bucket on S3).
    pub fn of(storage: &Path) -> StoredView {
        let s3 = on_s3().then(|| {
            let bucket = bucket_for(storage);
            S3Driver::new(buckets().garage.options(&bucket)).expect("an S3 driver for the test bucket")
        });
        let driver: Arc<dyn StorageDriver> = match &s3 {
            Some(driver) => Arc::new(driver.clone()),
            None => Arc::new(FilesystemDriver::new(storage).expect("a driver over the storage folder")),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the storage view");
        StoredView {
            driver,
            s3,
            runtime: Some(runtime),
        }
    }

    /// Runs a driver call from any thread, in or out of an async test.
    fn call<T: Send>(&self, work: impl std::future::Future<Output = T> + Send) -> T {
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the view");
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(work))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Names in a folder (empty when it does not exist).
    pub fn list(&self, folder: &str) -> Vec<String> {
        let path = StoragePath::new(folder).expect("a valid storage path");
        self.call(self.driver.list(&path)).unwrap_or_default()
    }

    /// The whole content of a file, if it exists.
    pub fn read(&self, file: &str) -> Option<Vec<u8>> {
        let path = StoragePath::new(file).expect("a valid storage path");
        self.call(async {
            let mut stream = self.driver.read(&path, 0, None).await.ok()?;
            // Copy and drop each chunk at once: chunks hold the driver's
            // read-ahead budget until dropped.
            let mut content = Vec::new();
            while let Some(chunk) = stream.try_next().await.ok()? {
                content.extend_from_slice(&chunk);
            }
            Some(content)
        })
    }

    /// The size of a file, if it exists.
    pub fn size(&self, file: &str) -> Option<u64> {
        let path = StoragePath::new(file).expect("a valid storage path");
        self.call(self.driver.stat(&path))
            .ok()
            .filter(|info| !info.is_dir)
            .map(|info| info.size)
    }

    /// Every file below a folder, relative to the storage root.
    pub fn files(&self, folder: &str) -> Vec<String> {
        let path = StoragePath::new(folder).expect("a valid storage path");
        self.call(self.driver.walk(&path))
            .unwrap_or_default()
            .into_iter()
            .map(|info| info.path.as_str().to_string())
            .collect()
    }

    /// Whether anything (file or folder) is at `path`.
    pub fn exists(&self, path: &str) -> bool {
        let path = StoragePath::new(path).expect("a valid storage path");
        self.call(self.driver.stat(&path)).is_ok()
    }

    /// Multipart uploads open in the bucket (S3 only).
    pub fn incomplete_uploads(&self) -> Vec<String> {
        let driver = self.s3.as_ref().expect("incomplete uploads exist on S3 only");
        self.call(driver.incomplete_uploads())
            .expect("listing multipart uploads")
    }
}
