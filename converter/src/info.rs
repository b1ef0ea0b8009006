//! What `dvcr info` reports, with `qemu-img info --output=json`'s key names
//! where it has them.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::detect::{self, Compression, ImageFormat};
use crate::qcow2::Qcow2Image;
use crate::source::{FileSource, ReadAt, StreamSummary};
use crate::unwrap;
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

/// Bytes of an unpacked stream kept for inspection.
const KEEP_HEAD: usize = 4 << 20;
const KEEP_TAIL: usize = 512;

/// Unpacks a wrapped image in one bounded pass, keeping its head and tail.
pub fn summarize_wrapped(path: &Path, compression: Compression, limit: u64) -> Result<StreamSummary, ConverterError> {
    let file = File::open(path).map_err(ConverterError::Read)?;
    let mut reader = unwrap::decoder(compression, std::io::BufReader::new(file), limit).map_err(ConverterError::Read)?;
    let mut head = vec![0u8; KEEP_HEAD];
    let length = unwrap::read_up_to(&mut reader, &mut head).map_err(ConverterError::Read)?;
    head.truncate(length);
    let mut tail = head[head.len().saturating_sub(KEEP_TAIL)..].to_vec();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let read = unwrap::read_up_to(&mut reader, &mut chunk).map_err(ConverterError::Read)?;
        if read == 0 {
            break;
        }
        tail.extend_from_slice(&chunk[..read]);
        let excess = tail.len().saturating_sub(KEEP_TAIL);
        tail.drain(..excess);
    }
    Ok(StreamSummary { head, tail, size: reader.produced() })
}

/// Inspects the image at `path`; qcow2 images are fully checked. A wrapped
/// image is unpacked once (bounded by `max_virtual_size`) and described
/// from its header; its qcow2 clusters are not scanned.
pub fn inspect(path: &Path, max_virtual_size: u64) -> Result<ImageInfo, ConverterError> {
    let file = File::open(path).map_err(ConverterError::Read)?;
    let actual_size = file.metadata().map_err(ConverterError::Read)?.blocks() * 512;
    let file_source = FileSource::new(file).map_err(ConverterError::Read)?;
    let (wrapper, _) = detect_source(&file_source)?;
    let summary;
    let source: &dyn ReadAt = match wrapper {
        Some(compression) => {
            summary = summarize_wrapped(path, compression, max_virtual_size)?;
            &summary
        }
        None => &file_source,
    };
    let (_, format) = detect_source(source)?;
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
    match format {
        ImageFormat::Qcow2 => {
            let header = match wrapper {
                None => {
                    let image = Qcow2Image::open(source, max_virtual_size)?;
                    info.compressed = Some(image.has_compressed_clusters()?);
                    image.header().clone()
                }
                Some(_) => crate::qcow2::read_header(source, max_virtual_size)?,
            };
            info.virtual_size = Some(header.virtual_size);
            info.cluster_size = Some(header.cluster_size());
            info.compression_type = Some(match header.compression {
                crate::qcow2::ClusterCompression::Zlib => "zlib",
                crate::qcow2::ClusterCompression::Zstd => "zstd",
            });
            info.extended_l2 = Some(header.extended_l2);
        }
        ImageFormat::Vmdk | ImageFormat::Vhd | ImageFormat::Vhdx | ImageFormat::Vdi if wrapper.is_none() => {
            // Checked as a conversion would check it, so that `info` refuses
            // what `convert` refuses.
            if let Some(image) = crate::convert::open_mapped(format, source, max_virtual_size)? {
                info.virtual_size = Some(image.virtual_size());
            }
        }
        _ => info.virtual_size = crate::formats::virtual_size(format, source)?,
    }
    Ok(info)
}

/// Format and virtual size of an image seen as a stream: its head (at
/// least [`detect::DETECT_HEAD_BYTES`] when it is that long, more for
/// headers that point further), its last 512 bytes and its length. The
/// header checks a conversion makes are made (a qcow2 backing file,
/// encryption, unknown features, sizes); the tables are not walked.
pub fn describe_stream(summary: &StreamSummary, max_virtual_size: u64) -> Result<(ImageFormat, u64), ConverterError> {
    let (_, format) = detect_source(summary)?;
    let virtual_size = match format {
        ImageFormat::Qcow2 => crate::qcow2::read_header(summary, max_virtual_size)?.virtual_size,
        other => crate::formats::virtual_size(other, summary)?.unwrap_or(summary.size),
    };
    if virtual_size > max_virtual_size {
        return Err(ConverterError::VirtualSizeTooLarge {
            format,
            size: virtual_size,
            limit: max_virtual_size,
        });
    }
    Ok((format, virtual_size))
}
