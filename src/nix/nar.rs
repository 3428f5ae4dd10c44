//! NAR (Nix ARchive): a streaming encoder that reads a store path from disk, and a
//! validating streaming reader for bytes that arrive from the network.
//!
//! ```text
//!   filesystem ──► dump_path ──► 256 KiB batch ──► HashingWriter(sha256, size) ──► caller's Write
//!   network bytes ──► 128 KiB buffer ──► validate (+ sha256, size) ──► NarSummary | NarError
//! ```
//! Neither side holds a whole file in memory, and neither recurses: both walk the tree with
//! an explicit stack, so a deep tree (or a hostile NAR) cannot overflow the thread's stack.
//!
//! The format: `str(s)` is `s`'s length as u64 little-endian, its bytes, and zero padding to a
//! multiple of 8; a NAR is `str("nix-archive-1")` and one node:
//! ```text
//!   node = "(" "type" ( "regular" ["executable" ""] "contents" str(bytes)
//!                     | "symlink" "target" str(target)
//!                     | "directory" { "entry" "(" "name" str(name) "node" node ")" } ) ")"
//! ```
//! with directory entries strictly ascending by raw bytes.

use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::hash::HashingWriter;
use super::Sha256Hash;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// A filesystem error in [`dump_path`], or a read error of [`validate`]'s input (then
    /// `path` is [`NAR_INPUT`]).
    #[error("I/O error at {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("I/O error writing NAR: {0}")]
    Write(std::io::Error),
    #[error("{path}: {what} cannot be stored in a NAR (only regular files, directories and symlinks can)")]
    UnsupportedFileType {
        path: std::path::PathBuf,
        what: &'static str,
    },
    #[error("malformed NAR at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
}

/// The `path` of a [`NarError::Io`] raised by reading [`validate`]'s input.
pub const NAR_INPUT: &str = "(NAR input)";

const MAGIC: &[u8] = b"nix-archive-1";

/// Deepest directory nesting [`validate`] accepts: the root node is at depth 0, and a node at
/// depth `MAX_DEPTH` is refused. Only bounds the explicit stack (a name per level); Nix 2.35
/// itself refuses depth 64 and more, older Nix has no limit.
pub const MAX_DEPTH: usize = 256;
/// Longest entry name (NAME_MAX on Linux; Nix 2.35 uses the same bound).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target (PATH_MAX - 1; Nix 2.35 uses the same bound).
pub const MAX_TARGET_LEN: usize = 4095;
/// Longest keyword token read while validating; real ones are at most 13 bytes, a little slack
/// keeps error messages useful for short garbage without allowing large allocations.
const MAX_TAG_LEN: usize = 32;

/// Output is batched to this size: big enough that the consumer (hasher, compressor, channel)
/// sees few large writes, small enough to stay in L2 cache.
const ENCODER_BUF_SIZE: usize = 256 * 1024;
/// Input read size for the validator.
const DECODER_BUF_SIZE: usize = 128 * 1024;

/// Writes the NAR serialisation of `path` (file, directory or symlink; symlinks are not
/// followed) to `out`, byte-identical to `nix-store --dump`, and returns its hash and size.
///
/// `out` is written in pieces of up to 256 KiB and flushed at the end. A regular file whose
/// size changes while it is read is an error, as the NAR already declared its length.
pub fn dump_path<W: std::io::Write>(
    path: &std::path::Path,
    out: W,
) -> Result<NarSummary, NarError> {
    let mut enc = Encoder::new(out);
    enc.str(MAGIC)?;
    let root_meta = std::fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
    // Open directories, innermost last, with the names still to be written.
    let mut stack: Vec<OpenDir> = Vec::new();
    if let Some(dir) = enc.node(path.to_path_buf(), &root_meta)? {
        stack.push(dir);
    }
    while let Some(dir) = stack.last_mut() {
        match dir.names.next() {
            Some(name) => {
                let child = dir.path.join(&name);
                enc.token(b"entry")?;
                enc.token(b"(")?;
                enc.token(b"name")?;
                enc.str(name.as_bytes())?;
                enc.token(b"node")?;
                let meta = std::fs::symlink_metadata(&child).map_err(|e| io_error(&child, e))?;
                match enc.node(child, &meta)? {
                    Some(subdir) => stack.push(subdir),
                    None => enc.token(b")")?, // closes the entry
                }
            }
            None => {
                stack.pop();
                enc.token(b")")?; // closes the directory node
                if !stack.is_empty() {
                    enc.token(b")")?; // closes the entry holding it
                }
            }
        }
    }
    enc.finish()
}

struct OpenDir {
    path: PathBuf,
    names: std::vec::IntoIter<OsString>,
}

