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
        ImageFormat::Vhdx => crate::vhdx::virtual_size(source).map(Some),
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
