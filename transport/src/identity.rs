//! The node's Ed25519 identity: one keypair in the data directory, created
//! on first use, protobuf-encoded, mode 0600, the same `PeerId` forever after.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::{KeyType, Keypair};
use libp2p::PeerId;

/// File name of the key inside the data directory.
pub const KEY_FILE: &str = "node.key";

/// Why the node identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("cannot create data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "key file {path} has mode {mode:o}: others may read the node's private key; \
         run `chmod 600 {path}` if nobody else had access, otherwise delete it so a new \
         identity is created and replace this node's peer id in the cluster"
    )]
    Insecure { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} is not a valid libp2p key ({reason}); restore it from a backup, \
         or delete it so a new identity is created and replace this node's peer id in the cluster"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// Loads the node's keypair from `data_dir/node.key`, creating it (and the
/// directory) if absent.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(KEY_FILE);
    match fs::symlink_metadata(&path) {
        Ok(_) => load_identity(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_identity(data_dir, &path),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

/// Loads an existing key file, refusing one that others may read.
pub fn load_identity(path: &Path) -> Result<Keypair, IdentityError> {
    let read_err = |source| IdentityError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Insecure {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = fs::read(path).map_err(read_err)?;
    let corrupt = |reason: String| IdentityError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if key.key_type() != KeyType::Ed25519 {
        return Err(corrupt(format!(
            "{:?} key, expected Ed25519",
            key.key_type()
        )));
    }
    Ok(key)
}

fn create_identity(data_dir: &Path, path: &Path) -> Result<Keypair, IdentityError> {
    fs::create_dir_all(data_dir).map_err(|source| IdentityError::CreateDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .expect("ed25519 keys always encode");
    let write_err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    // Write a temp file created 0600 (never readable by others, not even
    // briefly), fsync it, then rename: a crash leaves no half-written key.
    let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(&bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(write_err)?;
    if let Ok(dir) = fs::File::open(data_dir) {
        dir.sync_all().map_err(write_err)?;
    }
    tracing::info!(peer = %PeerId::from(key.public()), path = %path.display(), "created node identity");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_with_same_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let a = load_or_create_identity(&data).unwrap();
        let mode = fs::metadata(data.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_identity(&data).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert_eq!(b.key_type(), KeyType::Ed25519);
    }

    #[test]
    fn world_or_group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_identity(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = load_or_create_identity(dir.path()).unwrap_err();
            assert!(matches!(err, IdentityError::Insecure { .. }), "{err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn corrupted_key_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        for garbage in [
            &b""[..],
            b"not a key at all",
            &[0x08, 0x01, 0x12, 0x40, 1, 2, 3],
        ] {
            fs::write(&path, garbage).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = load_or_create_identity(dir.path()).unwrap_err();
            assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
            assert!(
                err.to_string().contains("restore it from a backup"),
                "{err}"
            );
            // The corrupt file is left alone: the operator decides.
            assert_eq!(fs::read(&path).unwrap(), garbage);
        }
    }
}
