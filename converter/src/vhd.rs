//! Microsoft VHD (`conectix`, qemu's `vpc`): fixed images (the disk then a
//! footer) and dynamic ones (a block allocation table of 32-bit sector
//! numbers; each block is a sector bitmap followed by its data). The
//! virtual size is the one qemu reads (the footer's size or its CHS
//! geometry, by creator). Differencing images are refused: their parent is
//! a path read from the image.

use crate::detect::ImageFormat;
use crate::endian::{be32, be64};
use crate::mapped::{check_inside, check_virtual_size, read_structure, Cluster, MappedImage};
use crate::source::ReadAt;
use crate::ConverterError;

const FORMAT: ImageFormat = ImageFormat::Vhd;
const SECTOR: u64 = 512;
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
const UNALLOCATED: u32 = u32::MAX;
/// Blocks larger than this are visited in pieces of this size.
const PIECE: u64 = 1 << 20;
/// Largest block allocation table read into memory.
const MAX_TABLE_BYTES: u64 = 256 << 20;

fn malformed(reason: impl Into<String>) -> ConverterError {
    ConverterError::Malformed {
        format: FORMAT,
        reason: reason.into(),
    }
}

enum Layout {
    /// The disk is the file's first `virtual_size` bytes.
    Fixed,
    /// Blocks through a table.
    Dynamic {
        block_size: u64,
        bitmap_size: u64,
        table: Vec<u32>,
    },
}

/// A VHD opened for reading.
pub struct VhdImage<'a> {
    source: &'a dyn ReadAt,
    virtual_size: u64,
    layout: Layout,
}

impl<'a> VhdImage<'a> {
    /// Reads and checks the footer, and for a dynamic image its header and
    /// block allocation table.
    pub fn open(source: &'a dyn ReadAt, max_virtual_size: u64) -> Result<Self, ConverterError> {
        let virtual_size = crate::formats::virtual_size(FORMAT, source)?.unwrap_or(0);
        check_virtual_size(FORMAT, virtual_size, max_virtual_size)?;
        let head = read_structure(source, FORMAT, "the footer copy", 0, SECTOR as usize)?;
        let footer = if head.starts_with(b"conectix") {
            head
        } else {
            read_structure(source, FORMAT, "the footer", source.size() - SECTOR, SECTOR as usize)?
        };
        let layout = match be32(&footer, 60) {
            DISK_FIXED => {
                check_inside(source, FORMAT, "the disk of a fixed image", 0, virtual_size)?;
                Layout::Fixed
            }
            DISK_DYNAMIC => open_dynamic(source, be64(&footer, 16), virtual_size)?,
            DISK_DIFFERENCING => {
                let parent = differencing_parent(source, be64(&footer, 16));
                return Err(ConverterError::Differencing { format: FORMAT, parent });
            }
            other => return Err(malformed(format!("disk type {other} is not fixed (2), dynamic (3) or differencing (4)"))),
        };
        Ok(VhdImage {
            source,
            virtual_size,
            layout,
        })
    }
}

fn open_dynamic(source: &dyn ReadAt, header_offset: u64, virtual_size: u64) -> Result<Layout, ConverterError> {
    let header = read_structure(source, FORMAT, "the dynamic disk header", header_offset, 1024)?;
    if &header[..8] != b"cxsparse" {
        return Err(malformed(format!("no dynamic disk header (`cxsparse`) at offset {header_offset:#x}")));
    }
    let table_offset = be64(&header, 16);
    let entries = u64::from(be32(&header, 28));
    let block_size = u64::from(be32(&header, 32));
    if !block_size.is_power_of_two() || block_size < SECTOR {
        return Err(malformed(format!("block size {block_size} is not a power of two of at least 512 bytes")));
    }
    if entries * block_size < virtual_size {
        return Err(malformed(format!(
            "the block allocation table's {entries} blocks of {block_size} bytes do not cover the virtual size {virtual_size}"
        )));
    }
    let needed = virtual_size.div_ceil(block_size);
    if needed * 4 > MAX_TABLE_BYTES {
        return Err(malformed(format!("a block allocation table of {needed} entries is larger than the 256 MiB read")));
    }
    let bytes = read_structure(source, FORMAT, "the block allocation table", table_offset, (needed * 4) as usize)?;
    let table = bytes.chunks_exact(4).map(|entry| be32(entry, 0)).collect();
    let bitmap_size = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
    Ok(Layout::Dynamic {
        block_size,
        bitmap_size,
        table,
    })
}

/// The parent's name from a differencing image's header, for the error.
fn differencing_parent(source: &dyn ReadAt, header_offset: u64) -> String {
    let Ok(header) = read_structure(source, FORMAT, "the dynamic disk header", header_offset, 1024) else {
        return "unreadable".into();
    };
    let units: Vec<u16> = header[64..576]
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .take_while(|unit| *unit != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

impl MappedImage for VhdImage<'_> {
    fn source(&self) -> &dyn ReadAt {
        self.source
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        match &self.layout {
            Layout::Fixed => PIECE,
            Layout::Dynamic { block_size, .. } => (*block_size).min(PIECE),
        }
    }

    fn visit_clusters(
        &self,
        visit: &mut dyn FnMut(u64, Cluster) -> Result<(), ConverterError>,
    ) -> Result<(), ConverterError> {
        let piece = self.cluster_size();
        let mut guest = 0;
        while guest < self.virtual_size {
            let length = piece.min(self.virtual_size - guest);
            let cluster = match &self.layout {
                Layout::Fixed => Cluster::Data { host_offset: guest },
                Layout::Dynamic {
                    block_size,
                    bitmap_size,
                    table,
                } => {
                    let entry = table[(guest / block_size) as usize];
                    if entry == UNALLOCATED {
                        Cluster::Unallocated
                    } else {
                        let host_offset = u64::from(entry) * SECTOR + bitmap_size + guest % block_size;
                        check_inside(self.source, FORMAT, "a data block", host_offset, length)?;
                        Cluster::Data { host_offset }
                    }
                }
            };
            visit(guest, cluster)?;
            guest += length;
        }
        Ok(())
    }
}
