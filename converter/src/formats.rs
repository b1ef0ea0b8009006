//! Virtual sizes of the formats read only for `dvcr info` so far: VMDK,
//! VHD, VHDX and VDI. Every read is bounded and checked.

use crate::detect::ImageFormat;
use crate::endian::{be64, le32, le64};
use crate::source::ReadAt;
use crate::ConverterError;

fn read(source: &dyn ReadAt, format: ImageFormat, offset: u64, length: usize) -> Result<Vec<u8>, ConverterError> {
    let end = offset.checked_add(length as u64);
    if end.is_none_or(|end| end > source.size()) {
        return Err(ConverterError::Malformed {
            format,
            reason: format!("a structure at offset {offset:#x} ({length} bytes) lies beyond the end of the file"),
        });
    }
    let mut buffer = vec![0u8; length];
    source.read_exact_at(&mut buffer, offset).map_err(ConverterError::Read)?;
    Ok(buffer)
}

/// The virtual size of a VMDK, VHD, VHDX or VDI image; `None` for a VMDK
/// descriptor file (its extents live in other files).
pub fn virtual_size(format: ImageFormat, source: &dyn ReadAt) -> Result<Option<u64>, ConverterError> {
    match format {
        ImageFormat::Vmdk => {
            let header = read(source, format, 0, 20)?;
            if &header[..4] != b"KDMV" {
                return Ok(None);
            }
            let sectors = le64(&header, 12);
            Ok(Some(sectors.checked_mul(512).ok_or_else(|| ConverterError::Malformed {
                format,
                reason: format!("capacity of {sectors} sectors overflows"),
            })?))
        }
        ImageFormat::Vhd => vhd_size(source).map(Some),
        ImageFormat::Vhdx => vhdx_size(source).map(Some),
        ImageFormat::Vdi => {
            let header = read(source, format, 0, 0x178)?;
            let version = le32(&header, 0x44);
            if version != 0x0001_0001 {
                return Err(ConverterError::Malformed {
                    format,
                    reason: format!("VDI header version {version:#x} is not 1.1"),
                });
            }
            Ok(Some(le64(&header, 0x170)))
        }
        ImageFormat::Qcow2 | ImageFormat::Raw | ImageFormat::Iso => Ok(Some(source.size())),
    }
}

/// VHD: the footer's current size, or the CHS geometry for images whose
/// creator rounds to it (as qemu reads them).
fn vhd_size(source: &dyn ReadAt) -> Result<u64, ConverterError> {
    let format = ImageFormat::Vhd;
    if source.size() < 512 {
        return Err(ConverterError::Malformed {
            format,
            reason: format!("{} bytes is shorter than a VHD footer (512 bytes)", source.size()),
        });
    }
    let head = read(source, format, 0, 512)?;
    let footer = if head.starts_with(b"conectix") {
        head
    } else {
        read(source, format, source.size().saturating_sub(512), 512)?
    };
    if !footer.starts_with(b"conectix") {
        return Err(ConverterError::Malformed {
            format,
            reason: "no `conectix` footer".into(),
        });
    }
    let current_size = be64(&footer, 48);
    let creator = &footer[28..32];
    let cylinders = u64::from(u16::from_be_bytes([footer[56], footer[57]]));
    let heads = u64::from(footer[58]);
    let sectors_per_track = u64::from(footer[59]);
    let uses_current_size = [&b"win "[..], b"qem2", b"d2v ", b"CTXS", b"tap\0"].contains(&creator)
        || (cylinders == 65535 && heads == 16 && sectors_per_track == 255);
    if uses_current_size {
        Ok(current_size)
    } else {
        Ok(cylinders * heads * sectors_per_track * 512)
    }
}

/// GUIDs as they are stored on disk (first three fields little-endian).
const VHDX_METADATA_REGION: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
const VHDX_VIRTUAL_DISK_SIZE: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
const VHDX_REGION_TABLE: u64 = 192 << 10;
const VHDX_MAX_ENTRIES: u32 = 2047;

/// VHDX: the Virtual Disk Size item of the metadata region.
fn vhdx_size(source: &dyn ReadAt) -> Result<u64, ConverterError> {
    let format = ImageFormat::Vhdx;
    let malformed = |reason: String| ConverterError::Malformed { format, reason };
    let table = read(source, format, VHDX_REGION_TABLE, 64 << 10)?;
    if &table[..4] != b"regi" {
        return Err(malformed("no region table at 192 KiB".into()));
    }
    let entries = le32(&table, 8).min(VHDX_MAX_ENTRIES) as usize;
    let metadata = (0..entries)
        .map(|index| &table[16 + index * 32..16 + (index + 1) * 32])
        .find(|entry| entry[..16] == VHDX_METADATA_REGION)
        .map(|entry| (le64(entry, 16), le32(entry, 24)))
        .ok_or_else(|| malformed("the region table has no metadata region".into()))?;
    let (metadata_offset, metadata_length) = metadata;
    let header = read(source, format, metadata_offset, (64 << 10).min(metadata_length as usize))?;
    if header.len() < 32 || &header[..8] != b"metadata" {
        return Err(malformed("the metadata region has no `metadata` signature".into()));
    }
    let count = usize::from(u16::from_le_bytes([header[10], header[11]])).min(VHDX_MAX_ENTRIES as usize);
    for index in 0..count {
        let at = 32 + index * 32;
        let Some(entry) = header.get(at..at + 32) else { break };
        if entry[..16] == VHDX_VIRTUAL_DISK_SIZE {
            let item_offset = metadata_offset + u64::from(le32(entry, 16));
            let item = read(source, format, item_offset, 8)?;
            return Ok(le64(&item, 0));
        }
    }
    Err(malformed("the metadata region has no virtual disk size item".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo fuzz run detect`: a 12-byte `conectix...` file made
    /// the footer read index past the end.
    #[test]
    fn short_vhd_is_an_error_not_a_panic() {
        let short = b"conectix\x47\x83\xed\x27".to_vec();
        assert!(matches!(virtual_size(ImageFormat::Vhd, &short), Err(ConverterError::Malformed { .. })));
        for format in [ImageFormat::Vmdk, ImageFormat::Vhd, ImageFormat::Vhdx, ImageFormat::Vdi] {
            for length in 0..600 {
                let mut data = vec![0u8; length];
                for (at, magic) in [(0usize, &b"conectix"[..]), (0, b"KDMV"), (0, b"vhdxfile")] {
                    if length >= at + magic.len() {
                        data[at..at + magic.len()].copy_from_slice(magic);
                    }
                }
                let _ = virtual_size(format, &data);
            }
        }
    }
}
