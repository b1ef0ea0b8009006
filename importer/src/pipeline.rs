//! The one pass over a source: checksums over the bytes as they arrive,
//! unpacking of a gzip/xz/zstd/bzip2 wrapper, format detection and header
//! checks by the converter, and the layer tar (`disk/` + `disk/<file>`),
//! optionally compressed, written to a sink with its digests computed on
//! the way. Synchronous: it runs on a blocking thread between channels.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use dvcr_converter::detect::{self, ImageFormat};
use dvcr_converter::source::StreamSummary;
use dvcr_converter::unwrap;
use sha2::{Digest as _, Sha256};

use crate::checksum::{Checksums, ExpectedChecksum};
use crate::progress::Progress;
use crate::ImportError;

/// Bytes of the unpacked image kept for header checks.
const HEAD_BYTES: usize = 4 << 20;
const TAIL_BYTES: usize = 512;
const COPY_BUFFER: usize = 1 << 20;

/// How the layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar (DVP's current form).
    None,
    /// gzip.
    Gzip,
    /// Zstandard.
    Zstd,
}

/// What the pipeline needs to know.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Checksums the downloaded bytes must have.
    pub checksums: Vec<ExpectedChecksum>,
    /// Largest virtual (and unpacked) size accepted.
    pub max_virtual_size: u64,
    /// Layer compression.
    pub layer_compression: LayerCompression,
    /// The name the disk gets under `disk/` (a wrapper's extension is
    /// dropped when it is unpacked).
    pub file_name: String,
    /// Where an image is spooled when its unpacked length is not known
    /// before it ends (a compressed source, or no Content-Length).
    pub scratch_dir: PathBuf,
    /// Store a raw disk, converting other formats (`--format raw`).
    pub convert_to_raw: bool,
    /// The unpacked size of an xz source, when its index could be read
    /// before the download (a `Range` request for its tail): it then
    /// streams instead of being unpacked to scratch first.
    pub xz_unpacked_size: Option<u64>,
    /// Compute the layer blob's digest here even when the registry reports
    /// the digest of what it received (DVCR's `Dvcr-Upload-Digest`), and
    /// check the two agree. Without that report it is computed here
    /// anyway. Off, one SHA-256 pass is saved: the registry hashes every
    /// byte it receives in any case.
    pub hash_layer: bool,
    /// The source's format as the caller knows it (`Raw` or `Iso`): stored
    /// as it is, never unwrapped or probed (`--source-format`). A raw disk
    /// may start with anything its guest wrote, even an image header.
    pub forced_format: Option<ImageFormat>,
}

/// Facts about the stored image.
#[derive(Debug, Clone)]
pub struct ImageFacts {
    /// Bytes stored (the unpacked image).
    pub stored_size: u64,
    /// Guest disk size.
    pub virtual_size: u64,
    /// Detected format.
    pub format: ImageFormat,
    /// `disk/<file_name>`.
    pub file_name: String,
    /// The wrapper that was unpacked.
    pub unpacked_from: Option<detect::Compression>,
}

/// The layer as written.
#[derive(Debug, Clone)]
pub struct LayerFacts {
    /// `sha256:` of the blob; empty until [`LayerFacts::settle`] when the
    /// pipeline did not hash it.
    pub digest: String,
    /// `sha256:` of the uncompressed tar; empty until settled when it is
    /// the blob's own digest.
    pub diff_id: String,
    /// Blob size.
    pub size: u64,
}

impl LayerFacts {
    /// Completes the digests with the one the registry reported for what
    /// it received, and checks the two agree when both exist.
    pub fn settle(&mut self, reported: Option<&str>) -> Result<(), String> {
        match (self.digest.is_empty(), reported) {
            (true, Some(reported)) => self.digest = reported.to_string(),
            (true, None) => {
                return Err("the registry did not report the digest of the layer it received (it may have moved to another \
                            replica mid-upload); import again"
                    .into())
            }
            (false, Some(reported)) if reported != self.digest => {
                return Err(format!(
                    "the registry received different bytes than were sent: it reports {reported}, the layer is {}",
                    self.digest
                ))
            }
            (false, _) => {}
        }
        if self.diff_id.is_empty() {
            self.diff_id = self.digest.clone();
        }
        Ok(())
    }
}

