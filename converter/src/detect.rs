//! Format detection from content, never from the file name.

use std::fmt;

use serde::Serialize;

/// Bytes of the start of a file detection needs: ISO 9660's signature sits
/// at 0x8001.
pub const DETECT_HEAD_BYTES: usize = 0x8001 + 5;

/// A disk-image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
    /// VMware virtual disk (sparse extent or descriptor).
    Vmdk,
    /// Microsoft Virtual Hard Disk (`conectix`).
    Vhd,
    /// Microsoft Hyper-V VHDX.
    Vhdx,
    /// VirtualBox disk image.
    Vdi,
    /// ISO 9660 optical disc.
    Iso,
    /// Anything else: a raw disk.
    Raw,
}

impl ImageFormat {
    /// The name `qemu-img info` uses (`vpc` for VHD, `raw` for ISO).
    pub fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vpc",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Iso | ImageFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Iso => "iso",
            ImageFormat::Raw => "raw",
        })
    }
}

/// A compression wrapper around an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (`.gz`).
    Gzip,
    /// xz (`.xz`).
    Xz,
    /// Zstandard (`.zst`).
    Zstd,
    /// bzip2 (`.bz2`).
    Bzip2,
}

impl fmt::Display for Compression {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        })
    }
}

/// The compression wrapper whose magic starts `head`, if any.
pub fn detect_compression(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Compression::Xz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        Some(Compression::Bzip2)
    } else {
        None
    }
}

const VDI_SIGNATURE: u32 = 0xbeda107f;

/// The image format of uncompressed content, from its first bytes (at least
/// [`DETECT_HEAD_BYTES`] when the file is that long) and, for fixed VHDs,
/// its last 512 bytes.
pub fn detect_format(head: &[u8], footer: Option<&[u8]>) -> ImageFormat {
    if head.starts_with(b"QFI\xfb") {
        return ImageFormat::Qcow2;
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"COWD") || head.starts_with(b"# Disk DescriptorFile") {
        return ImageFormat::Vmdk;
    }
    if head.starts_with(b"vhdxfile") {
        return ImageFormat::Vhdx;
    }
    if head.starts_with(b"conectix") {
        return ImageFormat::Vhd;
    }
    if head.len() >= 0x48 && u32::from_le_bytes([head[0x40], head[0x41], head[0x42], head[0x43]]) == VDI_SIGNATURE {
        return ImageFormat::Vdi;
    }
    if head.len() >= 0x8006 && &head[0x8001..0x8006] == b"CD001" {
        return ImageFormat::Iso;
    }
    if footer.is_some_and(|footer| footer.starts_with(b"conectix")) {
        return ImageFormat::Vhd;
    }
    ImageFormat::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers() {
        assert_eq!(detect_format(b"QFI\xfb\0\0\0\x03", None), ImageFormat::Qcow2);
        assert_eq!(detect_format(b"KDMV\x01", None), ImageFormat::Vmdk);
        assert_eq!(detect_format(b"vhdxfile", None), ImageFormat::Vhdx);
        assert_eq!(detect_format(b"conectix", None), ImageFormat::Vhd);
        let mut vdi = vec![0u8; 0x48];
        vdi[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        assert_eq!(detect_format(&vdi, None), ImageFormat::Vdi);
        let mut iso = vec![0u8; DETECT_HEAD_BYTES];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert_eq!(detect_format(&iso, None), ImageFormat::Iso);
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(detect_format(&[0u8; 1024], Some(&footer)), ImageFormat::Vhd);
        assert_eq!(detect_format(&[0u8; 1024], Some(&[0u8; 512])), ImageFormat::Raw);
        assert_eq!(detect_format(b"", None), ImageFormat::Raw);
        assert_eq!(detect_compression(&[0x1f, 0x8b, 8]), Some(Compression::Gzip));
        assert_eq!(detect_compression(b"\xfd7zXZ\0"), Some(Compression::Xz));
        assert_eq!(detect_compression(&[0x28, 0xb5, 0x2f, 0xfd]), Some(Compression::Zstd));
        assert_eq!(detect_compression(b"BZh9"), Some(Compression::Bzip2));
        assert_eq!(detect_compression(b"BZhx"), None);
        assert_eq!(detect_compression(b"QFI\xfb"), None);
    }
}
