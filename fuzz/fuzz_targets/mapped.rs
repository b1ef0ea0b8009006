//! The VMDK, VHD, VHDX and VDI readers on arbitrary bytes: header checks, table
//! walk, and reading or inflating every cluster, as a conversion does.
#![no_main]

use dvcr_converter::convert::open_mapped;
use dvcr_converter::detect::ImageFormat;
use dvcr_converter::mapped::Cluster;
use dvcr_converter::source::ReadAt;
use dvcr_converter::ConverterError;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = data.to_vec();
    for format in [ImageFormat::Vmdk, ImageFormat::Vhd, ImageFormat::Vhdx, ImageFormat::Vdi] {
        let Ok(Some(image)) = open_mapped(format, &source, 1 << 30) else { continue };
        let cluster_size = image.cluster_size() as usize;
        let (mut scratch, mut cluster) = (Vec::new(), vec![0u8; cluster_size]);
        let mut visited = 0u32;
        let _ = image.visit_clusters(&mut |guest, mapping| {
            visited += 1;
            if visited > 100_000 {
                return Err(ConverterError::Read(std::io::Error::other("enough")));
            }
            match mapping {
                Cluster::Data { host_offset } => {
                    let length = (cluster_size as u64).min(image.virtual_size() - guest) as usize;
                    source.read_exact_at(&mut cluster[..length], host_offset).map_err(ConverterError::Read)
                }
                Cluster::Compressed { host_offset, length } => {
                    image.decompress_cluster(guest, host_offset, length, &mut scratch, &mut cluster)
                }
                Cluster::Subclusters { .. } | Cluster::Zero | Cluster::Unallocated => Ok(()),
            }
        });
    }
});