/// Runs the pipeline over `source` (of `source_length` bytes when known),
/// writing the layer blob to `sink`.
pub fn build_layer(
    source: impl Read,
    source_length: Option<u64>,
    options: &PipelineOptions,
    progress: &Progress,
    sink: impl Write,
) -> Result<(ImageFacts, LayerFacts), ImportError> {
    let mut counted = Checksums::reader(source, &options.checksums, progress);
    if options.forced_format.is_some() {
        // Stored as it is: nothing read ahead, no wrapper looked for.
        let length = source_length.ok_or_else(|| {
            ImportError::Usage("--source-format needs a source of known length: a file, a device or a URL".into())
        })?;
        if length == 0 {
            return Err(ImportError::EmptySource);
        }
        if length > options.max_virtual_size {
            return Err(ImportError::TooLarge(options.max_virtual_size));
        }
        let stored = stream_known_length(Vec::new(), &mut counted, length, options.file_name.clone(), options, sink)?;
        counted.verify()?;
        return Ok(stored);
    }
    let mut head = vec![0u8; HEAD_BYTES];
    let length = unwrap::read_up_to(&mut counted, &mut head).map_err(ImportError::source_read)?;
    head.truncate(length);
    if head.is_empty() {
        return Err(ImportError::EmptySource);
    }
    let wrapper = detect::detect_compression(&head);
    let file_name = disk_file_name(&options.file_name, wrapper);

    let wants_conversion = options.convert_to_raw && {
        let inner = detect::detect_format(&head, None);
        wrapper.is_some() || !matches!(inner, ImageFormat::Raw | ImageFormat::Iso)
    };
    let known_unpacked = match wrapper {
        Some(detect::Compression::Xz) => options.xz_unpacked_size,
        _ => None,
    };
    if (wrapper.is_some() && known_unpacked.is_none()) || source_length.is_none() || wants_conversion {
        // The unpacked length goes in the tar header before the data, and is
        // known only at the end: unpack to scratch, then check and send.
        let mut spool = tempfile::tempfile_in(&options.scratch_dir).map_err(|error| ImportError::Scratch(options.scratch_dir.clone(), error))?;
        let rejoined = io::Cursor::new(head).chain(&mut counted);
        let mut unpacked: Box<dyn Read> = match wrapper {
            Some(compression) => Box::new(unwrap::decoder(compression, rejoined, options.max_virtual_size).map_err(ImportError::source_read)?),
            None => Box::new(rejoined.take(options.max_virtual_size.saturating_add(1))),
        };
        let spooled = copy_all(&mut unpacked, &mut spool).map_err(|error| match error {
            CopyError::Read(error) => ImportError::source_read(error),
            CopyError::Write(error) => ImportError::Scratch(options.scratch_dir.clone(), error),
        })?;
        drop(unpacked);
        if spooled > options.max_virtual_size {
            return Err(ImportError::TooLarge(options.max_virtual_size));
        }
        counted.verify()?;
        let facts = check_spooled(&mut spool, spooled, options, &file_name, wrapper)?;
        if options.convert_to_raw && !matches!(facts.format, ImageFormat::Raw | ImageFormat::Iso) {
            return convert_then_write(&spool, facts, options, sink);
        }
        let layer = write_layer(&mut spool, spooled, &facts.file_name, options, sink)?;
        return Ok((facts, layer));
    }

    let (facts, layer) = match (wrapper, known_unpacked) {
        (Some(compression), Some(unpacked)) => {
            let rejoined = io::Cursor::new(head).chain(&mut counted);
            let mut decoder = unwrap::decoder(compression, rejoined, options.max_virtual_size).map_err(ImportError::source_read)?;
            let mut unpacked_head = vec![0u8; HEAD_BYTES];
            let read = unwrap::read_up_to(&mut decoder, &mut unpacked_head).map_err(ImportError::source_read)?;
            unpacked_head.truncate(read);
            stream_known_length(unpacked_head, decoder, unpacked, file_name, options, sink)?
        }
        _ => stream_known_length(head, &mut counted, source_length.unwrap_or_default(), file_name, options, sink)?,
    };
    counted.verify()?;
    Ok((
        ImageFacts {
            unpacked_from: wrapper,
            ..facts
        },
        layer,
    ))
}

