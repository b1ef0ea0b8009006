//! Microsoft VHDX (`vhdxfile`), dynamic and fixed: the current header (of
//! the two, the one with the higher sequence number), the region table,
//! the metadata (block size, logical sector size, virtual size, whether
//! there is a parent) and the block allocation table, whose payload entries
//! are interleaved with sector-bitmap entries every `chunk_ratio` blocks.
//!
//! Headers and region tables carry a CRC-32C: a header whose checksum is
//! wrong is ignored (the other one is used), a region table whose checksum
//! is wrong is replaced by its copy at 256 KiB, as the format intends.
//!
//! Refused, each by name: differencing disks (a parent), an unreplayed log
//! (the file is not consistent until it is replayed), partially present
//! blocks (differencing only), block sizes outside 1 to 256 MiB, neither
//! header or neither region table intact.

use crate::detect::ImageFormat;
use crate::endian::{le32, le64};
use crate::mapped::{check_inside, check_virtual_size, read_structure, Cluster, MappedImage};
use crate::source::ReadAt;
use crate::ConverterError;

const FORMAT: ImageFormat = ImageFormat::Vhdx;
const HEADERS: [u64; 2] = [64 << 10, 128 << 10];
const HEADER_BYTES: usize = 4 << 10;
const REGION_TABLES: [u64; 2] = [192 << 10, 256 << 10];
const REGION_TABLE_BYTES: usize = 64 << 10;
const MAX_REGIONS: usize = 2047;
const MAX_METADATA_ITEMS: usize = 2047;
/// GUIDs as stored on disk (first three fields little-endian).
const BAT_REGION: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
const METADATA_REGION: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const FILE_PARAMETERS: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
const VIRTUAL_DISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const LOGICAL_SECTOR_SIZE: [u8; 16] = [
    0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f,
];
const HAS_PARENT: u32 = 1 << 1;
const STATE_FULLY_PRESENT: u64 = 6;
const STATE_PARTIALLY_PRESENT: u64 = 7;
/// Blocks are visited in pieces of this size.
const PIECE: u64 = 1 << 20;
const MAX_TABLE_BYTES: u64 = 256 << 20;

fn malformed(reason: impl Into<String>) -> ConverterError {
    ConverterError::Malformed {
        format: FORMAT,
        reason: reason.into(),
    }
}

/// A VHDX opened for reading.
pub struct VhdxImage<'a> {
    source: &'a dyn ReadAt,
    virtual_size: u64,
    block_size: u64,
    chunk_ratio: u64,
    table: Vec<u64>,
}

impl<'a> VhdxImage<'a> {
    /// Reads and checks the headers, the region table, the metadata and the
    /// block allocation table.
    pub fn open(source: &'a dyn ReadAt, max_virtual_size: u64) -> Result<Self, ConverterError> {
        let identifier = read_structure(source, FORMAT, "the file identifier", 0, 8)?;
        if identifier != b"vhdxfile" {
            return Err(malformed("no `vhdxfile` identifier"));
        }
        check_log(source)?;
        let (bat_region, metadata_region) = regions(source)?;
        let metadata = Metadata::read(source, metadata_region)?;
        if metadata.flags & HAS_PARENT != 0 {
            return Err(ConverterError::Differencing {
                format: FORMAT,
                parent: "a parent named in its metadata".into(),
            });
        }
        let block_size = u64::from(metadata.block_size);
        if !(1 << 20..=256 << 20).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(malformed(format!("block size {block_size} is not a power of two from 1 to 256 MiB")));
        }
        let sector = u64::from(metadata.logical_sector_size);
        if sector != 512 && sector != 4096 {
            return Err(malformed(format!("logical sector size {sector} is not 512 or 4096")));
        }
        check_virtual_size(FORMAT, metadata.virtual_size, max_virtual_size)?;
        let chunk_ratio = (1u64 << 23) * sector / block_size;
        let blocks = metadata.virtual_size.div_ceil(block_size);
        let entries = if blocks == 0 { 0 } else { blocks + (blocks - 1) / chunk_ratio };
        if entries * 8 > MAX_TABLE_BYTES || entries * 8 > u64::from(bat_region.1) {
            return Err(malformed(format!(
                "a block allocation table of {entries} entries does not fit its region ({} bytes) or the 256 MiB read",
                bat_region.1
            )));
        }
        let bytes = read_structure(source, FORMAT, "the block allocation table", bat_region.0, (entries * 8) as usize)?;
        let table = bytes.chunks_exact(8).map(|entry| le64(entry, 0)).collect();
        Ok(VhdxImage {
            source,
            virtual_size: metadata.virtual_size,
            block_size,
            chunk_ratio,
            table,
        })
    }
}

/// The virtual size from the metadata region, without the other checks
/// (what `dvcr info` reads of a wrapped image).
pub(crate) fn virtual_size(source: &dyn ReadAt) -> Result<u64, ConverterError> {
    let (_, metadata_region) = regions(source)?;
    Ok(Metadata::read(source, metadata_region)?.virtual_size)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum
/// of VHDX headers, region tables and log entries.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut index = 0;
        while index < 256 {
            let mut value = index as u32;
            let mut bit = 0;
            while bit < 8 {
                value = if value & 1 != 0 { (value >> 1) ^ 0x82F6_3B78 } else { value >> 1 };
                bit += 1;
            }
            table[index] = value;
            index += 1;
        }
        table
    };
    !data
        .iter()
        .fold(!0u32, |crc, byte| TABLE[((crc ^ u32::from(*byte)) & 0xff) as usize] ^ (crc >> 8))
}

