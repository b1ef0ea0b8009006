//! `dvcr`: the one binary of DVCR, with a subcommand per job.

mod controller;
mod store_destination;
mod token;
mod transfer;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use dvcr_storage::filesystem::FilesystemDriver;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "dvcr", version, about = "Image registry and importer for virtual machines on Kubernetes")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the OCI registry (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Detect and check a disk image and report its format and sizes.
    Info(InfoArgs),
    /// Convert a disk image: qcow2, vmdk, vhd, vdi, raw or iso (also gz/xz/zst/bz2-wrapped, or `-` for standard input) to raw, or raw to qcow2.
    Convert(ConvertArgs),
    /// Import an image (HTTP URL, local file, `-`, or docker://REF in the same registry) into the registry.
    Import(Box<transfer::ImportArgs>),
    /// Receive one image by `curl -T IMAGE http://ADDR/upload` and store it in the registry.
    UploadServer(Box<transfer::UploadServerArgs>),
    /// Collect garbage once: repositories without an owner, idle uploads, blobs no manifest names.
    Gc(GcArgs),
    /// Registry tokens: make a signing key pair, issue a scoped token.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The controller of the virtualization.deckhouse.io resources.
    #[command(subcommand)]
    Controller(controller::ControllerCommand),
}

#[derive(Clone, Copy, ValueEnum)]
enum InfoOutput {
    Human,
    Json,
}

#[derive(clap::Args)]
struct InfoArgs {
    /// The image file.
    file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InfoOutput::Human)]
    output: InfoOutput,
    /// Refuse images whose virtual size is larger (bytes).
    #[arg(long, default_value_t = dvcr_converter::DEFAULT_MAX_VIRTUAL_SIZE)]
    max_virtual_size: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetFormat {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SourceFormat {
    /// Detected from the content.
    Auto,
    /// Raw bytes, never probed: for a disk whose guest may have written an image header at its start.
    Raw,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The source image: a file, `-` (standard input), an http(s):// URL read with Range requests, or docker://HOST/REPOSITORY:TAG (the disk inside an image in a registry, read in place).
    source: PathBuf,
    /// The destination: a file (created sparse) or a block device.
    destination: PathBuf,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, default_value_t = TargetFormat::Raw)]
    output_format: TargetFormat,
    /// Source format: detected, or raw (copied as it is, never probed).
    #[arg(short = 'f', long = "source-format", value_enum, default_value_t = SourceFormat::Auto)]
    source_format: SourceFormat,
    /// Read only the first BYTES of the source (a disk image on a block device larger than the image).
    #[arg(long, value_name = "BYTES")]
    source_length: Option<u64>,
    /// Refuse images whose virtual size is larger (bytes).
    #[arg(long, default_value_t = dvcr_converter::DEFAULT_MAX_VIRTUAL_SIZE)]
    max_virtual_size: u64,
    /// PEM CA certificates to trust for an https:// source or registry.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// A file holding a registry token for a docker:// source, sent as Bearer.
    #[arg(long)]
    registry_token_file: Option<PathBuf>,
    /// Speak plain HTTP to a docker:// source's registry (loopback registries do unless --ca-bundle is given).
    #[arg(long)]
    plain_http: bool,
    /// Serve the progress of the conversion at http://ADDR/metrics, as the importer does (`registry_progress`,
    /// `registry_average_speed`, `registry_current_speed`: bytes read of the source); not for standard input.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Label value of the progress gauges (the owning resource's UID).
    #[arg(long, default_value = "")]
    owner_uid: String,
}

