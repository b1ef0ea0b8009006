//! `dvcr`: the one binary of DVCR, with a subcommand per job.

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
    Serve(ServeArgs),
    /// Detect and check a disk image and report its format and sizes.
    Info(InfoArgs),
    /// Convert a disk image: qcow2, vmdk, vhd, vdi, raw or iso (also gz/xz/zst/bz2-wrapped, or `-` for standard input) to raw, or raw to qcow2.
    Convert(ConvertArgs),
    /// Import an image (HTTP URL, local file, `-`, or docker://REF in the same registry) into the registry.
    Import(Box<ImportArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum LayerCompressionArg {
    None,
    Gzip,
    Zstd,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// http(s)://URL, a file path, `-` (standard input), or docker://HOST/REPOSITORY:TAG in the destination registry.
    source: String,
    /// Destination: HOST[:PORT]/REPOSITORY:TAG, for example dvcr.example/vi/vms/ubuntu:UID.
    destination: String,
    /// Expected checksum of the downloaded bytes, ALG:HEX (md5, sha1, sha256, sha512); repeatable.
    #[arg(long = "checksum")]
    checksums: Vec<dvcr_importer::checksum::ExpectedChecksum>,
    /// PEM CA certificates to trust for an HTTPS source.
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// A dockerconfigjson file (a Kubernetes pull secret) with credentials for the destination registry.
    #[arg(long)]
    auth_file: Option<PathBuf>,
    /// PEM CA certificates to trust for the destination registry.
    #[arg(long)]
    registry_ca_bundle: Option<PathBuf>,
    /// Speak plain HTTP to the destination registry (loopback registries always do).
    #[arg(long)]
    plain_http: bool,
    /// Compression of the stored layer.
    #[arg(long, value_enum, default_value_t = LayerCompressionArg::None)]
    layer_compression: LayerCompressionArg,
    /// Label value of the progress gauges (the owning resource's UID).
    #[arg(long, default_value = "")]
    owner_uid: String,
    /// Serve the progress gauges at http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Write the final JSON report here, on success and on failure (a termination-message path).
    #[arg(long)]
    report_file: Option<PathBuf>,
    /// Refuse images whose virtual or unpacked size is larger (bytes).
    #[arg(long, default_value_t = dvcr_converter::DEFAULT_MAX_VIRTUAL_SIZE)]
    max_virtual_size: u64,
    /// Where a compressed source, or one of unknown length, is unpacked before it is sent.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    scratch_dir: PathBuf,
    /// Retries of transient source failures.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Delay before the first retry, in milliseconds (doubled each time).
    #[arg(long, default_value_t = 1000)]
    retry_delay_ms: u64,
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

#[derive(clap::Args)]
struct ConvertArgs {
    /// The source image.
    source: PathBuf,
    /// The destination: a file (created sparse) or a block device.
    destination: PathBuf,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_enum, default_value_t = TargetFormat::Raw)]
    output_format: TargetFormat,
    /// Refuse images whose virtual size is larger (bytes).
    #[arg(long, default_value_t = dvcr_converter::DEFAULT_MAX_VIRTUAL_SIZE)]
    max_virtual_size: u64,
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
    dvcr_converter::convert::convert_file(&args.source, &args.destination, output_format, args.max_virtual_size)
        .with_context(|| format!("cannot convert {}", args.source.display()))
}

/// Exit code of an import that may succeed if retried (EX_TEMPFAIL).
const EXIT_TRANSIENT: u8 = 75;

/// Why a subcommand failed, with the exit code it deserves.
struct CommandFailure {
    error: anyhow::Error,
    code: u8,
}

fn read_optional(path: &Option<PathBuf>, what: &str) -> anyhow::Result<Option<Vec<u8>>> {
    path.as_ref()
        .map(|path| std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display())))
        .transpose()
}

