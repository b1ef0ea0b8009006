//! VMware sparse extents (`KDMV`): monolithicSparse and streamOptimized
//! (compressed grains with markers, tables in a footer), read through the
//! grain directory and grain tables as qemu's `vmdk` driver reads them.
//!
//! Refused, each by name: descriptor-only files and multi-extent layouts
//! (the extents are other files named in the descriptor), delta disks with
//! a parent, grains above 2 MiB, compression other than deflate.

use crate::detect::ImageFormat;
use crate::endian::{le16, le32, le64};
use crate::mapped::{check_inside, check_virtual_size, read_structure, Cluster, MappedImage};
use crate::source::ReadAt;
use crate::ConverterError;

const FORMAT: ImageFormat = ImageFormat::Vmdk;
const SECTOR: u64 = 512;
const MAGIC: &[u8; 4] = b"KDMV";
/// `gd_offset` of a streamOptimized header: the real one is in the footer.
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// Largest grain read: a compressed grain is inflated whole in memory.
const MAX_GRAIN: u64 = 2 << 20;
/// Largest grain directory read into memory.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Largest descriptor embedded in a sparse extent that is read.
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// The header fields a reader needs.
#[derive(Debug, Clone)]
struct Header {
    flags: u32,
    capacity_sectors: u64,
    grain_sectors: u64,
    descriptor_offset: u64,
    descriptor_sectors: u64,
    entries_per_table: u32,
    directory_offset: u64,
    compression: u16,
}

fn malformed(reason: impl Into<String>) -> ConverterError {
    ConverterError::Malformed {
        format: FORMAT,
        reason: reason.into(),
    }
}

fn parse_header(bytes: &[u8]) -> Result<Header, ConverterError> {
    if bytes.len() < 79 || &bytes[..4] != MAGIC {
        return Err(malformed("no KDMV sparse-extent header"));
    }
    let version = le32(bytes, 4);
    if !(1..=3).contains(&version) {
        return Err(malformed(format!("sparse-extent version {version} is not 1, 2 or 3")));
    }
    Ok(Header {
        flags: le32(bytes, 8),
        capacity_sectors: le64(bytes, 12),
        grain_sectors: le64(bytes, 20),
        descriptor_offset: le64(bytes, 28),
        descriptor_sectors: le64(bytes, 36),
        entries_per_table: le32(bytes, 44),
        directory_offset: le64(bytes, 56),
        compression: le16(bytes, 77),
    })
}

/// A sparse VMDK extent opened for reading.
pub struct VmdkImage<'a> {
    source: &'a dyn ReadAt,
    header: Header,
    virtual_size: u64,
    grain_size: u64,
    /// Host sector of each grain table; 0 where none.
    directory: Vec<u32>,
}

impl<'a> VmdkImage<'a> {
    /// Reads and checks the header (the footer's, for streamOptimized), the
    /// embedded descriptor and the grain directory.
    pub fn open(source: &'a dyn ReadAt, max_virtual_size: u64) -> Result<Self, ConverterError> {
        let first = read_structure(source, FORMAT, "the header", 0, SECTOR as usize)?;
        if first.starts_with(b"# Disk DescriptorFile") {
            return Err(malformed(
                "this is a descriptor file: its data lives in other extent files, which are not read; \
                 convert it with `qemu-img convert` next to its extents, or export a monolithicSparse or streamOptimized VMDK",
            ));
        }
        if first.starts_with(b"COWD") {
            return Err(ConverterError::Unsupported {
                format: FORMAT,
                operation: "converted (VMware ESX COWD sparse extents)",
            });
        }
        let mut header = parse_header(&first)?;
        check_descriptor(source, &header)?;
        if header.directory_offset == GD_AT_END {
            header = read_footer(source)?;
        }
        if header.flags & FLAG_COMPRESSED != 0 && header.compression != COMPRESSION_DEFLATE {
            return Err(malformed(format!(
                "compression algorithm {} is unknown: only deflate (1) exists",
                header.compression
            )));
        }
        if header.grain_sectors == 0 || header.grain_sectors > MAX_GRAIN / SECTOR {
            return Err(malformed(format!(
                "grain size of {} sectors is out of range: 1 sector to 2 MiB are read",
                header.grain_sectors
            )));
        }
        if header.entries_per_table == 0 || header.entries_per_table > 1 << 20 {
            return Err(malformed(format!(
                "{} entries per grain table is out of range (1 to 1048576)",
                header.entries_per_table
            )));
        }
        let virtual_size = header
            .capacity_sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| malformed(format!("capacity of {} sectors overflows", header.capacity_sectors)))?;
        check_virtual_size(FORMAT, virtual_size, max_virtual_size)?;
        let grain_size = header.grain_sectors * SECTOR;
        let table_span = u64::from(header.entries_per_table) * grain_size;
        let tables = virtual_size.div_ceil(table_span);
        if tables * 4 > MAX_DIRECTORY_BYTES {
            return Err(malformed(format!(
                "a grain directory of {tables} entries is larger than the 64 MiB read"
            )));
        }
        let directory_offset = header
            .directory_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| malformed("grain directory offset overflows"))?;
        let bytes = read_structure(source, FORMAT, "the grain directory", directory_offset, (tables * 4) as usize)?;
        let directory = bytes.chunks_exact(4).map(|entry| le32(entry, 0)).collect();
        Ok(VmdkImage {
            source,
            header,
            virtual_size,
            grain_size,
            directory,
        })
    }

    fn compressed(&self) -> bool {
        self.header.flags & FLAG_COMPRESSED != 0
    }
}