/// Streams an image of known `length` (its first bytes in `head`, the
/// rest from `rest`) into the layer, checking its header before anything
/// is sent and describing it from its head and tail once it has passed.
fn stream_known_length(
    head: Vec<u8>,
    rest: impl Read,
    length: u64,
    file_name: String,
    options: &PipelineOptions,
    sink: impl Write,
) -> Result<(ImageFacts, LayerFacts), ImportError> {
    // Refuse a bad header before sending anything; the tail is not known yet.
    describe(&head, None, length.max(head.len() as u64), options)?;
    let kept_head = head.clone();
    let mut tail = Tail::default();
    let mut data = ExactLength {
        inner: io::Cursor::new(head).chain(rest),
        remaining: length,
        tail: &mut tail,
    };
    let layer = write_layer(&mut data, length, &file_name, options, sink)?;
    let (format, virtual_size) = describe(&kept_head, Some(&tail.bytes), length, options)?;
    Ok((
        ImageFacts {
            stored_size: length,
            virtual_size,
            format,
            file_name,
            unpacked_from: None,
        },
        layer,
    ))
}

/// `--format raw`: converts the checked spooled image to a raw scratch file
/// with the converter, and stores that.
fn convert_then_write(spool: &File, facts: ImageFacts, options: &PipelineOptions, sink: impl Write) -> Result<(ImageFacts, LayerFacts), ImportError> {
    let scratch = |error| ImportError::Scratch(options.scratch_dir.clone(), error);
    let source = dvcr_converter::source::FileSource::new(spool.try_clone().map_err(scratch)?).map_err(scratch)?;
    let raw = tempfile::NamedTempFile::new_in(&options.scratch_dir).map_err(scratch)?;
    dvcr_converter::convert::convert_read_at(&source, raw.path(), options.max_virtual_size)?;
    let mut converted = File::open(raw.path()).map_err(scratch)?;
    let length = converted.metadata().map_err(scratch)?.len();
    let stem = facts
        .file_name
        .rsplit_once('.')
        .filter(|(_, extension)| ["qcow2", "vmdk", "vhd", "vdi", "img", "raw"].contains(extension))
        .map_or(facts.file_name.as_str(), |(stem, _)| stem);
    let file_name = format!("{stem}.img");
    let layer = write_layer(&mut converted, length, &file_name, options, sink)?;
    Ok((
        ImageFacts {
            stored_size: length,
            virtual_size: length,
            format: ImageFormat::Raw,
            file_name,
            unpacked_from: facts.unpacked_from,
        },
        layer,
    ))
}

/// Format and virtual size from the head and tail of the unpacked image;
/// without a tail, only the head's headers are checked. A format the
/// caller gave (`forced_format`) is taken as it is, the image's length as
/// its virtual size.
fn describe(head: &[u8], tail: Option<&[u8]>, size: u64, options: &PipelineOptions) -> Result<(ImageFormat, u64), ImportError> {
    if let Some(format) = options.forced_format {
        return Ok((format, size));
    }
    let tail = match tail {
        Some(tail) => tail.to_vec(),
        None if size <= head.len() as u64 => head[head.len().saturating_sub(TAIL_BYTES)..].to_vec(),
        None => vec![0u8; TAIL_BYTES.min(size as usize)],
    };
    let summary = StreamSummary {
        head: head.to_vec(),
        tail,
        size,
    };
    Ok(dvcr_converter::info::describe_stream(&summary, options.max_virtual_size)?)
}

/// Full checks of a spooled image (tables walked, as a conversion would),
/// then its facts.
fn check_spooled(
    spool: &mut File,
    length: u64,
    options: &PipelineOptions,
    file_name: &str,
    wrapper: Option<detect::Compression>,
) -> Result<ImageFacts, ImportError> {
    let source = dvcr_converter::source::FileSource::new(spool.try_clone().map_err(ImportError::source_read)?)
        .map_err(ImportError::source_read)?;
    let (_, format) = dvcr_converter::info::detect_source(&source)?;
    let virtual_size = match dvcr_converter::convert::open_mapped(format, &source, options.max_virtual_size)? {
        Some(image) => {
            image.visit_clusters(&mut |_, _| Ok(()))?;
            image.virtual_size()
        }
        None => length,
    };
    use std::io::Seek;
    spool.seek(io::SeekFrom::Start(0)).map_err(ImportError::source_read)?;
    Ok(ImageFacts {
        stored_size: length,
        virtual_size,
        format,
        file_name: file_name.to_string(),
        unpacked_from: wrapper,
    })
}

