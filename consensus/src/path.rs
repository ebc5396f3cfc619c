//! `NsPath`: a namespace path that cannot hold an invalid value.

use std::fmt;

use serde::{Deserialize, Serialize};
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// The first segment reserved for synod's own files.
pub const RESERVED_PREFIX: &str = ".synod";

/// Longest path accepted, in bytes (after normalisation).
pub const MAX_PATH_BYTES: usize = 4096;

/// A relative, `/`-separated, NFC-normalised path inside the synced folder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NsPath(String);

/// The rule a rejected path broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathRule {
    /// The path is empty.
    Empty,
    /// Starts with `/`.
    Absolute,
    /// Contains `//` or ends with `/`.
    EmptySegment,
    /// Has a `.` segment.
    DotSegment,
    /// Has a `..` segment.
    DotDotSegment,
    /// Contains a NUL byte.
    Nul,
    /// First segment is `.synod`.
    Reserved,
    /// Longer than [`MAX_PATH_BYTES`].
    TooLong,
}

impl fmt::Display for PathRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathRule::Empty => "must not be empty",
            PathRule::Absolute => "must be relative",
            PathRule::EmptySegment => "must not have empty segments",
            PathRule::DotSegment => "must not have `.` segments",
            PathRule::DotDotSegment => "must not have `..` segments",
            PathRule::Nul => "must not contain NUL",
            PathRule::Reserved => "must not start with the reserved `.synod` segment",
            PathRule::TooLong => "must not exceed 4096 bytes",
        })
    }
}

/// A path that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path {path:?}: {rule}")]
#[non_exhaustive]
pub struct PathError {
    /// The offending input.
    pub path: String,
    /// What it broke.
    pub rule: PathRule,
}

impl NsPath {
    /// Validates and NFC-normalises `s`.
    pub fn parse(s: &str) -> Result<NsPath, PathError> {
        let err = |rule| PathError {
            path: s.to_owned(),
            rule,
        };
        // Most paths are already NFC (all ASCII ones are): skip the rewrite.
        let n: String = if s.is_ascii() || is_nfc_quick(s.chars()) == IsNormalized::Yes {
            s.to_owned()
        } else {
            s.nfc().collect()
        };
        if n.is_empty() {
            return Err(err(PathRule::Empty));
        }
        if n.len() > MAX_PATH_BYTES {
            return Err(err(PathRule::TooLong));
        }
        if n.contains('\0') {
            return Err(err(PathRule::Nul));
        }
        if n.starts_with('/') {
            return Err(err(PathRule::Absolute));
        }
        for (i, seg) in n.split('/').enumerate() {
            match seg {
                "" => return Err(err(PathRule::EmptySegment)),
                "." => return Err(err(PathRule::DotSegment)),
                ".." => return Err(err(PathRule::DotDotSegment)),
                RESERVED_PREFIX if i == 0 => return Err(err(PathRule::Reserved)),
                _ => {}
            }
        }
        Ok(NsPath(n))
    }

    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key under which two paths that differ only by case collide on a
    /// case-insensitive filesystem (Unicode lower case of the NFC form).
    pub fn case_fold_key(&self) -> String {
        case_fold_key(&self.0)
    }
}

/// Case-fold key of a path: equal keys mean the paths collide on
/// case-insensitive filesystems.
pub fn case_fold_key(path: &str) -> String {
    path.nfc().flat_map(char::to_lowercase).collect()
}

/// Groups of paths (two or more) that differ only by case.
pub fn case_collisions<'a>(paths: impl IntoIterator<Item = &'a NsPath>) -> Vec<Vec<NsPath>> {
    let mut by_key: std::collections::BTreeMap<String, Vec<NsPath>> = Default::default();
    for p in paths {
        by_key.entry(p.case_fold_key()).or_default().push(p.clone());
    }
    by_key.into_values().filter(|v| v.len() > 1).collect()
}

impl fmt::Display for NsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NsPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        NsPath::parse(&s)
    }
}

impl From<NsPath> for String {
    fn from(p: NsPath) -> String {
        p.0
    }
}

impl std::str::FromStr for NsPath {
    type Err = PathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NsPath::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules() {
        let bad = [
            ("", PathRule::Empty),
            ("/a", PathRule::Absolute),
            ("a//b", PathRule::EmptySegment),
            ("a/", PathRule::EmptySegment),
            ("a/./b", PathRule::DotSegment),
            ("a/../b", PathRule::DotDotSegment),
            ("..", PathRule::DotDotSegment),
            ("a\0b", PathRule::Nul),
            (".synod/x", PathRule::Reserved),
            (".synod", PathRule::Reserved),
        ];
        for (p, rule) in bad {
            let e = NsPath::parse(p).expect_err(p);
            assert_eq!(e.rule, rule, "{p:?}");
            assert!(e.to_string().contains(&format!("{p:?}")), "{e}");
        }
        for ok in ["a", "a/b.txt", "x/.synod", ".synodx/y", "a/.hidden", "..a"] {
            assert_eq!(NsPath::parse(ok).expect(ok).as_str(), ok);
        }
        assert!(NsPath::parse(&"a".repeat(MAX_PATH_BYTES + 1)).is_err());
    }

    #[test]
    fn nfc_normalised() {
        let decomposed = "cafe\u{301}";
        let p = NsPath::parse(decomposed).expect("valid");
        assert_eq!(p.as_str(), "caf\u{e9}");
        assert_eq!(p, NsPath::parse("caf\u{e9}").expect("valid"));
    }

    #[test]
    fn serde_revalidates() {
        let bytes = crate::codec::encode(&"../etc".to_string());
        assert!(crate::codec::decode::<NsPath>("path", &bytes).is_err());
        let bytes = crate::codec::encode(&"a/b".to_string());
        let p: NsPath = crate::codec::decode("path", &bytes).expect("valid");
        assert_eq!(p.as_str(), "a/b");
    }

    #[test]
    fn case_collisions_are_reported() {
        let ps: Vec<NsPath> = ["A/b", "a/B", "c"]
            .iter()
            .map(|s| NsPath::parse(s).expect("valid"))
            .collect();
        let groups = case_collisions(&ps);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].len(), 2);
    }

    proptest! {
        #[test]
        fn parse_is_idempotent_and_valid(s in "[a-zA-Z0-9./\u{301}\u{e9} _-]{0,40}") {
            if let Ok(p) = NsPath::parse(&s) {
                let again = NsPath::parse(p.as_str()).expect("a parsed path re-parses");
                prop_assert_eq!(&again, &p);
                prop_assert!(!p.as_str().starts_with('/'));
                prop_assert!(p.as_str().split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
                prop_assert!(p.as_str().split('/').next() != Some(RESERVED_PREFIX));
            }
        }

        #[test]
        fn joined_valid_segments_parse(segs in proptest::collection::vec("[a-z0-9_]{1,8}", 1..6)) {
            let s = segs.join("/");
            let p = NsPath::parse(&s).expect("valid");
            prop_assert_eq!(p.as_str(), s.as_str());
        }

        #[test]
        fn case_fold_is_case_insensitive(s in "[a-zA-Z]{1,12}") {
            let a = NsPath::parse(&s).expect("valid");
            let b = NsPath::parse(&s.to_uppercase()).expect("valid");
            prop_assert_eq!(a.case_fold_key(), b.case_fold_key());
        }
    }
}
