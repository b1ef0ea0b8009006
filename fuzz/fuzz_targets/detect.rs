//! Detection and the header readers of every format on arbitrary bytes.
#![no_main]

use dvcr_converter::detect::{self, ImageFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = detect::detect_compression(data);
    let footer = data.len().checked_sub(512).map(|start| &data[start..]);
    let _ = detect::detect_format(data, footer);
    let source = data.to_vec();
    for format in [ImageFormat::Vmdk, ImageFormat::Vhd, ImageFormat::Vhdx, ImageFormat::Vdi] {
        let _ = dvcr_converter::formats::virtual_size(format, &source);
    }
});
