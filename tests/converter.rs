//! `dvcr info` and `dvcr convert` against qemu-img, on fixtures qemu-img
//! builds at test time, and on hostile images crafted by hand.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::image::pseudo_random;
use common::{compress_file, require_tool, run, DVCR};
use serde_json::Value;

/// A raw disk with data, explicit zeros, holes and a partial last cluster.
fn make_raw(directory: &Path) -> PathBuf {
    let path = directory.join("source.raw");
    let size: u64 = (24 << 20) + 3584;
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&pseudo_random(1 << 20, 1), 0).unwrap();
    file.write_all_at(&vec![0u8; 2 << 20], 1 << 20).unwrap();
    file.write_all_at(&pseudo_random(300_000, 2), 7 << 20).unwrap();
    file.write_all_at(&pseudo_random(65_536, 3), 13 << 20).unwrap();
    file.write_all_at(&pseudo_random(3584, 4), size - 3584).unwrap();
    path
}

fn qemu_img(arguments: &[&str]) -> String {
    run(Command::new(require_tool("qemu-img")).args(arguments))
}

fn qemu_info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", &path.display().to_string()])).unwrap()
}

fn dvcr_info(path: &Path) -> Value {
    serde_json::from_str(&run(Command::new(DVCR).args(["info", "--output", "json"]).arg(path))).unwrap()
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Converts `image` with both tools and compares: format, virtual size,
/// bytes, and sparseness.
fn compare_with_qemu(image: &Path, directory: &Path) {
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    let mut qemu = qemu_info(image);
    let ours = dvcr_info(image);
    let mut qemu_format = Vec::new();
    if ours["format"] == "vpc" && qemu["format"] == "raw" {
        // qemu probes only the start of a file, so it takes a fixed VHD
        // (its footer is at the end) for raw; we read the footer.
        qemu_format = vec!["-f".to_string(), "vpc".to_string()];
        let text = qemu_img(&["info", "--output=json", "-f", "vpc", &image.display().to_string()]);
        qemu = serde_json::from_str(&text).unwrap();
    }
    assert_eq!(ours["format"], qemu["format"], "{name}: format");
    assert_eq!(ours["virtual-size"], qemu["virtual-size"], "{name}: virtual size");
    if qemu["format"] == "qcow2" {
        assert_eq!(ours["cluster-size"], qemu["cluster-size"], "{name}: cluster size");
    }
    let expected = directory.join(format!("{name}.qemu.raw"));
    let converted = directory.join(format!("{name}.dvcr.raw"));
    run(Command::new(require_tool("qemu-img"))
        .arg("convert")
        .args(&qemu_format)
        .args(["-O", "raw"])
        .arg(image)
        .arg(&expected));
    run(Command::new(DVCR).arg("convert").arg(image).arg(&converted).args(["-O", "raw"]));
    run(Command::new(require_tool("cmp")).arg(&expected).arg(&converted));
    let (ours, theirs) = (allocated_bytes(&converted), allocated_bytes(&expected));
    assert!(ours <= theirs + (64 << 10), "{name}: dvcr output allocates {ours} bytes, qemu-img's {theirs}");
}

#[test]
fn qcow2_variants_agree_with_qemu_img() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    let raw_text = raw.display().to_string();
    let variants: &[(&str, &[&str])] = &[
        ("v2.qcow2", &["-o", "compat=0.10"]),
        ("v3.qcow2", &["-o", "compat=1.1"]),
        ("c512.qcow2", &["-o", "cluster_size=512"]),
        ("c2m.qcow2", &["-o", "cluster_size=2M"]),
        ("zlib.qcow2", &["-c", "-o", "compression_type=zlib"]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"]),
        ("zlib-v2.qcow2", &["-c", "-o", "compat=0.10"]),
        ("zlib-c512.qcow2", &["-c", "-o", "compression_type=zlib,cluster_size=512"]),
        ("zlib-c2m.qcow2", &["-c", "-o", "compression_type=zlib,cluster_size=2M"]),
        ("zstd-c512.qcow2", &["-c", "-o", "compression_type=zstd,cluster_size=512"]),
        ("extl2.qcow2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ("extl2-2m.qcow2", &["-o", "extended_l2=on,cluster_size=2M"]),
        ("extl2-zstd.qcow2", &["-c", "-o", "extended_l2=on,compression_type=zstd"]),
    ];
    for (name, options) in variants {
        let image = directory.path().join(name);
        let mut arguments = vec!["convert", "-O", "qcow2"];
        arguments.extend_from_slice(options);
        let image_text = image.display().to_string();
        arguments.extend_from_slice(&[raw_text.as_str(), image_text.as_str()]);
        qemu_img(&arguments);
        compare_with_qemu(&image, directory.path());
    }

    // Preallocated metadata, explicit zero clusters and discarded ones.
    let edited = directory.path().join("edited.qcow2");
    let edited_text = edited.display().to_string();
    qemu_img(&["create", "-f", "qcow2", "-o", "preallocation=metadata", &edited_text, "16M"]);
    let qemu_io = require_tool("qemu-io");
    for command in [
        "write -P 0xab 0 1M",
        "write -z 512k 128k",
        "write -P 0x5c 4M 64k",
        "discard 4M 64k",
        "write -P 0x11 15M 1M",
        "write -z -u 15M 64k",
    ] {
        run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", command, &edited_text]));
    }
    compare_with_qemu(&edited, directory.path());

    // Subclusters written piecemeal in an extended-L2 image.
    let partial = directory.path().join("partial-extl2.qcow2");
    let partial_text = partial.display().to_string();
    qemu_img(&["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", &partial_text, "8M"]);
    for command in ["write -P 0x21 2k 2k", "write -P 0x42 62k 2k", "write -z 4k 4k", "write -P 0x63 1M 6k"] {
        run(Command::new(&qemu_io).args(["-f", "qcow2", "-c", command, &partial_text]));
    }
    compare_with_qemu(&partial, directory.path());
}

#[test]
fn raw_and_iso_agree_with_qemu_img() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    compare_with_qemu(&raw, directory.path());
    let iso = directory.path().join("disc.iso");
    let mut content = pseudo_random(1 << 20, 9);
    content[0x8000..0x8800].fill(0);
    content[0x8000] = 1;
    content[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(&iso, &content).unwrap();
    let info = dvcr_info(&iso);
    assert_eq!(info["detected-format"], "iso");
    compare_with_qemu(&iso, directory.path());
}

/// VMDK, VHD, VDI and VHDX variants qemu-img makes from the same raw disk.
const OTHER_FORMATS: &[(&str, &str, &[&str])] = &[
    ("monolithic.vmdk", "vmdk", &[]),
    ("stream.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
    ("zeroed-grain.vmdk", "vmdk", &["-o", "zeroed_grain=on"]),
    ("dynamic.vhd", "vpc", &[]),
    ("fixed.vhd", "vpc", &["-o", "subformat=fixed"]),
    ("force-size.vhd", "vpc", &["-o", "force_size=on"]),
    ("dynamic.vdi", "vdi", &[]),
    ("static.vdi", "vdi", &["-o", "static=on"]),
    ("dynamic.vhdx", "vhdx", &[]),
    ("fixed.vhdx", "vhdx", &["-o", "subformat=fixed"]),
    ("small-blocks.vhdx", "vhdx", &["-o", "block_size=1M"]),
];

fn make_other_format(raw: &Path, directory: &Path, name: &str, format: &str, options: &[&str]) -> PathBuf {
    let image = directory.join(name);
    let mut arguments = vec!["convert", "-O", format];
    arguments.extend_from_slice(options);
    let (raw_text, image_text) = (raw.display().to_string(), image.display().to_string());
    arguments.extend_from_slice(&[raw_text.as_str(), image_text.as_str()]);
    qemu_img(&arguments);
    image
}

#[test]
fn vmdk_vhd_vdi_and_vhdx_agree_with_qemu_img() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    for (name, format, options) in OTHER_FORMATS {
        let image = make_other_format(&raw, directory.path(), name, format, options);
        compare_with_qemu(&image, directory.path());
    }
    // A streamOptimized VMDK as VMware writes it: the header says the grain
    // directory is at the end, and a footer says where.
    let stream = directory.path().join("stream.vmdk");
    let mut content = std::fs::read(&stream).unwrap();
    let header: Vec<u8> = content[..512].to_vec();
    content[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut footer_marker = vec![0u8; 512];
    footer_marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    content.extend_from_slice(&footer_marker);
    content.extend_from_slice(&header);
    content.extend_from_slice(&[0u8; 512]);
    let footer = directory.path().join("footer.vmdk");
    std::fs::write(&footer, content).unwrap();
    compare_with_qemu(&footer, directory.path());

    // Written piecemeal: unallocated grains and blocks between data, and a
    // zeroed grain.
    let qemu_io = require_tool("qemu-io");
    for (name, format, options) in [
        ("edited.vmdk", "vmdk", "zeroed_grain=on"),
        ("edited.vhd", "vpc", "subformat=dynamic"),
        ("edited.vdi", "vdi", "static=off"),
        ("edited.vhdx", "vhdx", "subformat=dynamic"),
    ] {
        let image = directory.path().join(name);
        let text = image.display().to_string();
        qemu_img(&["create", "-f", format, "-o", options, &text, "40M"]);
        for command in ["write -P 0xab 0 100k", "write -P 0x5c 5M 1M", "write -z 5M 64k", "write -P 0x11 39M 1M"] {
            run(Command::new(&qemu_io).args(["-f", format, "-c", command, &text]));
        }
        compare_with_qemu(&image, directory.path());
    }
}

#[test]
fn hostile_vmdk_vhd_vdi_and_vhdx_images_are_refused_with_their_reason() {
    let directory = tempfile::tempdir().unwrap();
    let at = |name: &str| directory.path().join(name);
    let raw = make_raw(directory.path());

    // A VMDK delta naming its parent.
    let base = make_other_format(&raw, directory.path(), "base.vmdk", "vmdk", &[]);
    let delta = at("delta.vmdk");
    qemu_img(&["create", "-f", "vmdk", "-F", "vmdk", "-b", &base.display().to_string(), &delta.display().to_string()]);
    refused(&delta, "differencing image whose parent is");

    // A streamOptimized VMDK whose footer was cut off.
    let stream = make_other_format(&raw, directory.path(), "stream.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]);
    patch(&stream, &at("no-footer.vmdk"), 56, &u64::MAX.to_le_bytes());
    refused_conversion(&at("no-footer.vmdk"), "does not end with a footer");
    // A streamOptimized VMDK whose first grain (the first marker after the
    // header's overhead) holds damaged zlib data.
    let content = std::fs::read(&stream).unwrap();
    let first_marker = u64::from_le_bytes(content[64..72].try_into().unwrap()) as usize * 512;
    assert_ne!(content[first_marker + 8..first_marker + 12], [0; 4], "the first marker is a grain's");
    patch(&stream, &at("bad-grain.vmdk"), first_marker + 12, &[0xff; 16]);
    refused_conversion(&at("bad-grain.vmdk"), "is corrupt: it is not valid zlib data");
    // A grain directory far past the end.
    let monolithic = make_other_format(&raw, directory.path(), "monolithic.vmdk", "vmdk", &[]);
    patch(&monolithic, &at("gd-past-end.vmdk"), 56, &(1u64 << 40).to_le_bytes());
    refused_conversion(&at("gd-past-end.vmdk"), "the grain directory at offset");
    patch(&monolithic, &at("huge-grain.vmdk"), 20, &(1u64 << 30).to_le_bytes());
    refused_conversion(&at("huge-grain.vmdk"), "grain size of 1073741824 sectors is out of range");

    // A VHD turned into a differencing disk (type 4) in both footer copies.
    let vhd = make_other_format(&raw, directory.path(), "dynamic.vhd", "vpc", &[]);
    let mut content = std::fs::read(&vhd).unwrap();
    let end = content.len();
    content[60..64].copy_from_slice(&4u32.to_be_bytes());
    content[end - 512 + 60..end - 512 + 64].copy_from_slice(&4u32.to_be_bytes());
    std::fs::write(at("differencing.vhd"), &content).unwrap();
    refused_conversion(&at("differencing.vhd"), "differencing image");
    // A block allocation table past the end of the file.
    let header_offset = u64::from_be_bytes(content[16..24].try_into().unwrap()) as usize;
    patch(&vhd, &at("bat-past-end.vhd"), header_offset + 16, &(1u64 << 40).to_be_bytes());
    refused_conversion(&at("bat-past-end.vhd"), "the block allocation table at offset");

    // A VDI with a parent UUID, and one whose block map points past the end.
    let vdi = make_other_format(&raw, directory.path(), "dynamic.vdi", "vdi", &[]);
    patch(&vdi, &at("child.vdi"), 0x1b8, &[0x42; 16]);
    refused_conversion(&at("child.vdi"), "differencing image");
    let content = std::fs::read(&vdi).unwrap();
    let map_offset = u32::from_le_bytes(content[0x154..0x158].try_into().unwrap()) as usize;
    patch(&vdi, &at("block-past-end.vdi"), map_offset, &0x00ff_0000u32.to_le_bytes());
    refused_conversion(&at("block-past-end.vdi"), "a data block at offset");

    // A VHDX with a log to replay, and one cut short.
    let vhdx = make_other_format(&raw, directory.path(), "dynamic.vhdx", "vhdx", &[]);
    let reseal = |content: &mut Vec<u8>, at: usize, length: usize| {
        content[at + 4..at + 8].fill(0);
        let sum = dvcr_converter::vhdx::crc32c(&content[at..at + length]);
        content[at + 4..at + 8].copy_from_slice(&sum.to_le_bytes());
    };
    let mut content = std::fs::read(&vhdx).unwrap();
    for header in [64 << 10, 128 << 10] {
        content[header + 48..header + 64].fill(0x42);
        reseal(&mut content, header, 4 << 10);
    }
    std::fs::write(at("log.vhdx"), &content).unwrap();
    refused_conversion(&at("log.vhdx"), "has a log that was not replayed");
    // Checksums: one damaged header or region table is survived through
    // its twin; both damaged is refused.
    let expected = std::fs::read(&raw).unwrap();
    let original = std::fs::read(&vhdx).unwrap();
    let sequence = |at: usize| u64::from_le_bytes(original[at + 8..at + 16].try_into().unwrap());
    let current_header = if sequence(64 << 10) > sequence(128 << 10) { 64usize << 10 } else { 128 << 10 };
    for (name, damaged) in [("one-header.vhdx", vec![current_header]), ("one-region-table.vhdx", vec![192 << 10])] {
        let mut content = original.clone();
        for offset in damaged {
            content[offset + 200] ^= 0x55;
        }
        std::fs::write(at(name), &content).unwrap();
        let output = at(&format!("{name}.raw"));
        run(Command::new(DVCR).arg("convert").arg(at(name)).arg(&output));
        assert_eq!(std::fs::read(&output).unwrap(), expected, "{name} converts through the intact copy");
    }
    for (name, damaged, reason) in [
        ("both-headers.vhdx", [64usize << 10, 128 << 10], "neither header is intact"),
        ("both-region-tables.vhdx", [192 << 10, 256 << 10], "neither region table"),
    ] {
        let mut content = original.clone();
        for offset in damaged {
            content[offset + 200] ^= 0x55;
        }
        std::fs::write(at(name), &content).unwrap();
        refused_conversion(&at(name), reason);
    }
    let content = std::fs::read(&vhdx).unwrap();
    std::fs::write(at("cut.vhdx"), &content[..content.len() / 3]).unwrap();
    refused_conversion(&at("cut.vhdx"), "lies beyond the end of the file");

    // The virtual-size limit applies to every format.
    let output = Command::new(DVCR)
        .args(["convert", "--max-virtual-size", "1048576"])
        .arg(&vdi)
        .arg(at("limited.raw"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("vdi virtual size 25169408 bytes is above the limit"));
    assert!(!at("limited.raw").exists());
}

/// `dvcr convert` of a hostile file fails cleanly with `expected` in its
/// message and leaves no output.
fn refused_conversion(path: &Path, expected: &str) {
    let destination = path.with_extension("out");
    let output = Command::new(DVCR).arg("convert").arg(path).arg(&destination).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}: {stderr}", path.display());
    assert!(stderr.contains(expected), "{}: expected {expected:?} in {stderr}", path.display());
    assert!(!destination.exists(), "{}: output left behind", path.display());
}

/// Runs `dvcr info` on a hostile file: it must fail cleanly (exit 1, not a
/// panic's 101) with a message containing `expected`.
fn refused(path: &Path, expected: &str) {
    for command in ["info", "convert"] {
        let mut invocation = Command::new(DVCR);
        invocation.arg(command).arg(path);
        if command == "convert" {
            invocation.arg(path.with_extension("out"));
        }
        let output = invocation.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{command} {}: {stderr}", path.display());
        assert!(stderr.contains(expected), "{command} {}: expected {expected:?} in {stderr}", path.display());
    }
}

fn patch(source: &Path, target: &Path, offset: usize, bytes: &[u8]) {
    let mut content = std::fs::read(source).unwrap();
    content[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(target, content).unwrap();
}

#[test]
fn hostile_qcow2_images_are_refused_with_their_reason() {
    let directory = tempfile::tempdir().unwrap();
    let at = |name: &str| directory.path().join(name);
    let good = at("good.qcow2");
    qemu_img(&["create", "-f", "qcow2", &good.display().to_string(), "64M"]);
    run(Command::new(require_tool("qemu-io")).args(["-f", "qcow2", "-c", "write -P 1 0 1M", &good.display().to_string()]));

    let backed = at("backed.qcow2");
    qemu_img(&[
        "create", "-f", "qcow2", "-F", "qcow2", "-b", &good.display().to_string(), &backed.display().to_string(),
    ]);
    refused(&backed, "has a backing file");
    let header = std::fs::read(&good).unwrap();

    patch(&good, &at("encrypted.qcow2"), 32, &1u32.to_be_bytes());
    refused(&at("encrypted.qcow2"), "is encrypted");
    patch(&good, &at("unknown-feature.qcow2"), 72, &(1u64 << 40).to_be_bytes());
    refused(&at("unknown-feature.qcow2"), "unknown incompatible features");
    patch(&good, &at("corrupt.qcow2"), 72, &2u64.to_be_bytes());
    refused(&at("corrupt.qcow2"), "marked corrupt");
    patch(&good, &at("external.qcow2"), 72, &4u64.to_be_bytes());
    refused(&at("external.qcow2"), "external data file");
    patch(&good, &at("cluster-bits.qcow2"), 20, &30u32.to_be_bytes());
    refused(&at("cluster-bits.qcow2"), "cluster_bits 30 is out of range");
    patch(&good, &at("huge-l1.qcow2"), 36, &u32::MAX.to_be_bytes());
    refused(&at("huge-l1.qcow2"), "l1_size");
    patch(&good, &at("small-l1.qcow2"), 24, &(1u64 << 44).to_be_bytes());
    refused(&at("small-l1.qcow2"), "cannot map a virtual size");
    patch(&good, &at("l1-past-end.qcow2"), 40, &(1u64 << 40).to_be_bytes());
    refused(&at("l1-past-end.qcow2"), "the L1 table needs bytes up to");
    patch(&good, &at("version.qcow2"), 4, &7u32.to_be_bytes());
    refused(&at("version.qcow2"), "version 7 is not supported");
    std::fs::write(at("truncated.qcow2"), &header[..50]).unwrap();
    refused(&at("truncated.qcow2"), "truncated");

    // An L2 entry pointing past the end of the file.
    let l1_offset = u64::from_be_bytes(header[40..48].try_into().unwrap()) as usize;
    let l2_offset = (u64::from_be_bytes(header[l1_offset..l1_offset + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let far = (1u64 << 63) | (1u64 << 45);
    patch(&good, &at("data-past-end.qcow2"), l2_offset, &far.to_be_bytes());
    refused(&at("data-past-end.qcow2"), "a data cluster needs bytes up to");

    // Converting onto the source itself is refused before anything is written.
    let before = std::fs::read(&good).unwrap();
    let output = Command::new(DVCR).arg("convert").arg(&good).arg(&good).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("both the source and the destination"));
    assert_eq!(std::fs::read(&good).unwrap(), before, "the source was changed");

    // A limit on the virtual size.
    let output = Command::new(DVCR).args(["info", "--max-virtual-size", "1048576"]).arg(&good).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("above the limit"));
}

#[test]
fn wrapped_images_are_unpacked_and_agree_with_qemu_img() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    let qcow2 = directory.path().join("inner.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", &raw.display().to_string(), &qcow2.display().to_string()]);
    let expected = directory.path().join("expected.raw");
    qemu_img(&["convert", "-O", "raw", &raw.display().to_string(), &expected.display().to_string()]);
    let vmdk = make_other_format(&raw, directory.path(), "inner.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]);
    let vhd = make_other_format(&raw, directory.path(), "inner.vhd", "vpc", &["-o", "force_size=on"]);
    let vdi = make_other_format(&raw, directory.path(), "inner.vdi", "vdi", &[]);
    let vhdx = make_other_format(&raw, directory.path(), "inner.vhdx", "vhdx", &[]);
    for (inner, format) in [(&raw, "raw"), (&qcow2, "qcow2"), (&vmdk, "vmdk"), (&vhd, "vpc"), (&vdi, "vdi"), (&vhdx, "vhdx")] {
        let qemu = qemu_info(inner);
        for (wrapper, name) in [("gz", "gzip"), ("xz", "xz"), ("zst", "zstd"), ("bz2", "bzip2")] {
            let wrapped = compress_file(inner, wrapper);
            let info = dvcr_info(&wrapped);
            assert_eq!(info["wrapper"], name, "{format}.{wrapper}");
            assert_eq!(info["format"], format, "{format}.{wrapper}");
            assert_eq!(info["virtual-size"], qemu["virtual-size"], "{format}.{wrapper}");
            let converted = directory.path().join(format!("{format}-{wrapper}.raw"));
            run(Command::new(DVCR).arg("convert").arg(&wrapped).arg(&converted));
            run(Command::new(require_tool("cmp")).arg(&expected).arg(&converted));
            assert!(allocated_bytes(&converted) <= allocated_bytes(&expected) + (64 << 10), "{format}.{wrapper}: not sparse");
            assert_no_scratch_left(directory.path());
        }
    }
}

/// Fails if a conversion left its scratch file in `directory`.
fn assert_no_scratch_left(directory: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().contains("dvcr-unpacked"))
        .collect();
    assert!(leftovers.is_empty(), "scratch file left behind: {leftovers:?}");
}

/// `dvcr convert - DEST` with `file` on standard input.
fn convert_from_stdin(file: &Path, destination: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(DVCR)
        .args(["convert", "-"])
        .arg(destination)
        .args(extra)
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .unwrap()
}

#[test]
fn standard_input_is_a_source() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    let qcow2 = directory.path().join("inner.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", &raw.display().to_string(), &qcow2.display().to_string()]);
    let vmdk = make_other_format(&raw, directory.path(), "inner.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]);
    let raw_gz = compress_file(&raw, "gz");
    let qcow2_xz = compress_file(&qcow2, "xz");
    for input in [&raw, &raw_gz, &qcow2, &qcow2_xz, &vmdk] {
        let converted = directory.path().join("from-stdin.raw");
        let output = convert_from_stdin(input, &converted, &[]);
        assert!(output.status.success(), "{}: {}", input.display(), String::from_utf8_lossy(&output.stderr));
        run(Command::new(require_tool("cmp")).arg(&raw).arg(&converted));
        assert!(allocated_bytes(&converted) <= allocated_bytes(&raw) + (64 << 10), "{}: not sparse", input.display());
        std::fs::remove_file(&converted).unwrap();
    }
    // Bounded: a stream longer than the limit stops, and leaves nothing.
    for input in [&raw, &raw_gz, &qcow2] {
        let converted = directory.path().join("limited.raw");
        let output = convert_from_stdin(input, &converted, &["--max-virtual-size", "1048576"]);
        assert_eq!(output.status.code(), Some(1), "{}", input.display());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("limit of 1048576 bytes"), "{}: {stderr}", input.display());
        assert!(!converted.exists(), "{}: output left behind", input.display());
    }
    assert_no_scratch_left(directory.path());
    let output = convert_from_stdin(&raw, &directory.path().join("out.qcow2"), &["-O", "qcow2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("the source is standard input"));
}

/// A disk that a provisioner wrote is raw, whatever its guest put at its
/// start: `--source-format raw` copies it as it is (here a disk whose first
/// bytes are a whole qcow2 image, which detection would convert), and
/// `--source-length` reads only the image's length of a larger device.
#[test]
fn raw_sources_are_copied_unprobed_and_cut_to_their_length() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    let qcow2 = directory.path().join("guest-wrote-this.qcow2");
    qemu_img(&["convert", "-O", "qcow2", &raw.display().to_string(), &qcow2.display().to_string()]);
    let convert = |extra: &[&str], destination: &Path| {
        Command::new(DVCR).args(["convert"]).arg(&qcow2).arg(destination).args(extra).output().unwrap()
    };

    let probed = directory.path().join("probed.raw");
    let output = convert(&[], &probed);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    run(Command::new(require_tool("cmp")).arg(&raw).arg(&probed));

    let copied = directory.path().join("copied.raw");
    let output = convert(&["-f", "raw"], &copied);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    run(Command::new(require_tool("cmp")).arg(&qcow2).arg(&copied));

    let length = std::fs::metadata(&qcow2).unwrap().len();
    let device = directory.path().join("device.raw");
    std::fs::copy(&qcow2, &device).unwrap();
    std::fs::OpenOptions::new().write(true).open(&device).unwrap().set_len(length + (8 << 20)).unwrap();
    let cut = directory.path().join("cut.raw");
    let output = Command::new(DVCR)
        .args(["convert", "--source-format", "raw", "--source-length", &length.to_string()])
        .arg(&device)
        .arg(&cut)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    run(Command::new(require_tool("cmp")).arg(&qcow2).arg(&cut));

    let too_long = directory.path().join("too-long.raw");
    let output = convert(&["-f", "raw", "--source-length", &(length + 1).to_string()], &too_long);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("--source-length {} is longer than the source", length + 1)), "{stderr}");
    assert!(!too_long.exists());

    let output = convert_from_stdin(&raw, &directory.path().join("stdin.raw"), &["-f", "raw"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not standard input"));
    let output = convert(&["-f", "raw", "-O", "qcow2"], &directory.path().join("out.qcow2"));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("qcow2 output is written from a local raw file"));
    let output = convert(&["-f", "raw"], &qcow2);
    assert_eq!(output.status.code(), Some(1), "converting a file onto itself is refused");
}

#[test]
fn compression_bombs_stop_at_the_limit_and_leave_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let zeros = directory.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; 64 << 20]).unwrap();
    for wrapper in ["gz", "xz", "zst", "bz2"] {
        let bomb = compress_file(&zeros, wrapper);
        let destination = directory.path().join(format!("bomb-{wrapper}.raw"));
        for command in ["info", "convert"] {
            let mut invocation = Command::new(DVCR);
            invocation.args([command, "--max-virtual-size", "8388608"]).arg(&bomb);
            if command == "convert" {
                invocation.arg(&destination);
            }
            let output = invocation.output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{command} {wrapper}: {stderr}");
            assert!(stderr.contains("more than the limit of 8388608 bytes"), "{command} {wrapper}: {stderr}");
        }
        assert!(!destination.exists(), "{wrapper}: a partial output was left");
    }
    let corrupt = directory.path().join("corrupt.gz");
    std::fs::write(&corrupt, b"\x1f\x8b\x08\x00garbage that is not deflate").unwrap();
    refused(&corrupt, "gzip stream is corrupt");
}

