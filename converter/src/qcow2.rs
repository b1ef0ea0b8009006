//! A qcow2 (v2 and v3) reader of our own: header checks, cluster mapping,
//! and streaming conversion to raw.
//!
//! Why not the `qcow2-rs` crate: see docs/converter.md. In short, it refuses
//! zstd and extended-L2 images, panics on some malformed headers, and opens
//! backing files by the path written in the image.
//!
//! Every number read from the file is checked before it is used: cluster
//! size, table sizes and every offset against the file's length, so a
//! hostile image gets an error naming the field, never a panic or an
//! unbounded allocation.

use std::io;

use crate::endian::{be32, be64};
pub use crate::mapped::Cluster;
use crate::mapped::MappedImage;
use crate::source::ReadAt;
use crate::ConverterError;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Largest L1 table qemu itself accepts.
const MAX_L1_BYTES: u64 = 32 << 20;
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const SUBCLUSTERS: u64 = 32;

const INCOMPATIBLE_DIRTY: u64 = 1 << 0;
const INCOMPATIBLE_CORRUPT: u64 = 1 << 1;
const INCOMPATIBLE_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPATIBLE_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPATIBLE_EXTENDED_L2: u64 = 1 << 4;
const KNOWN_INCOMPATIBLE: u64 = INCOMPATIBLE_DIRTY
    | INCOMPATIBLE_CORRUPT
    | INCOMPATIBLE_EXTERNAL_DATA
    | INCOMPATIBLE_COMPRESSION_TYPE
    | INCOMPATIBLE_EXTENDED_L2;

const EXTENSION_END: u32 = 0;
const EXTENSION_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
const EXTENSION_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;

/// Why a qcow2 image was refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The file ends before a structure it declares.
    #[error("qcow2 image is truncated: {what} needs bytes up to {needed}, but the file has {size}")]
    Truncated {
        /// The structure.
        what: &'static str,
        /// End offset it needs.
        needed: u64,
        /// File size.
        size: u64,
    },
    /// Not a qcow2 file.
    #[error("not a qcow2 image: the file does not start with QFI\\xfb")]
    BadMagic,
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported: only versions 2 and 3 exist")]
    UnsupportedVersion(u32),
    /// The image names a backing file.
    #[error("qcow2 image has a backing file ({0:?}): images with backing files are refused, because the path is read from the image; flatten it first with `qemu-img convert`")]
    BackingFile(String),
    /// The image is encrypted.
    #[error("qcow2 image is encrypted (method {0}): encrypted images are refused; decrypt it first")]
    Encrypted(u32),
    /// The image keeps its data in another file.
    #[error("qcow2 image keeps its data in an external data file: refused, because the path is read from the image")]
    ExternalDataFile,
    /// Incompatible feature bits this reader does not know.
    #[error("qcow2 image uses unknown incompatible features (bits {0:#x}): refused, since reading it without them would give wrong data")]
    UnknownIncompatibleFeatures(u64),
    /// qemu marked the image corrupt.
    #[error("qcow2 image is marked corrupt by qemu: repair it with `qemu-img check -r all` first")]
    MarkedCorrupt,
    /// cluster_bits outside 9..=21.
    #[error("qcow2 cluster_bits {0} is out of range: cluster sizes are 512 B (9) to 2 MiB (21)")]
    ClusterBits(u32),
    /// Compression type other than zlib or zstd.
    #[error("qcow2 compression type {0} is unknown: only zlib (0) and zstd (1) exist")]
    CompressionType(u8),
    /// A header field is inconsistent.
    #[error("qcow2 header field {field} is invalid: {reason}")]
    Header {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Virtual size above the configured limit.
    #[error("qcow2 virtual size {size} bytes is above the limit of {limit} bytes")]
    VirtualSizeTooLarge {
        /// Declared size.
        size: u64,
        /// Configured limit.
        limit: u64,
    },
    /// A table or cluster offset outside the file or misaligned.
    #[error("qcow2 {what} at offset {offset:#x} is invalid: {reason}")]
    BadOffset {
        /// Which table or cluster.
        what: &'static str,
        /// The offset read.
        offset: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A compressed cluster does not decompress to a full cluster.
    #[error("qcow2 compressed cluster at guest offset {guest_offset:#x} is corrupt: {reason}")]
    Decompression {
        /// Guest offset of the cluster.
        guest_offset: u64,
        /// What the decompressor said.
        reason: String,
    },
    /// Reading the image failed.
    #[error("cannot read the qcow2 image: {0}")]
    Io(#[from] io::Error),
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterCompression {
    /// Raw deflate (qemu's "zlib").
    Zlib,
    /// Zstandard.
    Zstd,
}

/// The checked header of a qcow2 image.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest disk size in bytes.
    pub virtual_size: u64,
    /// Entries in the L1 table.
    pub l1_size: u64,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
    /// Compression of compressed clusters.
    pub compression: ClusterCompression,
    /// Whether L2 entries are 128-bit with subcluster bitmaps.
    pub extended_l2: bool,
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    /// L1 entries the virtual size needs.
    pub fn l1_needed(&self) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        self.virtual_size.div_ceil(per_l1)
    }
}



fn check_range(what: &'static str, offset: u64, length: u64, size: u64) -> Result<(), Qcow2Error> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        Some(end) => Err(Qcow2Error::Truncated { what, needed: end, size }),
        None => Err(Qcow2Error::BadOffset {
            what,
            offset,
            reason: "offset plus length overflows",
        }),
    }
}

