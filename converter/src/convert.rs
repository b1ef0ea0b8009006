//! Conversion to raw (and, from raw, to qcow2).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::detect::ImageFormat;
use crate::OutputFormat;
use crate::source::FileSource;
use crate::unwrap;

use crate::copier::{copy_runs, Run};
use crate::output::RawOutput;
use crate::mapped::{Cluster, MappedImage};
use crate::qcow2::Qcow2Image;
use crate::vdi::VdiImage;
use crate::vhd::VhdImage;
use crate::vhdx::VhdxImage;
use crate::vmdk::VmdkImage;
use crate::source::ReadAt;
use crate::ConverterError;

/// Largest run of contiguous data clusters read and written in one call.
const MAX_RUN: u64 = 1 << 20;

/// Opens a table-based image (qcow2, VMDK, VHD, VHDX, VDI) after checking it.
pub fn open_mapped<'a>(
    format: ImageFormat,
    source: &'a dyn ReadAt,
    max_virtual_size: u64,
) -> Result<Option<Box<dyn MappedImage + 'a>>, ConverterError> {
    Ok(Some(match format {
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open(source, max_virtual_size)?),
        ImageFormat::Vmdk => Box::new(VmdkImage::open(source, max_virtual_size)?),
        ImageFormat::Vhd => Box::new(VhdImage::open(source, max_virtual_size)?),
        ImageFormat::Vdi => Box::new(VdiImage::open(source, max_virtual_size)?),
        ImageFormat::Vhdx => Box::new(VhdxImage::open(source, max_virtual_size)?),
        ImageFormat::Raw | ImageFormat::Iso => return Ok(None),
    }))
}

/// Writes the guest disk of a table-based image to `destination` as raw.
pub fn mapped_to_raw(image: &dyn MappedImage, destination: &Path) -> Result<(), ConverterError> {
    let cluster_size = image.cluster_size();
    let virtual_size = image.virtual_size();
    let output = RawOutput::create(destination, Some(virtual_size))
        .map_err(|error| ConverterError::Output(destination.display().to_string(), error))?;
    let source = image.source();
    let output_error = |error| ConverterError::Output(destination.display().to_string(), error);
    // A single cluster (up to 2 MiB) may be larger than a run.
    let max_run = MAX_RUN.max(cluster_size);
    copy_runs(source, &output, output_error, max_run, |runs| {
        let mut batch: Vec<CompressedCluster> = Vec::with_capacity(COMPRESSED_BATCH);
        let mut pending: Option<Run> = None;
        image.visit_clusters(&mut |guest, mapping| -> Result<(), ConverterError> {
            // The last cluster may reach past the virtual size.
            let length = cluster_size.min(virtual_size - guest);
            let contiguous = |run: &Run, host: u64| {
                run.guest + run.length == guest && run.host + run.length == host && run.length + length <= max_run
            };
            if let Cluster::Data { host_offset } = mapping {
                match pending.as_mut() {
                    Some(run) if contiguous(run, host_offset) => run.length += length,
                    _ => {
                        if let Some(run) = pending.take() {
                            runs.push(run)?;
                        }
                        pending = Some(Run { guest, host: host_offset, length });
                    }
                }
                return Ok(());
            }
            if let Some(run) = pending.take() {
                runs.push(run)?;
            }
            match mapping {
                Cluster::Unallocated | Cluster::Zero => output.write_zeros(guest, length).map_err(output_error)?,
                // Every cluster is written at its own offset, so a batch
                // keeps filling across the zero and data clusters between
                // compressed ones (in a half-allocated image, 16 at a time
                // left the second core mostly idle).
                Cluster::Compressed { host_offset, length: stored } => {
                    batch.push(CompressedCluster { guest, host_offset, stored, length });
                    if batch.len() == COMPRESSED_BATCH {
                        decompress_batch(image, &output, &batch, output_error)?;
                        batch.clear();
                    }
                }
                Cluster::Subclusters { host_offset, allocated } => {
                    let subcluster = image.subcluster_size();
                    for index in 0..32u64 {
                        let start = index * subcluster;
                        if start >= length {
                            break;
                        }
                        let size = subcluster.min(length - start);
                        if allocated & (1 << index) != 0 {
                            runs.push(Run { guest: guest + start, host: host_offset + start, length: size })?;
                        } else {
                            output.write_zeros(guest + start, size).map_err(output_error)?;
                        }
                    }
                }
                Cluster::Data { .. } => {}
            }
            Ok(())
        })?;
        if let Some(run) = pending.take() {
            runs.push(run)?;
        }
        if !batch.is_empty() {
            decompress_batch(image, &output, &batch, output_error)?;
        }
        Ok(())
    })?;
    output.finish(None).map_err(output_error)
}

