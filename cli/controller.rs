//! `dvcr controller`: the controller of the virtualization.deckhouse.io
//! resources, and its CRDs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use dvcr_controller::runtime::Settings;
use dvcr_controller::workload::{UploadIngress, WorkerConfig};

use crate::transfer::parse_duration;

#[derive(Subcommand)]
pub enum ControllerCommand {
    /// Write the CustomResourceDefinitions of the virtualization.deckhouse.io resources, one YAML file each.
    Crds {
        /// Folder to write them into (deploy/base/crds in this repository); standard output when not given.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Run the controller (images, disks, machines, their addresses and operations) against the cluster
    /// of the in-cluster service account or $KUBECONFIG.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The registry's host[:port] as workers and nodes reach it (dvcr.dvcr.svc).
    #[arg(long, env = "DVCR_REGISTRY_HOST")]
    registry_host: String,
    /// PEM CA certificates of the registry, given to every worker.
    #[arg(long, env = "DVCR_REGISTRY_CA_BUNDLE")]
    registry_ca_bundle: Option<PathBuf>,
    /// Speak plain HTTP to the registry (test clusters only).
    #[arg(long)]
    registry_plain_http: bool,
    /// PEM PKCS#8 EC P-256 key signing the registry tokens (its public half is the registry's --token-public-key).
    #[arg(long, env = "DVCR_TOKEN_PRIVATE_KEY")]
    token_private_key: PathBuf,
    /// Lifetime of a worker's registry token: longer than the longest import or upload wait.
    #[arg(long, value_parser = parse_duration, default_value = "12h")]
    worker_token_lifetime: Duration,
    /// The image holding this binary, run by importer and uploader Pods; by default the image of the
    /// controller's own container, read from its Pod ($POD_NAME in $POD_NAMESPACE).
    #[arg(long, env = "DVCR_IMAGE")]
    dvcr_image: Option<String>,
    /// The controller's own Pod (set from the downward API), to find its image.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// The controller's namespace, where workers of ClusterVirtualImages run.
    #[arg(long, env = "POD_NAMESPACE", default_value = "dvcr")]
    namespace: String,
    /// Public host of uploads (an Ingress per upload); without it uploads are reachable in the cluster only.
    #[arg(long)]
    upload_ingress_host: Option<String>,
    /// IngressClass of the upload Ingresses.
    #[arg(long, requires = "upload_ingress_host")]
    upload_ingress_class: Option<String>,
    /// TLS Secret of the upload host (then the external URLs are https://).
    #[arg(long, requires = "upload_ingress_host")]
    upload_ingress_tls_secret: Option<String>,
    /// Volume mode of disks' PVCs: Filesystem (disk.img on a file system, any storage class) or Block.
    #[arg(long, value_enum, default_value_t = DiskVolumeMode::Filesystem)]
    disk_volume_mode: DiskVolumeMode,
    /// How long an upload is waited for before the image fails with WaitForUserUploadTimeout.
    #[arg(long, value_parser = parse_duration, default_value = "15m")]
    upload_timeout: Duration,
    /// IPv4 CIDRs machines get their addresses from (the module's virtualMachineCIDRs), comma-separated or
    /// repeated; without any, machines keep the pod network's address and VirtualMachineIPAddresses wait.
    #[arg(long, env = "DVCR_VIRTUAL_MACHINE_CIDRS", value_delimiter = ',')]
    virtual_machine_cidrs: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DiskVolumeMode {
    Filesystem,
    Block,
}

impl From<DiskVolumeMode> for dvcr_controller::workload::VolumeMode {
    fn from(mode: DiskVolumeMode) -> Self {
        match mode {
            DiskVolumeMode::Filesystem => dvcr_controller::workload::VolumeMode::Filesystem,
            DiskVolumeMode::Block => dvcr_controller::workload::VolumeMode::Block,
        }
    }
}

fn run_controller(args: RunArgs) -> anyhow::Result<()> {
    let registry_ca_bundle = args
        .registry_ca_bundle
        .as_ref()
        .map(|path| std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display())))
        .transpose()?;
    let token_private_key = std::fs::read(&args.token_private_key)
        .with_context(|| format!("cannot read the token key {}", args.token_private_key.display()))?;
    // Checked before the cluster is reached, so a bad key is named as such.
    dvcr_registry::auth::token::TokenIssuer::new(
        &token_private_key,
        dvcr_controller::runtime::TOKEN_ISSUER,
        dvcr_controller::runtime::TOKEN_AUDIENCE,
    )
    .with_context(|| format!("the token key {} cannot sign tokens", args.token_private_key.display()))?;
    let address_pool = if args.virtual_machine_cidrs.is_empty() {
        None
    } else {
        let pool = dvcr_controller::ipam::AddressPool::parse(&args.virtual_machine_cidrs)
            .context("--virtual-machine-cidrs")?;
        Some(pool)
    };
    let settings = Settings {
        workers: WorkerConfig {
            registry_host: args.registry_host,
            registry_ca_bundle,
            registry_plain_http: args.registry_plain_http,
            dvcr_image: args.dvcr_image.unwrap_or_default(),
            controller_namespace: args.namespace.clone(),
            upload_ingress: args.upload_ingress_host.map(|host| UploadIngress {
                host,
                class_name: args.upload_ingress_class,
                tls_secret_name: args.upload_ingress_tls_secret,
            }),
            upload_timeout_seconds: args.upload_timeout.as_secs().max(1),
            disk_volume_mode: args.disk_volume_mode.into(),
        },
        token_private_key,
        worker_token_lifetime: args.worker_token_lifetime,
        address_pool,
        instance: args.pod_name.clone(),
    };
    let mut settings = settings;
    let pod_name = args.pod_name;
    if settings.workers.dvcr_image.is_empty() && pod_name.is_none() {
        anyhow::bail!("give --dvcr-image, or run in a Pod with POD_NAME set so that its image is used");
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = dvcr_controller::kube::Client::try_default()
            .await
            .context("cannot reach the Kubernetes API (no in-cluster service account and no usable $KUBECONFIG)")?;
        if let (true, Some(pod_name)) = (settings.workers.dvcr_image.is_empty(), pod_name) {
            settings.workers.dvcr_image =
                dvcr_controller::runtime::own_image(&client, &settings.workers.controller_namespace, &pod_name)
                    .await
                    .context("cannot find the controller's own image; give --dvcr-image")?;
        }
        dvcr_controller::runtime::run(client, settings)
            .await
            .context("the controller stopped")
    })
}

pub fn run(command: ControllerCommand) -> anyhow::Result<()> {
    match command {
        ControllerCommand::Run(args) => run_controller(*args),
        ControllerCommand::Crds { output_dir } => {
            let files = dvcr_controller::crds::render_crd_files()?;
            match output_dir {
                None => {
                    let documents: Vec<&str> = files.iter().map(|file| file.content.as_str()).collect();
                    print!("{}", documents.join("---\n"));
                }
                Some(folder) => {
                    std::fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
                    for file in files {
                        let path = folder.join(&file.file_name);
                        std::fs::write(&path, &file.content)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                    }
                }
            }
            Ok(())
        }
    }
}
