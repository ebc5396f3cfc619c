//! Errors of node operations, as the API and CLI report them.

use synod_consensus::Entry;

/// Why a client operation failed. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("{0}")]
    BadPath(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("no entry at {0}")]
    NotFound(String),
    #[error("precondition failed for {path}")]
    Conflict {
        path: String,
        current: Option<Box<Entry>>,
    },
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no quorum: {0}")]
    Unavailable(String),
    #[error("this node is not the leader (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotLeader { leader: Option<u64> },
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            NodeError::BadPath(_) => "bad_path",
            NodeError::BadRequest(_) => "bad_request",
            NodeError::NotFound(_) => "not_found",
            NodeError::Conflict { .. } => "conflict",
            NodeError::TooLarge { .. } => "too_large",
            NodeError::Unavailable(_) => "unavailable",
            NodeError::NotLeader { .. } => "not_leader",
            NodeError::Internal(_) => "internal",
        }
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> NodeError {
        NodeError::Internal(format!("{context}: {err}"))
    }
}
