//! Files other programs read while keyrotd replaces them (`report --output`,
//! `once --metrics-textfile`): written whole or not at all.

use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory
/// (`.tmp` plus random characters, which readers that pick files by suffix, like
/// node_exporter's `*.prom`, skip), given `mode` whatever the umask, synced, then
/// renamed over `path`, so a reader sees the old file or the new one, never half of
/// one. The temporary file is removed on failure.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    #[cfg(unix)]
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    #[cfg(not(unix))]
    let _ = mode;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
