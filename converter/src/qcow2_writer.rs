//! Writing qcow2 v3 from a raw source, in one forward pass.
//!
//! Layout, with space reserved up front for the largest image the virtual
//! size allows, so that nothing moves once data is written:
//!
//! ```text
//! cluster 0          header
//! refcount table     sized for the worst case
//! refcount blocks    sized for the worst case, written last
//! L1 table
//! L2 tables          one slot per L1 entry; a slot stays a hole if unused
//! data clusters      appended in guest order; all-zero clusters are skipped
//! ```
//!
//! Only clusters in use get a refcount, so unused reserved slots are plain
//! free space (holes in the file). Memory holds one L2 table at a time.

use crate::aligned::PageAlignedBuffer;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::source::ReadAt;
use crate::ConverterError;

const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
/// 16-bit refcounts (refcount_order 4), as qemu-img writes by default.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER_SIZE * 8 / (1 << REFCOUNT_ORDER);
const L2_ENTRIES: u64 = CLUSTER_SIZE / 8;
const COPIED: u64 = 1 << 63;

/// Where everything goes, computed from the virtual size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    virtual_size: u64,
    guest_clusters: u64,
    l1_entries: u64,
    refcount_table: u64,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
    refcount_block_count: u64,
    l1_table: u64,
    l1_clusters: u64,
    l2_tables: u64,
    data: u64,
}

impl Layout {
    fn new(virtual_size: u64) -> Layout {
        let guest_clusters = virtual_size.div_ceil(CLUSTER_SIZE);
        let l1_entries = guest_clusters.div_ceil(L2_ENTRIES);
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER_SIZE).max(1);
        // Refcount blocks and the table that lists them cover themselves
        // too: grow both until they cover the worst-case file.
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        loop {
            let worst = 1 + table_clusters + blocks + l1_clusters + l1_entries + guest_clusters;
            let needed_blocks = worst.div_ceil(REFCOUNTS_PER_BLOCK);
            let needed_table = (needed_blocks * 8).div_ceil(CLUSTER_SIZE).max(1);
            if needed_blocks <= blocks && needed_table <= table_clusters {
                break;
            }
            blocks = blocks.max(needed_blocks);
            table_clusters = table_clusters.max(needed_table);
        }
        let refcount_table = CLUSTER_SIZE;
        let refcount_blocks = refcount_table + table_clusters * CLUSTER_SIZE;
        let l1_table = refcount_blocks + blocks * CLUSTER_SIZE;
        let l2_tables = l1_table + l1_clusters * CLUSTER_SIZE;
        let data = l2_tables + l1_entries * CLUSTER_SIZE;
        Layout {
            virtual_size,
            guest_clusters,
            l1_entries,
            refcount_table,
            refcount_table_clusters: table_clusters,
            refcount_blocks,
            refcount_block_count: blocks,
            l1_table,
            l1_clusters,
            l2_tables,
            data,
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut header = vec![0u8; CLUSTER_SIZE as usize];
        let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(self.l1_entries as u32).to_be_bytes());
        put(40, &self.l1_table.to_be_bytes());
        put(48, &self.refcount_table.to_be_bytes());
        put(56, &(self.refcount_table_clusters as u32).to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &104u32.to_be_bytes());
        // Bytes 104..112 stay zero: the end of header extensions.
        header
    }
}

fn write_error(destination: &Path) -> impl Fn(io::Error) -> ConverterError + '_ {
    move |error| ConverterError::Output(destination.display().to_string(), error)
}