/// Compressed clusters decompressed together, across cores.
const COMPRESSED_BATCH: usize = 256;

/// One compressed guest cluster.
struct CompressedCluster {
    guest: u64,
    host_offset: u64,
    stored: u64,
    length: u64,
}

/// Decompresses independent clusters on every core and writes each at its
/// guest offset (positioned writes, so order does not matter).
fn decompress_batch(
    image: &dyn MappedImage,
    output: &RawOutput,
    batch: &[CompressedCluster],
    output_error: impl Fn(std::io::Error) -> ConverterError + Copy + Send,
) -> Result<(), ConverterError> {
    let cluster_size = image.cluster_size() as usize;
    let workers = std::thread::available_parallelism().map_or(1, usize::from).min(batch.len()).max(1);
    let per_worker = batch.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(per_worker)
            .map(|part| {
                scope.spawn(move || -> Result<(), ConverterError> {
                    let (mut compressed, mut cluster) = (Vec::new(), vec![0u8; cluster_size]);
                    for job in part {
                        image.decompress_cluster(job.guest, job.host_offset, job.stored, &mut compressed, &mut cluster)?;
                        output.write_data(job.guest, &cluster[..job.length as usize]).map_err(output_error)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(result) => result?,
                Err(_) => return Err(ConverterError::Read(std::io::Error::other("a decompression thread panicked"))),
            }
        }
        Ok(())
    })
}

/// Copies a raw source to `destination`, leaving zero blocks as holes.
pub fn raw_to_raw(source: &dyn ReadAt, destination: &Path) -> Result<(), ConverterError> {
    let size = source.size();
    let output_error = |error| ConverterError::Output(destination.display().to_string(), error);
    let output = RawOutput::create(destination, Some(size)).map_err(output_error)?;
    copy_runs(source, &output, output_error, MAX_RUN, |runs| {
        let mut offset = 0;
        while offset < size {
            let length = (size - offset).min(MAX_RUN);
            runs.push(Run { guest: offset, host: offset, length })?;
            offset += length;
        }
        Ok(())
    })?;
    output.finish(None).map_err(output_error)
}

/// Converts the image at `source` (`-`: standard input) to `destination`:
/// to raw from qcow2, VMDK, VHD, VDI, raw and ISO, each also inside a
/// gzip/xz/zstd/bzip2 wrapper (unpacked with its output bounded by
/// `max_virtual_size`); to qcow2 from raw and ISO. Other formats are
/// refused by name.
pub fn convert_file(
    source: &Path,
    destination: &Path,
    output_format: OutputFormat,
    max_virtual_size: u64,
) -> Result<(), ConverterError> {
    refuse_same_file(source, destination)?;
    let result = match output_format {
        OutputFormat::Raw if source == Path::new("-") => convert_stream(std::io::stdin().lock(), destination, max_virtual_size),
        OutputFormat::Raw => convert_checked(source, destination, max_virtual_size),
        OutputFormat::Qcow2 if source == Path::new("-") => Err(ConverterError::QcowOutputSource("standard input".into())),
        OutputFormat::Qcow2 => to_qcow2(source, destination),
    };
    removing_partial_output(destination, result)
}

fn convert_checked(source: &Path, destination: &Path, max_virtual_size: u64) -> Result<(), ConverterError> {
    let file = File::open(source).map_err(ConverterError::Read)?;
    let file_source = FileSource::new(file).map_err(ConverterError::Read)?;
    convert_source(&file_source, destination, max_virtual_size)
}

fn convert_source(source: &dyn ReadAt, destination: &Path, max_virtual_size: u64) -> Result<(), ConverterError> {
    let (wrapper, format) = crate::info::detect_source(source)?;
    if wrapper.is_some() {
        return convert_stream(crate::source::SequentialReader::new(source), destination, max_virtual_size);
    }
    match format {
        ImageFormat::Raw | ImageFormat::Iso => raw_to_raw(source, destination),
        other => match open_mapped(other, source, max_virtual_size)? {
            Some(image) => mapped_to_raw(image.as_ref(), destination),
            None => Err(ConverterError::Unsupported {
                format: other,
                operation: "converted",
            }),
        },
    }
}

/// Converts an image read through any random-access source (an HTTP
/// `Range` reader, the disk file inside a registry blob) to raw at
/// `destination`; a failed conversion removes its partial output.
pub fn convert_read_at(source: &dyn ReadAt, destination: &Path, max_virtual_size: u64) -> Result<(), ConverterError> {
    removing_partial_output(destination, convert_source(source, destination, max_virtual_size))
}

/// Copies `source` to `destination` byte for byte, without looking at
/// what it holds: for a source known to be raw, such as a disk a
/// provisioner wrote, whose guest may have put anything at its start, even
/// an image header (read as qcow2 it would be another disk). Zero blocks
/// become holes; a failed copy removes its partial output.
pub fn copy_raw_read_at(source: &dyn ReadAt, destination: &Path) -> Result<(), ConverterError> {
    removing_partial_output(destination, raw_to_raw(source, destination))
}

/// Passes `result` on, removing what a failed conversion wrote first.
fn removing_partial_output(destination: &Path, result: Result<(), ConverterError>) -> Result<(), ConverterError> {
    if result.is_err() {
        remove_partial_output(destination);
    }
    result
}

/// Removes what a failed conversion wrote (a block device is left as is).
fn remove_partial_output(destination: &Path) {
    let is_block_device = std::fs::metadata(destination).is_ok_and(|metadata| {
        use std::os::unix::fs::FileTypeExt;
        metadata.file_type().is_block_device()
    });
    if !is_block_device {
        let _ = std::fs::remove_file(destination);
    }
}

/// qcow2 output is written from a raw (or ISO) file.
fn to_qcow2(source: &Path, destination: &Path) -> Result<(), ConverterError> {
    let file = File::open(source).map_err(ConverterError::Read)?;
    let file_source = FileSource::new(file).map_err(ConverterError::Read)?;
    match crate::info::detect_source(&file_source)? {
        (None, ImageFormat::Raw | ImageFormat::Iso) => crate::qcow2_writer::raw_to_qcow2(&file_source, destination),
        (Some(compression), _) => Err(ConverterError::QcowOutputSource(format!("a {compression}-compressed file"))),
        (None, format) => Err(ConverterError::QcowOutputSource(format!("a {format} image"))),
    }
}

/// Refuses a conversion whose destination is its source (the same inode):
/// it would overwrite what it reads.
pub fn refuse_same_file(source: &Path, destination: &Path) -> Result<(), ConverterError> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(from), Ok(to)) = (std::fs::metadata(source), std::fs::metadata(destination)) {
        if (from.dev(), from.ino()) == (to.dev(), to.ino()) {
            return Err(ConverterError::SameFile(destination.display().to_string()));
        }
    }
    Ok(())
}

