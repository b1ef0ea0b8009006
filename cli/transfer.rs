//! `dvcr import` and `dvcr upload-server`: their flags, and how their
//! outcome becomes a report file and an exit code.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use dvcr_importer::pipeline::{LayerCompression, PipelineOptions};
use dvcr_importer::progress::{Progress, Report};
use dvcr_importer::reference::ImageReference;
use dvcr_importer::registry_client::{ClientOptions, Credentials, RegistryClient};

/// Exit code of a failure that may go away if retried (EX_TEMPFAIL).
const EXIT_TRANSIENT: u8 = 75;

/// Why a subcommand failed, with the exit code it deserves.
pub struct CommandFailure {
    pub error: anyhow::Error,
    pub code: u8,
}

fn permanent(error: anyhow::Error) -> CommandFailure {
    CommandFailure { error, code: 1 }
}

#[derive(Clone, Copy, ValueEnum)]
enum LayerCompressionArg {
    None,
    Gzip,
    Zstd,
}

/// How the destination registry is reached and what is stored there.
#[derive(clap::Args)]
pub struct PushArgs {
    /// A dockerconfigjson file (a Kubernetes pull secret) with credentials for the registries (source and destination).
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// A file holding a registry token for the destination (`dvcr token issue`, or the controller's), sent as Bearer.
    #[arg(long)]
    registry_token_file: Option<PathBuf>,
    /// PEM CA certificates to trust for the destination registry (also makes a loopback registry speak HTTPS).
    #[arg(long)]
    registry_ca_bundle: Option<PathBuf>,
    /// Speak plain HTTP to the destination registry (loopback registries do unless --registry-ca-bundle is given).
    #[arg(long)]
    plain_http: bool,
    /// Compression of the stored layer.
    #[arg(long, value_enum, default_value_t = LayerCompressionArg::None)]
    layer_compression: LayerCompressionArg,
    /// Refuse images whose virtual or unpacked size is larger (bytes).
    #[arg(long, default_value_t = dvcr_converter::DEFAULT_MAX_VIRTUAL_SIZE)]
    max_virtual_size: u64,
    /// Where a compressed image, or one of unknown length, is unpacked before it is sent.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    scratch_dir: PathBuf,
    /// What is stored: the image as it is (unpacked), or a raw disk converted from it.
    #[arg(long, value_enum, default_value_t = StoredFormat::Source)]
    format: StoredFormat,
    /// Hash the layer here too and check that the registry received exactly it. By default a DVCR
    /// registry's report of what it received is used, one SHA-256 pass fewer; other registries are
    /// always sent a digest computed here.
    #[arg(long)]
    verify_layer_digest: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceFormatArg {
    /// Detected from the content, wrappers unpacked.
    Auto,
    /// A raw disk, stored as it is.
    Raw,
    /// An ISO 9660 image, stored as it is.
    Iso,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoredFormat {
    /// The source's own format (qcow2 stays qcow2).
    Source,
    /// Convert to raw (qcow2, vmdk, vhd, vdi).
    Raw,
}

/// Progress and outcome reporting.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// Label value of the progress gauges (the owning resource's UID).
    #[arg(long, default_value = "")]
    owner_uid: String,
    /// Serve the progress gauges at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Write the final JSON report here, on success and on failure (a termination-message path).
    #[arg(long)]
    report_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// http(s)://URL, a file path, `-` (standard input), or docker://HOST/REPOSITORY:TAG (mounted when in the destination's registry, else pulled).
    source: String,
    /// Destination: HOST[:PORT]/REPOSITORY:TAG, for example dvcr.example/vi/vms/ubuntu:UID.
    destination: String,
    /// Expected checksum of the downloaded bytes, ALG:HEX (md5, sha1, sha256, sha512); repeatable.
    #[arg(long = "checksum")]
    checksums: Vec<dvcr_importer::checksum::ExpectedChecksum>,
    /// PEM CA certificates to trust for an HTTPS source or a source registry.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// Retries of transient source failures.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Delay before the first retry, in milliseconds (doubled each time).
    #[arg(long, default_value_t = 1000)]
    retry_delay_ms: u64,
    /// The source's format: detected (and unwrapped), or raw or iso stored as it is, never probed (a raw
    /// disk may start with anything its guest wrote, even an image header).
    #[arg(long, value_enum, default_value_t = SourceFormatArg::Auto)]
    source_format: SourceFormatArg,
    /// Read only the first BYTES of a file or device source (an image on a block device larger than the image).
    #[arg(long, value_name = "BYTES")]
    source_length: Option<u64>,
    #[command(flatten)]
    push: PushArgs,
    #[command(flatten)]
    report: ReportArgs,
}

#[derive(clap::Args)]
pub struct UploadServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Destination: HOST[:PORT]/REPOSITORY:TAG.
    #[arg(long)]
    destination: String,
    /// Give up when no upload has been stored within this time (30s, 15m, 1h).
    #[arg(long, value_parser = parse_duration, default_value = "15m")]
    timeout: Duration,
    /// Keep serving after the image is stored (later uploads get 409).
    #[arg(long)]
    keep_running: bool,
    /// Also take the upload at /upload/TOKEN (the external URL an Ingress passes on); letters and digits only.
    #[arg(long, value_parser = parse_path_token)]
    path_token: Option<String>,
    #[command(flatten)]
    push: PushArgs,
    #[command(flatten)]
    report: ReportArgs,
}

