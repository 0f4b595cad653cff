//! File store: one JSON document per slot at `<dir>/<path>.json`, the embedded default.
//!
//! The document is [`Document::from_state`]: the six DESIGN.md §3 fields at the top level
//! (what consumers read) and the bookkeeping under `rotation`. The [`Version`] is the
//! hex SHA-256 of the file's bytes, so any change by anyone is a new version.
//!
//! A write holds an exclusive `flock` on a lock file beside the target
//! (`<dir>/<parent>/.<name>.lock`), which serialises writers in this process and in
//! other processes alike; then it compares the version, computes
//! [`SlotState::apply`], and replaces the file atomically: a temp file in the same
//! directory, fsync, rename, fsync of the directory. Files are created 0600 and
//! directories 0700. Readers take no lock: a rename is atomic, so they see the old
//! document or the new one, never half of one.
//!
//! Path segments starting with `.` are refused (lock and temp files live there), as are
//! paths that are absolute, contain `..`, or pass through a symlink below `dir`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::*;
use serde::{Deserialize, Serialize};

// ----- configuration: `[stores.<name>]` with `type = "..."` -----

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub dir: PathBuf,
}

impl FileConfig {
    /// Checks the section without I/O (see [`super::vault::VaultConfig::validate`]).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.dir.as_os_str().is_empty() {
            return Err(("dir", "must not be empty".into()));
        }
        Ok(())
    }
}

/// How long a writer waits for another writer's lock before giving up (temporary).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The file backend.
#[derive(Debug, Clone)]
pub struct FileStore {
    name: String,
    dir: PathBuf,
}

/// Where one slot lives on disk.
#[derive(Debug)]
struct Target {
    /// The slot path as the engine gave it (for messages).
    path: String,
    /// Directories below `dir` leading to the file, outermost first.
    dirs: Vec<PathBuf>,
    parent: PathBuf,
    file: PathBuf,
    lock: PathBuf,
    /// File name stem (last path segment).
    stem: String,
}

impl FileStore {
    /// Builds the store; touches nothing on disk (the first write creates `dir`;
    /// `health` and `probe_write` leave nothing behind).
    pub fn new(name: &str, cfg: &FileConfig) -> StoreResult<Self> {
        if cfg.dir.as_os_str().is_empty() {
            return Err(StoreError::new(
                name,
                StoreErrorKind::InvalidConfig,
                "dir must not be empty",
            ));
        }
        Ok(FileStore {
            name: name.to_string(),
            dir: cfg.dir.clone(),
        })
    }

    /// The directory holding the documents.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the document for `path` is (or would be) stored.
    pub fn file_path(&self, path: &str) -> StoreResult<PathBuf> {
        Ok(self.target(path)?.file)
    }

    fn err(&self, kind: StoreErrorKind, message: impl Into<String>) -> StoreError {
        StoreError::new(&self.name, kind, message)
    }

    fn io_err(&self, what: &str, p: &Path, e: &io::Error) -> StoreError {
        let kind = match e.kind() {
            io::ErrorKind::PermissionDenied => StoreErrorKind::PermissionDenied,
            _ => StoreErrorKind::Other,
        };
        self.err(kind, format!("cannot {what} {}: {e}", p.display()))
    }

    /// Maps a slot path to files, refusing anything that could leave `dir`.
    fn target(&self, path: &str) -> StoreResult<Target> {
        check_path(&self.name, path)?;
        let segs: Vec<&str> = path.split('/').collect();
        if segs.iter().any(|s| s.starts_with('.')) {
            return Err(self.err(
                StoreErrorKind::InvalidConfig,
                format!("path {path:?} has a segment starting with '.' (reserved for lock and temp files)"),
            ));
        }
        let (stem, parents) = segs
            .split_last()
            .ok_or_else(|| self.err(StoreErrorKind::InvalidConfig, "empty path"))?;
        let mut dirs = Vec::with_capacity(parents.len());
        let mut parent = self.dir.clone();
        for seg in parents {
            parent.push(seg);
            dirs.push(parent.clone());
        }
        Ok(Target {
            path: path.to_string(),
            file: parent.join(format!("{stem}.json")),
            lock: parent.join(format!(".{stem}.lock")),
            parent,
            dirs,
            stem: stem.to_string(),
        })
    }

