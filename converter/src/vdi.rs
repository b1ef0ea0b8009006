//! VirtualBox VDI 1.1, static and dynamic: a block map of 32-bit block
//! numbers into the data area, read as qemu's `vdi` driver reads it
//! (1 MiB blocks, 512-byte sectors, no extra block data). Differencing
//! images (a parent or link UUID) are refused.

use crate::detect::ImageFormat;
use crate::endian::{le32, le64};
use crate::mapped::{check_inside, check_virtual_size, read_structure, Cluster, MappedImage};
use crate::source::ReadAt;
use crate::ConverterError;

const FORMAT: ImageFormat = ImageFormat::Vdi;
const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const HEADER_BYTES: usize = 0x200;
const BLOCK_SIZE: u64 = 1 << 20;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// Entries at or above this are unallocated (`0xffffffff`) or discarded
/// (`0xfffffffe`): both read as zeros.
const FIRST_FREE_MARK: u32 = 0xffff_fffe;

fn malformed(reason: impl Into<String>) -> ConverterError {
    ConverterError::Malformed {
        format: FORMAT,
        reason: reason.into(),
    }
}

/// A VDI opened for reading.
pub struct VdiImage<'a> {
    source: &'a dyn ReadAt,
    virtual_size: u64,
    data_offset: u64,
    block_map: Vec<u32>,
}

impl<'a> VdiImage<'a> {
    /// Reads and checks the header and the block map.
    pub fn open(source: &'a dyn ReadAt, max_virtual_size: u64) -> Result<Self, ConverterError> {
        let header = read_structure(source, FORMAT, "the header", 0, HEADER_BYTES)?;
        if le32(&header, 0x40) != SIGNATURE {
            return Err(malformed("no VDI signature at 0x40"));
        }
        let version = le32(&header, 0x44);
        if version != VERSION_1_1 {
            return Err(malformed(format!("header version {version:#x} is not 1.1")));
        }
        let image_type = le32(&header, 0x4c);
        if image_type != TYPE_DYNAMIC && image_type != TYPE_STATIC {
            return Err(malformed(format!("image type {image_type} is not dynamic (1) or static (2)")));
        }
        let (map_offset, data_offset) = (u64::from(le32(&header, 0x154)), u64::from(le32(&header, 0x158)));
        if map_offset % 512 != 0 || data_offset % 512 != 0 {
            return Err(malformed("the block map or the data area is not aligned to a sector"));
        }
        let sector_size = le32(&header, 0x168);
        if sector_size != 512 {
            return Err(malformed(format!("sector size {sector_size} is not 512")));
        }
        let virtual_size = le64(&header, 0x170);
        let block_size = u64::from(le32(&header, 0x178));
        let block_extra = le32(&header, 0x17c);
        let blocks = u64::from(le32(&header, 0x180));
        if block_size != BLOCK_SIZE || block_extra != 0 {
            return Err(malformed(format!(
                "blocks of {block_size} bytes with {block_extra} extra bytes: only 1 MiB blocks without extra data are read"
            )));
        }
        if header[0x1a8..0x1c8].iter().any(|byte| *byte != 0) {
            return Err(ConverterError::Differencing {
                format: FORMAT,
                parent: "a parent image named by UUID".into(),
            });
        }
        check_virtual_size(FORMAT, virtual_size, max_virtual_size)?;
        if blocks * BLOCK_SIZE < virtual_size {
            return Err(malformed(format!(
                "{blocks} blocks of 1 MiB do not cover the virtual size {virtual_size}"
            )));
        }
        let needed = virtual_size.div_ceil(BLOCK_SIZE);
        let bytes = read_structure(source, FORMAT, "the block map", map_offset, (needed * 4) as usize)?;
        let block_map = bytes.chunks_exact(4).map(|entry| le32(entry, 0)).collect();
        Ok(VdiImage {
            source,
            virtual_size,
            data_offset,
            block_map,
        })
    }
}

impl MappedImage for VdiImage<'_> {
    fn source(&self) -> &dyn ReadAt {
        self.source
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        BLOCK_SIZE
    }

    fn visit_clusters(
        &self,
        visit: &mut dyn FnMut(u64, Cluster) -> Result<(), ConverterError>,
    ) -> Result<(), ConverterError> {
        for (index, entry) in self.block_map.iter().enumerate() {
            let guest = index as u64 * BLOCK_SIZE;
            let cluster = if *entry >= FIRST_FREE_MARK {
                Cluster::Unallocated
            } else {
                let host_offset = self.data_offset + u64::from(*entry) * BLOCK_SIZE;
                let length = BLOCK_SIZE.min(self.virtual_size - guest);
                check_inside(self.source, FORMAT, "a data block", host_offset, length)?;
                Cluster::Data { host_offset }
            };
            visit(guest, cluster)?;
        }
        Ok(())
    }
}