fn info(args: InfoArgs) -> anyhow::Result<()> {
    let info = dvcr_converter::info::inspect(&args.file, args.max_virtual_size)
        .with_context(|| format!("cannot inspect {}", args.file.display()))?;
    match args.output {
        InfoOutput::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        InfoOutput::Human => {
            println!("image: {}", info.filename);
            println!("file format: {}", info.detected_format);
            if let Some(size) = info.virtual_size {
                println!("virtual size: {size} bytes");
            }
            println!("disk size: {} bytes", info.actual_size);
            if let Some(cluster_size) = info.cluster_size {
                println!("cluster_size: {cluster_size}");
            }
            if let Some(compressed) = info.compressed {
                println!("compressed clusters: {compressed}");
            }
        }
    }
    Ok(())
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let output_format = match args.output_format {
        TargetFormat::Raw => dvcr_converter::OutputFormat::Raw,
        TargetFormat::Qcow2 => dvcr_converter::OutputFormat::Qcow2,
    };
    let source_text = args.source.to_string_lossy().into_owned();
    let access = transfer::RemoteAccess {
        ca_bundle: args.ca_bundle.as_deref(),
        registry_token_file: args.registry_token_file.as_deref(),
        plain_http: args.plain_http,
    };
    let remote = transfer::remote_source(&source_text, &access)?;
    let read_at_only = args.metrics_listen.is_some()
        || args.source_format == SourceFormat::Raw
        || args.source_length.is_some();
    if remote.is_none() && !read_at_only {
        return dvcr_converter::convert::convert_file(
            &args.source,
            &args.destination,
            output_format,
            args.max_virtual_size,
        )
        .with_context(|| format!("cannot convert {}", args.source.display()));
    }
    if output_format != dvcr_converter::OutputFormat::Raw {
        anyhow::bail!(
            "qcow2 output is written from a local raw file without --source-format, --source-length or \
             --metrics-listen; {source_text} can be converted to raw"
        );
    }
    let source: Box<dyn dvcr_converter::source::ReadAt> = match remote {
        Some(remote) => remote,
        None => {
            if source_text == "-" {
                anyhow::bail!(
                    "--source-format raw, --source-length and --metrics-listen need a source read at offsets: \
                     a file, a block device, an http(s):// URL or docker://; not standard input"
                );
            }
            dvcr_converter::convert::refuse_same_file(&args.source, &args.destination)?;
            let file = std::fs::File::open(&args.source)
                .with_context(|| format!("cannot open the source {source_text}"))?;
            Box::new(
                dvcr_converter::source::FileSource::new(file)
                    .with_context(|| format!("cannot read the size of {source_text}"))?,
            )
        }
    };
    let source: Box<dyn dvcr_converter::source::ReadAt> = match args.source_length {
        None => source,
        Some(length) => {
            let size = source.size();
            Box::new(dvcr_converter::source::SubRange::new(source, 0, length).with_context(|| {
                format!("--source-length {length} is longer than the source {source_text} ({size} bytes)")
            })?)
        }
    };
    let progress = Arc::new(dvcr_importer::progress::Progress::default());
    progress.set_total(Some(source.size()));
    // Kept alive until the conversion ends: it serves the gauges.
    let _metrics = match args.metrics_listen {
        Some(address) => Some(transfer::metrics_runtime(address, progress.clone(), args.owner_uid.clone())?),
        None => None,
    };
    let counted = transfer::CountedSource::new(source, progress.clone());
    let converted = match args.source_format {
        SourceFormat::Raw => dvcr_converter::convert::copy_raw_read_at(&counted, &args.destination),
        SourceFormat::Auto => {
            dvcr_converter::convert::convert_read_at(&counted, &args.destination, args.max_virtual_size)
        }
    };
    converted.with_context(|| format!("cannot convert {source_text}"))?;
    progress.finish();
    Ok(())
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    #[command(flatten)]
    storage: StorageArgs,
    /// How long an upload session (POST /dvcr/uploads) waits for its upload (30s, 15m, 1h).
    /// Upload sessions are offered by the embedded default only (no authentication, no TLS);
    /// in a cluster, `dvcr upload-server` takes uploads.
    #[arg(long, value_parser = transfer::parse_duration, default_value = "15m")]
    upload_session_lifetime: std::time::Duration,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Also serve /metrics, /healthz and /readyz on this address, plain HTTP without authentication.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Collect garbage this often while serving (30m, 6h); off when not given.
    #[arg(long, value_parser = transfer::parse_duration)]
    gc_interval: Option<std::time::Duration>,
    #[command(flatten)]
    gc: GcRules,
}