/// Batches NAR bytes into a fixed buffer that file contents are read straight into.
struct Encoder<W: Write> {
    out: HashingWriter<W>,
    buf: Box<[u8]>,
    len: usize,
}

impl<W: Write> Encoder<W> {
    fn new(out: W) -> Self {
        Self {
            out: HashingWriter::new(out),
            buf: vec![0; ENCODER_BUF_SIZE].into_boxed_slice(),
            len: 0,
        }
    }

    /// Writes the node's opening; returns the directory to descend into, if it is one.
    fn node(&mut self, path: PathBuf, meta: &Metadata) -> Result<Option<OpenDir>, NarError> {
        let file_type = meta.file_type();
        let kind: &[u8] = if file_type.is_file() {
            b"regular"
        } else if file_type.is_dir() {
            b"directory"
        } else if file_type.is_symlink() {
            b"symlink"
        } else {
            let what = if file_type.is_socket() {
                "a socket"
            } else if file_type.is_fifo() {
                "a FIFO"
            } else if file_type.is_block_device() {
                "a block device"
            } else if file_type.is_char_device() {
                "a character device"
            } else {
                "a file of unknown type"
            };
            return Err(NarError::UnsupportedFileType { path, what });
        };
        self.token(b"(")?;
        self.token(b"type")?;
        self.token(kind)?;
        if file_type.is_file() {
            // Only the owner's execute bit counts: 0655 is not executable to Nix.
            if meta.mode() & 0o100 != 0 {
                self.token(b"executable")?;
                self.token(b"")?;
            }
            self.token(b"contents")?;
            self.contents(&path, meta.len())?;
            self.token(b")")?;
            Ok(None)
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| io_error(&path, e))?;
            self.token(b"target")?;
            self.str(target.as_os_str().as_bytes())?;
            self.token(b")")?;
            Ok(None)
        } else {
            let mut names = std::fs::read_dir(&path)
                .and_then(|entries| {
                    entries
                        .map(|entry| entry.map(|e| e.file_name()))
                        .collect::<io::Result<Vec<OsString>>>()
                })
                .map_err(|e| io_error(&path, e))?;
            // Nix sorts std::string names, i.e. by unsigned bytes; so does OsStr on Unix, but
            // say so explicitly since the order is part of the format.
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            Ok(Some(OpenDir {
                path,
                names: names.into_iter(),
            }))
        }
    }

    /// `str(file contents)`: declares `size` (from metadata) and then reads exactly that many
    /// bytes, straight into the output buffer.
    fn contents(&mut self, path: &Path, size: u64) -> Result<(), NarError> {
        self.bytes(&size.to_le_bytes())?;
        let mut file = File::open(path).map_err(|e| io_error(path, e))?;
        let mut left = size;
        while left > 0 {
            if self.len == self.buf.len() {
                self.flush_buf()?;
            }
            let room = (self.buf.len() - self.len).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = read_retrying(&mut file, &mut self.buf[self.len..self.len + room])
                .map_err(|e| io_error(path, e))?;
            if n == 0 {
                return Err(changed_size(path, size, "shrank"));
            }
            self.len += n;
            left -= n as u64;
        }
        // The header is already written, so extra bytes cannot be included: refuse rather
        // than silently archive a file that was cut short.
        let mut probe = [0u8; 1];
        if read_retrying(&mut file, &mut probe).map_err(|e| io_error(path, e))? != 0 {
            return Err(changed_size(path, size, "grew"));
        }
        self.padding(size)
    }

    fn token(&mut self, token: &[u8]) -> Result<(), NarError> {
        self.str(token)
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.bytes(&(s.len() as u64).to_le_bytes())?;
        self.bytes(s)?;
        self.padding(s.len() as u64)
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        self.bytes(&[0u8; 8][..padding_len(len)])
    }

    fn bytes(&mut self, mut data: &[u8]) -> Result<(), NarError> {
        while !data.is_empty() {
            if self.len == self.buf.len() {
                self.flush_buf()?;
            }
            let n = data.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<(), NarError> {
        self.out
            .write_all(&self.buf[..self.len])
            .map_err(NarError::Write)?;
        self.len = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<NarSummary, NarError> {
        self.flush_buf()?;
        self.out.flush().map_err(NarError::Write)?;
        let (_, nar_hash, nar_size) = self.out.finish();
        Ok(NarSummary { nar_hash, nar_size })
    }
}

fn read_retrying(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

fn io_error(path: &Path, source: io::Error) -> NarError {
    NarError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn changed_size(path: &Path, size: u64, how: &str) -> NarError {
    io_error(
        path,
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("file {how} while being archived (it was {size} bytes when the NAR header was written)"),
        ),
    )
}

/// Reads a whole NAR from `input`, checking every rule of the format (magic, tokens, padding,
/// entry order and names, limits) and returns its hash and size. Reads in bounded pieces.
///
/// Rules beyond the grammar: padding must be zero; `executable` may only appear as
/// `"executable" ""` before `contents`; entry names must be non-empty, at most 255 bytes, not
/// `.`/`..` and free of `/` and NUL, and strictly ascending; symlink targets must be 1..=4095
/// bytes without NUL; nesting is limited to [`MAX_DEPTH`]; nothing may follow the root node.
pub fn validate<R: std::io::Read>(input: R) -> Result<NarSummary, NarError> {
    validate_with_listing(input, 0).map(|(summary, _)| summary)
}

/// [`validate`], also writing the NAR's listing in the format of Nix's `<hash>.ls` files
/// (`{"version":1,"root":NODE}`, regular files with `size`, `executable` and `narOffset`, the
/// offset of their contents in the NAR). The listing is `None` when it would exceed
/// `listing_limit` bytes (0: never built), so a NAR of millions of tiny files costs bounded
/// memory.
pub fn validate_with_listing<R: std::io::Read>(
    input: R,
    listing_limit: usize,
) -> Result<(NarSummary, Option<String>), NarError> {
    let mut listing = Listing::new(listing_limit);
    let mut r = Decoder::new(input);
    match r.string(MAGIC.len(), "magic") {
        Ok(magic) if magic == MAGIC => {}
        Ok(_) | Err(NarError::Malformed { .. }) => {
            return Err(malformed(
                0,
                "not a NAR: it does not start with \"nix-archive-1\"",
            ))
        }
        Err(e) => return Err(e),
    }
    // Last entry name of each open directory, innermost last.
    let mut dirs: Vec<Option<Vec<u8>>> = Vec::new();
    let root = r.node()?;
    listing.node(&root);
    if root == Node::Directory {
        dirs.push(None);
    }
    while !dirs.is_empty() {
        let tag_at = r.offset;
        let tag = r.tag()?;
        match tag.as_slice() {
            b")" => {
                dirs.pop();
                listing.close_directory();
                if !dirs.is_empty() {
                    r.expect(b")")?; // closes the entry that held the directory
                }
            }
            b"entry" => {
                r.expect(b"(")?;
                r.expect(b"name")?;
                let name_at = r.offset;
                let name = r.string(MAX_NAME_LEN, "entry name")?;
                check_entry_name(&name).map_err(|reason| malformed(name_at, reason))?;
                let prev = dirs
                    .last_mut()
                    .expect("loop runs while a directory is open");
                if let Some(prev) = prev.as_deref() {
                    if name.as_slice() <= prev {
                        let reason = if name.as_slice() == prev {
                            format!("duplicate directory entry {}", quote(&name))
                        } else {
                            format!(
                                "directory entries not sorted: {} after {}",
                                quote(&name),
                                quote(prev)
                            )
                        };
                        return Err(malformed(name_at, reason));
                    }
                }
                listing.entry(prev.is_none(), &name);
                *prev = Some(name);
                r.expect(b"node")?;
                if dirs.len() >= MAX_DEPTH {
                    let reason = format!("directories nested deeper than {MAX_DEPTH} levels");
                    return Err(malformed(r.offset, reason));
                }
                let node = r.node()?;
                listing.node(&node);
                if node == Node::Directory {
                    dirs.push(None);
                } else {
                    r.expect(b")")?; // closes the entry
                }
            }
            other => {
                let reason = format!("expected \"entry\" or \")\", found {}", quote(other));
                return Err(malformed(tag_at, reason));
            }
        }
    }
    r.expect_eof()?;
    Ok((r.finish(), listing.finish()))
}

/// What [`Decoder::node`] read: a whole file or symlink, or the head of a directory.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Regular {
        size: u64,
        executable: bool,
        /// Where the contents start in the NAR.
        offset: u64,
    },
    Symlink(Vec<u8>),
    Directory,
}

/// Nix's listing JSON, written as the validator walks the NAR: one pass, no tree in memory.
struct Listing {
    json: String,
    limit: usize,
}

impl Listing {
    fn new(limit: usize) -> Self {
        let mut json = String::new();
        if limit > 0 {
            json.push_str("{\"version\":1,\"root\":");
        }
        Listing { json, limit }
    }

    /// Stops building once over the limit (and when never asked for one).
    fn active(&self) -> bool {
        self.limit > 0 && self.json.len() <= self.limit
    }

    fn node(&mut self, node: &Node) {
        if !self.active() {
            return;
        }
        use std::fmt::Write as _;
        match node {
            Node::Regular {
                size,
                executable,
                offset,
            } => {
                let _ = write!(self.json, "{{\"type\":\"regular\",\"size\":{size}");
                if *executable {
                    self.json.push_str(",\"executable\":true");
                }
                let _ = write!(self.json, ",\"narOffset\":{offset}}}");
            }
            Node::Symlink(target) => {
                self.json.push_str("{\"type\":\"symlink\",\"target\":");
                self.string(target);
                self.json.push('}');
            }
            Node::Directory => self.json.push_str("{\"type\":\"directory\",\"entries\":{"),
        }
    }

    fn entry(&mut self, first: bool, name: &[u8]) {
        if !self.active() {
            return;
        }
        if !first {
            self.json.push(',');
        }
        self.string(name);
        self.json.push(':');
    }

    fn close_directory(&mut self) {
        if self.active() {
            self.json.push_str("}}");
        }
    }

    /// Names and targets are bytes; JSON needs text. Nix's own listing has the same
    /// limitation, and store paths with non-UTF-8 names are vanishingly rare.
    fn string(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        self.json
            .push_str(&serde_json::to_string(&text).expect("a string serialises"));
    }

    fn finish(mut self) -> Option<String> {
        if !self.active() {
            return None;
        }
        self.json.push('}');
        Some(self.json)
    }
}

fn check_entry_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(format!("invalid entry name {}", quote(name)));
    }
    Ok(())
}

