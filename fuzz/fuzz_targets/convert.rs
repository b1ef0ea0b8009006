//! A whole conversion to raw of arbitrary bytes read as qcow2, as `dvcr
//! convert` does it: the table walk, data runs copied on the copier's
//! threads, compressed clusters decompressed in batches on every core,
//! zero and unallocated clusters left as holes, the output synced. Run
//! with TMPDIR on a tmpfs: every input writes (and removes) one file.
#![no_main]

use dvcr_converter::convert::mapped_to_raw;
use dvcr_converter::qcow2::Qcow2Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = data.to_vec();
    let Ok(image) = Qcow2Image::open(&source, 256 << 20) else { return };
    let header = image.header();
    // A huge disk of unallocated clusters is a walk, not a finding.
    if header.virtual_size / header.cluster_size() > 1 << 16 {
        return;
    }
    let output = std::env::temp_dir().join(format!("dvcr-fuzz-convert-{}.raw", std::process::id()));
    let _ = mapped_to_raw(&image, &output);
    let _ = std::fs::remove_file(&output);
});
