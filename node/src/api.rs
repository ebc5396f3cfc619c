//! The HTTP API (DESIGN.md section 6): JSON over axum on 127.0.0.1.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use synod_consensus::{Consistency, Entry, EntryKind, Expect, NsPath, MAX_INLINE};
use tokio::io::AsyncWriteExt;

use crate::engine::{SyncNode, WriteMeta};
use crate::error::NodeError;
use crate::fsutil;
use crate::peers::PeerNet;
use crate::status::{self, ClusterReport, StatusReport};

/// What handlers share.
#[allow(missing_debug_implementations)]
pub struct ApiState<N: PeerNet> {
    pub node: Arc<SyncNode<N>>,
    pub max_upload_bytes: u64,
    /// Every node of the cluster configuration, for `POST /v1/cluster/init`.
    pub initial_members: std::collections::BTreeMap<u64, synod_consensus::NodeInfo>,
    pub settings: synod_consensus::ClusterSettings,
    pub verify: crate::verify::Shared,
    /// Conflict copies in the namespace, for the status reports.
    pub conflicts: status::ConflictTracker,
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        let status = match &self {
            NodeError::BadPath(_) | NodeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::Conflict { .. } => StatusCode::CONFLICT,
            NodeError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::NotLeader { .. } => StatusCode::MISDIRECTED_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        if let NodeError::NotLeader { leader } = &self {
            body["error"]["leader"] = json!(leader);
        }
        if let NodeError::Conflict { current, .. } = &self {
            body["error"]["current"] = json!(current.as_deref().map(EntryView::from_entry));
        }
        (status, Json(body)).into_response()
    }
}

/// An entry as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryView {
    pub path: Option<String>,
    pub kind: String,
    pub size: u64,
    pub root: String,
    pub mode: u32,
    pub mtime_ns: i64,
    pub version: u64,
    pub origin: u64,
    pub holders: Vec<u64>,
    pub deleted: bool,
}

impl EntryView {
    pub fn from_entry(e: &Entry) -> EntryView {
        EntryView {
            path: None,
            kind: match e.kind {
                EntryKind::File => "file",
                EntryKind::Directory => "directory",
                EntryKind::Symlink => "symlink",
            }
            .into(),
            size: e.size,
            root: e.root.to_string(),
            mode: e.mode,
            mtime_ns: e.mtime_ns,
            version: e.version,
            origin: e.origin,
            holders: e.holders.clone(),
            deleted: e.tombstone,
        }
    }

    fn with_path(mut self, p: &NsPath) -> EntryView {
        self.path = Some(p.to_string());
        self
    }
}

pub fn router<N: PeerNet>(state: Arc<ApiState<N>>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics::<N>))
        .route("/v1/status", get(get_status::<N>))
        .route("/v1/cluster", get(get_cluster::<N>))
        .route("/v1/events", get(get_events::<N>))
        .route("/v1/cluster/init", post(init_cluster::<N>))
        .route("/v1/verify", post(start_verify::<N>).get(get_verify::<N>))
        .route("/v1/cluster/learners", post(add_learner::<N>))
        .route("/v1/cluster/promote", post(promote::<N>))
        .route("/v1/cluster/remove", post(remove_member::<N>))
        .route("/v1/files", get(list_files::<N>))
        .route(
            "/v1/files/{*path}",
            get(get_file::<N>)
                .put(put_file::<N>)
                .delete(delete_file::<N>),
        )
        // Uploads stream to disk under our own limit (`max_upload_bytes`).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .route("/v1/rename", post(rename::<N>))
        .merge(crate::lab_hooks::routes())
        .fallback(|| async { NodeError::NotFound("no such route".into()) })
        .with_state(state)
}

fn parse_path(p: &str) -> Result<NsPath, NodeError> {
    NsPath::parse(p).map_err(|e| NodeError::BadPath(e.to_string()))
}

fn consistency(stale: Option<u8>) -> Consistency {
    // `lab_hooks::stale_reads` is always false unless built with `lab-hooks`.
    if stale.unwrap_or(0) != 0 || crate::lab_hooks::stale_reads() {
        Consistency::Stale
    } else {
        Consistency::Linearizable
    }
}