/// Writes the raw `source` as a qcow2 v3 image (64 KiB clusters, no
/// compression) at `destination`; all-zero clusters stay unallocated. The
/// virtual size is the source's, rounded up to 512 bytes as qemu reads
/// qcow2 sizes in sectors; the padding reads as zeros.
pub fn raw_to_qcow2(source: &dyn ReadAt, destination: &Path) -> Result<(), ConverterError> {
    let failed = write_error(destination);
    let source_size = source.size();
    let layout = Layout::new(source_size.div_ceil(512) * 512);
    if layout.l1_entries * 8 > 32 << 20 {
        return Err(ConverterError::Output(
            destination.display().to_string(),
            io::Error::new(io::ErrorKind::InvalidInput, "the image is too large for a qcow2 L1 table"),
        ));
    }
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(destination).map_err(&failed)?;
    let mut l1 = vec![0u8; (layout.l1_clusters * CLUSTER_SIZE) as usize];
    let mut l2 = vec![0u8; CLUSTER_SIZE as usize];
    let mut cluster = PageAlignedBuffer::new(CLUSTER_SIZE as usize);
    let cluster = cluster.as_mut();
    let mut next_data = layout.data;
    for table in 0..layout.l1_entries {
        l2.fill(0);
        let mut table_used = false;
        let first = table * L2_ENTRIES;
        for index in 0..L2_ENTRIES.min(layout.guest_clusters - first) {
            let guest = (first + index) * CLUSTER_SIZE;
            let length = CLUSTER_SIZE.min(source_size.saturating_sub(guest)) as usize;
            cluster[length..].fill(0);
            source.read_exact_at(&mut cluster[..length], guest).map_err(ConverterError::Read)?;
            if cluster.iter().all(|byte| *byte == 0) {
                continue;
            }
            file.write_all_at(cluster, next_data).map_err(&failed)?;
            let at = (index * 8) as usize;
            l2[at..at + 8].copy_from_slice(&(next_data | COPIED).to_be_bytes());
            next_data += CLUSTER_SIZE;
            table_used = true;
        }
        if table_used {
            let l2_offset = layout.l2_tables + table * CLUSTER_SIZE;
            file.write_all_at(&l2, l2_offset).map_err(&failed)?;
            let at = (table * 8) as usize;
            l1[at..at + 8].copy_from_slice(&(l2_offset | COPIED).to_be_bytes());
        }
    }
    file.write_all_at(&l1, layout.l1_table).map_err(&failed)?;
    write_refcounts(&file, &layout, &l1, next_data).map_err(&failed)?;
    file.write_all_at(&layout.header(), 0).map_err(&failed)?;
    file.set_len(next_data.max(layout.data)).map_err(&failed)?;
    file.sync_all().map_err(&failed)
}

/// Gives refcount 1 to every cluster in use: header, refcount table and
/// blocks, L1, the L2 tables the L1 points to, and the data clusters.
fn write_refcounts(file: &File, layout: &Layout, l1: &[u8], data_end: u64) -> io::Result<()> {
    let mut used: Vec<(u64, u64)> = vec![
        (0, 1),
        (layout.refcount_table / CLUSTER_SIZE, layout.refcount_table_clusters),
        (layout.refcount_blocks / CLUSTER_SIZE, layout.refcount_block_count),
        (layout.l1_table / CLUSTER_SIZE, layout.l1_clusters),
        (layout.data / CLUSTER_SIZE, (data_end - layout.data) / CLUSTER_SIZE),
    ];
    for entry in l1.chunks_exact(8).take(layout.l1_entries as usize) {
        let offset = u64::from_be_bytes(entry.try_into().unwrap_or([0; 8])) & !COPIED;
        if offset != 0 {
            used.push((offset / CLUSTER_SIZE, 1));
        }
    }
    let mut table = vec![0u8; (layout.refcount_table_clusters * CLUSTER_SIZE) as usize];
    let mut block = vec![0u8; CLUSTER_SIZE as usize];
    for block_index in 0..layout.refcount_block_count {
        let first = block_index * REFCOUNTS_PER_BLOCK;
        let last = first + REFCOUNTS_PER_BLOCK;
        block.fill(0);
        for &(start, count) in &used {
            for cluster in start.max(first)..(start + count).min(last) {
                let at = ((cluster - first) * 2) as usize;
                block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
            }
        }
        let offset = layout.refcount_blocks + block_index * CLUSTER_SIZE;
        file.write_all_at(&block, offset)?;
        let at = (block_index * 8) as usize;
        table[at..at + 8].copy_from_slice(&offset.to_be_bytes());
    }
    file.write_all_at(&table, layout.refcount_table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_reserves_enough_refcount_blocks() {
        for size in [0, 512, CLUSTER_SIZE, 3 << 30, 1 << 40, (1 << 44) + 12345] {
            let layout = Layout::new(size);
            let worst = layout.data / CLUSTER_SIZE + layout.guest_clusters;
            assert!(layout.refcount_block_count * REFCOUNTS_PER_BLOCK >= worst, "{size}");
            assert!(layout.refcount_table_clusters * CLUSTER_SIZE / 8 >= layout.refcount_block_count, "{size}");
            assert!(layout.l1_entries * L2_ENTRIES * CLUSTER_SIZE >= size);
        }
    }

    #[test]
    fn round_trips_through_our_reader() {
        let directory = tempfile::tempdir().unwrap();
        let mut raw = vec![0u8; (3 * CLUSTER_SIZE + 1000) as usize];
        raw[10..20].fill(7);
        raw[(2 * CLUSTER_SIZE) as usize..].fill(9);
        let path = directory.path().join("out.qcow2");
        raw_to_qcow2(&raw, &path).unwrap();
        let written = std::fs::read(&path).unwrap();
        let image = crate::qcow2::Qcow2Image::open(&written, 1 << 40).unwrap();
        let back = directory.path().join("back.raw");
        crate::convert::mapped_to_raw(&image, &back).unwrap();
        // The virtual size is rounded up to a sector; the padding is zeros.
        raw.resize(raw.len().div_ceil(512) * 512, 0);
        assert_eq!(std::fs::read(back).unwrap(), raw);
    }
}
