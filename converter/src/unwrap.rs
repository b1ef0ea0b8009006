//! Compression wrappers (gzip, xz, zstd, bzip2): streaming decoders whose
//! output is bounded, so that a compression bomb stops with an error
//! instead of filling the disk.

use std::io::{self, Read};

use crate::detect::Compression;

/// A decoder for `compression` over `input`, yielding at most `limit` bytes;
/// one byte more is an error naming the limit.
pub fn decoder<'a>(compression: Compression, input: impl Read + 'a, limit: u64) -> io::Result<Bounded<Box<dyn Read + 'a>>> {
    let inner: Box<dyn Read + 'a> = match compression {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(input)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
