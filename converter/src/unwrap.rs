//! Compression wrappers (gzip, xz, zstd, bzip2): streaming decoders whose
//! output is bounded, so that a compression bomb stops with an error
//! instead of filling the disk.

use std::io::{self, Read};

use crate::detect::Compression;

/// Most memory an xz decoder may use: `xz -9` needs 65 MiB; the largest
/// preset dictionary (1.5 GiB) is refused.
const XZ_MEMORY_LIMIT: u64 = 256 << 20;

/// A decoder for `compression` over `input`, yielding at most `limit` bytes;
/// one byte more is an error naming the limit.
pub fn decoder<'a>(compression: Compression, input: impl Read + 'a, limit: u64) -> io::Result<Bounded<Box<dyn Read + 'a>>> {
    let inner: Box<dyn Read + 'a> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Xz => {
            // The .xz format only (xz2's multi decoder also takes legacy
            // .lzma, whose header sets a dictionary of up to 4 GiB), and a
            // memory limit: a hostile header cannot make the decoder
            // allocate more.
            let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMORY_LIMIT, xz2::stream::CONCATENATED)
                .map_err(|error| io::Error::other(format!("cannot start an xz decoder: {error}")))?;
            Box::new(xz2::read::XzDecoder::new_stream(input, stream))
        }
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
    };
    Ok(Bounded {
        inner,
        limit,
        produced: 0,
        compression,
    })
}

/// A reader that fails once more than `limit` bytes came out of it.
pub struct Bounded<R> {
    inner: R,
    limit: u64,
    produced: u64,
    compression: Compression,
}

impl<R> Bounded<R> {
    /// Bytes produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        // Ask for one byte past the limit so that exceeding it is seen.
        let room = (self.limit - self.produced).saturating_add(1);
        let want = buffer.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buffer[..want]).map_err(|error| {
            io::Error::new(error.kind(), format!("{} stream is corrupt: {error}", self.compression))
        })?;
        self.produced += read as u64;
        if self.produced > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "{} stream unpacks to more than the limit of {} bytes (a compression bomb, or raise --max-virtual-size)",
                    self.compression, self.limit
                ),
            ));
        }
        Ok(read)
    }
}

/// Reads until `buffer` is full or the stream ends; returns the bytes read.
pub fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// The unpacked size of a single-stream xz file, from its last bytes
/// (`tail`, the end of a file of `file_size` bytes): the stream footer
/// gives the index's size, and the index lists every block's sizes. `None`
/// when the tail does not hold a whole index, the file has more than one
/// stream or padding, or anything does not add up, so that a caller falls
/// back to unpacking first.
pub fn xz_unpacked_size(tail: &[u8], file_size: u64) -> Option<u64> {
    const HEADER: u64 = 12;
    const FOOTER: usize = 12;
    if tail.len() < FOOTER || (tail.len() as u64) > file_size {
        return None;
    }
    let footer = &tail[tail.len() - FOOTER..];
    if &footer[10..12] != b"YZ" {
        return None;
    }
    let backward = u64::from(u32::from_le_bytes([footer[4], footer[5], footer[6], footer[7]]));
    let index_size = usize::try_from((backward + 1) * 4).ok()?;
    let index_end = tail.len() - FOOTER;
    let index = tail.get(index_end.checked_sub(index_size)?..index_end)?;
    if index.first() != Some(&0) {
        return None;
    }
    let mut position = 1;
    let varint = |position: &mut usize| -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..63).step_by(7) {
            let byte = *index.get(*position)?;
            *position += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    };
    let records = varint(&mut position)?;
    let (mut unpacked, mut blocks) = (0u64, 0u64);
    for _ in 0..records {
        let unpadded = varint(&mut position)?;
        unpacked = unpacked.checked_add(varint(&mut position)?)?;
        blocks = blocks.checked_add(unpadded.checked_add(3)? / 4 * 4)?;
    }
    // One stream exactly: header, blocks, index, footer fill the file.
    let stream = HEADER + blocks + index_size as u64 + FOOTER as u64;
    (stream == file_size).then_some(unpacked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo fuzz run wrappers`: a legacy .lzma header asking
    /// for a 4 GiB dictionary made the xz decoder allocate it.
    #[test]
    fn xz_decoding_has_a_memory_limit_and_no_legacy_lzma() {
        let legacy: &[u8] = b"\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x02\x00\x00\x00\x00\x00";
        let mut reader = decoder(Compression::Xz, legacy, 1 << 20).unwrap();
        assert!(io::copy(&mut reader, &mut io::sink()).is_err());
        // A genuine xz stream whose dictionary (384 MiB) is above the limit.
        let mut options = xz2::stream::LzmaOptions::new_preset(1).unwrap();
        options.dict_size(384 << 20);
        let mut filters = xz2::stream::Filters::new();
        filters.lzma2(&options);
        let stream = xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc64).unwrap();
        let mut encoder = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
        io::Write::write_all(&mut encoder, b"hello").unwrap();
        let packed = encoder.finish().unwrap();
        let mut reader = decoder(Compression::Xz, packed.as_slice(), 1 << 20).unwrap();
        let error = io::copy(&mut reader, &mut io::sink()).unwrap_err();
        assert!(error.to_string().contains("xz stream is corrupt"), "{error}");
        // Ordinary presets still decode.
        let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 9);
        io::Write::write_all(&mut encoder, b"hello").unwrap();
        let packed = encoder.finish().unwrap();
        let mut out = Vec::new();
        decoder(Compression::Xz, packed.as_slice(), 100).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
    }

    #[test]
    fn xz_sizes_come_from_the_index() {
        for (length, preset) in [(0usize, 1u32), (1, 6), (3 << 20, 1), (5 << 20, 9)] {
            let data: Vec<u8> = (0..length).map(|index| (index * 31 % 251) as u8).collect();
            let mut encoder = xz2::write::XzEncoder::new(Vec::new(), preset);
            io::Write::write_all(&mut encoder, &data).unwrap();
            let packed = encoder.finish().unwrap();
            assert_eq!(xz_unpacked_size(&packed, packed.len() as u64), Some(length as u64), "{length}");
            let tail = &packed[packed.len().saturating_sub(100)..];
            assert_eq!(xz_unpacked_size(tail, packed.len() as u64), Some(length as u64), "tail of {length}");
            // Two streams, or a cut file: unknown.
            let twice = [packed.clone(), packed.clone()].concat();
            assert_eq!(xz_unpacked_size(&twice, twice.len() as u64), None);
            assert_eq!(xz_unpacked_size(&packed[..packed.len() - 1], packed.len() as u64 - 1), None);
        }
        assert_eq!(xz_unpacked_size(b"", 0), None);
        assert_eq!(xz_unpacked_size(&[0xff; 40], 40), None);
    }

    #[test]
    fn bounded_output_stops_a_bomb() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        io::Write::write_all(&mut encoder, &vec![0u8; 10 << 20]).unwrap();
        let bomb = encoder.finish().unwrap();
        let mut fits = decoder(Compression::Gzip, bomb.as_slice(), 10 << 20).unwrap();
        assert_eq!(io::copy(&mut fits, &mut io::sink()).unwrap(), 10 << 20);
        let mut over = decoder(Compression::Gzip, bomb.as_slice(), (10 << 20) - 1).unwrap();
        let error = io::copy(&mut over, &mut io::sink()).unwrap_err();
        assert!(error.to_string().contains("compression bomb"), "{error}");
        let mut garbage = decoder(Compression::Gzip, &b"\x1f\x8bnot gzip at all"[..], 100).unwrap();
        assert!(io::copy(&mut garbage, &mut io::sink()).is_err());
    }
}
