//! synod-lab: the failure-injection lab that shows synod safe, in the manner
//! of Jepsen. It starts real `synod` processes (in network namespaces or on
//! loopback), runs concurrent clients against their HTTP API while nemeses
//! break the cluster, records every operation as a history, and checks that
//! history with independent checkers. It never links node internals: only
//! the `synod` binary, its HTTP API and its folders.
//!
//! Layout:
//! - `history`: the JSON-lines history (invoke/ok/fail/info), pairing.
//! - `checker`: verdicts; `checker/linearizable` (Wing–Gong–Lowe search per
//!   path), `checker/lost_writes`, `checker/files`, `checker/convergence`.
//! - `api`: a small blocking HTTP client for synod's API.
//! - `cluster`: config generation, node processes, start/kill/pause.
//! - `netns`: namespaces, bridge, veths, nftables and `tc` rules.
//! - `nemesis`: faults with start/stop, partition shapes, seeded or fixed
//!   schedules.
//! - `workload`: the `register` workload's clients; `workload/files`: the
//!   `files` workload (larger files put, edited, renamed, deleted).
//! - `report`: the stdout summary and `report.html`.
//! - `run`: one run end to end, re-checking, campaigns.
//! - `bench`: `synod-lab bench`, synod side by side with rsync, Syncthing
//!   and etcd.

pub mod api;
pub mod bench;
pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod netns;
pub mod report;
pub mod run;
pub mod workload;