/// Converts a forward-only stream (a wrapped file, standard input): a
/// wrapper is unpacked on the way (bounded by `limit`); raw and ISO stream
/// straight to the sparse destination; formats that need random access
/// are spooled next to the destination first (bounded, removed after).
pub fn convert_stream(input: impl Read, destination: &Path, limit: u64) -> Result<(), ConverterError> {
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let mut head = vec![0u8; crate::detect::DETECT_HEAD_BYTES];
    let length = unwrap::read_up_to(&mut input, &mut head).map_err(ConverterError::Read)?;
    head.truncate(length);
    if let Some(compression) = crate::detect::detect_compression(&head) {
        let rejoined = std::io::Cursor::new(head).chain(input);
        let decoder = unwrap::decoder(compression, rejoined, limit).map_err(ConverterError::Read)?;
        return convert_stream(decoder, destination, limit);
    }
    let format = crate::detect::detect_format(&head, None);
    let output_error = |error| ConverterError::Output(destination.display().to_string(), error);
    let mut rest = std::io::Cursor::new(head).chain(input).take(limit.saturating_add(1));
    match format {
        ImageFormat::Raw | ImageFormat::Iso => {
            let output = RawOutput::create(destination, None).map_err(output_error)?;
            let mut offset = 0u64;
            let mut buffer = vec![0u8; MAX_RUN as usize];
            loop {
                let read = unwrap::read_up_to(&mut rest, &mut buffer).map_err(ConverterError::Read)?;
                if read == 0 {
                    break;
                }
                output.write_data(offset, &buffer[..read]).map_err(output_error)?;
                offset += read as u64;
            }
            if offset > limit {
                return Err(ConverterError::StreamTooLarge(limit));
            }
            output.finish(Some(offset)).map_err(output_error)
        }
        _ => {
            let scratch = scratch_path(destination);
            let spooled = (|| {
                let mut file = File::create(&scratch).map_err(output_error)?;
                let copied = std::io::copy(&mut rest, &mut file).map_err(ConverterError::Read)?;
                if copied > limit {
                    return Err(ConverterError::StreamTooLarge(limit));
                }
                convert_checked(&scratch, destination, limit)
            })();
            let _ = std::fs::remove_file(&scratch);
            spooled
        }
    }
}

fn scratch_path(destination: &Path) -> PathBuf {
    let name = destination.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    destination.with_file_name(format!(".{name}.dvcr-unpacked-{}", std::process::id()))
}