/// What garbage collection removes.
#[derive(clap::Args)]
struct GcRules {
    /// Nothing written or used this long before a collection starts is removed.
    #[arg(long = "gc-grace", value_parser = transfer::parse_duration, default_value = "1h")]
    grace: std::time::Duration,
    /// Uploads idle this long are removed.
    #[arg(long = "gc-upload-max-age", value_parser = transfer::parse_duration, default_value = "24h")]
    upload_max_age: std::time::Duration,
    /// A file naming the repositories that still have an owner, one per line; others are removed
    /// (read again for every collection; without it no repository is removed).
    #[arg(long = "gc-live-repositories")]
    live_repositories: Option<PathBuf>,
}

impl GcRules {
    fn options(&self) -> dvcr_registry::gc::GcOptions {
        dvcr_registry::gc::GcOptions {
            grace: self.grace,
            upload_max_age: self.upload_max_age,
            live_repositories: None,
            dry_run: false,
        }
    }
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    rules: GcRules,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
}

/// `dvcr gc`: one collection from this process. A registry serving the same
/// storage is protected by the grace window only; `dvcr serve --gc-interval`
/// also protects what its own requests are using at that moment.
fn gc(args: GcArgs) -> anyhow::Result<()> {
    let mut options = args.rules.options();
    options.dry_run = args.dry_run;
    if let Some(path) = &args.rules.live_repositories {
        options.live_repositories = Some(dvcr_registry::gc::read_live_repositories(path).map_err(anyhow::Error::msg)?);
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let (driver, _) = runtime.block_on(args.storage.open())?;
    let store = dvcr_registry::Store::new(driver);
    let report = runtime
        .block_on(store.collect_garbage(&options))
        .context("garbage collection failed")?;
    // What was removed is freed before the process ends, so that the
    // space the report names is free when it exits.
    runtime.block_on(store.driver().settle());
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// How often the S3 bucket is tried at start (over about 12 s).
const BUCKET_CHECK_ATTEMPTS: u32 = 6;

/// Where the registry keeps its data: a folder, or an S3 bucket.
#[derive(clap::Args)]
struct StorageArgs {
    /// Folder that holds the registry's data (filesystem storage, used when no --s3-bucket is given).
    #[arg(long, default_value = "./dvcr-data")]
    storage_dir: PathBuf,
    /// Write blobs into the storage folder through the page cache instead of around it (O_DIRECT, the default): for network file systems such as NFS, where each direct write is a round trip to the server.
    #[arg(long)]
    storage_page_cache: bool,
    /// Store in this S3 bucket instead of a folder; every replica given the same bucket serves the same registry.
    #[arg(long)]
    s3_bucket: Option<String>,
    /// The S3 endpoint URL (Garage, MinIO, Ceph...); AWS's own when not given.
    #[arg(long, requires = "s3_bucket")]
    s3_endpoint: Option<String>,
    /// The bucket's region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// A key prefix for every object, to share a bucket.
    #[arg(long, default_value = "")]
    s3_prefix: String,
    /// Access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    s3_access_key_id: Option<String>,
    /// A file holding the secret access key (else the AWS_SECRET_ACCESS_KEY environment variable).
    #[arg(long)]
    s3_secret_access_key_file: Option<PathBuf>,
    /// PEM CA certificates to trust for the endpoint, besides the system's.
    #[arg(long, env = "AWS_CA_BUNDLE")]
    s3_ca_bundle: Option<PathBuf>,
    /// Address the bucket as BUCKET.ENDPOINT (AWS style) instead of ENDPOINT/BUCKET.
    #[arg(long)]
    s3_virtual_hosted: bool,
    /// First part size of multipart uploads, in MiB (doubling every 1000 parts, up to 32 times); at least 8.
    #[arg(long, default_value_t = 8)]
    s3_part_size_mib: u64,
    /// MiB that all uploads together may hold in parts on their way to S3.
    #[arg(long, default_value_t = dvcr_storage::s3::DEFAULT_BUFFER_MEMORY_MIB)]
    s3_buffer_memory_mib: usize,
    /// Parts that all uploads together send to S3 at once (one upload sends one at a time).
    #[arg(long, default_value_t = dvcr_storage::s3::DEFAULT_PARTS_IN_FLIGHT as u64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    s3_parts_in_flight: u64,
}

impl StorageArgs {
    /// Opens the driver these flags name, and says what it is for logs.
    async fn open(&self) -> anyhow::Result<(Arc<dyn dvcr_storage::StorageDriver>, String)> {
        let Some(bucket) = &self.s3_bucket else {
            let driver = FilesystemDriver::new(&self.storage_dir)
                .with_context(|| format!("cannot use storage folder {}", self.storage_dir.display()))?
                .with_direct_writes(!self.storage_page_cache);
            return Ok((Arc::new(driver), format!("folder {}", self.storage_dir.display())));
        };
        if self.s3_part_size_mib < 8 {
            anyhow::bail!("--s3-part-size-mib must be at least 8, so that blobs of 1 TiB fit in 10,000 parts");
        }
        let access_key_id = self
            .s3_access_key_id
            .clone()
            .context("S3 storage needs an access key: --s3-access-key-id or AWS_ACCESS_KEY_ID")?;
        let secret_access_key = match &self.s3_secret_access_key_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the S3 secret key file {}", path.display()))?
                .trim()
                .to_string(),
            None => std::env::var("AWS_SECRET_ACCESS_KEY")
                .context("S3 storage needs a secret key: --s3-secret-access-key-file or AWS_SECRET_ACCESS_KEY")?,
        };
        let mut options = dvcr_storage::s3::S3Options::new(bucket, &self.s3_region, access_key_id, secret_access_key);
        options.endpoint = self.s3_endpoint.clone();
        options.prefix = self.s3_prefix.clone();
        options.session_token = std::env::var("AWS_SESSION_TOKEN").ok().filter(|token| !token.is_empty());
        options.path_style = !self.s3_virtual_hosted;
        options.part_size = self.s3_part_size_mib << 20;
        options.buffer_memory = self.s3_buffer_memory_mib << 20;
        options.parts_in_flight = usize::try_from(self.s3_parts_in_flight).unwrap_or(1);
        if let Some(path) = &self.s3_ca_bundle {
            options.ca_bundle =
                Some(std::fs::read(path).with_context(|| format!("cannot read the S3 CA bundle {}", path.display()))?);
        }
        let driver = dvcr_storage::s3::S3Driver::new(options)?;
        let place = format!("s3 bucket {bucket} at {}", self.s3_endpoint.as_deref().unwrap_or("AWS"));
        // An endpoint starting beside us (a pod of the same rollout, a
        // freshly started server) may refuse or reset connections for a
        // moment: try for a while before giving up.
        let mut attempt = 1;
        while let Err(error) = driver.check_bucket().await {
            if attempt == BUCKET_CHECK_ATTEMPTS {
                return Err(anyhow::Error::new(error).context(format!(
                    "cannot use the {place} ({attempt} attempts): check the endpoint, bucket, region and credentials"
                )));
            }
            tracing::warn!(%error, attempt, "the {place} does not answer yet; trying again");
            tokio::time::sleep(std::time::Duration::from_millis(250 << attempt.min(4))).await;
            attempt += 1;
        }
        Ok((Arc::new(driver), place))
    }
}

/// Who may use the registry. Without any of these the registry is open,
/// which it allows only on a loopback address.
#[derive(clap::Args)]
struct AuthArgs {
    /// htpasswd file of users (bcrypt, `htpasswd -B`); re-read when it changes.
    #[arg(long)]
    htpasswd: Option<PathBuf>,
    /// A user of the htpasswd file who may only pull (such as the nodes' node-puller); repeatable.
    #[arg(long = "read-only-user")]
    read_only_users: Vec<String>,
    /// PEM public key (EC P-256) that scoped ES256 tokens must be signed with.
    #[arg(long)]
    token_public_key: Option<PathBuf>,
    /// The `iss` tokens must carry.
    #[arg(long, default_value = dvcr_registry::auth::token::DEFAULT_ISSUER)]
    token_issuer: String,
    /// The `aud` tokens must carry.
    #[arg(long, default_value = dvcr_registry::auth::token::DEFAULT_AUDIENCE)]
    token_audience: String,
    /// PEM PKCS#8 EC P-256 private key: the registry then issues tokens to its users at /dvcr/token
    /// (the Docker token protocol) and challenges clients with Bearer.
    #[arg(long, requires = "htpasswd")]
    token_private_key: Option<PathBuf>,
    /// How long tokens from /dvcr/token are valid.
    #[arg(long, value_parser = transfer::parse_duration, default_value = "5m")]
    token_lifetime: std::time::Duration,
}

/// TLS for the registry's listener.
#[derive(clap::Args)]
struct TlsArgs {
    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates; clients must then present a certificate signed by one of them.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

impl AuthArgs {
    fn authenticator(&self, https: bool) -> anyhow::Result<Option<dvcr_registry::auth::Authenticator>> {
        use dvcr_registry::auth::{token, Authenticator, Htpasswd, TokenIssuer, TokenService, TokenVerifier};
        if self.htpasswd.is_none() && self.token_public_key.is_none() {
            if !self.read_only_users.is_empty() {
                anyhow::bail!("--read-only-user needs --htpasswd");
            }
            return Ok(None);
        }
        let htpasswd = self.htpasswd.as_deref().map(Htpasswd::load).transpose()?;
        let tokens = match &self.token_public_key {
            Some(path) => {
                let key = std::fs::read(path).with_context(|| format!("cannot read the token public key {}", path.display()))?;
                Some(
                    TokenVerifier::new(&key, &self.token_issuer, &self.token_audience)
                        .with_context(|| format!("cannot use the token public key {}", path.display()))?,
                )
            }
            None => None,
        };
        let read_only = self.read_only_users.iter().cloned().collect();
        let mut authenticator = Authenticator::new(htpasswd, read_only, tokens).map_err(anyhow::Error::msg)?;
        if let Some(path) = &self.token_private_key {
            let key = std::fs::read(path).with_context(|| format!("cannot read the token private key {}", path.display()))?;
            let cannot_use = || format!("cannot use the token private key {}", path.display());
            let issuer = TokenIssuer::new(&key, &self.token_issuer, &self.token_audience).with_context(cannot_use)?;
            let public = token::public_key_of(&key).with_context(cannot_use)?;
            let verifier = TokenVerifier::new(public.as_bytes(), &self.token_issuer, &self.token_audience)?;
            authenticator = authenticator
                .with_token_service(TokenService::new(issuer, self.token_lifetime, https), verifier)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(Some(authenticator))
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("DVCR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let auth = args.auth.authenticator(args.tls.tls_cert.is_some())?;
    if auth.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "listening on {} needs authentication: give --htpasswd and/or --token-public-key (the registry is open only on a loopback address)",
            args.listen
        );
    }
    let tls = match (&args.tls.tls_cert, &args.tls.tls_key) {
        (Some(certificate), Some(key)) => Some(dvcr_registry::tls::server_config(certificate, key, args.tls.tls_client_ca.as_deref())?),
        _ => None,
    };
    let (driver, storage) = args.storage.open().await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let embedded_default = auth.is_none() && tls.is_none();
    let registry = dvcr_registry::Registry::new(driver, auth);
    if let Some(interval) = args.gc_interval {
        tokio::spawn(dvcr_registry::gc::run_periodically(
            registry.store.clone(),
            interval,
            args.gc.options(),
            args.gc.live_repositories.clone(),
        ));
    }
    if let Some(address) = args.metrics_listen {
        let probes = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} for metrics"))?;
        let router = dvcr_registry::probes_router(registry.clone());
        tokio::spawn(async move {
            if let Err(error) = axum::serve(probes, router).await {
                tracing::error!(%error, "the metrics listener failed");
            }
        });
        tracing::info!(listen = %address, "metrics and probes serving");
    }
    let sessions = if embedded_default {
        transfer::upload_sessions(registry.store.clone(), listener.local_addr()?, args.upload_session_lifetime)
    } else {
        axum::Router::new()
    };
    let router = dvcr_registry::router_with(registry, sessions);
    tracing::info!(
        listen = %listener.local_addr()?,
        %storage,
        tls = tls.is_some(),
        authentication = !embedded_default && (args.auth.htpasswd.is_some() || args.auth.token_public_key.is_some()),
        "registry serving"
    );
    dvcr_registry::server::serve(listener, router, tls, shutdown_signal()).await;
    Ok(())
}

/// glibc gives each thread that allocates its own arena (up to 8 per
/// core) and keeps freed chunks in them; with dozens of threads moving
/// 512 KiB chunks, peak RSS under `bench/load.sh` was 277 MiB against
/// 188 MiB with two arenas, at no cost in throughput. And once a large
/// mmapped block is freed glibc raises its mmap threshold to that size,
/// so the S3 driver's 8 MiB part buffers then came from the arenas and
/// stayed there: 16 pushes to S3 peaked at 462 MiB, 308 MiB with the
/// threshold fixed at 1 MiB. (Uploads gather into 1 MiB chunks, which
/// would each be a fresh mapping above that threshold, zeroed and faulted
/// in page by page; they come from a pool of recycled buffers instead.)
/// Fixing the mmap threshold also fixes the trim threshold at glibc's
/// 128 KiB: each time the top of a heap had more free than that, it was
/// given back and faulted in again at the next allocation (hyper's read
/// buffers are a few hundred KiB). At 1 MiB two 1 GiB pushes took
/// 20,078-25,360 page faults instead of 126,269-127,777 (4 MiB: 13,334,
/// and up to 4 MiB kept per heap; the S3 driver's peak RSS is close to
/// its 256 MiB target), at the same peak RSS (65 MiB).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Runs the registry on a multi-threaded runtime; the other subcommands
/// need none.
fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    tune_malloc();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let failure = |error| transfer::CommandFailure { error, code: 1 };
    let result = match cli.command {
        Some(Command::Info(args)) => info(args).map_err(failure),
        Some(Command::Convert(args)) => convert(args).map_err(failure),
        Some(Command::Import(args)) => transfer::run_import(*args),
        Some(Command::UploadServer(args)) => transfer::run_upload_server(*args),
        Some(Command::Serve(args)) => run_serve(*args).map_err(failure),
        Some(Command::Token(command)) => token::run(command).map_err(failure),
        Some(Command::Controller(command)) => controller::run(command).map_err(failure),
        Some(Command::Gc(args)) => gc(args).map_err(failure),
        None => run_serve(ServeArgs::parse_defaults()).map_err(failure),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(transfer::CommandFailure { error, code }) => {
            eprintln!("dvcr: {error:#}");
            ExitCode::from(code)
        }
    }
}

impl ServeArgs {
    fn parse_defaults() -> Self {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Defaults::parse_from(["dvcr"]).serve
    }
}
