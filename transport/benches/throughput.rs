//! Chunk-fetch throughput over loopback against a raw quinn single-stream
//! copy measured in the same run.
//!
//! `cargo bench -p synod-transport --bench throughput` (env `SYNOD_BENCH_MIB`
//! to change the 1 GiB volume, `SYNOD_BENCH_BATCH` chunks per request,
//! `SYNOD_BENCH_WINDOW` requests in flight, capped by `SYNOD_BENCH_SLOTS`,
//! the transport's per-peer chunk-request budget).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use synod_consensus::Request;
use synod_merkle::Hash;
use synod_transport::messages::ForwardResponse;
use synod_transport::{
    start_transport, Bytes, ChunkData, Keypair, PeerId, ServiceError, Services, TransportConfig,
};

// The allocator synod's binaries use: a fresh frame buffer per request
// costs glibc page faults (measured: ≈ 10 % of the fetch's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK: usize = 64 * 1024;
/// Distinct chunks held by the server (16 MiB); fetches cycle over them.
const POOL: usize = 256;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct MemChunks(HashMap<Hash, Bytes>);

impl Services for MemChunks {
    fn tree_top(
        &self,
        _: PeerId,
        _: Hash,
    ) -> BoxFuture<'_, Result<Option<(u64, Hash)>, ServiceError>> {
        Box::pin(async { Ok(None) })
    }
    fn tree_nodes(
        &self,
        _: PeerId,
        _: Hash,
        _: usize,
        _: Range<u64>,
    ) -> BoxFuture<'_, Result<Option<Vec<Hash>>, ServiceError>> {
        Box::pin(async { Ok(None) })
    }
    fn read_chunks(
        &self,
        _: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Option<Bytes>>, ServiceError>> {
        Box::pin(async move { Ok(ids.iter().map(|id| self.0.get(id).cloned()).collect()) })
    }
    fn store_chunks(
        &self,
        _: PeerId,
        _: Vec<ChunkData>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async { Ok(()) })
    }
    fn store_manifests(
        &self,
        _: PeerId,
        _: Vec<Vec<u8>>,
    ) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async { Ok(()) })
    }
    fn missing_chunks(
        &self,
        _: PeerId,
        ids: Vec<Hash>,
    ) -> BoxFuture<'_, Result<Vec<Hash>, ServiceError>> {
        Box::pin(async move {
            Ok(ids
                .into_iter()
                .filter(|id| !self.0.contains_key(id))
                .collect())
        })
    }
    fn forward_write(&self, _: PeerId, _: Request) -> BoxFuture<'_, ForwardResponse> {
        Box::pin(async { ForwardResponse::Failed("bench".into()) })
    }
    fn read_index(&self, _: PeerId) -> BoxFuture<'_, ForwardResponse> {
        Box::pin(async { ForwardResponse::Failed("bench".into()) })
    }
}

fn mbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

async fn libp2p_fetch(
    total: u64,
    batch: usize,
    window: usize,
    slots: usize,
) -> anyhow::Result<f64> {
    let mut chunks = HashMap::new();
    let mut ids = Vec::new();
    for i in 0..POOL {
        let mut bytes = vec![0u8; CHUNK];
        for (j, b) in bytes.iter_mut().enumerate() {
            *b = (i * 31 + j * 7) as u8;
        }
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let id = Hash::of(&bytes);
        ids.push(id);
        chunks.insert(id, Bytes::from(bytes));
    }
    let config = || TransportConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1"
            .parse()
            .expect("valid multiaddr")],
        chunk_requests_per_peer: slots,
        ..TransportConfig::default()
    };
    let (server, _st) = start_transport(
        Keypair::generate_ed25519(),
        config(),
        Arc::new(MemChunks(chunks)),
    )
    .await?;
    let (client, _ct) = start_transport(
        Keypair::generate_ed25519(),
        config(),
        Arc::new(MemChunks(HashMap::new())),
    )
    .await?;
    server.set_allowed_peers([client.local_peer_id()]).await?;
    client.set_allowed_peers([server.local_peer_id()]).await?;
    client
        .add_peer_address(server.local_peer_id(), server.listen_addrs()[0].clone())
        .await?;
    let peer = server.local_peer_id();
    // Warm up the connection.
    client.fetch_chunks(peer, &ids[..1]).await?;

    let requests = (total as usize).div_ceil(CHUNK * batch);
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    let mut bytes = 0u64;
    while sent < requests || !in_flight.is_empty() {
        while sent < requests && in_flight.len() < window {
            let first = (sent * batch) % POOL;
            let want: Vec<Hash> = (0..batch).map(|k| ids[(first + k) % POOL]).collect();
            let client = client.clone();
            in_flight.push(async move { client.fetch_chunks(peer, &want).await });
            sent += 1;
        }
        if let Some(got) = in_flight.next().await {
            for c in got? {
                bytes += c.map_or(0, |c| c.len() as u64);
            }
        }
    }
    let took = start.elapsed();
    client.shutdown().await;
    server.shutdown().await;
    Ok(mbps(bytes, took))
}

