//! A small blocking client of a node's HTTP API, for the CLI and tests.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// A failed API call, with the node's JSON error when it sent one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: HTTP {status} {code}: {message}")]
    Api {
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: {message}")]
    Io { url: String, message: String },
}

impl ClientError {
    /// The HTTP status, if the node answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

/// Percent-encodes each segment of a synced path for a URL.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Client {
    /// `api` is `host:port` or a full `http://` URL.
    pub fn new(api: &str) -> Client {
        let base = if api.starts_with("http://") || api.starts_with("https://") {
            api.trim_end_matches('/').to_owned()
        } else {
            format!("http://{api}")
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout_read(Duration::from_secs(120))
            .build();
        Client { base, agent }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, rest: &str) -> String {
        format!("{}{rest}", self.base)
    }

    fn handle(
        url: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, ClientError> {
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(status, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                Err(ClientError::Api {
                    url: url.to_owned(),
                    status,
                    code: body["error"]["code"]
                        .as_str()
                        .unwrap_or("unknown")
                        .to_owned(),
                    message: body["error"]["message"]
                        .as_str()
                        .unwrap_or("no error message")
                        .to_owned(),
                })
            }
            Err(e) => Err(ClientError::Transport {
                url: url.to_owned(),
                message: e.to_string(),
            }),
        }
    }

    fn json(url: &str, resp: ureq::Response) -> Result<Value, ClientError> {
        resp.into_json().map_err(|e| ClientError::Io {
            url: url.to_owned(),
            message: format!("bad JSON answer: {e}"),
        })
    }

    pub fn get_json(&self, rest: &str) -> Result<Value, ClientError> {
        let url = self.url(rest);
        let resp = Self::handle(&url, self.agent.get(&url).call())?;
        Self::json(&url, resp)
    }

    pub fn post_json(&self, rest: &str, body: Value) -> Result<Value, ClientError> {
        let url = self.url(rest);
        let resp = Self::handle(&url, self.agent.post(&url).send_json(body))?;
        Self::json(&url, resp)
    }

    pub fn status(&self) -> Result<Value, ClientError> {
        self.get_json("/v1/status")
    }

    pub fn list(&self, prefix: &str) -> Result<Value, ClientError> {
        let url = self.url("/v1/files");
        let resp = Self::handle(&url, self.agent.get(&url).query("prefix", prefix).call())?;
        Self::json(&url, resp)
    }

    pub fn stat(&self, path: &str) -> Result<Value, ClientError> {
        self.get_json(&format!("/v1/files/{}", encode_path(path)))
    }

    /// The content of `path`, streamed into `out`. Returns bytes copied.
    pub fn cat(&self, path: &str, out: &mut impl std::io::Write) -> Result<u64, ClientError> {
        let url = self.url(&format!("/v1/files/{}?content=1", encode_path(path)));
        let resp = Self::handle(&url, self.agent.get(&url).call())?;
        std::io::copy(&mut resp.into_reader(), out).map_err(|e| ClientError::Io {
            url,
            message: e.to_string(),
        })
    }

    /// Uploads `reader` as `path`. `if_match`: a version, or `Some(0)` for
    /// "must not exist".
    pub fn put(
        &self,
        path: &str,
        reader: impl Read + Send,
        if_match: Option<u64>,
    ) -> Result<Value, ClientError> {
        let url = self.url(&format!("/v1/files/{}", encode_path(path)));
        let mut req = self.agent.put(&url);
        match if_match {
            Some(0) => req = req.set("If-None-Match", "*"),
            Some(v) => req = req.set("If-Match", &v.to_string()),
            None => {}
        }
        let resp = Self::handle(&url, req.send(reader))?;
        Self::json(&url, resp)
    }

    pub fn put_file(
        &self,
        local: &Path,
        path: &str,
        if_match: Option<u64>,
    ) -> Result<Value, ClientError> {
        let file = std::fs::File::open(local).map_err(|e| ClientError::Io {
            url: local.display().to_string(),
            message: e.to_string(),
        })?;
        self.put(path, file, if_match)
    }

    pub fn delete(&self, path: &str, if_match: Option<u64>) -> Result<Value, ClientError> {
        let url = self.url(&format!("/v1/files/{}", encode_path(path)));
        let mut req = self.agent.delete(&url);
        if let Some(v) = if_match {
            req = req.set("If-Match", &v.to_string());
        }
        let resp = Self::handle(&url, req.call())?;
        Self::json(&url, resp)
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<Value, ClientError> {
        self.post_json("/v1/rename", serde_json::json!({ "from": from, "to": to }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_encoded_per_segment() {
        assert_eq!(encode_path("a b/c%d/é.txt"), "a%20b/c%25d/%C3%A9.txt");
    }
}
