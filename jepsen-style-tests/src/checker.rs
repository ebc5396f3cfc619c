//! Independent checkers over a recorded history and the nodes' final state.
//! Each returns a [`Finding`]: valid, invalid (with the smallest
//! counterexample it found) or unknown (it could not decide, and says why).

pub mod convergence;
pub mod files;
pub mod folder;
pub mod linearizable;
pub mod lost_writes;

use serde::{Deserialize, Serialize};

/// What a checker concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Valid,
    Invalid,
    /// Not decided (search budget exhausted, cluster never recovered, ...).
    Unknown,
}

/// One checker's result, for the summary and `report.html`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub checker: String,
    pub verdict: Verdict,
    /// One line for the summary.
    pub summary: String,
    /// The counterexample or the reason for `unknown`, one item per line.
    pub details: Vec<String>,
}

impl Finding {
    pub fn valid(checker: &str, summary: String) -> Finding {
        Finding {
            checker: checker.to_string(),
            verdict: Verdict::Valid,
            summary,
            details: Vec::new(),
        }
    }
}

/// The worst verdict of a set: invalid beats unknown beats valid.
pub fn overall(findings: &[Finding]) -> Verdict {
    if findings.iter().any(|f| f.verdict == Verdict::Invalid) {
        Verdict::Invalid
    } else if findings.iter().any(|f| f.verdict == Verdict::Unknown) {
        Verdict::Unknown
    } else {
        Verdict::Valid
    }
}