/// The name under `disk/`: the source's base name made safe, without the
/// extension of a wrapper that was unpacked.
pub fn disk_file_name(name: &str, wrapper: Option<detect::Compression>) -> String {
    let mut name: String = name
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' })
        .collect();
    if wrapper.is_some() {
        for extension in [".gz", ".xz", ".zst", ".bz2", ".gzip", ".zstd"] {
            if let Some(stripped) = name.strip_suffix(extension) {
                name = stripped.to_string();
                break;
            }
        }
    }
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        "disk.img".to_string()
    } else {
        name.chars().take(200).collect()
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `reader` to its end in writes of `COPY_BUFFER` bytes (the last
/// one shorter): sources hand over a few KiB per read, and each write costs
/// the layer's hashers, encoder and channel a call.
fn copy_all(mut reader: &mut dyn Read, writer: &mut dyn Write) -> Result<u64, CopyError> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let filled = unwrap::read_up_to(&mut reader, &mut buffer).map_err(CopyError::Read)?;
        if filled == 0 {
            return Ok(total);
        }
        writer.write_all(&buffer[..filled]).map_err(CopyError::Write)?;
        total += filled as u64;
        if filled < buffer.len() {
            return Ok(total);
        }
    }
}

/// The last bytes that went through.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn keep(&mut self, data: &[u8]) {
        if data.len() >= TAIL_BYTES {
            self.bytes.clear();
            self.bytes.extend_from_slice(&data[data.len() - TAIL_BYTES..]);
        } else {
            self.bytes.extend_from_slice(data);
            let excess = self.bytes.len().saturating_sub(TAIL_BYTES);
            self.bytes.drain(..excess);
        }
    }
}

/// Yields exactly `remaining` bytes of `inner`: ending early is a
/// truncated source, and bytes beyond are an error too.
struct ExactLength<'a, R> {
    inner: R,
    remaining: u64,
    tail: &'a mut Tail,
}

impl<R: Read> Read for ExactLength<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(io::ErrorKind::InvalidData, "the source sent more bytes than it announced")),
            };
        }
        let want = buffer.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buffer[..want])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the source ended {} bytes before its announced length", self.remaining),
            ));
        }
        self.remaining -= read as u64;
        self.tail.keep(&buffer[..read]);
        Ok(read)
    }
}

/// A writer that counts what passes through and, when asked, hashes it.
struct Hashing<W> {
    inner: W,
    hasher: Option<Sha256>,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(data)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&data[..written]);
        }
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Hashing<W> {
    fn new(inner: W, hash: bool) -> Self {
        Hashing {
            inner,
            hasher: hash.then(Sha256::new),
            written: 0,
        }
    }

    fn digest(&self) -> Option<String> {
        self.hasher
            .as_ref()
            .map(|hasher| format!("sha256:{}", hex::encode(hasher.clone().finalize())))
    }
}

enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(inner) => inner.write(data),
            Encoder::Gzip(inner) => inner.write(data),
            Encoder::Zstd(inner) => inner.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(inner) => inner.flush(),
            Encoder::Gzip(inner) => inner.flush(),
            Encoder::Zstd(inner) => inner.flush(),
        }
    }
}

impl<W: Write> Encoder<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(inner) => Ok(inner),
            Encoder::Gzip(inner) => inner.finish(),
            Encoder::Zstd(inner) => inner.finish(),
        }
    }
}

/// Tar's block size: headers are one block, data is padded to whole blocks.
const TAR_BLOCK: u64 = 512;

/// The tar headers that open the layer: the `disk/` folder, then the
/// header of `disk/<name>` for `length` bytes (after a GNU long-name entry
/// when the name needs one), as `tar::Builder` writes them.
fn layer_headers(name: &str, length: u64) -> Result<Vec<u8>, ImportError> {
    let mut builder = tar::Builder::new(Vec::with_capacity(4 * TAR_BLOCK as usize));
    let mut directory = tar::Header::new_gnu();
    directory.set_entry_type(tar::EntryType::Directory);
    directory.set_mode(0o755);
    directory.set_size(0);
    directory.set_mtime(0);
    builder.append_data(&mut directory, "disk/", io::empty()).map_err(ImportError::Layer)?;
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(length);
    file.set_mtime(0);
    // No data here: the header carries the size, the caller streams the data.
    builder
        .append_data(&mut file, format!("disk/{name}"), io::empty())
        .map_err(ImportError::Layer)?;
    // Taken before the builder's end-of-archive blocks, which the caller writes.
    Ok(std::mem::take(builder.get_mut()))
}