/// streamOptimized: the footer marker, the footer header and the
/// end-of-stream marker are the last three sectors.
fn read_footer(source: &dyn ReadAt) -> Result<Header, ConverterError> {
    let size = source.size();
    if size < 4 * SECTOR {
        return Err(malformed("the grain directory is at the end, but the file is too short for a footer"));
    }
    let tail = read_structure(source, FORMAT, "the footer", size - 3 * SECTOR, 3 * SECTOR as usize)?;
    let (marker, footer, end) = (&tail[..512], &tail[512..1024], &tail[1024..]);
    if le32(marker, 12) != MARKER_FOOTER || le32(end, 12) != MARKER_END_OF_STREAM || &footer[..4] != MAGIC {
        return Err(malformed(
            "the header says the grain directory is in the footer, but the file does not end with a footer and an end-of-stream marker (is it truncated?)",
        ));
    }
    let header = parse_header(footer)?;
    if header.directory_offset == GD_AT_END {
        return Err(malformed("the footer does not say where the grain directory is"));
    }
    Ok(header)
}

/// Refuses what the embedded descriptor says needs other files.
fn check_descriptor(source: &dyn ReadAt, header: &Header) -> Result<(), ConverterError> {
    if header.descriptor_offset == 0 || header.descriptor_sectors == 0 {
        return Ok(());
    }
    let offset = header.descriptor_offset.saturating_mul(SECTOR);
    let length = header.descriptor_sectors.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
    let bytes = read_structure(source, FORMAT, "the embedded descriptor", offset, length as usize)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.split('\0').next().unwrap_or_default();
    let mut extents = 0;
    for line in text.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("parentFileNameHint") {
            let parent = value.trim_start_matches([' ', '=']).trim_matches('"');
            return Err(ConverterError::Differencing {
                format: FORMAT,
                parent: parent.to_string(),
            });
        }
        if let Some(value) = line.strip_prefix("createType") {
            let kind = value.trim_start_matches([' ', '=']).trim_matches('"');
            if !["monolithicSparse", "streamOptimized"].contains(&kind) {
                return Err(malformed(format!(
                    "createType {kind:?} keeps data in other files or devices; only monolithicSparse and streamOptimized files are read"
                )));
            }
        }
        if ["RW ", "RDONLY ", "NOACCESS "].iter().any(|access| line.starts_with(access)) {
            extents += 1;
        }
    }
    if extents > 1 {
        return Err(malformed(format!(
            "the descriptor lists {extents} extents; only single-extent files are read"
        )));
    }
    Ok(())
}

