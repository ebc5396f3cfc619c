//! openraft's storage conformance suite against the sled storage.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use synod_consensus::{open_stores, LogStore, NodeId, StateMachineStore, TypeConfig};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let (log, sm) =
            open_stores(dir.path(), "suite").map_err(|e| openraft::StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(SledBuilder).expect("storage suite");
}
