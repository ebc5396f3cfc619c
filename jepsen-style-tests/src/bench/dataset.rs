//! The benchmark's seeded dataset (one large random file and many small
//! ones), the edit set applied to it, and the checks that a receiving
//! folder holds exactly the expected files.
//!
//! Every tool reads the same bytes: the dataset is written once, and each
//! run's source folder is filled with hard links to it (same filesystem,
//! nothing copied). Tools only read their source, and edits always write a
//! new file and rename it into place, so the shared inodes never change.
//! Files appear in a source folder by `rename`, so a tool's clock starts
//! when the whole tree is there.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Sizes of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetSpec {
    pub big_bytes: u64,
    pub small_files: usize,
    pub small_min: u64,
    pub small_max: u64,
    pub seed: u64,
}

/// Directory names the tools keep inside a synced folder: never counted.
pub const TOOL_DIRS: [&str; 4] = [".synod", ".stfolder", ".stversions", ".stignore"];

/// The expected content of a folder: path → (size, BLAKE3).
pub type Expected = BTreeMap<String, (u64, blake3::Hash)>;

/// A dataset on disk.
#[derive(Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub spec: DatasetSpec,
    pub files: Expected,
}

/// The seeded sizes of the small files.
pub fn small_sizes(spec: &DatasetSpec) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x5a11_f11e);
    (0..spec.small_files)
        .map(|_| rng.gen_range(spec.small_min..=spec.small_max))
        .collect()
}

/// Path of small file `i`.
pub fn small_path(i: usize) -> String {
    format!("small/{i:05}.bin")
}

pub const BIG: &str = "big.bin";