impl MappedImage for VmdkImage<'_> {
    fn source(&self) -> &dyn ReadAt {
        self.source
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        self.grain_size
    }

    fn visit_clusters(
        &self,
        visit: &mut dyn FnMut(u64, Cluster) -> Result<(), ConverterError>,
    ) -> Result<(), ConverterError> {
        let entries = u64::from(self.header.entries_per_table);
        let table_span = entries * self.grain_size;
        let file_size = self.source.size();
        let mut table = vec![0u8; (entries * 4) as usize];
        for (index, table_sector) in self.directory.iter().enumerate() {
            let first_guest = index as u64 * table_span;
            let grains_here = entries.min((self.virtual_size - first_guest).div_ceil(self.grain_size));
            if *table_sector == 0 {
                for grain in 0..grains_here {
                    visit(first_guest + grain * self.grain_size, Cluster::Unallocated)?;
                }
                continue;
            }
            let table_offset = u64::from(*table_sector) * SECTOR;
            check_inside(self.source, FORMAT, "a grain table", table_offset, table.len() as u64)?;
            self.source.read_exact_at(&mut table, table_offset).map_err(ConverterError::Read)?;
            for grain in 0..grains_here {
                let guest = first_guest + grain * self.grain_size;
                let entry = le32(&table, (grain * 4) as usize);
                let cluster = match entry {
                    0 => Cluster::Unallocated,
                    1 if self.header.flags & FLAG_ZERO_GRAIN != 0 => Cluster::Zero,
                    sector => {
                        let host_offset = u64::from(sector) * SECTOR;
                        if self.compressed() {
                            if host_offset >= file_size {
                                return Err(malformed(format!(
                                    "the compressed grain at guest offset {guest:#x} starts beyond the end of the file"
                                )));
                            }
                            Cluster::Compressed { host_offset, length: 0 }
                        } else {
                            let length = self.grain_size.min(self.virtual_size - guest);
                            check_inside(self.source, FORMAT, "a grain", host_offset, length)?;
                            Cluster::Data { host_offset }
                        }
                    }
                };
                visit(guest, cluster)?;
            }
        }
        Ok(())
    }

    fn decompress_cluster(
        &self,
        guest_offset: u64,
        host_offset: u64,
        _stored: u64,
        scratch: &mut Vec<u8>,
        output: &mut [u8],
    ) -> Result<(), ConverterError> {
        let corrupt = |reason: String| malformed(format!("the compressed grain at guest offset {guest_offset:#x} is corrupt: {reason}"));
        let available = self.source.size().saturating_sub(host_offset);
        let (data_offset, data_length) = if self.header.flags & FLAG_MARKERS != 0 {
            let mut marker = [0u8; 12];
            if available < 12 {
                return Err(corrupt("its marker is cut off by the end of the file".into()));
            }
            self.source.read_exact_at(&mut marker, host_offset).map_err(ConverterError::Read)?;
            let size = u64::from(le32(&marker, 8));
            if size == 0 || size > 2 * self.grain_size || size > available - 12 {
                return Err(corrupt(format!("its marker declares {size} compressed bytes")));
            }
            (host_offset + 12, size)
        } else {
            (host_offset, (2 * self.grain_size).min(available))
        };
        scratch.resize(data_length as usize, 0);
        self.source.read_exact_at(scratch, data_offset).map_err(ConverterError::Read)?;
        // A grain is one zlib stream of known size: inflated whole by
        // libdeflate, as qcow2 clusters are (what follows the stream, when
        // there are no markers, is not read).
        let inflated = libdeflater::Decompressor::new()
            .zlib_decompress(scratch, output)
            .map_err(|error| match error {
                libdeflater::DecompressionError::InsufficientSpace => {
                    corrupt(format!("it inflates to more than a grain ({} bytes)", output.len()))
                }
                libdeflater::DecompressionError::BadData => {
                    corrupt("it is not valid zlib data (or its checksum does not match)".into())
                }
            })?;
        let needed = self.grain_size.min(self.virtual_size - guest_offset);
        if (inflated as u64) < needed {
            return Err(corrupt(format!("it inflated to {inflated} bytes instead of {needed}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(grain_sectors: u64, capacity_sectors: u64, entries_per_table: u32) -> Vec<u8> {
        let mut image = vec![0u8; 4096];
        image[..4].copy_from_slice(MAGIC);
        image[4..8].copy_from_slice(&1u32.to_le_bytes());
        image[12..20].copy_from_slice(&capacity_sectors.to_le_bytes());
        image[20..28].copy_from_slice(&grain_sectors.to_le_bytes());
        image[44..48].copy_from_slice(&entries_per_table.to_le_bytes());
        image[56..64].copy_from_slice(&1u64.to_le_bytes());
        image
    }

    /// Found by `cargo fuzz run mapped`: a grain size near 2^64 sectors
    /// overflowed the range check itself.
    #[test]
    fn huge_numbers_are_errors_not_panics() {
        for grain in [0, 1, 128, u64::MAX / 512 + 1, u64::MAX] {
            for capacity in [0, 1, 1 << 40, u64::MAX / 512 + 1, u64::MAX] {
                for entries in [0, 1, 512, u32::MAX] {
                    let image = header(grain, capacity, entries);
                    if let Ok(opened) = VmdkImage::open(&image, u64::MAX) {
                        let _ = opened.visit_clusters(&mut |_, _| Ok(()));
                    }
                }
            }
        }
        assert!(matches!(
            VmdkImage::open(&header(u64::MAX / 512 + 1, 8, 512), u64::MAX),
            Err(ConverterError::Malformed { .. })
        ));
    }
}
