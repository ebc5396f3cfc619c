//! The sync engine's core: one node's handles (Raft, stores, network) and the
//! write path of DESIGN.md section 4 — content to a quorum first, then the
//! commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use synod_chunker::{ChunkParams, ChunkRef, Manifest};
use synod_consensus::{
    Answer, Command, Consistency, Entry, EntryKind, Expect, NodeId, NsPath, ProposeError, Proposer,
    Reader, Request, RequestId, Response, SynodRaft,
};
use synod_merkle::Hash;
use synod_transport::buffers::Buffer;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::delta;
use crate::error::NodeError;
use crate::local::{LocalFile, LocalState};
use crate::metrics::Metrics;
use crate::peers::{ChunkAsDelta, ForwardOutcome, PeerNet};
use crate::pushed::PushedManifest;
use crate::staging::{OpenPacks, Staging};

/// Most bytes of chunks in one push or fetch request.
pub const BATCH_BYTES: usize = 1 << 20;
/// Most chunks in one push or fetch request.
pub const BATCH_CHUNKS: usize = 16;
/// New files up to this size are pushed without asking which chunks the
/// peer lacks (one round trip saved; at worst a few KiB sent twice). New
/// versions of files the peer holds are always asked about: that is what
/// keeps an edit down to the changed chunks.
const SEND_WITHOUT_ASKING: u64 = 256 << 10;
/// Files up to this size are replicated in batches (one push and one sync
/// on the receiver for many files); larger ones one by one.
pub(crate) const BATCHED_FILE_MAX: u64 = 256 << 10;
/// Most chunks in one push request (the transport's limit per request).
const PUSH_CHUNKS: usize = synod_transport::MAX_CHUNKS_PER_REQUEST;
/// Most bytes of encoded manifests in one push request.
const MANIFEST_PUSH_BYTES: usize = synod_transport::MAX_CHUNK_BATCH_BYTES / 2;
/// Push requests to one peer in flight at once.
const PUSHES_IN_FLIGHT: usize = 3;
/// From this many bytes a push to enough voters goes in stripes (see
/// [`SyncNode::replicate_many`]).
const BULK_PUSH_BYTES: u64 = 64 << 20;
/// From this many voters to reach, a bulk push goes in stripes.
const STRIPE_MIN_VOTERS: usize = 3;
/// How long a striped push waits, once enough voters said which chunks
/// they lack, for the other voters to say so too.
const STRIPE_GRACE: Duration = Duration::from_millis(500);

/// Everything one running node owns.
pub struct SyncNode<N: PeerNet> {
    pub id: NodeId,
    pub folder: PathBuf,
    pub params: ChunkParams,
    /// Copies (this node included) a write needs before it is committed.
    pub replication: u32,
    pub write_timeout: Duration,
    pub raft: SynodRaft,
    pub reader: Reader,
    pub proposer: Proposer,
    pub local: LocalState,
    pub staging: Staging,
    pub net: Arc<N>,
    pub metrics: Arc<Metrics>,
    /// Uploads committed or being committed: root → temp file holding it.
    pub(crate) uploads: Arc<Mutex<HashMap<Hash, PathBuf>>>,
    /// This node's materialized watermark.
    pub(crate) watermark: watch::Sender<u64>,
    /// Held by the materializer while it changes the folder and by the
    /// scanner while it commits what it found, so neither acts on a file
    /// the other is halfway through.
    pub(crate) folder_lock: tokio::sync::Mutex<()>,
    /// What the materializer placed, so the watcher knows its own renames.
    pub(crate) placed: Arc<crate::scanner::Placed>,
}

impl<N: PeerNet> std::fmt::Debug for SyncNode<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncNode")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// How the caller wants its write checked.
#[derive(Debug, Clone, Copy)]
pub struct WriteMeta {
    pub expect: Expect,
    pub mode: u32,
    pub mtime_ns: i64,
}

