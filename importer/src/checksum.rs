//! Checksums over the bytes of a source as they arrive (`--checksum
//! ALG:HEX`, repeatable): md5, sha1, sha256, sha512.

use std::io::{self, Read};
use std::str::FromStr;

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest as _, Sha256, Sha512};

use crate::progress::Progress;
use crate::ImportError;

/// A checksum algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// MD5.
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "md5",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_length(self) -> usize {
        match self {
            Algorithm::Md5 => 32,
            Algorithm::Sha1 => 40,
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// An expected checksum: `ALG:HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedChecksum {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Lowercase hex.
    pub hex: String,
}

impl FromStr for ExpectedChecksum {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (name, hex) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not ALG:HEX (for example sha256:9f86d0...)"))?;
        let algorithm = match name.to_ascii_lowercase().as_str() {
            "md5" => Algorithm::Md5,
            "sha1" => Algorithm::Sha1,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(format!("checksum algorithm {other:?} is not one of md5, sha1, sha256, sha512")),
        };
        let hex = hex.to_ascii_lowercase();
        if hex.len() != algorithm.hex_length() || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(format!("a {} checksum is {} hex digits, not {hex:?}", algorithm.name(), algorithm.hex_length()));
        }
        Ok(ExpectedChecksum { algorithm, hex })
    }
}

enum Hasher {
    Md5(Md5),
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Md5 => Hasher::Md5(Md5::new()),
            Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(hasher) => hasher.update(data),
            Hasher::Sha1(hasher) => hasher.update(data),
            Hasher::Sha256(hasher) => hasher.update(data),
            Hasher::Sha512(hasher) => hasher.update(data),
        }
    }

    fn hex(&self) -> String {
        match self {
            Hasher::Md5(hasher) => hex::encode(hasher.clone().finalize()),
            Hasher::Sha1(hasher) => hex::encode(hasher.clone().finalize()),
            Hasher::Sha256(hasher) => hex::encode(hasher.clone().finalize()),
            Hasher::Sha512(hasher) => hex::encode(hasher.clone().finalize()),
        }
    }
}

/// A reader that counts bytes for progress and feeds the checksums.
pub struct Checksums<'a, R> {
    inner: R,
    hashers: Vec<(ExpectedChecksum, Hasher)>,
    progress: &'a Progress,
}

impl<'a, R: Read> Checksums<'a, R> {
    /// Wraps `inner`.
    pub fn reader(inner: R, expected: &[ExpectedChecksum], progress: &'a Progress) -> Self {
        let hashers = expected
            .iter()
            .map(|checksum| (checksum.clone(), Hasher::new(checksum.algorithm)))
            .collect();
        Checksums { inner, hashers, progress }
    }

    /// Drains what is left of the source (so that every byte is hashed) and
    /// compares every checksum.
    pub fn verify(&mut self) -> Result<(), ImportError> {
        let mut rest = [0u8; 64 << 10];
        while self.read(&mut rest).map_err(ImportError::source_read)? > 0 {}
        for (expected, hasher) in &self.hashers {
            let actual = hasher.hex();
            if actual != expected.hex {
                return Err(ImportError::BadChecksum {
                    algorithm: expected.algorithm.name(),
                    expected: expected.hex.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for Checksums<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        for (_, hasher) in &mut self.hashers {
            hasher.update(&buffer[..read]);
        }
        self.progress.add_read(read as u64);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        assert!("sha256:abc".parse::<ExpectedChecksum>().is_err());
        assert!("crc32:00000000".parse::<ExpectedChecksum>().is_err());
        let md5: ExpectedChecksum = "MD5:D41D8CD98F00B204E9800998ECF8427E".parse().unwrap();
        let progress = Progress::default();
        let mut reader = Checksums::reader(io::empty(), std::slice::from_ref(&md5), &progress);
        assert!(reader.verify().is_ok());
        let wrong: ExpectedChecksum = format!("sha1:{}", "0".repeat(40)).parse().unwrap();
        let mut reader = Checksums::reader(&b"x"[..], &[wrong], &progress);
        assert!(matches!(reader.verify(), Err(ImportError::BadChecksum { .. })));
        assert_eq!(progress.read(), 1);
    }
}