#[test]
fn raw_to_qcow2_passes_qemu_img_check_and_converts_back_identical() {
    let directory = tempfile::tempdir().unwrap();
    let raw = make_raw(directory.path());
    let qcow2 = directory.path().join("written.qcow2");
    run(Command::new(DVCR).arg("convert").arg(&raw).arg(&qcow2).args(["-O", "qcow2"]));
    let check = Command::new(require_tool("qemu-img"))
        .args(["check", "--output=json"])
        .arg(&qcow2)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&check.stdout).unwrap_or(Value::Null);
    assert!(
        check.status.success(),
        "qemu-img check failed: {report}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // qemu-img leaves out the counters that are zero.
    assert_eq!(report["check-errors"], 0, "{report}");
    for counter in ["corruptions", "leaks", "corruptions-fixed", "leaks-fixed"] {
        assert!(report[counter].is_null() || report[counter] == 0, "{counter}: {report}");
    }
    assert!(report["allocated-clusters"].as_u64().unwrap() > 0, "{report}");
    let info = qemu_info(&qcow2);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], std::fs::metadata(&raw).unwrap().len());
    // Back to raw with qemu-img and with dvcr: both identical to the source.
    let by_qemu = directory.path().join("by-qemu.raw");
    qemu_img(&["convert", "-O", "raw", &qcow2.display().to_string(), &by_qemu.display().to_string()]);
    run(Command::new(require_tool("cmp")).arg(&raw).arg(&by_qemu));
    let by_dvcr = directory.path().join("by-dvcr.raw");
    run(Command::new(DVCR).arg("convert").arg(&qcow2).arg(&by_dvcr));
    run(Command::new(require_tool("cmp")).arg(&raw).arg(&by_dvcr));
    // Only the allocated data takes room: about 1.4 MiB of the 24 MiB disk.
    assert!(allocated_bytes(&qcow2) < 4 << 20, "qcow2 output is not sparse: {}", allocated_bytes(&qcow2));
    // A qcow2 source for qcow2 output is refused by name.
    let output = Command::new(DVCR).arg("convert").arg(&qcow2).arg(directory.path().join("x.qcow2")).args(["-O", "qcow2"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("the source is a qcow2 image"));
}

#[test]
fn raw_to_qcow2_spanning_several_l2_tables() {
    let directory = tempfile::tempdir().unwrap();
    let raw = directory.path().join("wide.raw");
    let file = std::fs::File::create(&raw).unwrap();
    file.set_len((1536 << 20) + 512).unwrap();
    use std::os::unix::fs::FileExt;
    for (index, offset) in [0u64, 600 << 20, (1536 << 20) - 80_000].into_iter().enumerate() {
        file.write_all_at(&pseudo_random(70_000, 20 + index as u64), offset).unwrap();
    }
    let qcow2 = directory.path().join("wide.qcow2");
    run(Command::new(DVCR).arg("convert").arg(&raw).arg(&qcow2).args(["-O", "qcow2"]));
    qemu_img(&["check", &qcow2.display().to_string()]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &raw.display().to_string(), &qcow2.display().to_string()]);
    assert_eq!(dvcr_info(&qcow2)["virtual-size"], (1536u64 << 20) + 512);
}