/// Reads and checks the header of the image in `source`.
pub fn read_header(source: &dyn ReadAt, max_virtual_size: u64) -> Result<Header, Qcow2Error> {
    let size = source.size();
    check_range("the header", 0, 72, size)?;
    let mut fixed = [0u8; 104];
    let fixed_length = size.min(104) as usize;
    source.read_exact_at(&mut fixed[..fixed_length], 0)?;
    if &fixed[..4] != MAGIC {
        return Err(Qcow2Error::BadMagic);
    }
    let version = be32(&fixed, 4);
    if version != 2 && version != 3 {
        return Err(Qcow2Error::UnsupportedVersion(version));
    }
    let cluster_bits = be32(&fixed, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(Qcow2Error::ClusterBits(cluster_bits));
    }
    let backing_file_offset = be64(&fixed, 8);
    let backing_file_size = be32(&fixed, 16);
    if backing_file_offset != 0 {
        let length = u64::from(backing_file_size.min(1023));
        let mut name = vec![0u8; length as usize];
        if check_range("the backing file name", backing_file_offset, length, size).is_ok() {
            source.read_exact_at(&mut name, backing_file_offset)?;
        }
        return Err(Qcow2Error::BackingFile(String::from_utf8_lossy(&name).into_owned()));
    }
    let crypt_method = be32(&fixed, 32);
    if crypt_method != 0 {
        return Err(Qcow2Error::Encrypted(crypt_method));
    }
    let virtual_size = be64(&fixed, 24);
    if virtual_size > max_virtual_size {
        return Err(Qcow2Error::VirtualSizeTooLarge {
            size: virtual_size,
            limit: max_virtual_size,
        });
    }
    let l1_size = u64::from(be32(&fixed, 36));
    let l1_table_offset = be64(&fixed, 40);

    let (mut compression, mut extended_l2, header_length) = (ClusterCompression::Zlib, false, if version == 2 { 72 } else { 104 });
    let mut header_length = header_length as u64;
    if version == 3 {
        check_range("the version 3 header", 0, 104, size)?;
        let incompatible = be64(&fixed, 72);
        if incompatible & !KNOWN_INCOMPATIBLE != 0 {
            return Err(Qcow2Error::UnknownIncompatibleFeatures(incompatible & !KNOWN_INCOMPATIBLE));
        }
        if incompatible & INCOMPATIBLE_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if incompatible & INCOMPATIBLE_EXTERNAL_DATA != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }
        extended_l2 = incompatible & INCOMPATIBLE_EXTENDED_L2 != 0;
        header_length = u64::from(be32(&fixed, 100));
        if header_length < 104 || !header_length.is_multiple_of(8) || header_length > 1 << cluster_bits {
            return Err(Qcow2Error::Header {
                field: "header_length",
                reason: format!("{header_length} is not a multiple of 8 between 104 and the cluster size"),
            });
        }
        if header_length > 104 {
            check_range("the header", 0, 105, size)?;
            let mut byte = [0u8; 1];
            source.read_exact_at(&mut byte, 104)?;
            compression = match byte[0] {
                0 => ClusterCompression::Zlib,
                1 => ClusterCompression::Zstd,
                other => return Err(Qcow2Error::CompressionType(other)),
            };
        }
        if (incompatible & INCOMPATIBLE_COMPRESSION_TYPE != 0) != (compression != ClusterCompression::Zlib) {
            return Err(Qcow2Error::Header {
                field: "compression_type",
                reason: "the compression-type feature bit and the compression type disagree".into(),
            });
        }
    }
    check_extensions(source, header_length, 1 << cluster_bits)?;

    let header = Header {
        version,
        cluster_bits,
        virtual_size,
        l1_size,
        l1_table_offset,
        compression,
        extended_l2,
    };
    let needed = header.l1_needed();
    if l1_size < needed {
        return Err(Qcow2Error::Header {
            field: "l1_size",
            reason: format!("{l1_size} entries cannot map a virtual size of {virtual_size} bytes ({needed} needed)"),
        });
    }
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Qcow2Error::Header {
            field: "l1_size",
            reason: format!("{l1_size} entries is more than qemu's limit of {} entries", MAX_L1_BYTES / 8),
        });
    }
    if l1_size > 0 {
        if !l1_table_offset.is_multiple_of(header.cluster_size()) {
            return Err(Qcow2Error::BadOffset {
                what: "L1 table",
                offset: l1_table_offset,
                reason: "not aligned to a cluster",
            });
        }
        check_range("the L1 table", l1_table_offset, l1_size * 8, size)?;
    }
    Ok(header)
}