/// One libp2p-stream stream over libp2p-quic, raw bytes, no framing: the
/// ceiling of any protocol on libp2p's QUIC (same cipher as synod's path).
async fn libp2p_stream_copy(total: u64) -> anyhow::Result<f64> {
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::StreamProtocol;
    const PROTO: StreamProtocol = StreamProtocol::new("/synod-bench/copy/1");
    let swarm = || -> anyhow::Result<libp2p::Swarm<libp2p_stream::Behaviour>> {
        Ok(libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_quic()
            .with_behaviour(|_| libp2p_stream::Behaviour::new())?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
            .build())
    };
    let mut server = swarm()?;
    let mut client = swarm()?;
    server.listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse()?)?;
    let addr = loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
            server.select_next_some().await
        {
            break address;
        }
    };
    let server_peer = *server.local_peer_id();
    let mut incoming = server.behaviour().new_control().accept(PROTO)?;
    let mut control = client.behaviour().new_control();
    // libp2p-stream keeps no address book: dial first.
    client.dial(addr.with(libp2p::multiaddr::Protocol::P2p(server_peer)))?;
    let drive = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = server.select_next_some() => {}
                _ = client.select_next_some() => {}
            }
        }
    });
    let recv = tokio::spawn(async move {
        let (_, mut stream) = incoming
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no stream"))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        anyhow::Ok(got)
    });
    let mut stream = control
        .open_stream(server_peer, PROTO)
        .await
        .map_err(|e| anyhow::anyhow!("open stream: {e}"))?;
    let block = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        stream.write_all(&block).await?;
        sent += block.len() as u64;
    }
    stream.close().await?;
    let got = recv.await??;
    let took = start.elapsed();
    drive.abort();
    anyhow::ensure!(
        got == total,
        "libp2p-stream received {got} of {total} bytes"
    );
    Ok(mbps(got, took))
}

/// Raw quinn copy of `total` bytes on one stream. `chacha` restricts TLS to
/// the suite libp2p-tls prefers (ChaCha20-Poly1305); otherwise rustls'
/// default (AES-128-GCM first) is used.
async fn raw_quinn(total: u64, chacha: bool) -> anyhow::Result<f64> {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use rustls::crypto::ring::{cipher_suite, default_provider};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut provider = default_provider();
    if chacha {
        provider.cipher_suites = vec![
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            // quinn needs it for Initial packets only.
            cipher_suite::TLS13_AES_128_GCM_SHA256,
        ];
    }
    let provider = Arc::new(provider);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    let server_cfg =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls)?,
    )));

    let recv = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .ok_or_else(|| anyhow::anyhow!("no connection"))?
            .await?;
        let (_tx, mut rx) = conn.accept_bi().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while let Some(n) = rx.read(&mut buf).await? {
            got += n as u64;
        }
        anyhow::Ok(got)
    });
    let conn = client.connect(addr, "localhost")?.await?;
    let (mut tx, _rx) = conn.open_bi().await?;
    let block = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        tx.write_all(&block).await?;
        sent += block.len() as u64;
    }
    tx.finish()?;
    let got = recv.await??;
    let took = start.elapsed();
    anyhow::ensure!(got == total, "raw quinn received {got} of {total} bytes");
    Ok(mbps(got, took))
}

fn main() -> anyhow::Result<()> {
    // Both ring and aws-lc-rs are compiled in (libp2p-quic); pick one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let total = env_usize("SYNOD_BENCH_MIB", 1024) as u64 * 1024 * 1024;
    let batch = env_usize("SYNOD_BENCH_BATCH", 8);
    let window = env_usize("SYNOD_BENCH_WINDOW", 4);
    let slots = env_usize(
        "SYNOD_BENCH_SLOTS",
        TransportConfig::default().chunk_requests_per_peer,
    );
    let rt = tokio::runtime::Runtime::new()?;
    let rounds = env_usize("SYNOD_BENCH_ROUNDS", 3).max(1);
    // The three measurements are interleaved, round after round, so a burst
    // of other load on this 2-core machine hits all of them alike.
    rt.block_on(async {
        let (mut q, mut qc, mut ls, mut s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            q.push(raw_quinn(total, false).await?);
            qc.push(raw_quinn(total, true).await?);
            ls.push(libp2p_stream_copy(total).await?);
            s.push(libp2p_fetch(total, batch, window, slots).await?);
            println!(
                "round {round}: raw quinn {:.1}, raw quinn chacha {:.1}, libp2p-stream {:.1}, synod {:.1} MB/s",
                q[round - 1],
                qc[round - 1],
                ls[round - 1],
                s[round - 1]
            );
        }
        // Each round's ratio pairs measurements taken seconds apart, so a
        // slow spell of this shared machine hits both sides of it.
        let mut paired: Vec<f64> = s.iter().zip(&q).map(|(s, q)| s / q).collect();
        let paired = median(&mut paired);
        let (quinn, quinn_chacha, stream, libp2p) =
            (median(&mut q), median(&mut qc), median(&mut ls), median(&mut s));
        println!("median of {rounds} rounds, {} MiB each, {} KiB chunks", total >> 20, CHUNK >> 10);
        println!("raw quinn, 1 stream    {quinn:8.1} MB/s  (rustls default: AES-128-GCM)");
        println!("raw quinn, 1 stream    {quinn_chacha:8.1} MB/s  (ChaCha20-Poly1305, as libp2p-tls negotiates)");
        println!("libp2p-stream, 1 str. {stream:8.1} MB/s  (raw bytes over libp2p-quic: its ceiling)");
        println!(
            "synod chunk fetch      {libp2p:8.1} MB/s  ({batch} chunks/request, {} requests in flight, BLAKE3-verified)",
            window.min(slots)
        );
        println!("ratio                  {:8.2}  (target >= 0.80, against AES-GCM quinn)", libp2p / quinn);
        println!("ratio, per round       {paired:8.2}  (median of each round's synod / raw quinn)");
        println!("ratio, same cipher     {:8.2}", libp2p / quinn_chacha);
        println!("ratio to libp2p-stream {:8.2}", libp2p / stream);
        anyhow::Ok(())
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
