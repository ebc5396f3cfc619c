//! A small blocking client for synod's HTTP API, classifying every failure
//! by what it tells the checker: a status code (the node answered), a
//! refused connection (the request was certainly not sent), or a transport
//! error after sending (the outcome is unknown).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::checker::convergence::FileState;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{url}: HTTP {code}: {body}")]
    Status {
        url: String,
        code: u16,
        body: String,
    },
    #[error("{url}: connection refused: {message}")]
    Refused { url: String, message: String },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: bad response: {message}")]
    Decode { url: String, message: String },
}

impl ApiError {
    /// The HTTP status, if the node answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the request cannot have reached the node.
    pub fn certainly_not_sent(&self) -> bool {
        matches!(self, ApiError::Refused { .. })
    }
}

/// Precondition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match: version`.
    Version(u64),
    /// `If-None-Match: *`.
    Absent,
}

/// One entry of `GET /v1/files`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Entry {
    pub path: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Debug, Deserialize)]
struct Listing {
    entries: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Written {
    version: u64,
}

/// A client for one node's API.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    /// `api` is `ip:port`; `timeout` bounds every request.
    pub fn new(api: &str, timeout: Duration) -> Api {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2).min(timeout))
            .timeout(timeout)
            .build();
        Api {
            base: format!("http://{api}"),
            agent,
        }
    }

    fn fail(&self, url: &str, e: ureq::Error) -> ApiError {
        match e {
            ureq::Error::Status(code, resp) => ApiError::Status {
                url: url.to_string(),
                code,
                body: resp.into_string().unwrap_or_default(),
            },
            ureq::Error::Transport(t) => {
                if t.kind() == ureq::ErrorKind::ConnectionFailed {
                    ApiError::Refused {
                        url: url.to_string(),
                        message: t.to_string(),
                    }
                } else {
                    ApiError::Transport {
                        url: url.to_string(),
                        message: t.to_string(),
                    }
                }
            }
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        url: &str,
        resp: ureq::Response,
    ) -> Result<T, ApiError> {
        resp.into_json().map_err(|e| ApiError::Decode {
            url: url.to_string(),
            message: e.to_string(),
        })
    }

    /// `GET /v1/status` as raw JSON.
    pub fn status(&self) -> Result<serde_json::Value, ApiError> {
        let url = format!("{}/v1/status", self.base);
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.fail(&url, e))?;
        Self::decode(&url, resp)
    }

    /// `POST /v1/cluster/init`.
    pub fn init_cluster(&self) -> Result<(), ApiError> {
        let url = format!("{}/v1/cluster/init", self.base);
        self.agent
            .post(&url)
            .send_string("")
            .map_err(|e| self.fail(&url, e))?;
        Ok(())
    }

    /// Linearizable read of a file's bytes and version; `None` if absent.
    pub fn read(&self, path: &str) -> Result<Option<(Vec<u8>, u64)>, ApiError> {
        let url = format!("{}/v1/files/{path}?content=1", self.base);
        let resp = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(e) => return Err(self.fail(&url, e)),
        };
        let etag = resp
            .header("etag")
            .unwrap_or("")
            .trim_matches('"')
            .to_string();
        let version = etag.parse::<u64>().map_err(|_| ApiError::Decode {
            url: url.clone(),
            message: format!("ETag {etag:?} is not a version"),
        })?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes).map_err(|e| {
            ApiError::Transport {
                url: url.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(Some((bytes, version)))
    }

    /// `PUT /v1/files/{path}`; returns the committed version.
    pub fn write(&self, path: &str, body: &[u8], pre: Precondition) -> Result<u64, ApiError> {
        let url = format!("{}/v1/files/{path}", self.base);
        let mut req = self.agent.put(&url);
        req = match pre {
            Precondition::None => req,
            Precondition::Version(v) => req.set("If-Match", &v.to_string()),
            Precondition::Absent => req.set("If-None-Match", "*"),
        };
        let resp = req.send_bytes(body).map_err(|e| self.fail(&url, e))?;
        let w: Written = Self::decode(&url, resp)?;
        Ok(w.version)
    }

    /// `DELETE /v1/files/{path}` (`If-Match: version` when given); returns
    /// the version of the tombstone.
    pub fn delete(&self, path: &str, expect: Option<u64>) -> Result<u64, ApiError> {
        let url = format!("{}/v1/files/{path}", self.base);
        let mut req = self.agent.delete(&url);
        if let Some(v) = expect {
            req = req.set("If-Match", &v.to_string());
        }
        let resp = req.call().map_err(|e| self.fail(&url, e))?;
        let w: Written = Self::decode(&url, resp)?;
        Ok(w.version)
    }

    /// `POST /v1/rename` (`to` must not exist; `from` at its current
    /// version); returns the committed version.
    pub fn rename(&self, from: &str, to: &str) -> Result<u64, ApiError> {
        let url = format!("{}/v1/rename", self.base);
        let resp = self
            .agent
            .post(&url)
            .send_json(serde_json::json!({ "from": from, "to": to }))
            .map_err(|e| self.fail(&url, e))?;
        let w: Written = Self::decode(&url, resp)?;
        Ok(w.version)
    }

    /// `GET /v1/lab/hooks`: the node's test-only hooks, or `None` when the
    /// node was built without the `lab-hooks` feature (404).
    pub fn lab_hooks(&self) -> Result<Option<serde_json::Value>, ApiError> {
        let url = format!("{}/v1/lab/hooks", self.base);
        match self.agent.get(&url).call() {
            Ok(resp) => Self::decode(&url, resp).map(Some),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(self.fail(&url, e)),
        }
    }

    /// `PUT /v1/lab/hooks` with the fields to change; returns the new state.
    pub fn set_lab_hooks(&self, change: &serde_json::Value) -> Result<serde_json::Value, ApiError> {
        let url = format!("{}/v1/lab/hooks", self.base);
        let resp = self
            .agent
            .put(&url)
            .send_json(change)
            .map_err(|e| self.fail(&url, e))?;
        Self::decode(&url, resp)
    }

    /// `GET /v1/files?prefix=` (linearizable), live entries only.
    pub fn list(&self, prefix: &str) -> Result<Vec<Entry>, ApiError> {
        let url = format!("{}/v1/files?prefix={prefix}", self.base);
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| self.fail(&url, e))?;
        let l: Listing = Self::decode(&url, resp)?;
        Ok(l.entries.into_iter().filter(|e| !e.deleted).collect())
    }

    /// The committed namespace with each file's content hashed, for the
    /// convergence checker.
    pub fn committed_files(&self) -> Result<BTreeMap<String, FileState>, ApiError> {
        let mut out = BTreeMap::new();
        for e in self.list("")? {
            if e.kind != "file" && !e.kind.is_empty() {
                continue;
            }
            let Some((bytes, _)) = self.read(&e.path)? else {
                continue;
            };
            let mode = (e.mode != 0).then_some(e.mode & 0o777);
            out.insert(
                e.path.clone(),
                FileState {
                    size: e.size,
                    mode,
                    digest: blake3::hash(&bytes).to_hex().to_string(),
                },
            );
        }
        Ok(out)
    }
}

/// Field `name` of a status document as a string ("" if absent).
pub fn status_str<'a>(status: &'a serde_json::Value, name: &str) -> &'a str {
    status.get(name).and_then(|v| v.as_str()).unwrap_or("")
}