    /// Refuses a target whose directories or file are symlinks (or not what they should
    /// be). Missing components are fine; they are created later, without following links.
    fn check_no_symlink(&self, t: &Target) -> StoreResult<()> {
        for d in &t.dirs {
            match fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.err(
                        StoreErrorKind::InvalidConfig,
                        format!(
                            "path {:?} goes through a symlink at {}",
                            t.path,
                            d.display()
                        ),
                    ))
                }
                Ok(m) if !m.is_dir() => {
                    return Err(self.err(
                        StoreErrorKind::InvalidConfig,
                        format!("path {:?}: {} is not a directory", t.path, d.display()),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(self.io_err("inspect", d, &e)),
            }
        }
        for f in [&t.file, &t.lock] {
            match fs::symlink_metadata(f) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.err(
                        StoreErrorKind::InvalidConfig,
                        format!("path {:?}: {} is a symlink", t.path, f.display()),
                    ))
                }
                Ok(m) if !m.is_file() => {
                    return Err(self.err(
                        StoreErrorKind::InvalidConfig,
                        format!("path {:?}: {} is not a regular file", t.path, f.display()),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err("inspect", f, &e)),
            }
        }
        Ok(())
    }

    /// Creates `dir` (0700, with parents) and the target's directories (0700, one by one
    /// so none is created through a symlink), then re-checks for symlinks.
    fn ensure_dirs(&self, t: &Target) -> StoreResult<()> {
        self.ensure_root()?;
        let mut parent = self.dir.clone();
        for d in &t.dirs {
            match fs::DirBuilder::new().mode(0o700).create(d) {
                // Make the new entry durable before files are renamed into it.
                Ok(()) => File::open(&parent)
                    .and_then(|p| p.sync_all())
                    .map_err(|e| self.io_err("sync directory", &parent, &e))?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.io_err("create directory", d, &e)),
            }
            parent.clone_from(d);
        }
        self.check_no_symlink(t)
    }

    fn ensure_root(&self) -> StoreResult<()> {
        match fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(self.err(
                StoreErrorKind::InvalidConfig,
                format!("dir {} is not a directory", self.dir.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(&self.dir)
                .map_err(|e| self.io_err("create directory", &self.dir, &e)),
            Err(e) => Err(self.io_err("inspect", &self.dir, &e)),
        }
    }

    /// Reads the document's bytes; `None` when the file does not exist.
    fn read_bytes(&self, t: &Target) -> StoreResult<Option<Vec<u8>>> {
        match fs::read(&t.file) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("read", &t.file, &e)),
        }
    }

    fn parse(&self, t: &Target, bytes: Option<&[u8]>) -> StoreResult<SlotState> {
        let Some(bytes) = bytes else {
            return Ok(SlotState::default());
        };
        let bad = |why: String| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("{} is not a keyrotd document: {why}", t.file.display()),
            )
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(json_error_summary(&e)))?;
        let doc = parse_document(value).map_err(bad)?;
        Ok(doc.into_state(Version(sha256_hex(bytes))))
    }

    fn read_blocking(&self, path: &str) -> StoreResult<SlotState> {
        let t = self.target(path)?;
        self.check_no_symlink(&t)?;
        let bytes = self.read_bytes(&t)?;
        self.parse(&t, bytes.as_deref())
    }

    fn read_consumer_blocking(&self, path: &str) -> StoreResult<ConsumerDoc> {
        let t = self.target(path)?;
        self.check_no_symlink(&t)?;
        let Some(bytes) = self.read_bytes(&t)? else {
            return Ok(ConsumerDoc::default());
        };
        self.parse_consumer(&t, &bytes)
    }

    fn parse_consumer(&self, t: &Target, bytes: &[u8]) -> StoreResult<ConsumerDoc> {
        let bad = |why: String| {
            self.err(
                StoreErrorKind::InvalidData,
                format!("{} is not a keyrotd document: {why}", t.file.display()),
            )
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(json_error_summary(&e)))?;
        parse_consumer(value, Version(sha256_hex(bytes))).map_err(bad)
    }

    /// The consumer document: exactly the six fields, replaced atomically under the
    /// lock if still at `expected`; `None` removes the file.
    fn write_consumer_blocking(
        &self,
        path: &str,
        record: Option<&SecretRecord>,
        expected: &Version,
    ) -> StoreResult<Version> {
        let t = self.target(path)?;
        self.check_no_symlink(&t)?;
        if record.is_none() && !t.file.exists() {
            return Ok(Version::absent());
        }
        self.ensure_dirs(&t)?;
        let _lock = self.lock(&t)?;
        let bytes = self.read_unchanged(&t, expected)?;
        if let Some(b) = &bytes {
            // Never replace someone else's file: it must parse as a keyrotd document.
            self.parse_consumer(&t, b)?;
        }
        let Some(record) = record else {
            fs::remove_file(&t.file).map_err(|e| self.io_err("remove", &t.file, &e))?;
            let _ = fs::remove_file(&t.lock);
            return Ok(Version::absent());
        };
        let mut out = serde_json::to_vec_pretty(record).map_err(|e| {
            self.err(
                StoreErrorKind::Other,
                format!("cannot encode {path:?}: {}", json_error_summary(&e)),
            )
        })?;
        out.push(b'\n');
        self.replace(&t, &out)?;
        Ok(Version(sha256_hex(&out)))
    }

    /// Reads the target's bytes (under its lock) and checks they are still at
    /// `expected` (else `Conflict`): the compare of every compare-and-set write.
    fn read_unchanged(&self, t: &Target, expected: &Version) -> StoreResult<Option<Vec<u8>>> {
        let bytes = self.read_bytes(t)?;
        let found = bytes
            .as_deref()
            .map(sha256_hex)
            .map(Version)
            .unwrap_or_default();
        if &found != expected {
            return Err(self.err(
                StoreErrorKind::Conflict,
                format!(
                    "{:?} changed since it was read (expected version {}, found {})",
                    t.path,
                    short(expected),
                    short(&found)
                ),
            ));
        }
        Ok(bytes)
    }

    /// Takes the slot's cross-process lock, polling so that a stuck holder yields a
    /// temporary error instead of a hang. The lock is released when the file is dropped.
    fn lock(&self, t: &Target) -> StoreResult<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&t.lock)
            .map_err(|e| self.io_err("open lock file", &t.lock, &e))?;
        let start = Instant::now();
        loop {
            match fs4::fs_std::FileExt::try_lock_exclusive(&f) {
                Ok(true) => return Ok(f),
                Ok(false) if start.elapsed() < LOCK_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(false) => {
                    return Err(self.err(
                        StoreErrorKind::Unavailable,
                        format!(
                            "slot {:?} is locked by another writer for more than {}s",
                            t.path,
                            LOCK_TIMEOUT.as_secs()
                        ),
                    ))
                }
                Err(e) => return Err(self.io_err("lock", &t.lock, &e)),
            }
        }
    }

    fn apply_blocking(
        &self,
        path: &str,
        expected: &Version,
        tr: &Transition,
    ) -> StoreResult<SlotState> {
        let t = self.target(path)?;
        self.check_no_symlink(&t)?;
        self.ensure_dirs(&t)?;
        let _lock = self.lock(&t)?;
        let bytes = self.read_unchanged(&t, expected)?;
        let state = self.parse(&t, bytes.as_deref())?;
        let mut next = state
            .apply(tr)
            .map_err(|e| self.err(StoreErrorKind::Conflict, format!("slot {path:?}: {e}")))?;
        let mut out = serde_json::to_vec_pretty(&Document::from_state(&next)).map_err(|e| {
            self.err(
                StoreErrorKind::Other,
                format!("cannot encode slot {path:?}: {}", json_error_summary(&e)),
            )
        })?;
        out.push(b'\n');
        self.replace(&t, &out)?;
        next.version = Version(sha256_hex(&out));
        Ok(next)
    }

    /// Atomically replaces the target's file with `bytes` (temp file, fsync, rename,
    /// fsync of the directory).
    fn replace(&self, t: &Target, bytes: &[u8]) -> StoreResult<()> {
        let tmp = t.parent.join(format!(
            ".{}.json.tmp-{}-{:016x}",
            t.stem,
            std::process::id(),
            rand::random::<u64>()
        ));
        if let Err(e) = write_new_synced(&tmp, bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_err("write", &tmp, &e));
        }
        if let Err(e) = fs::rename(&tmp, &t.file) {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_err("rename into", &t.file, &e));
        }
        File::open(&t.parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io_err("sync directory", &t.parent, &e))
    }

    /// Proves a write to `dir` (or to `t` below it) would succeed, and leaves the disk as
    /// it found it: the missing directories are created the way a write creates them
    /// (0700, one by one), a probe file is created and removed in the innermost one, and
    /// every directory the probe created is removed again, innermost first. A directory
    /// another writer put a file into meanwhile stays.
    fn probe_leaving_nothing(&self, t: Option<&Target>) -> StoreResult<()> {
        let mut missing = self.missing_root_dirs()?;
        if let Some(t) = t {
            self.check_no_symlink(t)?;
            missing.extend(t.dirs.iter().filter(|d| !d.exists()).cloned());
        }
        let mut created = Vec::new();
        let mut result = Ok(());
        for d in &missing {
            match fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => created.push(d.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    result = Err(self.io_err("create directory", d, &e));
                    break;
                }
            }
        }
        if result.is_ok() {
            result = match t {
                // Nothing was created through a symlink swapped in meanwhile.
                Some(t) => self
                    .check_no_symlink(t)
                    .and_then(|()| self.probe_in(&t.parent, &t.stem)),
                None => self.probe_in(&self.dir, "keyrotd-health"),
            };
        }
        for d in created.iter().rev() {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                    ) => {}
                Err(e) if result.is_ok() => {
                    result = Err(self.io_err("remove probe directory", d, &e))
                }
                Err(_) => {}
            }
        }
        result
    }

    /// `dir` and those of its ancestors that do not exist, outermost first; an error
    /// when the nearest existing one is not a directory.
    fn missing_root_dirs(&self) -> StoreResult<Vec<PathBuf>> {
        let mut missing = Vec::new();
        let mut p = self.dir.as_path();
        loop {
            match fs::metadata(p) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => {
                    return Err(self.err(
                        StoreErrorKind::InvalidConfig,
                        format!(
                            "{} is not a directory (dir {})",
                            p.display(),
                            self.dir.display()
                        ),
                    ))
                }
                // A file further up: `p`'s parent is no directory (found next round).
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => return Err(self.io_err("inspect", p, &e)),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(p.to_path_buf());
                    match p.parent() {
                        Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                        // A relative `dir` whose first segment is missing: below the
                        // working directory.
                        _ => break,
                    }
                }
                Err(e) => return Err(self.io_err("inspect", p, &e)),
            }
        }
        missing.reverse();
        Ok(missing)
    }

    /// Creates and removes a probe file in `parent`, which exists.
    fn probe_in(&self, parent: &Path, stem: &str) -> StoreResult<()> {
        let probe = parent.join(format!(".{stem}.probe-{:016x}", rand::random::<u64>()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&probe)
            .map_err(|e| self.io_err("write", &probe, &e))?;
        fs::remove_file(&probe).map_err(|e| self.io_err("remove", &probe, &e))
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(FileStore) -> StoreResult<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| {
                self.err(
                    StoreErrorKind::Other,
                    format!("file store task failed: {e}"),
                )
            })?
    }
}