fn check_extensions(source: &dyn ReadAt, start: u64, cluster_size: u64) -> Result<(), Qcow2Error> {
    let end = cluster_size.min(source.size());
    let mut offset = start;
    while offset + 8 <= end {
        let mut head = [0u8; 8];
        source.read_exact_at(&mut head, offset)?;
        let kind = be32(&head, 0);
        let length = u64::from(be32(&head, 4));
        match kind {
            EXTENSION_END => return Ok(()),
            EXTENSION_EXTERNAL_DATA_FILE => return Err(Qcow2Error::ExternalDataFile),
            EXTENSION_FULL_DISK_ENCRYPTION => return Err(Qcow2Error::Encrypted(2)),
            _ => {}
        }
        offset = offset + 8 + length.div_ceil(8) * 8;
    }
    Ok(())
}


/// A qcow2 image opened for reading.
pub struct Qcow2Image<'a> {
    source: &'a dyn ReadAt,
    header: Header,
    l1: Vec<u64>,
}

impl<'a> Qcow2Image<'a> {
    /// Reads and checks the header and the L1 table.
    pub fn open(source: &'a dyn ReadAt, max_virtual_size: u64) -> Result<Self, Qcow2Error> {
        let header = read_header(source, max_virtual_size)?;
        let needed = header.l1_needed() as usize;
        let mut table = vec![0u8; needed * 8];
        source.read_exact_at(&mut table, header.l1_table_offset)?;
        let l1 = table.chunks_exact(8).map(|entry| be64(entry, 0)).collect();
        Ok(Qcow2Image { source, header, l1 })
    }

    /// The checked header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Calls `visit(guest_offset, cluster)` for every guest cluster, in
    /// order, reading each L2 table once.
    pub fn for_each_cluster<E: From<Qcow2Error>>(
        &self,
        mut visit: impl FnMut(u64, Cluster) -> Result<(), E>,
    ) -> Result<(), E> {
        let header = &self.header;
        let cluster_size = header.cluster_size();
        let file_size = self.source.size();
        let entry_bytes = if header.extended_l2 { 16 } else { 8 };
        let mut table = vec![0u8; cluster_size as usize];
        for (l1_index, l1_entry) in self.l1.iter().enumerate() {
            let first_guest = l1_index as u64 * header.l2_entries() * cluster_size;
            let l2_offset = l1_entry & L1_OFFSET_MASK;
            let clusters_here = header
                .l2_entries()
                .min((header.virtual_size - first_guest).div_ceil(cluster_size));
            if l2_offset == 0 {
                for index in 0..clusters_here {
                    visit(first_guest + index * cluster_size, Cluster::Unallocated)?;
                }
                continue;
            }
            if !l2_offset.is_multiple_of(cluster_size) {
                return Err(Qcow2Error::BadOffset {
                    what: "L2 table",
                    offset: l2_offset,
                    reason: "not aligned to a cluster",
                }
                .into());
            }
            check_range("an L2 table", l2_offset, cluster_size, file_size)?;
            self.source.read_exact_at(&mut table, l2_offset).map_err(Qcow2Error::Io)?;
            for index in 0..clusters_here {
                let at = (index * entry_bytes) as usize;
                let entry = be64(&table, at);
                let bitmap = if header.extended_l2 { Some(be64(&table, at + 8)) } else { None };
                let guest = first_guest + index * cluster_size;
                let guest_length = cluster_size.min(header.virtual_size - guest);
                let cluster = self.decode_l2(entry, bitmap, guest_length)?;
                visit(guest, cluster)?;
            }
        }
        Ok(())
    }

