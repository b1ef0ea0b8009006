//! What `dvcr info` reports, with `qemu-img info --output=json`'s key names
//! where it has them.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::detect::{self, Compression, ImageFormat};
use crate::qcow2::Qcow2Image;
use crate::source::{FileSource, ReadAt};
use crate::ConverterError;

/// Facts about one image file.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The file inspected.
    pub filename: String,
    /// Format, as `qemu-img` names it (`vpc` for VHD, `raw` for ISO).
    pub format: String,
    /// DVCR's own name for the format (`iso`, `vhd`, ...).
    pub detected_format: ImageFormat,
    /// Size of the guest disk in bytes, where the format is read natively.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// Bytes the file occupies on disk.
    pub actual_size: u64,
    /// qcow2: bytes per cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// qcow2: whether any cluster is compressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
    /// qcow2: `zlib` or `zstd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<&'static str>,
    /// qcow2: whether L2 entries carry subcluster bitmaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// A compression wrapper around the whole file (`gzip`, `xz`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wrapper: Option<Compression>,
}

/// Reads the first bytes and the last 512 of a source for detection.
pub fn detect_source(source: &dyn ReadAt) -> Result<(Option<Compression>, ImageFormat), ConverterError> {
    let size = source.size();
    let mut head = vec![0u8; (size.min(detect::DETECT_HEAD_BYTES as u64)) as usize];
    source.read_exact_at(&mut head, 0).map_err(ConverterError::Read)?;
    if let Some(compression) = detect::detect_compression(&head) {
        return Ok((Some(compression), ImageFormat::Raw));
    }
    let mut footer = [0u8; 512];
    let footer = if size >= 1024 {
        source.read_exact_at(&mut footer, size - 512).map_err(ConverterError::Read)?;
        Some(&footer[..])
    } else {
        None
    };
    Ok((None, detect::detect_format(&head, footer)))
}

/// Inspects the image at `path`; qcow2 images are fully checked.
pub fn inspect(path: &Path, max_virtual_size: u64) -> Result<ImageInfo, ConverterError> {
    let file = File::open(path).map_err(ConverterError::Read)?;
    let actual_size = file.metadata().map_err(ConverterError::Read)?.blocks() * 512;
    let source = FileSource::new(file).map_err(ConverterError::Read)?;
    let (wrapper, format) = detect_source(&source)?;
    let mut info = ImageInfo {
        filename: path.display().to_string(),
        format: format.qemu_name().to_string(),
        detected_format: format,
        virtual_size: None,
        actual_size,
        cluster_size: None,
        compressed: None,
        compression_type: None,
        extended_l2: None,
        wrapper,
    };
    if let Some(compression) = wrapper {
        return Err(ConverterError::Compressed(compression));
    }
    match format {
        ImageFormat::Qcow2 => {
            let image = Qcow2Image::open(&source, max_virtual_size)?;
            let header = image.header();
            info.virtual_size = Some(header.virtual_size);
            info.cluster_size = Some(header.cluster_size());
            info.compressed = Some(image.has_compressed_clusters()?);
            info.compression_type = Some(match header.compression {
                crate::qcow2::ClusterCompression::Zlib => "zlib",
                crate::qcow2::ClusterCompression::Zstd => "zstd",
            });
            info.extended_l2 = Some(header.extended_l2);
        }
        ImageFormat::Raw | ImageFormat::Iso => info.virtual_size = Some(source.size()),
        ImageFormat::Vmdk | ImageFormat::Vhd | ImageFormat::Vhdx | ImageFormat::Vdi => {
            info.virtual_size = crate::formats::virtual_size(format, &source)?;
        }
    }
    Ok(info)
}