/// Reads from a fixed buffer, hashing consumed bytes in whole buffers at a time.
struct Decoder<R> {
    input: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// `buf[..hashed]` has been fed to `hasher`; always `<= pos`.
    hashed: usize,
    hasher: Sha256,
    /// Bytes consumed so far: the offset of the next byte.
    offset: u64,
}

impl<R: Read> Decoder<R> {
    fn new(input: R) -> Self {
        Self {
            input,
            buf: vec![0; DECODER_BUF_SIZE].into_boxed_slice(),
            pos: 0,
            end: 0,
            hashed: 0,
            hasher: Sha256::new(),
            offset: 0,
        }
    }

    /// Refills the buffer once everything in it is consumed; false at end of input.
    fn fill(&mut self) -> Result<bool, NarError> {
        debug_assert_eq!(self.pos, self.end);
        self.hasher.update(&self.buf[self.hashed..self.pos]);
        self.pos = 0;
        self.end = 0;
        self.hashed = 0;
        loop {
            match self.input.read(&mut self.buf) {
                Ok(n) => {
                    self.end = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarError::Io {
                        path: PathBuf::from(NAR_INPUT),
                        source,
                    })
                }
            }
        }
    }

    /// Consumes `n` bytes, passing each available run to `f` (which may be a no-op).
    fn consume(&mut self, mut n: u64, mut f: impl FnMut(&[u8])) -> Result<(), NarError> {
        while n > 0 {
            if self.pos == self.end && !self.fill()? {
                return Err(malformed(self.offset, "truncated: unexpected end of input"));
            }
            let take = (self.end - self.pos).min(usize::try_from(n).unwrap_or(usize::MAX));
            f(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            self.offset += take as u64;
            n -= take as u64;
        }
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut bytes = Vec::with_capacity(8);
        self.consume(8, |run| bytes.extend_from_slice(run))?;
        Ok(u64::from_le_bytes(
            bytes.try_into().expect("consumed 8 bytes"),
        ))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let at = self.offset;
        let mut non_zero = false;
        self.consume(padding_len(len) as u64, |run| {
            non_zero |= run.iter().any(|&b| b != 0)
        })?;
        if non_zero {
            return Err(malformed(at, "non-zero padding"));
        }
        Ok(())
    }

    /// A length-prefixed string of at most `max` bytes (checked before allocating).
    fn string(&mut self, max: usize, what: &str) -> Result<Vec<u8>, NarError> {
        let at = self.offset;
        let len = self.u64()?;
        if len > max as u64 {
            let reason = format!("{what} is {len} bytes long, more than the limit of {max}");
            return Err(malformed(at, reason));
        }
        let mut s = Vec::with_capacity(len as usize);
        self.consume(len, |run| s.extend_from_slice(run))?;
        self.padding(len)?;
        Ok(s)
    }

    fn tag(&mut self) -> Result<Vec<u8>, NarError> {
        self.string(MAX_TAG_LEN, "token")
    }

    fn expect(&mut self, expected: &[u8]) -> Result<(), NarError> {
        let at = self.offset;
        let tag = self.tag()?;
        if tag != expected {
            let reason = format!("expected {}, found {}", quote(expected), quote(&tag));
            return Err(malformed(at, reason));
        }
        Ok(())
    }

    /// Reads a node up to its end, or for a directory up to its first entry, whose entries
    /// the caller then reads.
    fn node(&mut self) -> Result<Node, NarError> {
        self.expect(b"(")?;
        self.expect(b"type")?;
        let type_at = self.offset;
        match self.tag()?.as_slice() {
            b"regular" => {
                let mut tag_at = self.offset;
                let mut tag = self.tag()?;
                let executable = tag == b"executable";
                if executable {
                    let marker_at = self.offset;
                    if !self.string(MAX_TAG_LEN, "executable marker")?.is_empty() {
                        return Err(malformed(marker_at, "executable marker is not empty"));
                    }
                    tag_at = self.offset;
                    tag = self.tag()?;
                }
                if tag != b"contents" {
                    let reason = format!("expected \"contents\", found {}", quote(&tag));
                    return Err(malformed(tag_at, reason));
                }
                let len = self.u64()?;
                let offset = self.offset;
                self.consume(len, |_| {})?;
                self.padding(len)?;
                self.expect(b")")?;
                Ok(Node::Regular {
                    size: len,
                    executable,
                    offset,
                })
            }
            b"symlink" => {
                self.expect(b"target")?;
                let target_at = self.offset;
                let target = self.string(MAX_TARGET_LEN, "symlink target")?;
                if target.is_empty() || target.contains(&0) {
                    let reason = format!("invalid symlink target {}", quote(&target));
                    return Err(malformed(target_at, reason));
                }
                self.expect(b")")?;
                Ok(Node::Symlink(target))
            }
            b"directory" => Ok(Node::Directory),
            other => {
                let reason = format!("unknown file type {}", quote(other));
                Err(malformed(type_at, reason))
            }
        }
    }

    fn expect_eof(&mut self) -> Result<(), NarError> {
        if self.pos < self.end || self.fill()? {
            return Err(malformed(
                self.offset,
                "trailing bytes after the end of the NAR",
            ));
        }
        Ok(())
    }

    fn finish(mut self) -> NarSummary {
        self.hasher.update(&self.buf[self.hashed..self.pos]);
        NarSummary {
            nar_hash: Sha256Hash(self.hasher.finalize().into()),
            nar_size: self.offset,
        }
    }
}

