//! Prometheus metrics: the text exposition format over a tiny HTTP responder.
//!
//! Owns rendering the daemon's figures (misses, fill latency histogram, bytes fetched,
//! errors, queue depth, per-image progress) and answering `GET` on `--metrics-addr` (off by
//! default). Every request gets the metrics, whatever its path; no other HTTP is spoken.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::ImageStatus;
use crate::fill::Stats;

/// Renders the metrics text.
pub fn render(stats: &Stats, latency: &[u64], inflight: u64, images: &[ImageStatus]) -> String {
    let mut o = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        "fanfill_misses_total",
        "Pre-content events of readers served (misses).",
        stats.events,
    );
    counter(
        "fanfill_fills_total",
        "Chunk fetches performed.",
        stats.fills,
    );
    counter(
        "fanfill_bytes_fetched_total",
        "Bytes fetched from registries and layouts.",
        stats.bytes_fetched,
    );
    counter(
        "fanfill_fill_errors_total",
        "Fills or events answered with an error.",
        stats.errors,
    );
    let _ = writeln!(
        o,
        "# HELP fanfill_inflight_events Reader events being served now (queue depth).\n# TYPE fanfill_inflight_events gauge\nfanfill_inflight_events {inflight}"
    );
    let _ = writeln!(
        o,
        "# HELP fanfill_fill_latency_seconds Time from reading an event to answering it.\n# TYPE fanfill_fill_latency_seconds histogram"
    );
    let mut cum = 0u64;
    let mut sum = 0f64;
    for (i, n) in latency.iter().enumerate() {
        cum += n;
        // Bucket i holds [2^i, 2^(i+1)) µs; approximate the sum by bucket midpoints.
        sum += *n as f64 * 1.5 * (1u64 << i) as f64 / 1e6;
        let le = (1u64 << (i + 1)) as f64 / 1e6;
        let _ = writeln!(
            o,
            "fanfill_fill_latency_seconds_bucket{{le=\"{le}\"}} {cum}"
        );
    }
    let _ = writeln!(
        o,
        "fanfill_fill_latency_seconds_bucket{{le=\"+Inf\"}} {cum}\nfanfill_fill_latency_seconds_sum {sum}\nfanfill_fill_latency_seconds_count {cum}"
    );
    let _ = writeln!(
        o,
        "# HELP fanfill_image_bytes Bytes of an image's files, total and filled.\n# TYPE fanfill_image_bytes gauge"
    );
    for i in images {
        let dest = i
            .dest
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        let _ = writeln!(
            o,
            "fanfill_image_bytes{{dest=\"{dest}\",kind=\"total\"}} {}\nfanfill_image_bytes{{dest=\"{dest}\",kind=\"filled\"}} {}\nfanfill_image_bytes{{dest=\"{dest}\",kind=\"fetched\"}} {}\nfanfill_image_files{{dest=\"{dest}\",kind=\"total\"}} {}\nfanfill_image_files{{dest=\"{dest}\",kind=\"complete\"}} {}\nfanfill_image_fetch_errors{{dest=\"{dest}\"}} {}",
            i.bytes_total, i.bytes_filled, i.bytes_fetched, i.files, i.files_complete, i.errors
        );
    }
    o
}

/// Answers every connection on `listener` with the current metrics.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read the request head (up to a blank line or 8 KiB); its content is not needed.
            let mut buf = vec![0u8; 8192];
            let mut got = 0;
            while got < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    conn.read(&mut buf[got..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => got += n,
                }
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = tokio::task::spawn_blocking(move || metrics())
                .await
                .unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_ends_at_inf() {
        let mut lat = vec![0u64; 32];
        lat[4] = 3;
        lat[10] = 1;
        let s = Stats {
            events: 4,
            ..Stats::default()
        };
        let t = render(&s, &lat, 2, &[]);
        assert!(t.contains("fanfill_misses_total 4"));
        assert!(t.contains("fanfill_inflight_events 2"));
        assert!(t.contains("fanfill_fill_latency_seconds_bucket{le=\"0.000032\"} 3"));
        assert!(t.contains("fanfill_fill_latency_seconds_bucket{le=\"+Inf\"} 4"));
        assert!(t.contains("fanfill_fill_latency_seconds_count 4"));
    }
}