/// A path token: 16 to 64 letters and digits, so it is one path segment and hard to guess.
fn parse_path_token(text: &str) -> Result<String, String> {
    if (16..=64).contains(&text.len()) && text.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a path token: use 16 to 64 letters and digits"))
    }
}

/// Parses 30s, 15m, 1h (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let invalid = || format!("{text:?} is not a duration like 500ms, 30s, 15m, 1h or 7d");
    let value: u64 = number.parse().map_err(|_| invalid())?;
    let milliseconds = match unit {
        "ms" => Some(value),
        "" | "s" => value.checked_mul(1000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        "d" => value.checked_mul(86_400_000),
        _ => None,
    };
    milliseconds.map(Duration::from_millis).ok_or_else(invalid)
}

fn read_optional(path: &Option<PathBuf>, what: &str) -> anyhow::Result<Option<Vec<u8>>> {
    path.as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display())))
        .transpose()
}

impl PushArgs {
    fn client_options(&self, destination: &ImageReference) -> anyhow::Result<ClientOptions> {
        let credentials = match read_optional(&self.auth_file, "auth file")? {
            Some(document) => Credentials::from_docker_config(&document, &destination.host)
                .map_err(|reason| anyhow::anyhow!("the auth file is unusable: {reason}"))?,
            None => None,
        };
        let bearer_token = read_optional(&self.registry_token_file, "registry token file")?
            .map(|bytes| String::from_utf8(bytes).map(|text| text.trim().to_string()))
            .transpose()
            .map_err(|_| anyhow::anyhow!("the registry token file is not text"))?;
        Ok(ClientOptions {
            ca_bundle: read_optional(&self.registry_ca_bundle, "registry CA bundle")?,
            plain_http: self.plain_http,
            credentials,
            bearer_token,
        })
    }

    fn pipeline(&self, checksums: Vec<dvcr_importer::checksum::ExpectedChecksum>) -> PipelineOptions {
        PipelineOptions {
            checksums,
            max_virtual_size: self.max_virtual_size,
            layer_compression: match self.layer_compression {
                LayerCompressionArg::None => LayerCompression::None,
                LayerCompressionArg::Gzip => LayerCompression::Gzip,
                LayerCompressionArg::Zstd => LayerCompression::Zstd,
            },
            file_name: String::new(),
            scratch_dir: self.scratch_dir.clone(),
            convert_to_raw: matches!(self.format, StoredFormat::Raw),
            xz_unpacked_size: None,
            hash_layer: self.verify_layer_digest,
            forced_format: None,
        }
    }
}

impl ReportArgs {
    async fn serve_metrics(&self, progress: Arc<Progress>) -> Result<(), CommandFailure> {
        if let Some(address) = self.metrics_listen {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} for metrics"))
                .map_err(permanent)?;
            tokio::spawn(dvcr_importer::progress::serve_metrics(listener, progress, self.owner_uid.clone()));
        }
        Ok(())
    }

    /// Writes the report (success or failure) and turns the outcome into
    /// the command's result.
    fn conclude(&self, progress: &Progress, outcome: Result<Report, (&'static str, anyhow::Error, u8)>) -> Result<(), CommandFailure> {
        let report = match &outcome {
            Ok(report) => report.clone(),
            Err((reason, error, _)) => Report {
                duration: progress.elapsed().as_nanos() as u64,
                average_speed: progress.average_speed() as u64,
                error_message: Some(format!("{error:#}")),
                reason: Some(reason.to_string()),
                ..Report::default()
            },
        };
        let text = serde_json::to_string(&report).unwrap_or_default();
        if let Some(path) = &self.report_file {
            std::fs::write(path, &text)
                .with_context(|| format!("cannot write the report to {}", path.display()))
                .map_err(permanent)?;
        }
        match outcome {
            Ok(_) => {
                println!("{text}");
                Ok(())
            }
            Err((_, error, code)) => Err(CommandFailure { error, code }),
        }
    }
}