/// `If-Match: <version>` → `Version`, `If-None-Match: *` → `Absent`.
fn precondition(headers: &HeaderMap) -> Result<Expect, NodeError> {
    if let Some(v) = headers.get(header::IF_NONE_MATCH) {
        return match v.to_str().map(str::trim) {
            Ok("*") => Ok(Expect::Absent),
            _ => Err(NodeError::BadRequest(
                "If-None-Match only supports `*`".into(),
            )),
        };
    }
    if let Some(v) = headers.get(header::IF_MATCH) {
        let text = v.to_str().unwrap_or("").trim().trim_matches('"');
        return text.parse::<u64>().map(Expect::Version).map_err(|_| {
            NodeError::BadRequest(format!("If-Match must be a version number, got {text:?}"))
        });
    }
    Ok(Expect::Any)
}

async fn get_status<N: PeerNet>(State(s): State<Arc<ApiState<N>>>) -> Json<StatusReport> {
    Json(status::status_with_conflicts(&s.node, &s.conflicts))
}

async fn get_cluster<N: PeerNet>(State(s): State<Arc<ApiState<N>>>) -> Json<ClusterReport> {
    Json(status::cluster(&s.node))
}

async fn metrics<N: PeerNet>(State(s): State<Arc<ApiState<N>>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        status::prometheus(&s.node, &s.conflicts),
    )
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Only events with a larger sequence number.
    after: Option<u64>,
}

async fn get_events<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    Query(q): Query<EventsQuery>,
) -> Json<serde_json::Value> {
    let events = s.node.metrics.events.since(q.after.unwrap_or(0));
    Json(json!({ "events": events }))
}

async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}

/// Initializes Raft with every configured node as a voter, then the cluster
/// settings. Safe to call again: an initialized cluster answers 200.
async fn init_cluster<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
) -> Result<Json<serde_json::Value>, NodeError> {
    let raft = &s.node.raft;
    let fresh = !raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::internal("raft", e))?;
    if fresh {
        raft.initialize(s.initial_members.clone())
            .await
            .map_err(|e| NodeError::internal("initializing raft", e))?;
    }
    if s.node.reader.view().settings().ok().flatten().is_none() {
        let answer = s
            .node
            .propose(synod_consensus::Command::InitCluster {
                settings: s.settings,
            })
            .await?;
        tracing::info!(?answer, "cluster settings proposed");
    }
    Ok(Json(json!({ "initialized": true, "fresh": fresh })))
}

async fn start_verify<N: PeerNet>(State(s): State<Arc<ApiState<N>>>) -> Json<serde_json::Value> {
    let started = crate::verify::start(s.node.clone(), s.verify.clone());
    Json(json!({ "started": started }))
}

async fn get_verify<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
) -> Json<crate::verify::VerifyReport> {
    Json(s.verify.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

#[derive(Debug, Deserialize)]
struct LearnerRequest {
    id: u64,
    /// QUIC address: `host:port` (UDP) or a multiaddr.
    addr: String,
    peer_id: String,
}

#[derive(Debug, Deserialize)]
struct MemberRequest {
    id: u64,
}

/// Membership changes go through the leader only.
fn require_leader<N: PeerNet>(node: &SyncNode<N>) -> Result<(), NodeError> {
    let leader = node.raft.metrics().borrow().current_leader;
    if leader == Some(node.id) {
        Ok(())
    } else {
        Err(NodeError::NotLeader { leader })
    }
}

fn membership_error(e: impl std::fmt::Display) -> NodeError {
    NodeError::BadRequest(format!("membership change refused: {e}"))
}

async fn add_learner<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    Json(req): Json<LearnerRequest>,
) -> Result<Json<serde_json::Value>, NodeError> {
    require_leader(&s.node)?;
    if req.id == 0 {
        return Err(NodeError::BadRequest("node id must be at least 1".into()));
    }
    let addr = match req.addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => crate::daemon::quic_addr(sa).to_string(),
        Err(_) => req.addr.clone(),
    };
    let info = synod_consensus::NodeInfo {
        addr,
        peer_id: req.peer_id.clone(),
    };
    synod_transport::peer_of(&info)
        .map_err(|e| NodeError::BadRequest(format!("learner {}: {e}", req.id)))?;
    if s.node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&req.id)
        .is_some()
    {
        return Err(NodeError::BadRequest(format!(
            "node {} is already a member",
            req.id
        )));
    }
    s.node
        .raft
        .add_learner(req.id, info, false)
        .await
        .map_err(membership_error)?;
    tracing::info!(node = req.id, addr = %req.addr, "learner added");
    Ok(Json(json!({ "added": req.id, "role": "learner" })))
}

