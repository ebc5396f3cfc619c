//! Names for conflict copies: `name.sync-conflict-<utc>-<node>.ext`.

use std::time::SystemTime;

/// The conflict copy name of `path` for `node` at `when`, beside the original.
/// [`conflict_name`], with `-2`, `-3`… appended while that name is taken in
/// `folder` (two conflicts of one path within a second must not collide).
pub fn free_conflict_name(
    folder: &std::path::Path,
    path: &str,
    node: u64,
    when: SystemTime,
) -> String {
    (1u32..)
        .map(|n| numbered(path, node, when, n))
        .find(|name| std::fs::symlink_metadata(folder.join(name)).is_err())
        .expect("some suffix is free")
}

pub fn conflict_name(path: &str, node: u64, when: SystemTime) -> String {
    numbered(path, node, when, 1)
}

/// The `n`th conflict name of `path` in one second (`-n` after the node).
fn numbered(path: &str, node: u64, when: SystemTime, n: u32) -> String {
    let node = if n > 1 {
        format!("{node}-{n}")
    } else {
        node.to_string()
    };
    let secs = when
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let stamp = utc_stamp(secs);
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    // A leading dot is part of the name, not an extension.
    match file.rfind('.').filter(|&i| i > 0) {
        Some(i) => format!(
            "{dir}{}.sync-conflict-{stamp}-{node}{}",
            &file[..i],
            &file[i..]
        ),
        None => format!("{dir}{file}.sync-conflict-{stamp}-{node}"),
    }
}

/// True if the last component of `path` is a conflict copy's name.
pub fn is_conflict_copy(path: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.contains(".sync-conflict-")
}

/// `YYYYMMDD-HHMMSS` in UTC (civil-from-days, Howard Hinnant's algorithm).
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(utc_stamp(1_795_000_000), "20261118-110640");
        assert_eq!(
            conflict_name("docs/report.final.pdf", 2, t),
            "docs/report.final.sync-conflict-20261118-110640-2.pdf"
        );
        assert_eq!(
            conflict_name("Makefile", 3, t),
            "Makefile.sync-conflict-20261118-110640-3"
        );
        assert_eq!(
            conflict_name("a/.bashrc", 1, t),
            "a/.bashrc.sync-conflict-20261118-110640-1"
        );
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert!(is_conflict_copy(&conflict_name("a/b.txt", 2, t)));
        assert!(is_conflict_copy(&conflict_name("Makefile", 2, t)));
        assert!(!is_conflict_copy("a.sync-conflict-x/b.txt"));
        assert!(!is_conflict_copy("notes.txt"));
    }

    #[test]
    fn a_second_conflict_in_the_same_second_gets_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_763_463_600);
        let first = free_conflict_name(dir.path(), "d/a.txt", 3, t);
        assert_eq!(first, conflict_name("d/a.txt", 3, t));
        std::fs::create_dir_all(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join(&first), b"one").unwrap();
        let second = free_conflict_name(dir.path(), "d/a.txt", 3, t);
        assert_ne!(second, first);
        assert!(second.ends_with("-3-2.txt"), "{second}");
        assert!(is_conflict_copy(&second));
    }
}