fn import_request(args: &ImportArgs) -> anyhow::Result<dvcr_importer::import::ImportRequest> {
    use dvcr_importer::pipeline::LayerCompression;
    let destination = dvcr_importer::reference::ImageReference::parse(&args.destination)?;
    let credentials = match read_optional(&args.auth_file, "auth file")? {
        Some(document) => dvcr_importer::registry_client::Credentials::from_docker_config(&document, &destination.host)
            .map_err(|reason| anyhow::anyhow!("the auth file is unusable: {reason}"))?,
        None => None,
    };
    Ok(dvcr_importer::import::ImportRequest {
        source: dvcr_importer::import::Source::parse(&args.source)?,
        destination,
        pipeline: dvcr_importer::pipeline::PipelineOptions {
            checksums: args.checksums.clone(),
            max_virtual_size: args.max_virtual_size,
            layer_compression: match args.layer_compression {
                LayerCompressionArg::None => LayerCompression::None,
                LayerCompressionArg::Gzip => LayerCompression::Gzip,
                LayerCompressionArg::Zstd => LayerCompression::Zstd,
            },
            file_name: String::new(),
            scratch_dir: args.scratch_dir.clone(),
        },
        source_ca_bundle: read_optional(&args.ca_bundle, "CA bundle")?,
        registry: dvcr_importer::registry_client::ClientOptions {
            ca_bundle: read_optional(&args.registry_ca_bundle, "registry CA bundle")?,
            plain_http: args.plain_http,
            credentials,
        },
        retry: dvcr_importer::http_source::RetryPolicy {
            retries: args.retries,
            first_delay: std::time::Duration::from_millis(args.retry_delay_ms),
        },
    })
}

async fn import(args: ImportArgs) -> Result<(), CommandFailure> {
    use dvcr_importer::progress::{Progress, Report};
    let permanent = |error: anyhow::Error| CommandFailure { error, code: 1 };
    let progress = Arc::new(Progress::default());
    if let Some(address) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} for metrics"))
            .map_err(permanent)?;
        tokio::spawn(dvcr_importer::progress::serve_metrics(listener, progress.clone(), args.owner_uid.clone()));
    }
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(dvcr_importer::progress::terminal_bar(progress.clone())));
    let outcome = match import_request(&args) {
        Ok(request) => dvcr_importer::import::import(request, progress.clone()).await.map_err(|error| {
            let code = if error.is_permanent() { 1 } else { EXIT_TRANSIENT };
            (error.reason(), anyhow::Error::new(error), code)
        }),
        Err(error) => Err(("BadArguments", error, 1)),
    };
    if let Some(bar) = bar {
        bar.abort();
        eprintln!("\r\x1b[2K{}", progress.bar_line());
    }
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
    if let Some(path) = &args.report_file {
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

fn run_import(args: ImportArgs) -> Result<(), CommandFailure> {
    let runtime = tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")
        .map_err(|error| CommandFailure { error, code: 1 })?;
    runtime.block_on(import(args))
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Folder that holds the registry's data (filesystem storage).
    #[arg(long, default_value = "./dvcr-data")]
    storage_dir: PathBuf,
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
    let driver = FilesystemDriver::new(&args.storage_dir)
        .with_context(|| format!("cannot use storage folder {}", args.storage_dir.display()))?;
    let router = dvcr_registry::router(Arc::new(driver));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        storage = %args.storage_dir.display(),
        "registry serving"
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server failed")
}

/// Runs the registry on a multi-threaded runtime; the other subcommands
/// need none.
fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let failure = |error| CommandFailure { error, code: 1 };
    let result = match cli.command {
        Some(Command::Info(args)) => info(args).map_err(failure),
        Some(Command::Convert(args)) => convert(args).map_err(failure),
        Some(Command::Import(args)) => run_import(*args),
        Some(Command::Serve(args)) => run_serve(args).map_err(failure),
        None => run_serve(ServeArgs::parse_defaults()).map_err(failure),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandFailure { error, code }) => {
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
