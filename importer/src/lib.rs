//! DVCR's importer and uploader.
//!
//! - [`import`]: one import, from an HTTP URL, a local file or standard
//!   input, or another image in the same registry (a cross-repository
//!   mount), into a registry reference.
//! - [`pipeline`]: the single pass over the source (checksums, unpacking,
//!   detection and checks, the layer tar).
//! - [`registry_client`]: the OCI Distribution client it pushes with.
//! - [`remote_source`]: random access over HTTP `Range` (a URL, the disk
//!   inside a registry layer) for the converter.
//! - [`progress`]: gauges, the final report, a terminal bar.
//! - [`upload_server`]: `curl -T` uploads into the same pipeline.

pub mod artifact;
pub mod channel_io;
pub mod checksum;
pub mod container_source;
pub mod destination;
pub mod http_source;
pub mod import;
pub mod pipeline;
pub mod progress;
pub mod reference;
pub mod remote_source;
pub mod upload_server;
pub mod registry_client;

use std::io;
use std::path::PathBuf;

/// What can end an import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source answered with a status that will not change.
    #[error("{url} answered HTTP {status}{hint}", hint = status_hint(*status))]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The source kept failing transiently.
    #[error("{url} failed {attempts} times, last with {last}: giving up")]
    GaveUp {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The source could not be reached (DNS, TLS, refused connection).
    #[error("cannot download {0}: {1}")]
    Http(String, String),
    /// Reading the source failed or it ended early.
    #[error("reading the source failed: {0}")]
    SourceRead(io::Error),
    /// A checksum did not match.
    #[error("the {algorithm} checksum of the downloaded bytes is {actual}, expected {expected}: the image is corrupt or not the one expected")]
    BadChecksum {
        /// The algorithm.
        algorithm: &'static str,
        /// Expected hex.
        expected: String,
        /// Computed hex.
        actual: String,
    },
    /// The converter refused the image.
    #[error(transparent)]
    Converter(#[from] dvcr_converter::ConverterError),
    /// The unpacked image is larger than the limit.
    #[error("the image unpacks to more than the limit of {0} bytes (raise --max-virtual-size if it is genuine)")]
    TooLarge(u64),
    /// The scratch folder could not be used.
    #[error("cannot use the scratch folder {folder}: {error}{hint}", folder = .0.display(), error = .1, hint = space_hint(.1))]
    Scratch(PathBuf, io::Error),
    /// Building the layer failed.
    #[error("cannot build the layer: {0}")]
    Layer(io::Error),
    /// The registry refused or failed.
    #[error("{0}{hint}", hint = registry_hint(.0))]
    Registry(#[from] registry_client::RegistryError),
    /// The layer's digest is missing from the registry's report, or
    /// differs from the one computed here.
    #[error("{0}")]
    LayerDigest(String),
    /// The source has no bytes at all.
    #[error("the image is empty (0 bytes): check the URL or the file that was sent")]
    EmptySource,
    /// The arguments do not make sense.
    #[error("{0}")]
    Usage(String),
    /// A source image in a registry is not a disk artifact.
    #[error("{0}")]
    NotAnArtifact(String),
}

fn status_hint(status: u16) -> &'static str {
    match status {
        404 | 410 => ": the URL does not exist; check it",
        401 | 403 => ": the server refuses access; the URL may need credentials or be expired",
        _ => "",
    }
}

fn space_hint(error: &io::Error) -> &'static str {
    if error.raw_os_error() == Some(28) {
        ": the disk is full"
    } else {
        ""
    }
}

fn registry_hint(error: &registry_client::RegistryError) -> &'static str {
    let text = error.to_string().to_ascii_lowercase();
    if text.contains("no space") || text.contains("507") || text.contains("insufficient storage") {
        ": the registry is out of space; free space (delete images, run garbage collection) or grow its volume"
    } else {
        ""
    }
}

impl ImportError {
    pub(crate) fn source_read(error: io::Error) -> Self {
        // A source failure carried through the pipeline's channel.
        ImportError::SourceRead(error)
    }

    /// A machine-readable reason, as a condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ImportError::BadChecksum { .. } => "BadImageChecksum",
            ImportError::HttpStatus { .. } | ImportError::GaveUp { .. } | ImportError::Http(..) => "SourceUnavailable",
            ImportError::SourceRead(_) => "SourceReadFailed",
            ImportError::Converter(_) | ImportError::TooLarge(_) | ImportError::NotAnArtifact(_) | ImportError::EmptySource => "BadImage",
            ImportError::Scratch(..) | ImportError::Layer(_) => "ImporterFailed",
            ImportError::Registry(_) | ImportError::LayerDigest(_) => "RegistryFailed",
            ImportError::Usage(_) => "BadArguments",
        }
    }

    /// Whether retrying the same import can help.
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            ImportError::GaveUp { .. }
                | ImportError::Http(..)
                | ImportError::SourceRead(_)
                | ImportError::Registry(_)
                | ImportError::LayerDigest(_)
        )
    }
}
