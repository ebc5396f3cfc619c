//! The remote side of `synod_merkle::TreeSource`: a peer's manifest tree
//! read over `/synod/tree/1`, so `diff_trees` fetches only differing nodes.

use std::ops::Range;
use std::sync::Arc;

use libp2p::PeerId;
use synod_merkle::{diff_trees, DiffError, Hash, MerkleTree, TreeDiff, TreeSource};
use tokio::runtime::Handle;

use crate::handle::{RequestError, TransportHandle};

/// A peer's tree `root` as a (blocking) [`TreeSource`]. Use it from a
/// blocking thread only (see [`diff_remote_tree`]); every call waits for one
/// round trip.
#[derive(Debug)]
pub struct RemoteTree {
    handle: TransportHandle,
    runtime: Handle,
    peer: PeerId,
    root: Hash,
    /// Node requests made so far.
    pub requests: u64,
}

impl RemoteTree {
    /// The tree `root` held by `peer`, driven on `runtime`.
    pub fn new(handle: TransportHandle, runtime: Handle, peer: PeerId, root: Hash) -> Self {
        RemoteTree {
            handle,
            runtime,
            peer,
            root,
            requests: 0,
        }
    }
}

impl TreeSource for RemoteTree {
    type Error = RequestError;

    fn top(&mut self) -> Result<(u64, Hash), RequestError> {
        self.requests += 1;
        self.runtime
            .block_on(self.handle.tree_top(self.peer, self.root))
    }

    fn nodes(&mut self, level: usize, range: Range<u64>) -> Result<Vec<Hash>, RequestError> {
        self.requests += 1;
        self.runtime
            .block_on(self.handle.tree_nodes(self.peer, self.root, level, range))
    }
}

/// Diffs `local` against `peer`'s tree `remote_root`, fetching only the
/// remote nodes under differing subtrees. `diff_trees` is synchronous, so it
/// runs on a blocking thread and waits on the network from there.
// The error path carries the peer id; it is rare, so its size does not matter.
#[allow(clippy::result_large_err)]
pub async fn diff_remote_tree(
    handle: &TransportHandle,
    peer: PeerId,
    local: Arc<MerkleTree>,
    remote_root: Hash,
) -> Result<(TreeDiff, u64), DiffError<RequestError>> {
    let mut source = RemoteTree::new(handle.clone(), Handle::current(), peer, remote_root);
    tokio::task::spawn_blocking(move || {
        diff_trees(&local, &remote_root, &mut source).map(|d| (d, source.requests))
    })
    .await
    .map_err(|_| DiffError::Source(RequestError::Shutdown))?
}
