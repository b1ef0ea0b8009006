//! Images whose guest disk is a sequence of fixed-size clusters, each found
//! through a table: qcow2, sparse VMDK, VHD, VDI. Conversion to raw
//! ([`crate::convert::mapped_to_raw`]) walks any of them the same way.

use crate::source::ReadAt;
use crate::ConverterError;

/// Where one guest cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Never written: reads as zeros (there is no backing file).
    Unallocated,
    /// Explicitly zero.
    Zero,
    /// Stored uncompressed at a host offset.
    Data {
        /// Host offset of the cluster.
        host_offset: u64,
    },
    /// Stored compressed.
    Compressed {
        /// Host offset of the compressed bytes.
        host_offset: u64,
        /// Upper bound of the compressed length (0: the format finds it).
        length: u64,
    },
    /// qcow2 extended L2: per-subcluster allocation and zero bits.
    Subclusters {
        /// Host offset of the cluster.
        host_offset: u64,
        /// Bit i: subcluster i is stored at host_offset + i * subcluster size.
        allocated: u32,
    },
}

/// A checked, opened image of clusters.
pub trait MappedImage: Sync {
    /// The bytes the image is read from.
    fn source(&self) -> &dyn ReadAt;
    /// Size of the guest disk in bytes.
    fn virtual_size(&self) -> u64;
    /// Bytes per cluster as visited (at most 4 MiB); the last one may reach
    /// past the virtual size.
    fn cluster_size(&self) -> u64;
    /// Bytes per subcluster, for [`Cluster::Subclusters`].
    fn subcluster_size(&self) -> u64 {
        self.cluster_size()
    }
    /// Calls `visit(guest_offset, cluster)` for every guest cluster, in
    /// order. Every `Data` range it reports lies inside the source.
    fn visit_clusters(
        &self,
        visit: &mut dyn FnMut(u64, Cluster) -> Result<(), ConverterError>,
    ) -> Result<(), ConverterError>;
    /// Decompresses a [`Cluster::Compressed`] into `output` (a cluster
    /// long, of which the guest part must be filled). Formats whose walk
    /// never reports compressed clusters keep this default.
    fn decompress_cluster(
        &self,
        guest_offset: u64,
        _host_offset: u64,
        _stored: u64,
        _scratch: &mut Vec<u8>,
        _output: &mut [u8],
    ) -> Result<(), ConverterError> {
        Err(ConverterError::Read(std::io::Error::other(format!(
            "guest offset {guest_offset:#x}: this image format has no compressed clusters"
        ))))
    }
}

/// Reads `length` bytes at `offset`, or says which structure of which
/// format lies beyond the end of the file.
pub(crate) fn read_structure(
    source: &dyn ReadAt,
    format: crate::detect::ImageFormat,
    what: &str,
    offset: u64,
    length: usize,
) -> Result<Vec<u8>, ConverterError> {
    check_inside(source, format, what, offset, length as u64)?;
    let mut buffer = vec![0u8; length];
    source.read_exact_at(&mut buffer, offset).map_err(ConverterError::Read)?;
    Ok(buffer)
}

/// An error unless `length` bytes at `offset` are inside the source.
pub(crate) fn check_inside(
    source: &dyn ReadAt,
    format: crate::detect::ImageFormat,
    what: &str,
    offset: u64,
    length: u64,
) -> Result<(), ConverterError> {
    let end = offset.checked_add(length);
    if end.is_none_or(|end| end > source.size()) {
        return Err(ConverterError::Malformed {
            format,
            reason: format!(
                "{what} at offset {offset:#x} ({length} bytes) lies beyond the end of the file ({} bytes)",
                source.size()
            ),
        });
    }
    Ok(())
}

/// An error unless `size` is within the configured limit.
pub(crate) fn check_virtual_size(
    format: crate::detect::ImageFormat,
    size: u64,
    limit: u64,
) -> Result<(), ConverterError> {
    if size > limit {
        return Err(ConverterError::VirtualSizeTooLarge { format, size, limit });
    }
    Ok(())
}
