//! Names for conflict copies: `name.sync-conflict-<utc>-<node>.ext`.

use std::time::SystemTime;

/// The conflict copy name of `path` for `node` at `when`, beside the original.
pub fn conflict_name(path: &str, node: u64, when: SystemTime) -> String {
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
    }
}