async fn promote<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    Json(req): Json<MemberRequest>,
) -> Result<Json<serde_json::Value>, NodeError> {
    require_leader(&s.node)?;
    let ids: std::collections::BTreeSet<u64> = [req.id].into();
    s.node
        .raft
        .change_membership(openraft::ChangeMembers::AddVoterIds(ids), false)
        .await
        .map_err(membership_error)?;
    tracing::info!(node = req.id, "promoted to voter");
    Ok(Json(json!({ "promoted": req.id, "role": "voter" })))
}

async fn remove_member<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    Json(req): Json<MemberRequest>,
) -> Result<Json<serde_json::Value>, NodeError> {
    require_leader(&s.node)?;
    let ids: std::collections::BTreeSet<u64> = [req.id].into();
    let (voters, learners, _) = s.node.members();
    if !voters.contains(&req.id) && !learners.contains(&req.id) {
        return Err(NodeError::NotFound(format!("member {}", req.id)));
    }
    if voters.contains(&req.id) {
        if voters.len() == 1 {
            return Err(NodeError::BadRequest("cannot remove the last voter".into()));
        }
        s.node
            .raft
            .change_membership(openraft::ChangeMembers::RemoveVoters(ids.clone()), false)
            .await
            .map_err(membership_error)?;
    }
    s.node
        .raft
        .change_membership(openraft::ChangeMembers::RemoveNodes(ids), false)
        .await
        .map_err(membership_error)?;
    tracing::info!(node = req.id, "removed from the cluster");
    Ok(Json(json!({ "removed": req.id })))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    prefix: Option<String>,
    stale: Option<u8>,
    deleted: Option<u8>,
    limit: Option<usize>,
}

async fn list_files<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, NodeError> {
    let entries = s
        .node
        .list_prefix(
            q.prefix.as_deref().unwrap_or(""),
            q.limit.unwrap_or(100_000),
            consistency(q.stale),
        )
        .await?;
    let show_deleted = q.deleted.unwrap_or(0) != 0;
    let list: Vec<EntryView> = entries
        .iter()
        .filter(|(_, e)| show_deleted || e.is_live())
        .map(|(p, e)| EntryView::from_entry(e).with_path(p))
        .collect();
    Ok(Json(json!({ "entries": list })))
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    content: Option<u8>,
    stale: Option<u8>,
}

async fn get_file<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    UrlPath(path): UrlPath<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, NodeError> {
    let path = parse_path(&path)?;
    let entry = s
        .node
        .read_entry(&path, consistency(q.stale))
        .await?
        .filter(|e| e.is_live())
        .ok_or_else(|| NodeError::NotFound(path.to_string()))?;
    if q.content.unwrap_or(0) == 0 {
        return Ok(Json(EntryView::from_entry(&entry).with_path(&path)).into_response());
    }
    if entry.kind != EntryKind::File {
        return Err(NodeError::BadRequest(format!(
            "{path} is not a regular file"
        )));
    }
    let (file, held) = s.node.open_content(&path, entry.version).await?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::ETAG, format!("\"{}\"", held.version)),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn put_file<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, NodeError> {
    let path = parse_path(&path)?;
    let expect = precondition(&headers)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > s.max_upload_bytes) {
        return Err(NodeError::TooLarge {
            limit: s.max_upload_bytes,
        });
    }
    // Stamped when the body has arrived.
    let meta = move || WriteMeta {
        expect,
        mode: 0o644,
        mtime_ns: crate::lab_hooks::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
    };
    // A small file whose commit alone makes it durable on enough nodes
    // travels in the log entry itself.
    let may_inline =
        declared.is_none_or(|len| len <= MAX_INLINE as u64) && s.node.commit_covers_replication();
    let node = s.node.clone();
    let write_path = path.clone();
    let limit = s.max_upload_bytes;
    // A task of its own: if the client goes away mid-request, the upload
    // still ends in a commit or an error, and its temp file never leaks.
    let version = tokio::spawn(async move {
        let _in_progress = node.metrics.upload_started();
        let mut stream = body.into_data_stream();
        let mut head = Vec::new();
        if may_inline {
            // A body of unknown length is read until it proves too large.
            loop {
                match stream.next().await {
                    Some(chunk) => {
                        let chunk = chunk.map_err(|e| {
                            NodeError::BadRequest(format!("reading request body: {e}"))
                        })?;
                        head.extend_from_slice(&chunk);
                        if head.len() > MAX_INLINE {
                            break;
                        }
                    }
                    None => {
                        if head.len() as u64 > limit {
                            return Err(NodeError::TooLarge { limit });
                        }
                        return node.write_inline(&write_path, head, meta()).await;
                    }
                }
            }
        }
        let tmp = fsutil::temp_path(&node.folder, "upload")
            .map_err(|e| NodeError::internal("creating upload file", e))?;
        if let Err(e) = receive_body(head, stream, &tmp, limit).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        node.write_file(&write_path, tmp, meta()).await
    })
    .await
    .map_err(|e| NodeError::internal("upload task", e))??;
    Ok((
        StatusCode::OK,
        [(header::ETAG, format!("\"{version}\""))],
        Json(json!({ "path": path.as_str(), "version": version })),
    )
        .into_response())
}