/// Writes the layer tar of `length` bytes of `data` named `disk/<name>`.
fn write_layer(
    data: &mut dyn Read,
    length: u64,
    name: &str,
    options: &PipelineOptions,
    sink: impl Write,
) -> Result<LayerFacts, ImportError> {
    let compression = options.layer_compression;
    // An uncompressed layer's digest is its diff_id: hash it once, or not
    // at all when the registry reports it.
    let blob = Hashing::new(sink, options.hash_layer);
    let encoder = match compression {
        LayerCompression::None => Encoder::Plain(blob),
        LayerCompression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(blob, flate2::Compression::fast())),
        LayerCompression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(blob, 1).map_err(ImportError::Layer)?),
    };
    let mut tar_hashed = Hashing::new(encoder, compression != LayerCompression::None);
    // The data goes straight from the source to the layer's writers; tar's
    // own copy would add a pass through an 8 KiB buffer and a `BufWriter`
    // (two copies of every byte, a few hundred thousand calls per GiB).
    tar_hashed.write_all(&layer_headers(name, length)?).map_err(ImportError::Layer)?;
    let copied = copy_all(data, &mut tar_hashed).map_err(|error| match error {
        CopyError::Read(error) => ImportError::source_read(error),
        CopyError::Write(error) => ImportError::Layer(error),
    })?;
    if copied != length {
        return Err(ImportError::source_read(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the image had {copied} bytes where {length} were expected"),
        )));
    }
    // The file's last block is padded, and two zero blocks end the archive.
    let padding = (TAR_BLOCK - length % TAR_BLOCK) % TAR_BLOCK;
    let trailer = [0u8; TAR_BLOCK as usize * 3];
    tar_hashed
        .write_all(&trailer[..padding as usize + 2 * TAR_BLOCK as usize])
        .map_err(ImportError::Layer)?;
    let tar_digest = tar_hashed.digest();
    let mut blob = tar_hashed.inner.finish().map_err(ImportError::Layer)?;
    blob.flush().map_err(ImportError::Layer)?;
    let digest = blob.digest().unwrap_or_default();
    let diff_id = tar_digest.unwrap_or_else(|| digest.clone());
    // Unhashed here and uncompressed: both stay empty until settled.
    Ok(LayerFacts {
        digest,
        diff_id,
        size: blob.written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_digest_is_settled_by_the_registry_report_and_checked_against_our_own() {
        let layer = |digest: &str, diff_id: &str| LayerFacts {
            digest: digest.into(),
            diff_id: diff_id.into(),
            size: 3,
        };
        let mut unhashed = layer("", "");
        unhashed.settle(Some("sha256:aa")).unwrap();
        assert_eq!((unhashed.digest.as_str(), unhashed.diff_id.as_str()), ("sha256:aa", "sha256:aa"));
        assert!(layer("", "").settle(None).unwrap_err().contains("did not report"));
        let mut compressed = layer("", "sha256:tar");
        compressed.settle(Some("sha256:gz")).unwrap();
        assert_eq!((compressed.digest.as_str(), compressed.diff_id.as_str()), ("sha256:gz", "sha256:tar"));
        let mut ours = layer("sha256:aa", "sha256:aa");
        assert!(ours.settle(Some("sha256:bb")).unwrap_err().contains("different bytes"));
        ours.settle(None).unwrap();
        ours.settle(Some("sha256:aa")).unwrap();
        assert_eq!(ours.digest, "sha256:aa");
    }

    fn options(compression: LayerCompression) -> PipelineOptions {
        PipelineOptions {
            checksums: Vec::new(),
            max_virtual_size: 1 << 40,
            layer_compression: compression,
            file_name: "disk.img".into(),
            scratch_dir: std::env::temp_dir(),
            convert_to_raw: false,
            xz_unpacked_size: None,
            hash_layer: true,
            forced_format: None,
        }
    }

    /// The layer as `tar::Builder` writes it, data included: what this
    /// module wrote before it streamed the data itself. A stored image's
    /// digest must not change with the way it is written.
    fn built_by_tar(name: &str, data: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut directory = tar::Header::new_gnu();
        directory.set_entry_type(tar::EntryType::Directory);
        directory.set_mode(0o755);
        directory.set_size(0);
        directory.set_mtime(0);
        builder.append_data(&mut directory, "disk/", io::empty()).unwrap();
        let mut file = tar::Header::new_gnu();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_mode(0o644);
        file.set_size(data.len() as u64);
        file.set_mtime(0);
        builder.append_data(&mut file, format!("disk/{name}"), data).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn the_layer_is_the_tar_that_tar_builder_writes_byte_for_byte() {
        let long_name = format!("{}.qcow2", "a".repeat(150));
        // Lengths around the block size and over one copy buffer.
        for length in [0, 1, 511, 512, 513, COPY_BUFFER + 700, 2 * COPY_BUFFER] {
            let data: Vec<u8> = (0..length).map(|at| (at * 7 % 251) as u8).collect();
            for name in ["disk.img", long_name.as_str()] {
                let mut written = Vec::new();
                // A reader that hands over odd-sized pieces, as sockets do.
                let mut source = io::BufReader::with_capacity(4099, &data[..]);
                let facts = write_layer(&mut source, length as u64, name, &options(LayerCompression::None), &mut written).unwrap();
                let expected = built_by_tar(name, &data);
                assert!(written == expected, "length {length}, name of {} bytes: layer differs from tar's", name.len());
                assert_eq!(facts.size, expected.len() as u64);
                assert_eq!(facts.digest, format!("sha256:{}", hex::encode(Sha256::digest(&expected))));
                assert_eq!(facts.diff_id, facts.digest);
                // Each entry reads back whole with tar's reader.
                let mut archive = tar::Archive::new(&written[..]);
                let mut entries = archive.entries().unwrap();
                assert_eq!(entries.next().unwrap().unwrap().path().unwrap().to_str(), Some("disk/"));
                let mut file = entries.next().unwrap().unwrap();
                assert_eq!(file.path().unwrap().to_str().map(str::to_owned), Some(format!("disk/{name}")));
                let mut read_back = Vec::new();
                file.read_to_end(&mut read_back).unwrap();
                assert!(read_back == data);
            }
        }
    }

    #[test]
    fn a_compressed_layer_unpacks_to_the_same_tar() {
        let data: Vec<u8> = (0..COPY_BUFFER + 3).map(|at| (at % 13) as u8).collect();
        let mut gzipped = Vec::new();
        let facts = write_layer(&mut &data[..], data.len() as u64, "disk.img", &options(LayerCompression::Gzip), &mut gzipped).unwrap();
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(&gzipped[..]).read_to_end(&mut unpacked).unwrap();
        let expected = built_by_tar("disk.img", &data);
        assert!(unpacked == expected);
        assert_eq!(facts.diff_id, format!("sha256:{}", hex::encode(Sha256::digest(&expected))));
        assert_eq!(facts.digest, format!("sha256:{}", hex::encode(Sha256::digest(&gzipped))));
    }

    #[test]
    fn data_shorter_or_longer_than_announced_is_a_source_error() {
        let data = vec![5u8; 1000];
        for announced in [999u64, 1001] {
            let error = write_layer(&mut &data[..], announced, "disk.img", &options(LayerCompression::None), io::sink()).unwrap_err();
            assert!(matches!(error, ImportError::SourceRead(_)), "announced {announced}: {error}");
            assert!(error.to_string().contains(&format!("1000 bytes where {announced}")), "{error}");
        }
    }

    #[test]
    fn file_names_are_safe_and_lose_the_wrapper_extension() {
        use detect::Compression::*;
        assert_eq!(disk_file_name("jammy-server-cloudimg-amd64.img", None), "jammy-server-cloudimg-amd64.img");
        assert_eq!(disk_file_name("/a/b/debian.qcow2.xz", Some(Xz)), "debian.qcow2");
        assert_eq!(disk_file_name("image.qcow2.gz", None), "image.qcow2.gz");
        assert_eq!(disk_file_name("../../etc/passwd", None), "passwd");
        assert_eq!(disk_file_name("..", None), "disk.img");
        assert_eq!(disk_file_name("a b%20c", None), "a_b_20c");
        assert_eq!(disk_file_name("", None), "disk.img");
    }
}