impl Dataset {
    /// Writes the dataset under `root` (removed first).
    pub fn generate(root: &Path, spec: DatasetSpec) -> Result<Dataset> {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root.join("small"))
            .with_context(|| format!("creating {}", root.display()))?;
        let mut files = Expected::new();
        let mut rng = StdRng::seed_from_u64(spec.seed);
        // Dated a day back, so an edit is newer by its mtime alone, even
        // to a tool that compares whole seconds (rsync's quick check).
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
        let h = write_random(&root.join(BIG), spec.big_bytes, &mut rng)?;
        set_mtime(&root.join(BIG), past)?;
        files.insert(BIG.to_string(), (spec.big_bytes, h));
        for (i, size) in small_sizes(&spec).into_iter().enumerate() {
            let path = small_path(i);
            let h = write_random(&root.join(&path), size, &mut rng)?;
            set_mtime(&root.join(&path), past)?;
            files.insert(path, (size, h));
        }
        Ok(Dataset {
            root: root.to_path_buf(),
            spec,
            files,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.files.values().map(|(s, _)| s).sum()
    }

    /// Hard-links every file of the dataset into `dest` (created), copying
    /// where a link is impossible.
    pub fn link_into(&self, dest: &Path) -> Result<()> {
        link_files(&self.root, dest, self.files.keys())
    }
}

/// Hard-links (or copies) `paths` from `from` to `to`.
pub fn link_files<'a>(
    from: &Path,
    to: &Path,
    paths: impl Iterator<Item = &'a String>,
) -> Result<()> {
    for p in paths {
        let src = from.join(p);
        let dst = to.join(p);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Moves every top-level entry of `stage` into `folder` by rename (the
/// "drop": the tree appears at once).
pub fn drop_into(stage: &Path, folder: &Path) -> Result<()> {
    for e in std::fs::read_dir(stage).with_context(|| format!("listing {}", stage.display()))? {
        let e = e?;
        let to = folder.join(e.file_name());
        if e.file_type()?.is_dir() && to.is_dir() {
            drop_into(&e.path(), &to)?;
        } else {
            std::fs::rename(e.path(), &to)
                .with_context(|| format!("moving {} to {}", e.path().display(), to.display()))?;
        }
    }
    Ok(())
}

/// The edit set: 100 bytes inserted at the start of the big file, 10 small
/// files modified (100 bytes in the middle), 5 deleted, 5 added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditPlan {
    pub head: Vec<u8>,
    /// (path, offset, new bytes).
    pub modify: Vec<(String, u64, Vec<u8>)>,
    pub delete: Vec<String>,
    /// (path, size, seed of its content).
    pub add: Vec<(String, u64, u64)>,
}

impl EditPlan {
    /// The seeded plan for `spec` (needs at least 20 small files).
    pub fn new(spec: &DatasetSpec) -> Result<EditPlan> {
        let n = spec.small_files;
        ensure!(n >= 20, "the edit set needs at least 20 small files");
        let sizes = small_sizes(spec);
        let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x5eed_ed17);
        let mut head = vec![0u8; 100];
        rng.fill_bytes(&mut head);
        let modify = (0..10)
            .map(|i| {
                let idx = 1 + i * (n / 20);
                let size = sizes[idx];
                let len = size.min(100);
                let at = (size / 2).saturating_sub(len / 2);
                let mut bytes = vec![0u8; len as usize];
                rng.fill_bytes(&mut bytes);
                (small_path(idx), at, bytes)
            })
            .collect();
        // From the second half: never one of the modified files.
        let delete = (0..5)
            .map(|i| small_path(n / 2 + 1 + i * (n / 20)))
            .collect();
        let add = (0..5)
            .map(|i| {
                (
                    format!("small/added-{i}.bin"),
                    rng.gen_range(spec.small_min..=spec.small_max),
                    rng.next_u64(),
                )
            })
            .collect();
        Ok(EditPlan {
            head,
            modify,
            delete,
            add,
        })
    }
}

/// The edited files, written once beside the dataset, and what a folder
/// holds after the edit.
#[derive(Debug)]
pub struct Edited {
    pub root: PathBuf,
    pub plan: EditPlan,
    /// Files written (replaced or added) by the edit.
    pub written: Vec<String>,
    pub after: Expected,
}

impl Edited {
    /// Writes the new versions of the edited files under `root`.
    pub fn prepare(data: &Dataset, plan: EditPlan, root: &Path) -> Result<Edited> {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root.join("small"))
            .with_context(|| format!("creating {}", root.display()))?;
        let mut after = data.files.clone();
        let mut written = Vec::new();
        {
            let out_path = root.join(BIG);
            let mut out = std::io::BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(&out_path)
                    .with_context(|| format!("creating {}", out_path.display()))?,
            );
            out.write_all(&plan.head)?;
            let mut src = std::fs::File::open(data.root.join(BIG))?;
            std::io::copy(&mut src, &mut out)?;
            out.flush()?;
            drop(out);
            let size = data.spec.big_bytes + plan.head.len() as u64;
            after.insert(BIG.to_string(), (size, hash_file(&out_path)?));
            written.push(BIG.to_string());
        }
        for (path, at, bytes) in &plan.modify {
            let mut content = std::fs::read(data.root.join(path))
                .with_context(|| format!("reading {path} of the dataset"))?;
            let at = *at as usize;
            content[at..at + bytes.len()].copy_from_slice(bytes);
            std::fs::write(root.join(path), &content)?;
            after.insert(path.clone(), (content.len() as u64, blake3::hash(&content)));
            written.push(path.clone());
        }
        for path in &plan.delete {
            after.remove(path);
        }
        for (path, size, seed) in &plan.add {
            let mut rng = StdRng::seed_from_u64(*seed);
            let h = write_random(&root.join(path), *size, &mut rng)?;
            after.insert(path.clone(), (*size, h));
            written.push(path.clone());
        }
        Ok(Edited {
            root: root.to_path_buf(),
            plan,
            written,
            after,
        })
    }

    /// Links the edited files into `stage` (on the source folder's
    /// filesystem), ready for [`Edited::apply`].
    pub fn stage(&self, stage: &Path) -> Result<()> {
        link_files(&self.root, stage, self.written.iter())
    }

    /// Applies the edit to `folder`: staged files renamed over their
    /// targets, deleted files removed.
    pub fn apply(&self, stage: &Path, folder: &Path) -> Result<()> {
        drop_into(stage, folder)?;
        for p in &self.plan.delete {
            std::fs::remove_file(folder.join(p))
                .with_context(|| format!("deleting {p} in {}", folder.display()))?;
        }
        Ok(())
    }
}