fn classify(error: dvcr_importer::ImportError) -> (&'static str, anyhow::Error, u8) {
    let code = if error.is_permanent() { 1 } else { EXIT_TRANSIENT };
    (error.reason(), anyhow::Error::new(error), code)
}

async fn import(args: ImportArgs) -> Result<(), CommandFailure> {
    let progress = Arc::new(Progress::default());
    args.report.serve_metrics(progress.clone()).await?;
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(dvcr_importer::progress::terminal_bar(progress.clone())));
    let request = (|| -> anyhow::Result<dvcr_importer::import::ImportRequest> {
        let destination = ImageReference::parse(&args.destination)?;
        Ok(dvcr_importer::import::ImportRequest {
            source: dvcr_importer::import::Source::parse(&args.source)?,
            registry: args.push.client_options(&destination)?,
            destination,
            pipeline: PipelineOptions {
                forced_format: match args.source_format {
                    SourceFormatArg::Auto => None,
                    SourceFormatArg::Raw => Some(dvcr_converter::detect::ImageFormat::Raw),
                    SourceFormatArg::Iso => Some(dvcr_converter::detect::ImageFormat::Iso),
                },
                ..args.push.pipeline(args.checksums.clone())
            },
            source_ca_bundle: read_optional(&args.ca_bundle, "CA bundle")?,
            retry: dvcr_importer::http_source::RetryPolicy {
                retries: args.retries,
                first_delay: Duration::from_millis(args.retry_delay_ms),
            },
            source_auth: read_optional(&args.push.auth_file, "auth file")?,
            source_length: args.source_length,
        })
    })();
    let outcome = match request {
        Ok(request) => dvcr_importer::import::import(request, progress.clone()).await.map_err(classify),
        Err(error) => Err(("BadArguments", error, 1)),
    };
    if let Some(bar) = bar {
        bar.abort();
        eprintln!("\r\x1b[2K{}", progress.bar_line());
    }
    args.report.conclude(&progress, outcome)
}

/// `dvcr import`.
pub fn run_import(args: ImportArgs) -> Result<(), CommandFailure> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime").map_err(permanent)?;
    runtime.block_on(import(args))
}

async fn upload_server(args: UploadServerArgs) -> Result<(), CommandFailure> {
    use dvcr_importer::upload_server::{single_upload_router, UploadSlot};
    let destination = ImageReference::parse(&args.destination).map_err(|error| permanent(error.into()))?;
    let options = args.push.client_options(&destination).map_err(permanent)?;
    let mut client = RegistryClient::new(&destination, &options).map_err(|error| permanent(error.into()))?;
    client
        .authorize(&[&destination.repository], "pull,push")
        .await
        .map_err(|error| classify(error.into()))
        .map_err(|(_, error, code)| CommandFailure { error, code })?;
    let slot = Arc::new(UploadSlot::new(Arc::new(client), destination.clone(), args.push.pipeline(Vec::new())));
    let progress_view = Arc::new(Progress::default());
    if args.report.metrics_listen.is_some() {
        // The gauges follow whichever upload is current.
        let slot_for_metrics = slot.clone();
        let address = args.report.metrics_listen;
        let owner = args.report.owner_uid.clone();
        if let Some(address) = address {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} for metrics"))
                .map_err(permanent)?;
            let router = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let progress = slot_for_metrics.progress.lock().map(|current| current.clone()).unwrap_or_default();
                    let body = progress.metrics(&owner);
                    async move { body }
                }),
            );
            tokio::spawn(async move { axum::serve(listener, router).await });
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))
        .map_err(permanent)?;
    tracing::info!(listen = %args.listen, destination = %destination, timeout = ?args.timeout, "waiting for an upload");
    let stored_slot = slot.clone();
    let keep_running = args.keep_running;
    let server = axum::serve(listener, single_upload_router(slot.clone(), args.path_token.as_deref())).with_graceful_shutdown(async move {
        if keep_running {
            std::future::pending::<()>().await;
        }
        loop {
            let notified = stored_slot.stored.notified();
            if stored_slot.stored_report().is_some() {
                break;
            }
            notified.await;
        }
    });
    let timeout = args.timeout;
    let outcome = tokio::select! {
        served = server => match served {
            Ok(()) => slot.stored_report().ok_or(("UploaderFailed", anyhow::anyhow!("the server stopped before an image was stored"), 1)),
            Err(error) => Err(("UploaderFailed", anyhow::Error::new(error).context("the upload server failed"), 1)),
        },
        _ = wait_for_timeout(slot.clone(), timeout) => Err((
            "WaitForUserUploadTimeout",
            anyhow::anyhow!("no image was uploaded within {}s; create a new upload", timeout.as_secs()),
            1,
        )),
    };
    let progress = slot.progress.lock().map(|current| current.clone()).unwrap_or(progress_view);
    args.report.conclude(&progress, outcome)
}