    /// Decodes one L2 entry of a cluster whose guest part is `guest_length`
    /// bytes (less than a cluster only at the end of the disk), checking that
    /// the bytes it will be read from are in the file.
    fn decode_l2(&self, entry: u64, bitmap: Option<u64>, guest_length: u64) -> Result<Cluster, Qcow2Error> {
        let header = &self.header;
        let cluster_size = header.cluster_size();
        let file_size = self.source.size();
        if entry & L2_COMPRESSED != 0 {
            let offset_bits = 62 - (header.cluster_bits - 8);
            let host_offset = entry & ((1u64 << offset_bits) - 1);
            let sectors = ((entry >> offset_bits) & ((1u64 << (header.cluster_bits - 8)) - 1)) + 1;
            let length = (sectors * 512 - (host_offset & 511)).min(file_size.saturating_sub(host_offset));
            if host_offset >= file_size {
                return Err(Qcow2Error::BadOffset {
                    what: "compressed cluster",
                    offset: host_offset,
                    reason: "beyond the end of the file",
                });
            }
            return Ok(Cluster::Compressed { host_offset, length });
        }
        let host_offset = entry & L2_OFFSET_MASK;
        let check_data = |host_offset: u64, length: u64| -> Result<(), Qcow2Error> {
            if !host_offset.is_multiple_of(cluster_size) {
                return Err(Qcow2Error::BadOffset {
                    what: "data cluster",
                    offset: host_offset,
                    reason: "not aligned to a cluster",
                });
            }
            check_range("a data cluster", host_offset, length, file_size)
        };
        match bitmap {
            None => {
                if entry & L2_ZERO != 0 && header.version >= 3 {
                    Ok(Cluster::Zero)
                } else if host_offset == 0 {
                    Ok(Cluster::Unallocated)
                } else {
                    check_data(host_offset, guest_length)?;
                    Ok(Cluster::Data { host_offset })
                }
            }
            Some(bitmap) => {
                let allocated = (bitmap & 0xffff_ffff) as u32;
                let zero = (bitmap >> 32) as u32;
                if allocated & zero != 0 {
                    return Err(Qcow2Error::BadOffset {
                        what: "extended L2 entry",
                        offset: host_offset,
                        reason: "a subcluster is marked both allocated and zero",
                    });
                }
                if allocated == 0 {
                    return Ok(if zero == 0 { Cluster::Unallocated } else { Cluster::Zero });
                }
                if host_offset == 0 {
                    return Err(Qcow2Error::BadOffset {
                        what: "extended L2 entry",
                        offset: 0,
                        reason: "subclusters are allocated but the cluster has no host offset",
                    });
                }
                let subcluster = cluster_size / SUBCLUSTERS;
                let allocated_end = u64::from(32 - allocated.leading_zeros()) * subcluster;
                check_data(host_offset, allocated_end.min(guest_length))?;
                if allocated == u32::MAX {
                    Ok(Cluster::Data { host_offset })
                } else {
                    Ok(Cluster::Subclusters { host_offset, allocated })
                }
            }
        }
    }