impl<N: PeerNet> SyncNode<N> {
    /// Voters and learners of the current membership, and the leader.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>, Option<NodeId>) {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        (voters, learners, m.current_leader)
    }

    /// How long pushing `size` bytes to a quorum may take: the write
    /// timeout plus time at a floor rate of 8 MiB/s, so a large file is not
    /// refused for its size while a dead quorum is still noticed.
    pub fn content_timeout(&self, size: u64) -> Duration {
        self.write_timeout + Duration::from_secs(size / (8 << 20))
    }

    /// A free conflict-copy name for `path`, by this node, now.
    pub(crate) fn aside_name(&self, path: &str) -> String {
        crate::conflict::free_conflict_name(&self.folder, path, self.id, crate::lab_hooks::now())
    }

    pub fn watch_watermark(&self) -> watch::Receiver<u64> {
        self.watermark.subscribe()
    }

    /// The write path: `tmp` (a fsynced file under `.synod/tmp/`) becomes the
    /// content of `path`. Answers the committed version only once the
    /// content is durable on `replication` nodes and the `Put` committed.
    pub async fn write_file(
        &self,
        path: &NsPath,
        tmp: PathBuf,
        meta: WriteMeta,
    ) -> Result<u64, NodeError> {
        let result = self.write_file_inner(path, &tmp, meta).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    async fn write_file_inner(
        &self,
        path: &NsPath,
        tmp: &Path,
        meta: WriteMeta,
    ) -> Result<u64, NodeError> {
        let params = self.params;
        let file = tmp.to_owned();
        let manifest =
            tokio::task::spawn_blocking(move || synod_chunker::chunk_file_scaled(&file, params))
                .await
                .map_err(|e| NodeError::internal("chunking task", e))?
                .map_err(|e| NodeError::internal("chunking the upload", e))?;
        let root = manifest.root();
        debug!(path = %path, root = %root.fmt_short(), chunks = manifest.chunk_count(), "upload chunked");
        self.local
            .put_manifest(&manifest)
            .map_err(|e| NodeError::internal("storing the manifest", e))?;
        let limit = self.content_timeout(manifest.size());
        let base = self.base_manifest(path.as_str());
        let holders = tokio::time::timeout(limit, self.replicate(&manifest, tmp, base.as_ref()))
            .await
            .map_err(|_| {
                NodeError::Unavailable(format!(
                    "content of {path} did not reach {} nodes within {limit:?}",
                    self.replication
                ))
            })??;
        self.uploads
            .lock()
            .expect("uploads lock poisoned")
            .insert(root, tmp.to_owned());
        let entry = Entry {
            kind: EntryKind::File,
            size: manifest.size(),
            root,
            mode: meta.mode,
            mtime_ns: meta.mtime_ns,
            version: 0,
            origin: self.id,
            holders,
            tombstone: false,
        };
        let answer = self
            .propose_with_parents(path, Command::put(path, entry, meta.expect))
            .await;
        match self.answer_to_version(path, answer) {
            Ok(v) => {
                // The materializer normally takes the temp file; if a newer
                // version of the path overtook it, nothing will: drop it
                // once this node has materialized past `v`.
                let uploads = self.uploads.clone();
                let mut wm = self.watch_watermark();
                let limit = self.write_timeout * 4;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(limit, wm.wait_for(|&w| w >= v)).await;
                    let left = uploads.lock().expect("uploads lock poisoned").remove(&root);
                    if let Some(tmp) = left {
                        let _ = std::fs::remove_file(tmp);
                    }
                });
                Ok(v)
            }
            Err(e) => {
                self.uploads
                    .lock()
                    .expect("uploads lock poisoned")
                    .remove(&root);
                Err(e)
            }
        }
    }

    /// Whether a commit alone leaves content in the log of `replication`
    /// nodes: then a small file may travel inline (see [`Self::write_inline`]).
    pub fn commit_covers_replication(&self) -> bool {
        let metrics = self.raft.metrics();
        // A joint membership commits on a majority of each configuration.
        let quorum = metrics
            .borrow()
            .membership_config
            .membership()
            .get_joint_config()
            .iter()
            .map(|c| c.len() / 2 + 1)
            .max()
            .unwrap_or(0);
        quorum > 0 && self.replication as usize <= quorum
    }

    /// The write path of a small file: its content `data` travels in the
    /// log entry ([`Command::PutInline`]), so the commit itself makes it
    /// durable on a quorum; no temp file and no separate content push.
    /// The caller checks [`Self::commit_covers_replication`] and the size.
    pub async fn write_inline(
        &self,
        path: &NsPath,
        data: Vec<u8>,
        meta: WriteMeta,
    ) -> Result<u64, NodeError> {
        debug_assert!(data.len() <= synod_consensus::MAX_INLINE);
        // The manifest is stored where the content is placed (materializer).
        let manifest = synod_chunker::chunk_slice_scaled(&data, self.params);
        let entry = Entry {
            kind: EntryKind::File,
            size: manifest.size(),
            root: manifest.root(),
            mode: meta.mode,
            mtime_ns: meta.mtime_ns,
            version: 0,
            origin: self.id,
            holders: vec![self.id],
            tombstone: false,
        };
        let answer = self
            .propose_with_parents(path, Command::put_inline(path, entry, meta.expect, data))
            .await;
        self.answer_to_version(path, answer)
    }

    pub async fn delete(&self, path: &NsPath, expect: Expect) -> Result<u64, NodeError> {
        let answer = self.propose(Command::delete(path, expect)).await;
        self.answer_to_version(path, answer)
    }

    pub async fn rename(
        &self,
        from: &NsPath,
        to: &NsPath,
        expect_from: Expect,
        expect_to: Expect,
    ) -> Result<u64, NodeError> {
        let answer = self
            .propose_with_parents(to, Command::rename(from, to, expect_from, expect_to))
            .await;
        self.answer_to_version(from, answer)
    }

    fn answer_to_version(
        &self,
        path: &NsPath,
        answer: Result<Answer, NodeError>,
    ) -> Result<u64, NodeError> {
        match answer? {
            Answer::Ok { version } => {
                Metrics::add(&self.metrics.writes_committed, 1);
                Ok(version)
            }
            Answer::Conflict { current } => {
                Metrics::add(&self.metrics.writes_conflicted, 1);
                Err(NodeError::Conflict {
                    path: path.to_string(),
                    current: current.map(Box::new),
                })
            }
            Answer::Rejected { reason } => Err(NodeError::BadRequest(reason)),
            other => Err(NodeError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Pushes the chunks each voter lacks until `replication` nodes (this
    /// one included) hold them fsynced. Returns those nodes.
    pub(crate) async fn replicate(
        &self,
        manifest: &Manifest,
        file: &Path,
        base: Option<&Manifest>,
    ) -> Result<Vec<NodeId>, NodeError> {
        self.replicate_many(&[(manifest, file, base)]).await
    }

    /// The manifest of the committed version of `path`, if this node holds
    /// it: what peers most likely hold too, so a new version's manifest can
    /// travel as a patch of it.
    pub(crate) fn base_manifest(&self, path: &str) -> Option<Manifest> {
        let path = NsPath::parse(path).ok()?;
        let entry = self.reader.view().get(&path).ok()??;
        if entry.tombstone || entry.kind != EntryKind::File {
            return None;
        }
        self.local.manifest(&entry.root).ok()?
    }

    /// [`Self::replicate`] for several files at once: per peer, their
    /// chunks share push requests and their manifests travel in one request
    /// with one sync on the receiver, so a folder of small files costs a
    /// few round trips per batch instead of two fsyncs per file.
    pub(crate) async fn replicate_many(
        &self,
        files: &[(&Manifest, &Path, Option<&Manifest>)],
    ) -> Result<Vec<NodeId>, NodeError> {
        let mut holders = vec![self.id];
        let need = (self.replication as usize).saturating_sub(1);
        if need == 0 || files.is_empty() {
            return Ok(holders);
        }
        // A node that has just started may not have learnt the membership
        // yet: wait for it (the caller bounds the wait) rather than fail.
        let mut metrics = self.raft.metrics();
        let peers: Vec<NodeId> = loop {
            let (voters, _, _) = self.members();
            let peers: Vec<NodeId> = voters.into_iter().filter(|&p| p != self.id).collect();
            if peers.len() >= need {
                break peers;
            }
            if metrics.changed().await.is_err() {
                break peers;
            }
        };
        // Pushes race to every voter and the first `need` to finish win.
        // A bulk push to three voters or more goes in stripes instead (see
        // `push_striped`): racing it would split this node's uplink across
        // every voter. With two, the race stays: each stripe's extra hop
        // cost more than the copy it saves (a 512 MiB file on a loopback
        // cluster of three: 14.5 s striped, 3-4 s raced). If striping
        // fails, the bulk push goes to `need` voters, another for each
        // that fails.
        let bulk: u64 = files.iter().map(|(m, _, _)| m.size()).sum();
        let striped = bulk >= BULK_PUSH_BYTES && peers.len() >= STRIPE_MIN_VOTERS;
        let mut queue: std::collections::VecDeque<NodeId> = if striped {
            self.by_contact(peers).into()
        } else {
            peers.into()
        };
        let start = if striped { need } else { queue.len() };
        if striped {
            let all: Vec<NodeId> = queue.iter().copied().collect();
            match self.push_striped(&all, need, files).await {
                Ok(striped) => {
                    holders.extend(striped);
                    return Ok(holders);
                }
                Err(e @ NodeError::Internal(_)) => return Err(e),
                // What did arrive stays: the pushes below ask first.
                Err(e) => {
                    warn!(peers = ?all, cause = %e, "striped push failed; pushing to each")
                }
            }
        }
        let push = |peer: NodeId| async move { (peer, self.push_missing(peer, files).await) };
        let mut tasks: FuturesUnordered<_> =
            queue.drain(..start.min(queue.len())).map(push).collect();
        let mut failures = Vec::new();
        while let Some((peer, result)) = tasks.next().await {
            match result {
                Ok(()) => {
                    holders.push(peer);
                    if holders.len() > need {
                        return Ok(holders);
                    }
                }
                // A file of ours could not be read as chunked: no peer
                // will do better.
                Err(e @ NodeError::Internal(_)) => return Err(e),
                Err(e) => {
                    warn!(peer, files = files.len(), cause = %e, "content push failed");
                    failures.push(e.to_string());
                    if let Some(next) = queue.pop_front() {
                        tasks.push(push(next));
                    }
                }
            }
        }
        Err(NodeError::Unavailable(format!(
            "content reached {} of {} required nodes ({})",
            holders.len(),
            self.replication,
            failures.join("; ")
        )))
    }

    /// `peers` with those whose Raft RPCs failed since their last answer
    /// last (only the leader sends RPCs; elsewhere the order is kept).
    fn by_contact(&self, mut peers: Vec<NodeId>) -> Vec<NodeId> {
        peers.sort_by_key(|&p| {
            self.metrics
                .contacts
                .of(p)
                .map_or(0, |c| c.failures_since.min(1))
        });
        peers
    }

    async fn push_missing(
        &self,
        peer: NodeId,
        files: &[(&Manifest, &Path, Option<&Manifest>)],
    ) -> Result<(), NodeError> {
        let mut missing = self.ask_missing(peer, files).await?;
        self.push_as_deltas(peer, files, &mut missing).await?;
        let batches = push_batches(files, &missing);
        let pushed: usize = batches.iter().map(|b| b.len()).sum();
        // A few pushes in flight: the receiver's fsync of one batch overlaps
        // the transfer of the next.
        let send_chunks = futures::stream::iter(batches)
            .map(|batch| self.push_batch(peer, batch))
            .buffered(PUSHES_IN_FLIGHT)
            .try_collect::<Vec<()>>();
        // The chunks alone are not the files: their order must survive this
        // node too.
        with_manifests(files, send_chunks, self.send_manifests(peer, files)).await?;
        debug!(peer, files = files.len(), pushed, "content replicated");
        Ok(())
    }

    /// Replicates a bulk push to the voters `peers` sending each chunk over
    /// this node's link once: batch `i` goes to the `i % k`-th, and the
    /// others copy it from there, so the writer's uplink carries one copy
    /// instead of `k`. The stripes go to every voter that answers the
    /// first question (which chunks it lacks) within [`STRIPE_GRACE`] of
    /// the `need`-th answer: voters that must get the content anyway get it
    /// now, not after the commit, and a dead one is left out. Every node
    /// answers only once what it got is fsynced. Returns those voters.
    async fn push_striped(
        &self,
        peers: &[NodeId],
        need: usize,
        files: &[(&Manifest, &Path, Option<&Manifest>)],
    ) -> Result<Vec<NodeId>, NodeError> {
        let mut asks: FuturesUnordered<_> = peers
            .iter()
            .map(|&peer| async move {
                let asked = async {
                    let mut missing = self.ask_missing(peer, files).await?;
                    self.push_as_deltas(peer, files, &mut missing).await?;
                    Ok::<_, NodeError>(missing)
                };
                (peer, asked.await)
            })
            .collect();
        let mut answered: Vec<(NodeId, HashSet<Hash>)> = Vec::new();
        let mut grace: Option<Instant> = None;
        loop {
            let next = match grace {
                Some(until) => match tokio::time::timeout_at(until, asks.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => asks.next().await,
            };
            match next {
                Some((peer, Ok(missing))) => answered.push((peer, missing)),
                Some((_, Err(e @ NodeError::Internal(_)))) => return Err(e),
                Some((peer, Err(e))) => debug!(peer, cause = %e, "left out of the stripes"),
                None => break,
            }
            if answered.len() >= need.max(1) && grace.is_none() {
                grace = Some(Instant::now() + STRIPE_GRACE);
            }
        }
        drop(asks);
        if answered.len() < need.max(1) {
            return Err(NodeError::Unavailable(format!(
                "{} of {need} voters answered which chunks they lack",
                answered.len()
            )));
        }
        let (peers, missing): (Vec<NodeId>, Vec<HashSet<Hash>>) = answered.into_iter().unzip();
        let peers = &peers[..];
        let any: HashSet<Hash> = missing.iter().flatten().copied().collect();
        let batches = push_batches(files, &any);
        let (n, k) = (batches.len(), peers.len());
        let missing = &missing;
        let send_chunks = futures::stream::iter(batches.into_iter().enumerate())
            .map(|(i, batch)| async move {
                let owner = i % k;
                let lacked = |j: usize| -> Vec<(PathBuf, ChunkRef)> {
                    batch
                        .iter()
                        .filter(|(_, c)| missing[j].contains(&c.id))
                        .cloned()
                        .collect()
                };
                let own = lacked(owner);
                if !own.is_empty() {
                    self.push_batch(peers[owner], own).await?;
                }
                let copies = peers.iter().enumerate().filter(|&(j, _)| j != owner).map(
                    |(j, &peer)| {
                        let want = lacked(j);
                        async move {
                            if want.is_empty() {
                                return Ok(());
                            }
                            let ids = want.iter().map(|(_, c)| c.id).collect();
                            match self.net.fetch_from(peer, peers[owner], ids).await {
                                Ok(()) => Ok(()),
                                // The two may not reach each other (yet):
                                // this stripe goes to it from here.
                                Err(e) => {
                                    debug!(peer, from = peers[owner], cause = %e, "stripe copy failed; pushing it");
                                    self.push_batch(peer, want).await
                                }
                            }
                        }
                    },
                );
                futures::future::try_join_all(copies).await?;
                Ok::<(), NodeError>(())
            })
            // Unordered: a stripe whose copy lags must not hold back the
            // pushes behind it (it kept the writer's uplink half idle).
            .buffer_unordered(2 * PUSHES_IN_FLIGHT * k)
            .try_collect::<Vec<()>>();
        let send_manifests =
            futures::future::try_join_all(peers.iter().map(|&p| self.send_manifests(p, files)));
        with_manifests(files, send_chunks, send_manifests).await?;
        debug!(
            ?peers,
            files = files.len(),
            batches = n,
            "content replicated, striped"
        );
        Ok(peers.to_vec())
    }

    /// Pushes the manifests of `files` to `peer`, as patches of the
    /// versions it holds where there are any.
    async fn send_manifests(
        &self,
        peer: NodeId,
        files: &[(&Manifest, &Path, Option<&Manifest>)],
    ) -> Result<(), NodeError> {
        let pushed: Vec<PushedManifest> = files
            .iter()
            .map(|(m, _, base)| PushedManifest::of(m, *base))
            .collect();
        let patched = pushed.iter().any(PushedManifest::is_patch);
        match self.push_manifest_list(peer, &pushed).await {
            // The peer lacks a base (it missed that version): whole.
            Err(e) if patched => {
                debug!(peer, cause = %e, "manifest patches refused; pushing them whole");
                let whole: Vec<PushedManifest> = files
                    .iter()
                    .map(|(m, _, _)| PushedManifest::Whole((*m).clone()))
                    .collect();
                self.push_manifest_list(peer, &whole).await
            }
            done => done,
        }
    }

    /// Reads one batch of chunks from the files they belong to and pushes
    /// it to `peer`.
    async fn push_batch(
        &self,
        peer: NodeId,
        batch: Vec<(PathBuf, ChunkRef)>,
    ) -> Result<(), NodeError> {
        let bytes: u64 = batch.iter().map(|(_, c)| c.len as u64).sum();
        let chunks =
            tokio::task::spawn_blocking(move || -> Result<Vec<(Hash, Bytes)>, NodeError> {
                let mut open: Option<(PathBuf, std::fs::File)> = None;
                batch
                    .into_iter()
                    .map(|(path, c)| {
                        let unreadable = |e: std::io::Error| {
                            NodeError::Internal(format!("reading {}: {e}", path.display()))
                        };
                        if open.as_ref().is_none_or(|(p, _)| *p != path) {
                            let f = std::fs::File::open(&path).map_err(unreadable)?;
                            open = Some((path.clone(), f));
                        }
                        let (_, f) = open.as_ref().expect("just opened");
                        let buf = read_chunk_at(f, &path, &c)?;
                        Ok((c.id, buf.into_bytes()))
                    })
                    .collect()
            })
            .await
            .map_err(|e| NodeError::internal("reading upload", e))??;
        self.net
            .push_chunks(peer, chunks)
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        Metrics::add(&self.metrics.bytes_pushed, bytes);
        Ok(())
    }

    /// The chunks of `files` that `peer` lacks (with, for new versions, any
    /// of the old version's it lacks). A new version of a file is asked
    /// about as the version the peer holds plus the chunks it adds; a small
    /// new file costs less to send than to ask about; a large one is asked
    /// about in full.
    async fn ask_missing(
        &self,
        peer: NodeId,
        files: &[(&Manifest, &Path, Option<&Manifest>)],
    ) -> Result<HashSet<Hash>, NodeError> {
        let unavailable = |e: crate::peers::PeerError| NodeError::Unavailable(e.to_string());
        let mut lacks = HashSet::new();
        let mut seen = HashSet::new();
        let mut ask_all: Vec<Hash> = Vec::new();
        let mut since = Vec::new();
        for (i, (m, _, base)) in files.iter().enumerate() {
            match base {
                Some(b) => since.push((i, b.root(), delta::added(m, b))),
                None if m.size() > SEND_WITHOUT_ASKING => {
                    ask_all.extend(m.chunk_ids().filter(|id| seen.insert(*id)))
                }
                None => lacks.extend(m.chunk_ids()),
            }
        }
        if !since.is_empty() {
            let queries = since.iter().map(|(_, b, a)| (*b, a.clone())).collect();
            let answers = self
                .net
                .missing_since(peer, queries)
                .await
                .map_err(unavailable)?;
            for ((i, _, added), answer) in since.iter().zip(answers) {
                let (m, _, base) = files[*i];
                let Some(ids) = answer else {
                    // The peer lacks that version's manifest: ask in full.
                    ask_all.extend(m.chunk_ids().filter(|id| seen.insert(*id)));
                    continue;
                };
                let asked: HashSet<Hash> = base
                    .into_iter()
                    .flat_map(Manifest::chunk_ids)
                    .chain(added.iter().copied())
                    .collect();
                if let Some(bad) = ids.iter().find(|id| !asked.contains(id)) {
                    return Err(NodeError::Unavailable(format!(
                        "peer {peer} named chunk {bad}, which it was not asked about"
                    )));
                }
                lacks.extend(ids);
            }
        }
        for ids in ask_all.chunks(4096) {
            let answer = self
                .net
                .missing_chunks(peer, ids.to_vec())
                .await
                .map_err(unavailable)?;
            lacks.extend(answer);
        }
        Ok(lacks)
    }

    /// Sends the chunks of new versions that `peer` lacks as deltas
    /// against the old chunks they replace, which it holds, where a delta
    /// is much smaller; takes those out of `lacks`. A chunk whose delta
    /// the peer refuses stays in `lacks`, to be sent whole.
    async fn push_as_deltas(
        &self,
        peer: NodeId,
        files: &[(&Manifest, &Path, Option<&Manifest>)],
        lacks: &mut HashSet<Hash>,
    ) -> Result<(), NodeError> {
        let mut runs: Vec<(PathBuf, delta::Run<ChunkRef>)> = Vec::new();
        let mut taken = HashSet::new();
        for (m, file, base) in files {
            let Some(base) = base else { continue };
            for mut run in delta::manifest_runs(m, base) {
                if run.old.iter().any(|id| lacks.contains(id)) {
                    continue;
                }
                run.new
                    .retain(|c| lacks.contains(&c.id) && taken.insert(c.id));
                if !run.new.is_empty() {
                    runs.push((file.to_path_buf(), run));
                }
            }
        }
        if runs.is_empty() {
            return Ok(());
        }
        let wanted = runs.iter().map(|(_, r)| r.old.clone()).collect();
        let signatures = match self.net.signatures(peer, wanted).await {
            Ok(s) => s,
            Err(e) => {
                debug!(peer, cause = %e, "no signatures; sending chunks whole");
                return Ok(());
            }
        };
        let work: Vec<(PathBuf, delta::Run<ChunkRef>, Vec<u8>)> = runs
            .into_iter()
            .zip(signatures)
            .filter_map(|((path, run), sig)| sig.map(|s| (path, run, s)))
            .collect();
        let deltas =
            tokio::task::spawn_blocking(move || -> Result<Vec<ChunkAsDelta>, NodeError> {
                let mut out = Vec::new();
                for (path, run, sig) in work {
                    let f = std::fs::File::open(&path).map_err(|e| {
                        NodeError::Internal(format!("reading {}: {e}", path.display()))
                    })?;
                    for c in &run.new {
                        let bytes = read_chunk_at(&f, &path, c)?;
                        if let Some(d) = delta::diff(&sig, &bytes) {
                            out.push((c.id, run.old.clone(), d));
                        }
                    }
                }
                Ok(out)
            })
            .await
            .map_err(|e| NodeError::internal("diffing chunks", e))??;
        let mut rest = deltas.into_iter().peekable();
        while rest.peek().is_some() {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(d) = rest.next_if(|_| batch.len() < PUSH_CHUNKS && bytes < BATCH_BYTES) {
                bytes += d.2.len();
                batch.push(d);
            }
            let ids: Vec<Hash> = batch.iter().map(|(id, _, _)| *id).collect();
            match self.net.push_deltas(peer, batch).await {
                Ok(()) => {
                    Metrics::add(&self.metrics.bytes_pushed, bytes as u64);
                    for id in &ids {
                        lacks.remove(id);
                    }
                }
                Err(e) => {
                    debug!(peer, chunks = ids.len(), cause = %e, "deltas refused; sending those chunks whole")
                }
            }
        }
        Ok(())
    }

    /// Commits `cmd` through the leader, wherever it is, retrying with the
    /// same request id (so it applies at most once) until the write timeout.
    pub async fn propose(&self, cmd: Command) -> Result<Answer, NodeError> {
        self.propose_as(self.proposer.next_request_id(), cmd).await
    }

    /// Proposes `cmd` under request id `rid`. `Unavailable` leaves the
    /// outcome unknown: the command may still commit. Proposing it again
    /// under the same `rid` settles that, since a request id applies once
    /// and a retry gets the first answer.
    pub async fn propose_as(&self, rid: RequestId, cmd: Command) -> Result<Answer, NodeError> {
        let mut answers = self.propose_all(vec![(rid, cmd)]).await?;
        Ok(answers.remove(0))
    }

    /// Proposes `cmd`, which writes `path`, together with a `Directory`
    /// entry for each parent of `path` this node knows no live entry of;
    /// answers `cmd`'s answer. The writer names the directories its file
    /// needs: otherwise every node's scanner would find them new once the
    /// file is placed, and all would race to commit them. A parent
    /// committed meanwhile by someone else answers a conflict, ignored.
    async fn propose_with_parents(&self, path: &NsPath, cmd: Command) -> Result<Answer, NodeError> {
        let mut commands = Vec::new();
        let view = self.reader.view();
        let text = path.as_str();
        // Needed only when a parent is missing, at most once per write.
        let mut empty = None;
        for (i, _) in text.match_indices('/') {
            let Ok(parent) = NsPath::parse(&text[..i]) else {
                continue;
            };
            let expect = match view.get(&parent) {
                Ok(None) => Expect::Absent,
                Ok(Some(e)) if !e.is_live() => Expect::Version(e.version),
                // Already there, or unreadable: the scanner's business.
                _ => continue,
            };
            let entry = Entry {
                kind: EntryKind::Directory,
                size: 0,
                root: *empty.get_or_insert_with(|| {
                    synod_chunker::chunk_slice_scaled(&[], self.params).root()
                }),
                mode: 0o755,
                mtime_ns: 0,
                version: 0,
                origin: self.id,
                holders: vec![self.id],
                tombstone: false,
            };
            commands.push((
                self.proposer.next_request_id(),
                Command::put(&parent, entry, expect),
            ));
        }
        commands.push((self.proposer.next_request_id(), cmd));
        let mut answers = self.propose_all(commands).await?;
        Ok(answers.pop().expect("one answer per command"))
    }

    /// Proposes `commands` together (one forward, one log entry when the
    /// leader's group commit allows), each under its own request id; one
    /// answer per command, in order. Retried whole, as [`Self::propose_as`].
    pub async fn propose_all(
        &self,
        commands: Vec<(RequestId, Command)>,
    ) -> Result<Vec<Answer>, NodeError> {
        let _latency = self.metrics.commit_latency.timer();
        let deadline = Instant::now() + self.write_timeout;
        let mut last_error = String::from("no leader elected");
        let n = commands.len();
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            match leader {
                Some(l) if l == self.id => {
                    // Bounded: a proposal stuck behind a lost leadership is
                    // retried under the same request id, which applies once.
                    let proposals = futures::future::join_all(
                        commands
                            .iter()
                            .map(|(rid, cmd)| self.proposer.propose_with_id(*rid, cmd.clone())),
                    );
                    match tokio::time::timeout_at(deadline, proposals).await {
                        Ok(answers) => match answers.into_iter().collect::<Result<Vec<_>, _>>() {
                            Ok(answers) => return Ok(answers),
                            Err(e) => last_error = format!("{e}"),
                        },
                        Err(_) => last_error = "proposal not answered in time".into(),
                    }
                }
                Some(l) => {
                    let req = Request {
                        commands: commands.clone(),
                    };
                    match self.net.forward(l, req).await {
                        Ok(ForwardOutcome::Done(resp)) if resp.answers.len() == n => {
                            return Ok(resp.answers)
                        }
                        Ok(ForwardOutcome::Done(resp)) => {
                            return Err(NodeError::Internal(format!(
                                "leader sent {} answers for {n} commands",
                                resp.answers.len()
                            )))
                        }
                        Ok(ForwardOutcome::NotLeader(_)) => {
                            last_error = format!("node {l} is no longer the leader")
                        }
                        Ok(ForwardOutcome::Failed(m)) => last_error = m,
                        Ok(ForwardOutcome::ReadIndex(_)) => {
                            last_error = format!("node {l} answered a write with a read index")
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Unavailable(format!(
                    "write not committed within {:?}: {last_error}",
                    self.write_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves a write forwarded by a follower: this node must lead.
    pub async fn serve_forward(&self, req: Request) -> ForwardOutcome {
        let answers = futures::future::join_all(
            req.commands
                .into_iter()
                .map(|(rid, cmd)| self.proposer.propose_with_id(rid, cmd)),
        )
        .await;
        let mut out = Vec::with_capacity(answers.len());
        for a in answers {
            match a {
                Ok(answer) => out.push(answer),
                Err(ProposeError::ForwardToLeader { leader_id, .. }) => {
                    return ForwardOutcome::NotLeader(leader_id)
                }
                Err(e) => return ForwardOutcome::Failed(e.to_string()),
            }
        }
        ForwardOutcome::Done(Response { answers: out })
    }

    /// Serves a follower's read-index request: this node must lead.
    pub async fn serve_read_index(&self) -> ForwardOutcome {
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => ForwardOutcome::ReadIndex(log_id.map_or(0, |l| l.index)),
            Err(e) => match e.forward_to_leader() {
                Some(f) => ForwardOutcome::NotLeader(f.leader_id),
                None => ForwardOutcome::Failed(e.to_string()),
            },
        }
    }

    /// Makes the next local read linearizable: on the leader through its
    /// read index; on a follower by asking the leader for its read index
    /// and waiting until this node has applied that far.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.write_timeout;
        let mut last_error = String::from("no leader elected");
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            let index = match leader {
                Some(l) if l == self.id => match self.serve_read_index().await {
                    ForwardOutcome::ReadIndex(i) => Some(i),
                    other => {
                        last_error = format!("{other:?}");
                        None
                    }
                },
                Some(l) => match self.net.read_index(l).await {
                    Ok(ForwardOutcome::ReadIndex(i)) => Some(i),
                    Ok(other) => {
                        last_error = format!("leader {l}: {other:?}");
                        None
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        None
                    }
                },
                None => None,
            };
            if let Some(i) = index {
                let wait = self.reader.view().wait_applied(i);
                if tokio::time::timeout_at(deadline, wait).await.is_ok() {
                    return Ok(());
                }
                last_error = format!("this node did not apply up to read index {i}");
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Unavailable(format!(
                    "linearizable read not possible within {:?}: {last_error}",
                    self.write_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn read_entry(
        &self,
        path: &NsPath,
        c: Consistency,
    ) -> Result<Option<Entry>, NodeError> {
        if c == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        self.reader
            .view()
            .get(path)
            .map_err(|e| NodeError::internal(&format!("reading {path}"), e))
    }

    pub async fn list_prefix(
        &self,
        prefix: &str,
        limit: usize,
        c: Consistency,
    ) -> Result<Vec<(NsPath, Entry)>, NodeError> {
        if c == Consistency::Linearizable {
            self.read_barrier().await?;
        }
        self.reader
            .view()
            .list_prefix(prefix, limit)
            .map_err(|e| NodeError::internal("listing", e))
    }

    /// The local file of `path` at `version` or a later committed version,
    /// opened, with the record of which version it holds. The record is read
    /// before and after opening and must name the opened inode, so the bytes
    /// served always belong to the version reported with them.
    pub async fn open_content(
        &self,
        path: &NsPath,
        version: u64,
    ) -> Result<(tokio::fs::File, LocalFile), NodeError> {
        let deadline = Instant::now() + self.write_timeout;
        let target = self.folder.join(path.as_str());
        let record = || {
            self.local
                .file(path.as_str())
                .map_err(|e| NodeError::internal(&format!("local record of {path}"), e))
        };
        // Placed already: no need to wait for the watermark, which a parked
        // file elsewhere may hold back.
        let placed = record()?.is_some_and(|r| r.version >= version);
        let mut wm = self.watch_watermark();
        if !placed
            && tokio::time::timeout_at(deadline, wm.wait_for(|&w| w >= version))
                .await
                .is_err()
        {
            return Err(NodeError::Unavailable(format!(
                "{path} version {version} is not on this node's disk yet"
            )));
        }
        loop {
            if let Some(before) = record()?.filter(|r| r.version >= version) {
                if let Ok(file) = tokio::fs::File::open(&target).await {
                    let meta = file
                        .metadata()
                        .await
                        .map_err(|e| NodeError::internal(&format!("stat {path}"), e))?;
                    let (_, inode) = crate::fsutil::stamp(&meta);
                    let after = record()?;
                    if after.as_ref() == Some(&before)
                        && inode == before.inode
                        && meta.len() == before.size
                    {
                        return Ok((file, before));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Unavailable(format!(
                    "{path} version {version} is not on this node's disk"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Chunk bytes for a peer's fetch: staged, or read (and verified) from
    /// the folder through the index.
    pub fn serve_chunk(&self, id: &Hash) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.serve_chunk_into(id, &mut out, &mut OpenPacks::default())
            .then_some(out)
    }

    /// [`SyncNode::serve_chunk`] appending to `out` (left as it was if this
    /// node lacks the chunk), with the packs it opens kept in `open`. A
    /// staging area that cannot be read is passed over.
    pub(crate) fn serve_chunk_into(
        &self,
        id: &Hash,
        out: &mut Vec<u8>,
        open: &mut OpenPacks,
    ) -> bool {
        if let Ok(true) = self.staging.get_into(id, out, open) {
            return true;
        }
        match self.local.index().read_chunk(&self.folder, id) {
            Ok(bytes) if out.is_empty() => *out = bytes,
            Ok(bytes) => out.extend_from_slice(&bytes),
            Err(e) => {
                debug!(chunk = %id.fmt_short(), cause = %e, "chunk not served");
                return false;
            }
        }
        true
    }

    /// Which of `ids` this node holds neither staged nor in the folder.
    pub fn lacking(&self, ids: &[Hash]) -> Vec<Hash> {
        ids.iter()
            .filter(|id| {
                !self.staging.contains(id)
                    && self
                        .local
                        .index()
                        .locate(id)
                        .map(|l| l.is_empty())
                        .unwrap_or(true)
            })
            .copied()
            .collect()
    }

    /// For each `(base, added)`: the chunks lacking here among the manifest
    /// `base`'s and `added`, or `None` if this node holds no manifest `base`.
    pub fn lacking_since(&self, queries: &[(Hash, Vec<Hash>)]) -> Vec<Option<Vec<Hash>>> {
        queries
            .iter()
            .map(|(base, added)| {
                let m = self.local.manifest(base).ok()??;
                let mut seen = HashSet::new();
                let ids: Vec<Hash> = m
                    .chunk_ids()
                    .chain(added.iter().copied())
                    .filter(|id| seen.insert(*id))
                    .collect();
                Some(self.lacking(&ids))
            })
            .collect()
    }

    /// The bytes of a run of chunks, concatenated, if all are held here and
    /// they add up to at most [`delta::MAX_RUN_BYTES`].
    fn run_bytes(&self, run: &[Hash]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for id in run {
            let bytes = self
                .serve_chunk(id)
                .ok_or_else(|| format!("chunk {id} of a delta's base is not held here"))?;
            out.extend_from_slice(&bytes);
            if out.len() as u64 > delta::MAX_RUN_BYTES {
                return Err(format!(
                    "a delta's base of {} chunks is over {} bytes",
                    run.len(),
                    delta::MAX_RUN_BYTES
                ));
            }
        }
        Ok(out)
    }

    /// A signature of each run's bytes, `None` for a run not held here.
    pub fn sign_runs(&self, runs: &[Vec<Hash>]) -> Vec<Option<Vec<u8>>> {
        runs.iter()
            .map(|run| self.run_bytes(run).ok().map(|b| delta::sign(&b)))
            .collect()
    }

    /// For each `(signature, ids)`: per id, the delta of the chunk held
    /// here against the bytes the signature describes, if worth sending.
    pub fn diff_chunks(&self, wanted: &[(Vec<u8>, Vec<Hash>)]) -> Vec<Option<Vec<u8>>> {
        wanted
            .iter()
            .flat_map(|(sig, ids)| {
                ids.iter()
                    .map(|id| delta::diff(sig, &self.serve_chunk(id)?))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The bytes of a run of chunks held here and a signature of them, for
    /// fetching the chunks that replaced them as deltas.
    pub(crate) fn signed_run(&self, run: &[Hash]) -> Option<(Vec<u8>, Vec<u8>)> {
        let bytes = self.run_bytes(run).ok()?;
        let sig = delta::sign(&bytes);
        Some((bytes, sig))
    }

    /// Rebuilds chunks from deltas against runs held here, checks each
    /// against its id, and stores them all durably (or none).
    pub fn store_deltas(&self, deltas: &[ChunkAsDelta]) -> Result<(), String> {
        let mut rebuilt = Vec::with_capacity(deltas.len());
        let mut bases: HashMap<&[Hash], Vec<u8>> = HashMap::new();
        for (id, run, d) in deltas {
            let base = match bases.entry(run.as_slice()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.run_bytes(run)?),
            };
            rebuilt.push((*id, delta::rebuild(id, base, d)?));
        }
        self.stage_durably(&rebuilt)?;
        let bytes: usize = deltas.iter().map(|(_, _, d)| d.len()).sum();
        Metrics::add(&self.metrics.delta_bytes_received, bytes as u64);
        Metrics::add(&self.metrics.chunks_rebuilt, rebuilt.len() as u64);
        Ok(())
    }

    /// Stores pushed chunks durably. The transport has checked each against
    /// its id (and reported a peer that lied) before they get here.
    pub fn store_pushed<B: AsRef<[u8]>>(&self, chunks: &[(Hash, B)]) -> Result<(), String> {
        self.stage_durably(chunks)?;
        let bytes: usize = chunks.iter().map(|(_, b)| b.as_ref().len()).sum();
        Metrics::add(&self.metrics.bytes_received_pushed, bytes as u64);
        Ok(())
    }

    /// Serves a writer's [`PeerNet::fetch_from`]: fetches `ids` from member
    /// `from` (every chunk checked by the transport) and stages them
    /// durably. Each is counted as fetched.
    pub async fn pull_from(&self, from: NodeId, ids: Vec<Hash>) -> Result<(), String> {
        let (voters, learners, _) = self.members();
        if from == self.id || !(voters.contains(&from) || learners.contains(&from)) {
            return Err(format!("node {from} is not another member to fetch from"));
        }
        let _arriving = self.staging.arriving(ids.clone());
        let got = self
            .net
            .fetch_chunks(from, ids.clone())
            .await
            .map_err(|e| e.to_string())?;
        let mut chunks = Vec::with_capacity(ids.len());
        for (id, bytes) in ids.into_iter().zip(got) {
            let bytes = bytes.ok_or_else(|| format!("node {from} lacks chunk {id}"))?;
            chunks.push((id, bytes));
        }
        let (n, bytes) = (
            chunks.len(),
            chunks.iter().map(|(_, b)| b.len()).sum::<usize>(),
        );
        let staging = self.staging.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            staging
                .put_many(&chunks)
                .map_err(|e| format!("staging {n} chunks: {e}"))?;
            staging
                .sync_dir()
                .map_err(|e| format!("fsync staging: {e}"))
        })
        .await
        .map_err(|e| e.to_string())??;
        Metrics::add(&self.metrics.chunks_fetched, n as u64);
        Metrics::add(&self.metrics.bytes_fetched, bytes as u64);
        Ok(())
    }

    fn stage_durably<B: AsRef<[u8]>>(&self, chunks: &[(Hash, B)]) -> Result<(), String> {
        self.staging
            .put_many(chunks)
            .map_err(|e| format!("staging {} chunks: {e}", chunks.len()))?;
        self.staging
            .sync_dir()
            .map_err(|e| format!("fsync staging: {e}"))
    }

    /// Pushes manifests in requests kept well under the transport's frame limit.
    async fn push_manifest_list(
        &self,
        peer: NodeId,
        list: &[PushedManifest],
    ) -> Result<(), NodeError> {
        let mut requests: Vec<(Vec<Vec<u8>>, usize)> = Vec::new();
        for m in list {
            let bytes = crate::local::encode(m);
            match requests.last_mut() {
                Some((list, size)) if *size + bytes.len() <= MANIFEST_PUSH_BYTES => {
                    *size += bytes.len();
                    list.push(bytes);
                }
                _ => {
                    let n = bytes.len();
                    requests.push((vec![bytes], n));
                }
            }
        }
        for (list, _) in requests {
            self.net
                .push_manifests(peer, list)
                .await
                .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Stores manifests pushed by a writer, durably (one flush for the
    /// lot), after checking each decodes into a consistent manifest; one
    /// that does not refuses the whole push and stores none.
    pub async fn store_pushed_manifests(&self, list: &[Vec<u8>]) -> Result<(), String> {
        let bytes: usize = list.iter().map(Vec::len).sum();
        Metrics::add(&self.metrics.manifest_bytes_received, bytes as u64);
        let manifests = list
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                crate::local::decode::<PushedManifest>("pushed manifest", bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|p| {
                        p.resolve(|root| self.local.manifest(root).map_err(|e| e.to_string()))
                    })
                    .map_err(|e| format!("manifest {} of {}: {e}", i + 1, list.len()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for manifest in &manifests {
            self.local
                .put_manifest(manifest)
                .map_err(|e| format!("storing manifest {}: {e}", manifest.root()))?;
            self.staging.expect_file(manifest);
        }
        self.local
            .flush()
            .await
            .map_err(|e| format!("flushing manifests: {e}"))
    }

    pub(crate) fn log_started(&self) {
        info!(node = self.id, folder = %self.folder.display(), "sync engine started");
    }
}

/// Sends the chunks and the manifests of `files`: together, or the
/// manifests first when a file is large, since a receiver stages a large
/// file's chunks in place once it knows the file's layout (see
/// `Staging::expect_file`). The commit waits for both anyway.
async fn with_manifests<A, B>(
    files: &[(&Manifest, &Path, Option<&Manifest>)],
    chunks: impl std::future::Future<Output = Result<A, NodeError>>,
    manifests: impl std::future::Future<Output = Result<B, NodeError>>,
) -> Result<(), NodeError> {
    let large = files
        .iter()
        .any(|(m, _, _)| m.size() >= crate::staging::STAGE_AS_FILE_MIN);
    if large {
        manifests.await?;
        chunks.await?;
    } else {
        futures::try_join!(chunks, manifests)?;
    }
    Ok(())
}

/// The chunks of `files` in `missing`, each once (read from the first file
/// that has it), in file order, in batches of at most [`PUSH_CHUNKS`] and
/// about [`BATCH_BYTES`].
fn push_batches(
    files: &[(&Manifest, &Path, Option<&Manifest>)],
    missing: &HashSet<Hash>,
) -> Vec<Vec<(PathBuf, ChunkRef)>> {
    let mut done = HashSet::new();
    let mut batches: Vec<Vec<(PathBuf, ChunkRef)>> = Vec::new();
    let mut bytes = 0usize;
    for (m, file, _) in files {
        for c in m.chunks() {
            if !missing.contains(&c.id) || !done.insert(c.id) {
                continue;
            }
            match batches.last_mut() {
                Some(b) if b.len() < PUSH_CHUNKS && bytes < BATCH_BYTES => {
                    bytes += c.len as usize;
                    b.push((file.to_path_buf(), *c));
                }
                _ => {
                    bytes = c.len as usize;
                    batches.push(vec![(file.to_path_buf(), *c)]);
                }
            }
        }
    }
    batches
}

/// Chunk `c` of the file `f` at `path`, checked against its id: a file
/// changed since it was chunked must not get this node reported by peers.
fn read_chunk_at(f: &std::fs::File, path: &Path, c: &ChunkRef) -> Result<Buffer, NodeError> {
    use std::os::unix::fs::FileExt;
    let mut buf = Buffer::new(c.len as usize);
    f.read_exact_at(&mut buf, c.offset)
        .map_err(|e| NodeError::Internal(format!("reading {}: {e}", path.display())))?;
    if Hash::of(&buf) != c.id {
        return Err(NodeError::Internal(format!(
            "{} changed since it was chunked",
            path.display()
        )));
    }
    Ok(buf)
}