fn set_mtime(path: &Path, t: std::time::SystemTime) -> Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(t))
        .with_context(|| format!("setting the mtime of {}", path.display()))
}

fn write_random(path: &Path, size: u64, rng: &mut StdRng) -> Result<blake3::Hash> {
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(hasher.finalize())
}

pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Regular files under `dir` (relative, `/`-separated), outside the tools'
/// own directories.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            let name = e.file_name();
            if TOOL_DIRS.iter().any(|t| name == *t) {
                continue;
            }
            let t = e.file_type()?;
            if t.is_dir() {
                walk(root, &e.path(), out)?;
            } else {
                let rel = e.path();
                let rel = rel.strip_prefix(root).unwrap_or(&rel);
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// `folder` holds exactly `expected`, every file hashing as it should.
pub fn verify_folder(folder: &Path, expected: &Expected) -> Result<()> {
    let present = list_files(folder)?;
    let extra: Vec<&String> = present
        .iter()
        .filter(|p| !expected.contains_key(*p))
        .collect();
    ensure!(
        extra.is_empty(),
        "{} holds files it should not: {:?}",
        folder.display(),
        &extra[..extra.len().min(5)]
    );
    for (path, (size, hash)) in expected {
        let p = folder.join(path);
        let meta = std::fs::metadata(&p)
            .with_context(|| format!("{path} is missing in {}", folder.display()))?;
        ensure!(
            meta.len() == *size,
            "{path} in {} has {} bytes, expected {size}",
            folder.display(),
            meta.len()
        );
        ensure!(
            hash_file(&p)? == *hash,
            "{path} in {} differs from its source",
            folder.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DatasetSpec {
        DatasetSpec {
            big_bytes: 300_000,
            small_files: 40,
            small_min: 1024,
            small_max: 8192,
            seed: 7,
        }
    }

    #[test]
    fn the_same_seed_writes_the_same_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Dataset::generate(&dir.path().join("a"), spec()).expect("a");
        let b = Dataset::generate(&dir.path().join("b"), spec()).expect("b");
        assert_eq!(a.files, b.files);
        assert_eq!(a.files.len(), 41);
        let other = DatasetSpec { seed: 8, ..spec() };
        let c = Dataset::generate(&dir.path().join("c"), other).expect("c");
        assert_ne!(a.files, c.files);
        verify_folder(&a.root, &b.files).expect("a holds what b expects");
        for (p, (size, _)) in &a.files {
            if p != BIG {
                assert!((1024..=8192).contains(size), "{p}: {size}");
            }
        }
    }

    #[test]
    fn the_edit_set_changes_what_it_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = Dataset::generate(&dir.path().join("data"), spec()).expect("data");
        let plan = EditPlan::new(&data.spec).expect("plan");
        assert_eq!(plan, EditPlan::new(&data.spec).expect("again"));
        assert_eq!(
            (plan.modify.len(), plan.delete.len(), plan.add.len()),
            (10, 5, 5)
        );
        for (p, _, _) in &plan.modify {
            assert!(!plan.delete.contains(p), "{p} both modified and deleted");
        }
        let edited = Edited::prepare(&data, plan, &dir.path().join("edited")).expect("edit");
        assert_eq!(edited.after.len(), data.files.len());
        assert_eq!(edited.after[BIG].0, data.spec.big_bytes + 100);

        let folder = dir.path().join("folder");
        let stage = dir.path().join("stage");
        data.link_into(&stage).expect("stage");
        std::fs::create_dir_all(&folder).expect("folder");
        drop_into(&stage, &folder).expect("drop");
        verify_folder(&folder, &data.files).expect("dropped");
        edited.stage(&stage).expect("stage edits");
        edited.apply(&stage, &folder).expect("apply");
        verify_folder(&folder, &edited.after).expect("edited");
        // The dataset itself is untouched.
        verify_folder(&data.root, &data.files).expect("dataset intact");
        assert!(verify_folder(&folder, &data.files).is_err());
    }
}
