//! The compression wrappers on arbitrary bytes: detection, the bounded
//! decoders of every format (as if the bytes were each), and the xz index
//! reader on any tail.
#![no_main]

use dvcr_converter::detect::{detect_compression, Compression};
use dvcr_converter::unwrap::{decoder, xz_unpacked_size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = detect_compression(data);
    for compression in [Compression::Gzip, Compression::Xz, Compression::Zstd, Compression::Bzip2] {
        if let Ok(mut reader) = decoder(compression, data, 1 << 20) {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        }
    }
    let _ = xz_unpacked_size(data, data.len() as u64);
    let _ = xz_unpacked_size(data, u64::MAX);
});
