//! Measures the fill granularity trade-off on the real kernel: for several chunk sizes, the
//! time to read a 64 MiB placeholder sequentially and to do 200 random 4 KiB reads, against a
//! source that behaves like a registry behind a 1 Gbit/s link with 2 ms RTT (per-request
//! latency plus transfer time). Prints a markdown table; the engine's default chunk size was
//! chosen from it.
//!
//! Run as root: `cargo run --release --example chunk_size`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fanfill::fill::{ContentSource, Engine, EngineConfig, Placeholder, SourceError, Verify};
use futures::FutureExt;
use futures::future::BoxFuture;

/// One shared link: transfers queue behind each other (bandwidth is shared), each request
/// also pays one round trip.
struct LinkSource {
    data: Arc<Vec<u8>>,
    rtt: Duration,
    bytes_per_sec: f64,
    link_free_at: Arc<std::sync::Mutex<Instant>>,
}

impl ContentSource for LinkSource {
    fn read_at(
        &self,
        _file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            let wire = Duration::from_secs_f64(len as f64 / self.bytes_per_sec);
            let done = {
                let mut free = self.link_free_at.lock().unwrap();
                let start = (*free).max(Instant::now() + self.rtt / 2);
                *free = start + wire;
                *free + self.rtt / 2
            };
            tokio::time::sleep_until(done.into()).await;
            Ok(self.data[offset as usize..(offset + len) as usize].to_vec())
        }
        .boxed()
    }
}

fn main() -> anyhow::Result<()> {
    let size: usize = 64 << 20;
    let data: Arc<Vec<u8>> = Arc::new((0..size).map(|i| (i * 31 % 251) as u8).collect());
    let dir = tempfile::tempdir()?;
    println!(
        "| chunk | sequential 64 MiB (ms) | 200 random 4 KiB reads (ms) | bytes fetched for random reads |"
    );
    println!("|---|---|---|---|");
    for chunk in [64u64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20] {
        let engine = Engine::start(EngineConfig {
            chunk_size: chunk,
            ..EngineConfig::default()
        })?;
        let link = Arc::new(std::sync::Mutex::new(Instant::now()));
        let mk = |name: &str| -> anyhow::Result<std::path::PathBuf> {
            let p = dir.path().join(format!("{name}-{chunk}"));
            File::create(&p)?.set_len(size as u64)?;
            engine.register(Placeholder {
                path: p.clone().into(),
                size: size as u64,
                source: Arc::new(LinkSource {
                    data: data.clone(),
                    rtt: Duration::from_millis(2),
                    bytes_per_sec: 125e6,
                    link_free_at: link.clone(),
                }),
                file: 0,
                verify: Verify::None,
            })?;
            Ok(p)
        };
        let seq = mk("seq")?;
        let t = Instant::now();
        let got = std::fs::read(&seq)?;
        let seq_ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(got == *data);
        let rnd = mk("rnd")?;
        let before = engine.stats().bytes_fetched;
        let f = File::open(&rnd)?;
        let mut buf = [0u8; 4096];
        let mut x: u64 = 88172645463325252;
        let t = Instant::now();
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (size as u64 - 4096)) & !4095;
            f.read_exact_at(&mut buf, off)?;
            assert!(buf[..] == data[off as usize..off as usize + 4096]);
        }
        let rnd_ms = t.elapsed().as_secs_f64() * 1e3;
        let fetched = engine.stats().bytes_fetched - before;
        println!(
            "| {} KiB | {seq_ms:.0} | {rnd_ms:.0} | {:.1} MiB |",
            chunk >> 10,
            fetched as f64 / 1048576.0
        );
        engine.shutdown();
    }
    Ok(())
}