    /// Decompresses one compressed cluster into `output` (a cluster long).
    pub fn decompress(
        &self,
        guest_offset: u64,
        host_offset: u64,
        length: u64,
        compressed: &mut Vec<u8>,
        output: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        compressed.resize(length as usize, 0);
        self.source.read_exact_at(compressed, host_offset)?;
        let failed = |reason: String| Qcow2Error::Decompression { guest_offset, reason };
        match self.header.compression {
            ClusterCompression::Zlib => {
                // libdeflate inflates a whole buffer two to three times
                // faster than a streaming inflater; a cluster is one
                // buffer. What follows the deflate stream (the stored
                // length is rounded up to sectors) is not read.
                let inflated = libdeflater::Decompressor::new()
                    .deflate_decompress(compressed, output)
                    .map_err(|error| match error {
                        libdeflater::DecompressionError::InsufficientSpace => {
                            failed(format!("it inflates to more than a cluster ({} bytes)", output.len()))
                        }
                        libdeflater::DecompressionError::BadData => failed("it is not valid deflate data".into()),
                    })?;
                if inflated != output.len() {
                    return Err(failed(format!("inflated to {inflated} bytes instead of {}", output.len())));
                }
            }
            ClusterCompression::Zstd => {
                let mut decoder = zstd::stream::raw::Decoder::new().map_err(|error| failed(error.to_string()))?;
                let mut input = zstd::stream::raw::InBuffer::around(compressed.as_slice());
                let mut out = zstd::stream::raw::OutBuffer::around(output);
                loop {
                    use zstd::stream::raw::Operation;
                    let before = (input.pos(), out.pos());
                    let hint = decoder
                        .run(&mut input, &mut out)
                        .map_err(|error| failed(error.to_string()))?;
                    if out.pos() == out.capacity() || hint == 0 || (input.pos(), out.pos()) == before {
                        break;
                    }
                }
                if out.pos() != out.capacity() {
                    return Err(failed(format!("decompressed to {} bytes instead of {}", out.pos(), out.capacity())));
                }
            }
        }
        Ok(())
    }

    /// Whether any cluster is compressed.
    pub fn has_compressed_clusters(&self) -> Result<bool, Qcow2Error> {
        let mut found = false;
        self.for_each_cluster(|_, cluster| {
            found |= matches!(cluster, Cluster::Compressed { .. });
            Ok::<(), Qcow2Error>(())
        })?;
        Ok(found)
    }

    /// Subcluster size of an extended-L2 image.
    pub fn subcluster_size(&self) -> u64 {
        self.header.cluster_size() / SUBCLUSTERS
    }

    /// The source the image is read from.
    pub fn source(&self) -> &dyn ReadAt {
        self.source
    }
}

