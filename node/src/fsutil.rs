//! Crash-safe file placement in the synced folder: temp file under
//! `.synod/tmp/` on the same filesystem, fsync, rename, fsync the directory.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where temp files live inside the folder (never synced: `.synod/` is reserved).
pub fn tmp_dir(folder: &Path) -> PathBuf {
    folder.join(".synod").join("tmp")
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A fresh temp file path under the folder's temp dir.
pub fn temp_path(folder: &Path, purpose: &str) -> io::Result<PathBuf> {
    let dir = tmp_dir(folder);
    // One stat where `create_dir_all` of an existing dir costs two calls.
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir)?;
    }
    let n: u64 = rand::random();
    Ok(dir.join(format!("{purpose}-{n:016x}")))
}

/// Renames the fsynced `tmp` over `target` (creating parents) and fsyncs the
/// target's directory, so after a crash either the old or the new file is
/// there, never a torn one.
pub fn place(tmp: &Path, target: &Path) -> io::Result<()> {
    rename_into(tmp, target)?;
    fsync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Renames `tmp` over `target`, creating its parents; durable only once
/// the caller syncs the target's directory (or its filesystem).
pub fn rename_into(tmp: &Path, target: &Path) -> io::Result<()> {
    rename_making_parents(tmp, target, rustix::fs::RenameFlags::empty())
}

/// [`rename_into`] that never replaces: fails (`AlreadyExists`) if anything
/// is at `target`, checked by the rename itself rather than a stat before.
pub fn rename_new(tmp: &Path, target: &Path) -> io::Result<()> {
    rename_making_parents(tmp, target, rustix::fs::RenameFlags::NOREPLACE)
}

fn rename_making_parents(
    tmp: &Path,
    target: &Path,
    flags: rustix::fs::RenameFlags,
) -> io::Result<()> {
    use rustix::fs::{renameat_with, CWD};
    let rename = || renameat_with(CWD, tmp, CWD, target, flags);
    // Parents are usually there: made only when the rename says they are not.
    match rename() {
        Err(e) if e == rustix::io::Errno::NOENT => {
            std::fs::create_dir_all(target.parent().unwrap_or(Path::new(".")))?;
            Ok(rename()?)
        }
        done => Ok(done?),
    }
}

/// Where a link target with manifest `m` is kept, relative to the folder.
pub fn link_target_rel(m: &synod_chunker::Manifest) -> PathBuf {
    Path::new(".synod").join("links").join(m.root().to_string())
}

/// Keeps `target` (a link's content) durably under `.synod/links/`, where
/// the chunk index can serve it. Returns its absolute path.
pub fn keep_link_target(
    folder: &Path,
    m: &synod_chunker::Manifest,
    target: &[u8],
) -> io::Result<PathBuf> {
    let kept = folder.join(link_target_rel(m));
    if std::fs::read(&kept).is_ok_and(|b| b == target) {
        return Ok(kept);
    }
    let tmp = temp_path(folder, "link")?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, target)?;
        f.sync_all()?;
    }
    place(&tmp, &kept)?;
    Ok(kept)
}

/// Removes leftover temp files of an earlier run.
pub fn sweep_tmp(folder: &Path) -> io::Result<usize> {
    let dir = tmp_dir(folder);
    let mut removed = 0;
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries {
                std::fs::remove_file(entry?.path())?;
                removed += 1;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

/// (mtime in ns, inode) of a file, to notice edits behind our back. A
/// directory's mtime moves with every entry added or removed inside it, so
/// only its inode counts.
pub fn stamp(meta: &std::fs::Metadata) -> (i64, u64) {
    if meta.is_dir() {
        return (0, meta.ino());
    }
    (meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), meta.ino())
}

/// The size compared with local records: a file's length, a link's target
/// length, zero for a directory.
pub fn size_of(meta: &std::fs::Metadata) -> u64 {
    if meta.is_dir() {
        0
    } else {
        meta.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_and_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = temp_path(dir.path(), "t").unwrap();
        std::fs::write(&tmp, b"x").unwrap();
        place(&tmp, &dir.path().join("a/b/c.txt")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/b/c.txt")).unwrap(), b"x");
        let left = temp_path(dir.path(), "t").unwrap();
        std::fs::write(&left, b"torn").unwrap();
        assert_eq!(sweep_tmp(dir.path()).unwrap(), 1);
        assert!(!left.exists());
    }

    #[test]
    fn a_new_placement_makes_parents_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("d/e/new.txt");
        let tmp = temp_path(dir.path(), "t").unwrap();
        std::fs::write(&tmp, b"ours").unwrap();
        rename_new(&tmp, &target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"ours");
        let again = temp_path(dir.path(), "t").unwrap();
        std::fs::write(&again, b"theirs").unwrap();
        let e = rename_new(&again, &target).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&target).unwrap(), b"ours");
        assert_eq!(std::fs::read(&again).unwrap(), b"theirs");
    }
}
