//! The qcow2 reader on arbitrary bytes: header checks, table walk and
//! decompression of every cluster, as a conversion does.
#![no_main]

use dvcr_converter::qcow2::{Cluster, Qcow2Error, Qcow2Image};
use dvcr_converter::source::ReadAt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = data.to_vec();
    let Ok(image) = Qcow2Image::open(&source, 1 << 30) else { return };
    let cluster_size = image.header().cluster_size() as usize;
    let (mut compressed, mut cluster) = (Vec::new(), vec![0u8; cluster_size]);
    let mut visited = 0u32;
    let _ = image.for_each_cluster(|guest, mapping| {
        visited += 1;
        if visited > 100_000 {
            // Huge virtual sizes of unallocated clusters: enough seen.
            return Err(Qcow2Error::Io(std::io::Error::other("stop")));
        }
        match mapping {
            Cluster::Data { host_offset } => source.read_exact_at(&mut cluster, host_offset).map_err(Qcow2Error::Io),
            Cluster::Compressed { host_offset, length } => {
                image.decompress(guest, host_offset, length, &mut compressed, &mut cluster)
            }
            Cluster::Subclusters { .. } | Cluster::Zero | Cluster::Unallocated => Ok(()),
        }
    });
});