impl MappedImage for Qcow2Image<'_> {
    fn source(&self) -> &dyn ReadAt {
        self.source
    }

    fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn subcluster_size(&self) -> u64 {
        self.header.cluster_size() / SUBCLUSTERS
    }

    fn visit_clusters(
        &self,
        visit: &mut dyn FnMut(u64, Cluster) -> Result<(), ConverterError>,
    ) -> Result<(), ConverterError> {
        self.for_each_cluster(visit)
    }

    fn decompress_cluster(
        &self,
        guest_offset: u64,
        host_offset: u64,
        stored: u64,
        scratch: &mut Vec<u8>,
        output: &mut [u8],
    ) -> Result<(), ConverterError> {
        Ok(self.decompress(guest_offset, host_offset, stored, scratch, output)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid v3 image: 512-byte clusters, 8 KiB virtual size, one
    /// data cluster, one zlib-compressed cluster, one zero cluster.
    fn small_image() -> Vec<u8> {
        let cluster = 512usize;
        let mut image = vec![0u8; cluster * 6];
        image[..4].copy_from_slice(MAGIC);
        image[4..8].copy_from_slice(&3u32.to_be_bytes());
        image[20..24].copy_from_slice(&9u32.to_be_bytes());
        image[24..32].copy_from_slice(&8192u64.to_be_bytes());
        image[36..40].copy_from_slice(&1u32.to_be_bytes());
        image[40..48].copy_from_slice(&(cluster as u64).to_be_bytes());
        image[100..104].copy_from_slice(&104u32.to_be_bytes());
        // L1 -> L2 at cluster 2.
        image[cluster..cluster + 8].copy_from_slice(&((2 * cluster) as u64 | 1 << 63).to_be_bytes());
        let l2 = 2 * cluster;
        image[l2..l2 + 8].copy_from_slice(&((3 * cluster) as u64 | 1 << 63).to_be_bytes());
        image[3 * cluster..4 * cluster].fill(0xab);
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), false);
        let mut compressed = vec![0u8; cluster];
        deflater
            .compress(&[0x5a; 512], &mut compressed, flate2::FlushCompress::Finish)
            .unwrap();
        let compressed_length = deflater.total_out() as usize;
        image[4 * cluster..4 * cluster + compressed_length].copy_from_slice(&compressed[..compressed_length]);
        let sectors = compressed_length.div_ceil(512) as u64 - 1;
        let entry = L2_COMPRESSED | (4 * cluster) as u64 | sectors << 61;
        image[l2 + 8..l2 + 16].copy_from_slice(&entry.to_be_bytes());
        image[l2 + 16..l2 + 24].copy_from_slice(&L2_ZERO.to_be_bytes());
        image
    }

    fn read_all(image: &Vec<u8>) -> Result<Vec<u8>, Qcow2Error> {
        let opened = Qcow2Image::open(image, 1 << 40)?;
        let cluster_size = opened.header().cluster_size() as usize;
        let mut disk = vec![0u8; opened.header().virtual_size as usize];
        let (mut compressed, mut cluster) = (Vec::new(), vec![0u8; cluster_size]);
        opened.for_each_cluster(|guest, mapping| {
            let at = guest as usize;
            let length = cluster_size.min(disk.len() - at);
            match mapping {
                Cluster::Data { host_offset } => image.read_exact_at(&mut disk[at..at + length], host_offset)?,
                Cluster::Compressed { host_offset, length: stored } => {
                    opened.decompress(guest, host_offset, stored, &mut compressed, &mut cluster)?;
                    disk[at..at + length].copy_from_slice(&cluster[..length]);
                }
                Cluster::Subclusters { .. } | Cluster::Zero | Cluster::Unallocated => {}
            }
            Ok::<(), Qcow2Error>(())
        })?;
        Ok(disk)
    }

    #[test]
    fn reads_a_hand_built_image() {
        let disk = read_all(&small_image()).unwrap();
        assert!(disk[..512].iter().all(|byte| *byte == 0xab));
        assert!(disk[512..1024].iter().all(|byte| *byte == 0x5a));
        assert!(disk[1024..].iter().all(|byte| *byte == 0));
    }

    #[test]
    fn bad_compressed_clusters_are_refused_with_what_was_wrong() {
        let cluster = 512;
        let decompression_error = |image: &Vec<u8>| match read_all(image) {
            Err(Qcow2Error::Decompression { guest_offset, reason }) => (guest_offset, reason),
            other => panic!("a decompression error, not {other:?}"),
        };
        let mut garbage = small_image();
        garbage[4 * cluster..5 * cluster].fill(0xff);
        assert_eq!(decompression_error(&garbage), (512, "it is not valid deflate data".to_string()));

        // A deflate stream of more than a cluster: a bomb stops at the cluster.
        let mut oversized = small_image();
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), false);
        let mut compressed = vec![0u8; cluster];
        deflater.compress(&[0x5a; 4096], &mut compressed, flate2::FlushCompress::Finish).unwrap();
        let length = deflater.total_out() as usize;
        oversized[4 * cluster..4 * cluster + length].copy_from_slice(&compressed[..length]);
        assert_eq!(
            decompression_error(&oversized),
            (512, "it inflates to more than a cluster (512 bytes)".to_string())
        );

        // One that ends short of a cluster.
        let mut short = small_image();
        let mut deflater = flate2::Compress::new(flate2::Compression::default(), false);
        deflater.compress(&[0x5a; 100], &mut compressed, flate2::FlushCompress::Finish).unwrap();
        let length = deflater.total_out() as usize;
        short[4 * cluster..5 * cluster].fill(0);
        short[4 * cluster..4 * cluster + length].copy_from_slice(&compressed[..length]);
        assert_eq!(decompression_error(&short), (512, "inflated to 100 bytes instead of 512".to_string()));
    }

    #[test]
    fn no_single_byte_change_of_the_metadata_panics() {
        let image = small_image();
        for offset in (0..112).chain(512..528).chain(1024..1048) {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut mutated = image.clone();
                mutated[offset] = value;
                let _ = read_all(&mutated);
            }
        }
        for length in 0..image.len() {
            let _ = read_all(&image[..length].to_vec());
        }
    }
}