/// Whether a structure's checksum (bytes 4..8, computed with those bytes
/// zeroed) is right.
fn checksum_matches(structure: &[u8]) -> bool {
    // A fuzzer cannot forge checksums; let it reach the parsing behind them.
    if cfg!(fuzzing) {
        return true;
    }
    let mut copy = structure.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == le32(structure, 4)
}

/// Refuses a file whose current header names a log to replay.
fn check_log(source: &dyn ReadAt) -> Result<(), ConverterError> {
    let mut current: Option<(u64, Vec<u8>)> = None;
    for offset in HEADERS {
        let header = read_structure(source, FORMAT, "a header", offset, HEADER_BYTES)?;
        if &header[..4] != b"head" || !checksum_matches(&header) {
            continue;
        }
        let sequence = le64(&header, 8);
        if current.as_ref().is_none_or(|(best, _)| sequence > *best) {
            current = Some((sequence, header));
        }
    }
    let (_, header) = current.ok_or_else(|| malformed("neither header is intact (a `head` signature and a matching CRC-32C)"))?;
    if header[48..64].iter().any(|byte| *byte != 0) {
        return Err(malformed(
            "the file has a log that was not replayed (it was not closed cleanly): open it once with Hyper-V or `qemu-img check -r all` first",
        ));
    }
    Ok(())
}

/// Where a region lies: file offset and length.
type Region = (u64, u32);

/// The BAT and metadata regions.
fn regions(source: &dyn ReadAt) -> Result<(Region, Region), ConverterError> {
    let mut intact = None;
    for offset in REGION_TABLES {
        let table = read_structure(source, FORMAT, "the region table", offset, REGION_TABLE_BYTES)?;
        if &table[..4] == b"regi" && checksum_matches(&table) {
            intact = Some(table);
            break;
        }
    }
    let table = intact.ok_or_else(|| malformed("neither region table (192 KiB, 256 KiB) is intact (a `regi` signature and a matching CRC-32C)"))?;
    let count = (le32(&table, 8) as usize).min(MAX_REGIONS);
    let find = |guid: &[u8; 16]| {
        (0..count)
            .map(|index| &table[16 + index * 32..16 + (index + 1) * 32])
            .find(|entry| &entry[..16] == guid)
            .map(|entry| (le64(entry, 16), le32(entry, 24)))
    };
    let bat = find(&BAT_REGION).ok_or_else(|| malformed("the region table has no block allocation table"))?;
    let metadata = find(&METADATA_REGION).ok_or_else(|| malformed("the region table has no metadata region"))?;
    Ok((bat, metadata))
}

struct Metadata {
    block_size: u32,
    flags: u32,
    virtual_size: u64,
    logical_sector_size: u32,
}

impl Metadata {
    fn read(source: &dyn ReadAt, (offset, length): Region) -> Result<Self, ConverterError> {
        let header = read_structure(source, FORMAT, "the metadata table", offset, (64usize << 10).min(length as usize))?;
        if header.len() < 32 || &header[..8] != b"metadata" {
            return Err(malformed("the metadata region has no `metadata` signature"));
        }
        let count = usize::from(u16::from_le_bytes([header[10], header[11]])).min(MAX_METADATA_ITEMS);
        let item = |guid: &[u8; 16], size: usize| -> Result<Vec<u8>, ConverterError> {
            for index in 0..count {
                let at = 32 + index * 32;
                let Some(entry) = header.get(at..at + 32) else { break };
                if &entry[..16] == guid {
                    let item_offset = offset + u64::from(le32(entry, 16));
                    return read_structure(source, FORMAT, "a metadata item", item_offset, size);
                }
            }
            Err(malformed("a required metadata item is missing"))
        };
        let parameters = item(&FILE_PARAMETERS, 8)?;
        Ok(Metadata {
            block_size: le32(&parameters, 0),
            flags: le32(&parameters, 4),
            virtual_size: le64(&item(&VIRTUAL_DISK_SIZE, 8)?, 0),
            logical_sector_size: le32(&item(&LOGICAL_SECTOR_SIZE, 4)?, 0),
        })
    }
}

impl MappedImage for VhdxImage<'_> {
    fn source(&self) -> &dyn ReadAt {
        self.source
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        PIECE
    }

    fn visit_clusters(
        &self,
        visit: &mut dyn FnMut(u64, Cluster) -> Result<(), ConverterError>,
    ) -> Result<(), ConverterError> {
        let mut guest = 0;
        while guest < self.virtual_size {
            let length = PIECE.min(self.virtual_size - guest);
            let block = guest / self.block_size;
            let entry = self.table[(block + block / self.chunk_ratio) as usize];
            let cluster = match entry & 7 {
                STATE_FULLY_PRESENT => {
                    let host_offset = (entry >> 20) * (1 << 20) + guest % self.block_size;
                    check_inside(self.source, FORMAT, "a payload block", host_offset, length)?;
                    Cluster::Data { host_offset }
                }
                STATE_PARTIALLY_PRESENT => {
                    return Err(malformed(format!(
                        "the block at guest offset {guest:#x} is partially present, which only a differencing disk may be"
                    )))
                }
                _ => Cluster::Unallocated,
            };
            visit(guest, cluster)?;
            guest += length;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        let mut header = vec![0u8; HEADER_BYTES];
        header[..4].copy_from_slice(b"head");
        let sum = crc32c(&header);
        header[4..8].copy_from_slice(&sum.to_le_bytes());
        assert!(checksum_matches(&header));
        header[100] ^= 1;
        assert!(!checksum_matches(&header));
    }
}