fn malformed(offset: u64, reason: impl Into<String>) -> NarError {
    NarError::Malformed {
        offset,
        reason: reason.into(),
    }
}

/// Bytes as a quoted string with non-printable and non-ASCII bytes escaped.
fn quote(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Builds NARs token by token for the validator tests.
    #[derive(Default)]
    struct Nar(Vec<u8>);

    impl Nar {
        fn new() -> Self {
            Self::default().s(MAGIC)
        }
        fn s(mut self, s: &[u8]) -> Self {
            self.0.extend_from_slice(&(s.len() as u64).to_le_bytes());
            self.0.extend_from_slice(s);
            self.0.resize(self.0.len() + padding_len(s.len() as u64), 0);
            self
        }
        fn tokens(self, tokens: &[&str]) -> Self {
            tokens.iter().fold(self, |nar, t| nar.s(t.as_bytes()))
        }
        fn file(self, contents: &[u8]) -> Self {
            self.tokens(&["(", "type", "regular", "contents"])
                .s(contents)
                .tokens(&[")"])
        }
        fn entry(self, name: &[u8]) -> Self {
            self.tokens(&["entry", "(", "name"])
                .s(name)
                .tokens(&["node"])
        }
        fn dir_with(self, names: &[&[u8]]) -> Self {
            let nar = self.tokens(&["(", "type", "directory"]);
            names
                .iter()
                .fold(nar, |nar, name| nar.entry(name).file(b"x").tokens(&[")"]))
                .tokens(&[")"])
        }
    }

    fn dump(path: &Path) -> (Vec<u8>, NarSummary) {
        let mut out = Vec::new();
        let summary = dump_path(path, &mut out).unwrap();
        (out, summary)
    }

    fn assert_vector(path: &Path, size: u64, nix32: &str) {
        let (bytes, summary) = dump(path);
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(summary.nar_size, size);
        assert_eq!(summary.nar_hash.to_nix32(), nix32);
        assert_eq!(summary.nar_hash, Sha256Hash::digest(&bytes));
        assert_eq!(validate(bytes.as_slice()).unwrap(), summary);
    }

    fn malformed_reason(nar: &[u8]) -> (u64, String) {
        match validate(nar) {
            Err(NarError::Malformed { offset, reason }) => (offset, reason),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn the_listing_describes_every_node_with_content_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            root.join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(root.join("data"), b"abc").unwrap();
        symlink("bin/tool", root.join("link")).unwrap();
        let (bytes, summary) = dump(&root);
        let (checked, listing) = validate_with_listing(bytes.as_slice(), 1 << 20).unwrap();
        assert_eq!(checked, summary);
        let listing: serde_json::Value = serde_json::from_str(&listing.unwrap()).unwrap();
        assert_eq!(listing["version"], 1);
        let entries = &listing["root"]["entries"];
        assert_eq!(listing["root"]["type"], "directory");
        assert_eq!(entries["link"]["target"], "bin/tool");
        let tool = &entries["bin"]["entries"]["tool"];
        assert_eq!(tool["executable"], true);
        assert!(entries["data"].get("executable").is_none());
        // Each offset is where the file's bytes are in the NAR.
        for (file, contents) in [(tool, &b"#!/bin/sh\n"[..]), (&entries["data"], b"abc")] {
            let at = file["narOffset"].as_u64().unwrap() as usize;
            assert_eq!(file["size"].as_u64().unwrap() as usize, contents.len());
            assert_eq!(&bytes[at..at + contents.len()], contents);
        }
        // Past the limit there is no listing, and validation is unaffected.
        let (checked, none) = validate_with_listing(bytes.as_slice(), 10).unwrap();
        assert_eq!((checked, none), (summary, None));
    }

    #[test]
    fn reference_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name| dir.path().join(name);

        std::fs::write(p("hello"), b"hello\n").unwrap();
        assert_vector(
            &p("hello"),
            120,
            "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
        );

        std::fs::write(p("empty"), b"").unwrap();
        assert_vector(
            &p("empty"),
            112,
            "0ip26j2h11n1kgkz36rl4akv694yz65hr72q4kv4b3lxcbi65b3p",
        );

        std::fs::create_dir(p("dir")).unwrap();
        assert_vector(
            &p("dir"),
            96,
            "0sjjj9z1dhilhpc8pq4154czrb79z9cm044jvn75kxcjv6v5l2m5",
        );

        symlink("target", p("link")).unwrap();
        assert_vector(
            &p("link"),
            120,
            "0x67g3311ihxwarw846p2jc8wbxmv9bd8ryh7qjpp6d8yb56536b",
        );

        std::fs::write(p("exe"), b"a").unwrap();
        std::fs::set_permissions(p("exe"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_vector(
            &p("exe"),
            152,
            "1743yzlyy48061na69n0asb8pygr5fjyq2sr6n6j7kp0hgn8vcv4",
        );
    }

    #[test]
    fn encoder_matches_hand_built_nar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("b"), b"x").unwrap();
        std::fs::write(root.join("a"), b"x").unwrap();
        std::fs::write(root.join("sub/Z"), b"x").unwrap();
        // Group and other execute bits do not matter.
        std::fs::set_permissions(root.join("a"), std::fs::Permissions::from_mode(0o655)).unwrap();
        let expected = Nar::new()
            .tokens(&["(", "type", "directory"])
            .entry(b"a")
            .file(b"x")
            .tokens(&[")"])
            .entry(b"b")
            .file(b"x")
            .tokens(&[")"])
            .entry(b"sub")
            .dir_with(&[b"Z"])
            .tokens(&[")", ")"]);
        assert_eq!(dump(&root).0, expected.0);
    }

    #[test]
    fn encoder_streams_files_larger_than_its_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..ENCODER_BUF_SIZE * 2 + 13)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let (bytes, summary) = dump(&path);
        assert_eq!(bytes, Nar::new().file(&data).0);
        assert_eq!(validate(bytes.as_slice()).unwrap(), summary);
    }

    #[test]
    fn encoder_refuses_fifos_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        match dump_path(&sock, io::sink()) {
            Err(NarError::UnsupportedFileType { path, what }) => {
                assert_eq!(path, sock);
                assert_eq!(what, "a socket");
            }
            other => panic!("{other:?}"),
        }
        match dump_path(Path::new("/dev/null"), io::sink()) {
            Err(NarError::UnsupportedFileType { what, .. }) => {
                assert_eq!(what, "a character device")
            }
            other => panic!("{other:?}"),
        }
        match dump_path(&dir.path().join("missing"), io::sink()) {
            Err(NarError::Io { path, .. }) => assert!(path.ends_with("missing")),
            other => panic!("{other:?}"),
        }
    }

    fn assert_changed_size(path: &Path, how: &str) {
        match dump_path(path, io::sink()) {
            Err(NarError::Io { path: p, source }) => {
                assert_eq!(p, path);
                assert!(source.to_string().contains(how), "{source}");
            }
            other => panic!("{}: expected an error, got {other:?}", path.display()),
        }
    }

    #[test]
    fn encoder_refuses_files_longer_than_their_metadata_says() {
        // procfs files report size 0 but have contents: like a file that grew after lstat.
        assert_changed_size(Path::new("/proc/self/status"), "grew");
    }

    #[test]
    fn encoder_refuses_files_shorter_than_their_metadata_says() {
        // sysfs attributes report 4096 bytes but hold a few: like a file truncated after lstat.
        let candidates = [
            "/sys/kernel/mm/transparent_hugepage/enabled",
            "/sys/kernel/uevent_seqnum",
            "/sys/power/state",
        ];
        let Some(path) = candidates.iter().map(Path::new).find(|p| {
            p.metadata().is_ok_and(|m| m.is_file() && m.len() == 4096)
                && std::fs::read(p).is_ok_and(|c| c.len() < 4096)
        }) else {
            eprintln!("no sysfs attribute to read here; the short-read check is not exercised");
            return;
        };
        assert_changed_size(path, "shrank");
    }

    #[test]
    fn encoder_reports_write_errors() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            dump_path(dir.path(), Broken),
            Err(NarError::Write(_))
        ));
    }

    #[test]
    fn validator_accepts_well_formed_nars() {
        for nar in [
            Nar::new().file(b""),
            Nar::new().file(b"12345678"),
            Nar::new()
                .tokens(&["(", "type", "regular", "executable", "", "contents"])
                .s(b"a")
                .tokens(&[")"]),
            Nar::new().tokens(&["(", "type", "symlink", "target", "/abs/dangling", ")"]),
            Nar::new().dir_with(&[]),
            Nar::new().dir_with(&[b"A", b"Z", b"a", b"z", b"~", b"\xc3\xa9", b"\xff"]),
            Nar::new().dir_with(&[&[b'n'; 255]]),
        ] {
            let summary = validate(nar.0.as_slice()).unwrap();
            assert_eq!(summary.nar_size, nar.0.len() as u64);
            assert_eq!(summary.nar_hash, Sha256Hash::digest(&nar.0));
        }
    }

    #[test]
    fn validator_reads_nested_directories_iteratively() {
        fn nested(depth: usize) -> Nar {
            let mut nar = Nar::new();
            for _ in 0..depth {
                nar = nar.tokens(&["(", "type", "directory"]).entry(b"d");
            }
            nar = nar.file(b"leaf");
            for _ in 0..depth {
                nar = nar.tokens(&[")", ")"]);
            }
            nar
        }
        let ok = nested(MAX_DEPTH - 1);
        assert!(validate(ok.0.as_slice()).is_ok());
        let (_, reason) = malformed_reason(&nested(MAX_DEPTH).0);
        assert!(reason.contains("nested deeper"), "{reason}");
        // Far deeper than any stack could recurse: still a clean error.
        let (_, reason) = malformed_reason(&nested(100_000).0);
        assert!(reason.contains("nested deeper"), "{reason}");
    }

    #[test]
    fn validator_rejections() {
        let mut nonzero_pad = Nar::new().file(b"abc").0;
        nonzero_pad[24 + 16 * 4 + 8 + 3] = 1; // first padding byte after "abc"
        let mut nonzero_tag_pad = Nar::new().file(b"").0;
        nonzero_tag_pad[24 + 9] = b'x'; // padding of "("
        let mut huge_len = Nar::new().0;
        huge_len.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut huge_name = Nar::new()
            .tokens(&["(", "type", "directory", "entry", "(", "name"])
            .0;
        huge_name.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut huge_contents = Nar::new().tokens(&["(", "type", "regular", "contents"]).0;
        huge_contents.extend_from_slice(&u64::MAX.to_le_bytes());
        huge_contents.extend_from_slice(b"some bytes");
        let complete = Nar::new().file(b"abc").0;

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty input", vec![], "not a NAR"),
            (
                "bad magic",
                Nar::default().s(b"nix-archive-2").file(b"").0,
                "not a NAR",
            ),
            (
                "long magic",
                Nar::default().s(b"nix-archive-1x").file(b"").0,
                "not a NAR",
            ),
            ("non-zero content padding", nonzero_pad, "non-zero padding"),
            (
                "non-zero token padding",
                nonzero_tag_pad,
                "non-zero padding",
            ),
            (
                "unsorted",
                Nar::new().dir_with(&[b"b", b"a"]).0,
                "not sorted",
            ),
            (
                "case order",
                Nar::new().dir_with(&[b"a", b"Z"]).0,
                "not sorted",
            ),
            (
                "duplicate",
                Nar::new().dir_with(&[b"a", b"a"]).0,
                "duplicate",
            ),
            (
                "dot-dot",
                Nar::new().dir_with(&[b".."]).0,
                "invalid entry name",
            ),
            ("dot", Nar::new().dir_with(&[b"."]).0, "invalid entry name"),
            (
                "empty name",
                Nar::new().dir_with(&[b""]).0,
                "invalid entry name",
            ),
            (
                "slash",
                Nar::new().dir_with(&[b"a/b"]).0,
                "invalid entry name",
            ),
            (
                "nul",
                Nar::new().dir_with(&[b"a\0"]).0,
                "invalid entry name",
            ),
            (
                "name too long",
                Nar::new().dir_with(&[&[b'n'; 256]]).0,
                "limit of 255",
            ),
            ("huge name length", huge_name, "limit of 255"),
            ("huge token length", huge_len, "limit of 32"),
            ("huge contents length", huge_contents, "truncated"),
            (
                "truncated mid-token",
                complete[..complete.len() - 12].to_vec(),
                "truncated",
            ),
            (
                "truncated before close",
                complete[..complete.len() - 16].to_vec(),
                "truncated",
            ),
            (
                "trailing bytes",
                [complete.clone(), vec![0]].concat(),
                "trailing bytes",
            ),
            (
                "two roots",
                [complete.clone(), complete[24..].to_vec()].concat(),
                "trailing",
            ),
            (
                "unknown type",
                Nar::new().tokens(&["(", "type", "fifo", ")"]).0,
                "unknown file type",
            ),
            (
                "missing type",
                Nar::new().tokens(&["(", "regular"]).0,
                "expected \"type\"",
            ),
            (
                "executable after contents",
                Nar::new()
                    .tokens(&[
                        "(",
                        "type",
                        "regular",
                        "contents",
                        "",
                        "executable",
                        "",
                        ")",
                    ])
                    .0,
                "expected \")\", found \"executable\"",
            ),
            (
                "non-empty executable marker",
                Nar::new()
                    .tokens(&[
                        "(",
                        "type",
                        "regular",
                        "executable",
                        "yes",
                        "contents",
                        "",
                        ")",
                    ])
                    .0,
                "executable marker",
            ),
            (
                "empty symlink target",
                Nar::new()
                    .tokens(&["(", "type", "symlink", "target", "", ")"])
                    .0,
                "invalid symlink target",
            ),
            (
                "symlink target with NUL",
                Nar::new()
                    .tokens(&["(", "type", "symlink", "target", "a\0b", ")"])
                    .0,
                "invalid symlink target",
            ),
            (
                "symlink target too long",
                Nar::new()
                    .tokens(&["(", "type", "symlink", "target"])
                    .s(&[b'a'; 4096])
                    .tokens(&[")"])
                    .0,
                "limit of 4095",
            ),
            (
                "garbage in directory",
                Nar::new()
                    .tokens(&["(", "type", "directory", "contents", ")"])
                    .0,
                "expected \"entry\" or \")\"",
            ),
            (
                "unclosed directory",
                Nar::new().tokens(&["(", "type", "directory"]).0,
                "truncated",
            ),
        ];
        for (what, nar, expected) in cases {
            let (_, reason) = malformed_reason(&nar);
            assert!(reason.contains(expected), "{what}: {reason}");
        }
    }

    #[test]
    fn validator_error_offsets_point_at_the_problem() {
        let nar = Nar::new().dir_with(&[b"b", b"a"]).0;
        let (offset, _) = malformed_reason(&nar);
        // The second name: after the magic, "(" "type" "directory", the first entry (5 tokens,
        // a file node of 6 and ")"), and "entry" "(" "name".
        let first_entry = 16 * 5 + 16 * 6 + 16;
        assert_eq!(offset, 24 + 16 + 16 + 24 + first_entry + 3 * 16);
        let complete = Nar::new().file(b"abc").0;
        let (offset, _) = malformed_reason(&[complete.clone(), vec![1, 2]].concat());
        assert_eq!(offset, complete.len() as u64);
    }

    #[test]
    fn validator_reports_read_errors_as_io() {
        struct FailingReader;
        impl Read for FailingReader {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            }
        }
        match validate(FailingReader) {
            Err(NarError::Io { path, source }) => {
                assert_eq!(path, Path::new(NAR_INPUT));
                assert_eq!(source.kind(), io::ErrorKind::ConnectionReset);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validator_handles_one_byte_reads() {
        /// Returns one byte a call, so every token straddles buffer refills.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((&first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = first;
                self.0 = rest;
                Ok(1)
            }
        }
        let nar = Nar::new().dir_with(&[b"a", b"bb", b"ccccccccc"]).0;
        let summary = validate(Trickle(&nar)).unwrap();
        assert_eq!(summary.nar_hash, Sha256Hash::digest(&nar));
        assert_eq!(summary.nar_size, nar.len() as u64);
    }
}