/// Resolves when `timeout` has passed and no image is stored or arriving.
async fn wait_for_timeout(slot: Arc<dvcr_importer::upload_server::UploadSlot>, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    // An upload under way at the deadline may finish; one that fails after
    // it ends the wait.
    while !slot.is_waiting() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `dvcr upload-server`.
pub fn run_upload_server(args: UploadServerArgs) -> Result<(), CommandFailure> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime").map_err(permanent)?;
    runtime.block_on(upload_server(args))
}

/// The upload sessions `dvcr serve` offers: uploads go through the same
/// pipeline as imports, straight into the registry's store.
pub fn upload_sessions(store: Arc<dvcr_registry::Store>, listening: SocketAddr, lifetime: Duration) -> axum::Router {
    use dvcr_importer::upload_server::{session_router, UploadSessions};
    let port = listening.port();
    let host = if listening.ip().is_unspecified() || listening.ip().is_loopback() {
        format!("127.0.0.1:{port}")
    } else {
        listening.to_string()
    };
    let destination = Arc::new(crate::store_destination::StoreDestination::new(store));
    let options = PipelineOptions {
        checksums: Vec::new(),
        max_virtual_size: dvcr_converter::DEFAULT_MAX_VIRTUAL_SIZE,
        layer_compression: LayerCompression::None,
        file_name: String::new(),
        scratch_dir: std::env::temp_dir(),
        convert_to_raw: false,
        xz_unpacked_size: None,
        hash_layer: false,
        forced_format: None,
    };
    session_router(Arc::new(UploadSessions::new(destination, host, options, lifetime)))
}

/// How a remote source is reached.
#[derive(Default)]
pub struct RemoteAccess<'a> {
    /// PEM CA certificates to trust.
    pub ca_bundle: Option<&'a std::path::Path>,
    /// A registry token for a `docker://` source.
    pub registry_token_file: Option<&'a std::path::Path>,
    /// Plain HTTP to a `docker://` source's registry.
    pub plain_http: bool,
}

/// A random-access reader for an `http(s)://` URL or a `docker://`
/// reference, or `None` for a local path.
/// A source whose reads are counted as progress.
pub struct CountedSource {
    inner: Box<dyn dvcr_converter::source::ReadAt>,
    progress: Arc<Progress>,
}

impl CountedSource {
    /// Counts the reads of `inner` in `progress`.
    pub fn new(inner: Box<dyn dvcr_converter::source::ReadAt>, progress: Arc<Progress>) -> Self {
        CountedSource { inner, progress }
    }
}

impl dvcr_converter::source::ReadAt for CountedSource {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buffer, offset)?;
        self.progress.add_read(buffer.len() as u64);
        Ok(())
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }
}

/// A one-thread runtime serving `progress` at `address`/metrics, for a
/// synchronous command; the gauges go when it is dropped.
pub fn metrics_runtime(
    address: SocketAddr,
    progress: Arc<Progress>,
    owner_uid: String,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(address))
        .with_context(|| format!("cannot listen on {address} for metrics"))?;
    runtime.spawn(dvcr_importer::progress::serve_metrics(listener, progress, owner_uid));
    Ok(runtime)
}

pub fn remote_source(
    source: &str,
    access: &RemoteAccess<'_>,
) -> anyhow::Result<Option<Box<dyn dvcr_converter::source::ReadAt>>> {
    let ca_bundle = access
        .ca_bundle
        .map(|path| std::fs::read(path).with_context(|| format!("cannot read the CA bundle {}", path.display())))
        .transpose()?;
    if source.starts_with("http://") || source.starts_with("https://") {
        let client = dvcr_importer::registry_client::http_client(ca_bundle.as_deref())?;
        let remote = dvcr_importer::remote_source::HttpRangeSource::open(client, source, None)?;
        return Ok(Some(Box::new(remote)));
    }
    if let Some(reference) = source.strip_prefix("docker://") {
        let reference = ImageReference::parse(reference)?;
        let bearer_token = access
            .registry_token_file
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the registry token {}", path.display()))
            })
            .transpose()?;
        let options = ClientOptions {
            ca_bundle,
            plain_http: access.plain_http,
            bearer_token,
            ..ClientOptions::default()
        };
        return Ok(Some(Box::new(dvcr_importer::remote_source::registry_disk(&reference, &options)?)));
    }
    Ok(None)
}
