//! DVCR's native disk-image detection, validation and conversion.
//!
//! - [`detect`]: the format and compression wrapper of a file, from content.
//! - [`qcow2`]: a checked qcow2 v2/v3 reader (zlib and zstd clusters,
//!   extended L2, every cluster size).
//! - [`vmdk`], [`vhd`], [`vhdx`], [`vdi`]: readers of the other table-based formats,
//!   behind the same [`mapped::MappedImage`] interface.
//! - [`convert`]: conversion to raw, sparse.
//! - [`info`]: what `dvcr info` reports, with `qemu-img info`'s key names.

mod aligned;
pub mod convert;
mod copier;
pub mod detect;
mod endian;
pub mod formats;
pub mod info;
pub mod mapped;
pub mod output;
pub mod qcow2;
pub mod qcow2_writer;
pub mod source;
pub mod unwrap;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::io;

/// What `dvcr convert` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw disk, sparse.
    Raw,
    /// qcow2 v3, 64 KiB clusters, uncompressed.
    Qcow2,
}

/// Default limit on the virtual size of an image: 64 TiB.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// What can go wrong in the converter.
#[derive(Debug, thiserror::Error)]
pub enum ConverterError {
    /// The qcow2 image was refused or is corrupt.
    #[error(transparent)]
    Qcow2(#[from] qcow2::Qcow2Error),
    /// The source could not be opened or read.
    #[error("cannot read the source image: {0}")]
    Read(io::Error),
    /// The destination could not be written.
    #[error("cannot write {0}: {1}")]
    Output(String, io::Error),
    /// The format is recognised but this operation does not handle it yet.
    #[error("{format} images cannot be {operation} natively yet: convert it to qcow2 or raw with `qemu-img convert` first")]
    Unsupported {
        /// The detected format.
        format: detect::ImageFormat,
        /// What was asked.
        operation: &'static str,
    },
    /// A VMDK, VHD, VHDX or VDI header is inconsistent.
    #[error("{format} image is malformed: {reason}")]
    Malformed {
        /// The detected format.
        format: detect::ImageFormat,
        /// What is wrong.
        reason: String,
    },
    /// qcow2 output from something other than a raw file.
    #[error("qcow2 output is written from raw or ISO files, and the source is {0}: convert it to raw first")]
    QcowOutputSource(String),
    /// A VMDK, VHD or VDI declares a virtual size above the limit.
    #[error("{format} virtual size {size} bytes is above the limit of {limit} bytes")]
    VirtualSizeTooLarge {
        /// The detected format.
        format: detect::ImageFormat,
        /// Declared size.
        size: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A differencing image: its data depends on a parent file.
    #[error("{format} image is a differencing image whose parent is {parent:?}: refused, because the parent's path is read from the image; flatten it first with `qemu-img convert`")]
    Differencing {
        /// The detected format.
        format: detect::ImageFormat,
        /// The parent as the image names it.
        parent: String,
    },
    /// A stream (standard input, an unpacked wrapper) is longer than the
    /// virtual-size limit.
    #[error("the image stream is longer than the limit of {0} bytes (raise --max-virtual-size if it is genuine)")]
    StreamTooLarge(u64),
    /// The destination is the source itself.
    #[error("{0} is both the source and the destination: converting in place would destroy the source")]
    SameFile(String),
}