/// Creates `p` (0600, failing if it exists), writes `bytes` and fsyncs it.
fn write_new_synced(p: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Hex SHA-256 of `bytes`: the file store's version.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A version abbreviated for messages.
fn short(v: &Version) -> String {
    if v.is_absent() {
        "absent".into()
    } else {
        v.0.chars().take(12).collect()
    }
}

#[async_trait]
impl SecretStore for FileStore {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    async fn read(&self, path: &str) -> StoreResult<SlotState> {
        let path = path.to_string();
        self.blocking(move |s| s.read_blocking(&path)).await
    }

    async fn apply(
        &self,
        path: &str,
        expected: &Version,
        t: &Transition,
    ) -> StoreResult<SlotState> {
        let (path, expected, t) = (path.to_string(), expected.clone(), t.clone());
        self.blocking(move |s| s.apply_blocking(&path, &expected, &t))
            .await
    }

    async fn read_consumer(&self, path: &str) -> StoreResult<ConsumerDoc> {
        let path = path.to_string();
        self.blocking(move |s| s.read_consumer_blocking(&path))
            .await
    }

    async fn write_consumer(
        &self,
        path: &str,
        record: Option<&SecretRecord>,
        expected: &Version,
    ) -> StoreResult<Version> {
        let (path, record, expected) = (path.to_string(), record.cloned(), expected.clone());
        self.blocking(move |s| s.write_consumer_blocking(&path, record.as_ref(), &expected))
            .await
    }

    async fn health(&self) -> StoreResult<()> {
        self.blocking(|s| s.probe_leaving_nothing(None)).await
    }

    async fn probe_write(&self, path: &str) -> StoreResult<()> {
        let path = path.to_string();
        self.blocking(move |s| {
            let t = s.target(&path)?;
            s.probe_leaving_nothing(Some(&t))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> FileStore {
        FileStore::new(
            "local",
            &FileConfig {
                dir: dir.to_path_buf(),
            },
        )
        .unwrap()
    }

    #[test]
    fn targets_stay_below_dir() {
        let s = store(Path::new("/srv/k"));
        let t = s.target("openai/proj/sa").unwrap();
        assert_eq!(t.file, Path::new("/srv/k/openai/proj/sa.json"));
        assert_eq!(t.lock, Path::new("/srv/k/openai/proj/.sa.lock"));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "a//b",
            "./a",
            "a/.hidden",
            "a\n",
        ] {
            let e = s.target(bad).unwrap_err();
            assert_eq!(e.kind, StoreErrorKind::InvalidConfig, "{bad:?}");
        }
    }

    #[test]
    fn version_is_content_hash() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
