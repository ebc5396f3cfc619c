//! Property: random Put/Delete/Rename with random preconditions, sent to random
//! nodes of a 3-node cluster under random partitions, leave every node with the
//! same namespace and root once healed, equal to a single-threaded model that
//! applies the committed commands in log order.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use openraft::EntryPayload;
use proptest::prelude::*;
use synod_consensus::testing::TestCluster;
use synod_consensus::{
    expect_holds, Answer, Command, Entry, Expect, NsPath, Proposer, ProposerConfig,
};
use synod_merkle::NamespaceTree;
use tracing::info;

const PATHS: [&str; 5] = ["a", "b", "d/c", "d/e", "f"];

#[derive(Debug, Clone)]
enum ExpectGen {
    Any,
    Absent,
    /// The version some node currently shows (possibly stale).
    Observed(usize),
    Version(u64),
}

#[derive(Debug, Clone)]
enum Step {
    Commands(Vec<(usize, Op)>),
    Isolate(usize),
    Split(usize),
    Heal,
}

#[derive(Debug, Clone)]
enum Op {
    Put(usize, ExpectGen),
    Delete(usize, ExpectGen),
    Rename(usize, usize, ExpectGen, ExpectGen),
}

fn expect_gen() -> impl Strategy<Value = ExpectGen> {
    prop_oneof![
        Just(ExpectGen::Any),
        Just(ExpectGen::Absent),
        (0..3usize).prop_map(ExpectGen::Observed),
        (0..40u64).prop_map(ExpectGen::Version),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        4 => (p.clone(), expect_gen()).prop_map(|(a, e)| Op::Put(a, e)),
        2 => (p.clone(), expect_gen()).prop_map(|(a, e)| Op::Delete(a, e)),
        2 => (p.clone(), p, expect_gen(), expect_gen()).prop_map(|(a, b, e, f)| Op::Rename(a, b, e, f)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => proptest::collection::vec((0..3usize, op()), 1..5).prop_map(Step::Commands),
        1 => (0..3usize).prop_map(Step::Isolate),
        1 => (0..3usize).prop_map(Step::Split),
        1 => Just(Step::Heal),
    ]
}

fn resolve(c: &TestCluster, e: &ExpectGen, path: &NsPath) -> Expect {
    match e {
        ExpectGen::Any => Expect::Any,
        ExpectGen::Absent => Expect::Absent,
        ExpectGen::Version(v) => Expect::Version(*v),
        ExpectGen::Observed(n) => {
            let seen = c
                .node(*n as u64 + 1)
                .ok()
                .and_then(|n| n.view.get(path).ok().flatten());
            seen.map_or(Expect::Absent, |e| Expect::Version(e.version))
        }
    }
}

fn to_command(c: &TestCluster, op: &Op, n: u64) -> Command {
    let p = |i: usize| NsPath::parse(PATHS[i]).expect("valid");
    match op {
        Op::Put(a, e) => Command::put(&p(*a), file(n), resolve(c, e, &p(*a))),
        Op::Delete(a, e) => Command::delete(&p(*a), resolve(c, e, &p(*a))),
        Op::Rename(a, b, e, f) => {
            Command::rename(&p(*a), &p(*b), resolve(c, e, &p(*a)), resolve(c, f, &p(*b)))
        }
    }
}

/// The single-threaded model: an independent re-statement of the command semantics.
#[derive(Default)]
struct Model {
    map: BTreeMap<String, Entry>,
    answered: HashMap<(u64, u64), ()>,
}

impl Model {
    fn apply(&mut self, index: u64, cmd: &Command) {
        let tomb = |e: &Entry| {
            let mut t = e.clone();
            t.version = index;
            t.tombstone = true;
            t.size = 0;
            t.holders.clear();
            t
        };
        match cmd {
            Command::Put {
                path,
                entry,
                expect,
            } if expect_holds(*expect, self.map.get(path)) => {
                let mut e = entry.clone();
                e.version = index;
                e.tombstone = false;
                self.map.insert(path.clone(), e);
            }
            Command::Delete { path, expect } => {
                if let Some(cur) = self.map.get(path).filter(|e| !e.tombstone) {
                    if expect_holds(*expect, Some(cur)) {
                        let t = tomb(cur);
                        self.map.insert(path.clone(), t);
                    }
                }
            }
            Command::Rename {
                from,
                to,
                expect_from,
                expect_to,
            } => {
                let Some(f) = self.map.get(from).filter(|e| !e.tombstone).cloned() else {
                    return;
                };
                if from == to
                    || !expect_holds(*expect_from, Some(&f))
                    || !expect_holds(*expect_to, self.map.get(to))
                {
                    return;
                }
                let mut moved = f.clone();
                moved.version = index;
                self.map.insert(to.clone(), moved);
                self.map.insert(from.clone(), tomb(&f));
            }
            _ => {}
        }
    }
}

async fn run_case(steps: Vec<Step>) -> anyhow::Result<()> {
    let d = tempfile::tempdir()?;
    let mut c = TestCluster::new(d.path(), TestCluster::fast_config())?;
    c.start(&[1, 2, 3]).await?;
    c.router.set_delay(Duration::ZERO, Duration::from_millis(2));
    c.router.set_drop_rate(0.02);
    let proposers: Vec<Proposer> = (1..=3)
        .map(|id| {
            Proposer::spawn(
                c.node(id).expect("node").raft.clone(),
                rand::random(),
                ProposerConfig::default(),
            )
        })
        .collect();
    let mut n = 0u64;
    for s in &steps {
        match s {
            Step::Isolate(i) => {
                info!(node = i + 1, "--- isolate");
                c.router.heal();
                c.router.isolate(*i as u64 + 1);
            }
            Step::Split(i) => {
                let lone = *i as u64 + 1;
                let rest: Vec<u64> = (1..=3).filter(|x| *x != lone).collect();
                info!(lone, "--- split");
                c.router.partition(&[&[lone], &rest]);
            }
            Step::Heal => {
                info!("--- heal");
                c.router.heal();
            }
            Step::Commands(ops) => {
                let mut tasks = Vec::new();
                for (node, op) in ops {
                    n += 1;
                    let cmd = to_command(&c, op, n);
                    let pr = proposers[*node].clone();
                    tasks.push(tokio::spawn(async move {
                        tokio::time::timeout(Duration::from_millis(300), pr.propose(cmd)).await
                    }));
                }
                for t in tasks {
                    let _ = t.await?;
                }
            }
        }
    }
    info!("--- heal and settle");
    c.router.heal();
    c.router.set_drop_rate(0.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let l = c.wait_leader(Duration::from_secs(10)).await?;
        let pr = Proposer::spawn(
            c.node(l)?.raft.clone(),
            rand::random(),
            ProposerConfig::default(),
        );
        let fin = Command::put(&p("zz-final"), file(0), Expect::Any);
        if let Ok(Ok(Answer::Ok { .. })) =
            tokio::time::timeout(Duration::from_secs(2), pr.propose(fin)).await
        {
            break l;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "cluster did not settle"
        );
    };
    // Commands whose callers timed out may still sit in a proposer's queue
    // and commit after the final write: compare at a cut where all three
    // nodes show the same applied index before and after they are read.
    drop(proposers);
    let (last, got, root) = loop {
        let last = max_applied(&c, &[1, 2, 3]);
        c.wait_applied(&[1, 2, 3], last, Duration::from_secs(10))
            .await?;
        let views = [1, 2, 3]
            .iter()
            .map(|id| {
                c.node(*id)
                    .and_then(|n| Ok((n.view.all()?, n.view.namespace_root())))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if max_applied(&c, &[1, 2, 3]) == last {
            for (i, v) in views.iter().enumerate().skip(1) {
                assert_eq!(v, &views[0], "node {} differs from node 1", i + 1);
            }
            let got: BTreeMap<String, Entry> = views[0]
                .0
                .iter()
                .map(|(p, e)| (p.to_string(), e.clone()))
                .collect();
            break (last, got, views[0].1);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(15),
            "the log kept growing after the final write"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut model = Model::default();
    for ent in c.node(leader)?.log.read_entries(..=last)? {
        if let EntryPayload::Normal(req) = &ent.payload {
            for (rid, cmd) in &req.commands {
                if model
                    .answered
                    .insert((rid.client, rid.serial), ())
                    .is_none()
                {
                    model.apply(ent.log_id.index, cmd);
                }
            }
        }
    }
    assert_eq!(
        got, model.map,
        "replicated namespace differs from the model"
    );
    let mut tree = NamespaceTree::new();
    for (p, e) in &model.map {
        tree.insert(p, e.tree_hash());
    }
    assert_eq!(root, tree.root(), "root differs from the model's");
    for id in [1, 2, 3] {
        c.stop_node(id).await?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, max_shrink_iters: 4, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_to_the_model_under_partitions(steps in proptest::collection::vec(step(), 5..25)) {
        init_tracing();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let res = rt.block_on(async { tokio::time::timeout(Duration::from_secs(90), run_case(steps)).await });
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => prop_assert!(false, "case failed: {e:#}"),
            Err(_) => prop_assert!(false, "case exceeded 90 s"),
        }
    }
}