/// Streams the body (`head`, then the rest of `stream`) into `tmp` (never
/// whole in memory), enforcing `limit`, and fsyncs it.
async fn receive_body(
    head: Vec<u8>,
    mut stream: axum::body::BodyDataStream,
    tmp: &std::path::Path,
    limit: u64,
) -> Result<(), NodeError> {
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|e| NodeError::internal("creating upload file", e))?;
    let mut total = head.len() as u64;
    if total > limit {
        return Err(NodeError::TooLarge { limit });
    }
    file.write_all(&head)
        .await
        .map_err(|e| NodeError::internal("writing upload file", e))?;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| NodeError::BadRequest(format!("reading request body: {e}")))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(NodeError::TooLarge { limit });
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| NodeError::internal("writing upload file", e))?;
    }
    // tokio's File reports a failed background write (ENOSPC) only on the
    // next flush: without it a full disk would commit an empty file.
    file.flush()
        .await
        .map_err(|e| NodeError::internal("writing upload file", e))?;
    file.sync_all()
        .await
        .map_err(|e| NodeError::internal("fsync upload file", e))?;
    let written = file
        .metadata()
        .await
        .map_err(|e| NodeError::internal("stat upload file", e))?
        .len();
    if written != total {
        return Err(NodeError::Internal(format!(
            "upload file holds {written} of {total} bytes received"
        )));
    }
    Ok(())
}

async fn delete_file<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, NodeError> {
    let path = parse_path(&path)?;
    let mut expect = precondition(&headers)?;
    if matches!(expect, Expect::Any) {
        // Delete what exists now; a concurrent write wins rather than vanishes.
        let current = s
            .node
            .read_entry(&path, Consistency::Linearizable)
            .await?
            .filter(|e| e.is_live())
            .ok_or_else(|| NodeError::NotFound(path.to_string()))?;
        expect = Expect::Version(current.version);
    }
    let version = s.node.delete(&path, expect).await?;
    Ok(Json(json!({ "path": path.as_str(), "version": version })))
}

#[derive(Debug, Deserialize)]
struct RenameBody {
    from: String,
    to: String,
    /// Version `from` must have; default: its current version.
    expect_from: Option<u64>,
    /// Version `to` must have; default: `to` must not exist.
    expect_to: Option<u64>,
}

async fn rename<N: PeerNet>(
    State(s): State<Arc<ApiState<N>>>,
    Json(body): Json<RenameBody>,
) -> Result<Json<serde_json::Value>, NodeError> {
    let from = parse_path(&body.from)?;
    let to = parse_path(&body.to)?;
    let expect_from = match body.expect_from {
        Some(v) => Expect::Version(v),
        None => {
            let current = s
                .node
                .read_entry(&from, Consistency::Linearizable)
                .await?
                .filter(|e| e.is_live())
                .ok_or_else(|| NodeError::NotFound(from.to_string()))?;
            Expect::Version(current.version)
        }
    };
    let expect_to = body.expect_to.map_or(Expect::Absent, Expect::Version);
    let version = s.node.rename(&from, &to, expect_from, expect_to).await?;
    Ok(Json(
        json!({ "from": from.as_str(), "to": to.as_str(), "version": version }),
    ))
}
