//! Convergence: after healing and a quiet period, every node's folder holds
//! exactly the committed namespace: the same paths, sizes and permission
//! bits, and bytes equal to the committed content (compared by BLAKE3 of the
//! bytes fetched from the leader, since the committed root is a Merkle root
//! over chunks, not a plain hash); and nothing left in `.synod/tmp/`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Finding, Verdict};

pub const CHECKER: &str = "convergence";

/// One regular file as seen on disk or as committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub size: u64,
    /// Permission bits (`mode & 0o777`); `None` when not known.
    pub mode: Option<u32>,
    /// BLAKE3 hex of the bytes.
    pub digest: String,
}

/// What one node's folder holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFolder {
    pub node: u64,
    pub files: BTreeMap<String, FileState>,
    /// Files left under `.synod/tmp/`.
    pub temp_files: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Walks `folder` (skipping `.synod/` except to list its `tmp/`).
pub fn scan_folder(node: u64, folder: &Path) -> Result<NodeFolder, ScanError> {
    let mut out = NodeFolder {
        node,
        files: BTreeMap::new(),
        temp_files: Vec::new(),
    };
    let tmp = folder.join(".synod").join("tmp");
    if tmp.is_dir() {
        walk(&tmp, &tmp, &mut |rel, _| {
            out.temp_files.push(rel.to_string());
            Ok(())
        })?;
    }
    walk(folder, folder, &mut |rel, path| {
        if rel == ".synod" || rel.starts_with(".synod/") {
            return Ok(());
        }
        let bytes = std::fs::read(path).map_err(|source| ScanError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mode = std::fs::metadata(path).ok().map(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & 0o777
        });
        out.files.insert(
            rel.to_string(),
            FileState {
                size: bytes.len() as u64,
                mode,
                digest: blake3::hash(&bytes).to_hex().to_string(),
            },
        );
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f(relative path, full path)` for every regular file under `dir`.
fn walk(
    root: &Path,
    dir: &Path,
    f: &mut dyn FnMut(&str, &Path) -> Result<(), ScanError>,
) -> Result<(), ScanError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ScanError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        let rel = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .unwrap_or_default();
        if ft.is_dir() {
            if rel == ".synod" {
                continue;
            }
            walk(root, &path, f)?;
        } else if ft.is_file() {
            f(&rel, &path)?;
        }
    }
    Ok(())
}

/// Compares every node's folder with the committed files.
pub fn check(committed: &BTreeMap<String, FileState>, nodes: &[NodeFolder]) -> Finding {
    let mut problems = Vec::new();
    for n in nodes {
        for (path, want) in committed {
            match n.files.get(path) {
                None => problems.push(format!("node {}: {path} missing", n.node)),
                Some(have) => {
                    if have.size != want.size {
                        problems.push(format!(
                            "node {}: {path} has {} bytes, committed {}",
                            n.node, have.size, want.size
                        ));
                    } else if have.digest != want.digest {
                        problems.push(format!(
                            "node {}: {path} bytes differ from the committed content",
                            n.node
                        ));
                    }
                    if let (Some(a), Some(b)) = (have.mode, want.mode) {
                        if a != b {
                            problems.push(format!(
                                "node {}: {path} mode {a:o}, committed {b:o}",
                                n.node
                            ));
                        }
                    }
                }
            }
        }
        for path in n.files.keys().filter(|p| !committed.contains_key(*p)) {
            problems.push(format!(
                "node {}: {path} is not in the committed namespace",
                n.node
            ));
        }
        for t in &n.temp_files {
            problems.push(format!("node {}: temp file left: .synod/tmp/{t}", n.node));
        }
    }
    if problems.is_empty() {
        Finding::valid(
            CHECKER,
            format!(
                "{} nodes hold the {} committed files",
                nodes.len(),
                committed.len()
            ),
        )
    } else {
        Finding {
            checker: CHECKER.into(),
            verdict: Verdict::Invalid,
            summary: format!(
                "{} differences between folders and the namespace",
                problems.len()
            ),
            details: problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: &[u8]) -> FileState {
        FileState {
            size: bytes.len() as u64,
            mode: Some(0o644),
            digest: blake3::hash(bytes).to_hex().to_string(),
        }
    }

    #[test]
    fn scanned_folder_matching_the_namespace_converges() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/.synod")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join(".synod/tmp")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/x"), b"hello").expect("write");
        let node = scan_folder(1, dir.path()).expect("scan");
        let committed: BTreeMap<String, FileState> = [(
            "sub/x".to_string(),
            FileState {
                mode: None,
                ..file(b"hello")
            },
        )]
        .into();
        let f = check(&committed, &[node]);
        assert_eq!(f.verdict, Verdict::Valid, "{:?}", f.details);
    }

    #[test]
    fn differences_are_each_reported() {
        let committed: BTreeMap<String, FileState> =
            [("a".into(), file(b"one")), ("b".into(), file(b"two"))].into();
        let node = NodeFolder {
            node: 2,
            files: [("a".into(), file(b"uno")), ("c".into(), file(b"x"))].into(),
            temp_files: vec!["chunk-1".into()],
        };
        let f = check(&committed, &[node]);
        assert_eq!(f.verdict, Verdict::Invalid);
        let all = f.details.join("\n");
        assert!(all.contains("a bytes differ"), "{all}");
        assert!(all.contains("b missing"), "{all}");
        assert!(all.contains("c is not in the committed"), "{all}");
        assert!(all.contains("temp file left"), "{all}");
    }

    #[test]
    fn leftover_temp_files_are_found_by_the_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join(".synod/tmp")).expect("mkdir");
        std::fs::write(dir.path().join(".synod/tmp/part"), b"x").expect("write");
        let node = scan_folder(1, dir.path()).expect("scan");
        assert_eq!(node.temp_files, vec!["part".to_string()]);
        assert!(node.files.is_empty());
    }
}
