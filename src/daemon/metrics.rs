//! Prometheus metrics: the text exposition format over a tiny HTTP responder.
//!
//! Owns rendering the daemon's figures (misses, fill latency histogram, bytes fetched,
//! errors, queue depth, overlay opens and how long they were held, per-image progress) and
//! answering `GET` on `--metrics-addr` (off by default). Every request gets the metrics,
//! whatever its path; no other HTTP is spoken.
//! The responder is bounded: [`MAX_CONNECTIONS`] at once, [`CONNECTION_DEADLINE`] for a
//! request head of at most 8 KiB and again for the answer.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::ImageStatus;
use crate::fill::Stats;

/// The overlay open watcher's figures ([`crate::overlay::OverlayWatcher`]).
#[derive(Debug, Clone, Default)]
pub struct OverlayFigures {
    /// Opens of regular files through watched overlays, counted when read.
    pub opens: u64,
    /// Opens read and not answered yet.
    pub inflight: u64,
    /// How long opens were held, per log2 bucket of microseconds.
    pub held: Vec<u64>,
    /// Files the loader-aware read-ahead asked to fill.
    pub loader_ahead: u64,
}

/// Writes a histogram of times from log2 buckets of microseconds (bucket `i` holds
/// `[2^i, 2^(i+1))` µs); the sum is approximated by bucket midpoints.
fn histogram(o: &mut String, name: &str, help: &str, buckets: &[u64]) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cum = 0u64;
    let mut sum = 0f64;
    for (i, n) in buckets.iter().enumerate() {
        cum += n;
        sum += *n as f64 * 1.5 * (1u64 << i) as f64 / 1e6;
        let le = (1u64 << (i + 1)) as f64 / 1e6;
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {cum}");
    }
    let _ = writeln!(
        o,
        "{name}_bucket{{le=\"+Inf\"}} {cum}\n{name}_sum {sum}\n{name}_count {cum}"
    );
}

/// Renders the metrics text.
pub fn render(
    stats: &Stats,
    latency: &[u64],
    inflight: u64,
    overlay: &OverlayFigures,
    images: &[ImageStatus],
) -> String {
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
        "fanfill_delivered_waits_total",
        "Misses that waited for a running layer stream and got their bytes from it.",
        stats.delivered,
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
    histogram(
        &mut o,
        "fanfill_fill_latency_seconds",
        "Time from reading an event to answering it.",
        latency,
    );
    let _ = writeln!(
        o,
        "# HELP fanfill_overlay_opens_total Opens of regular files through watched overlays (counted when read).\n# TYPE fanfill_overlay_opens_total counter\nfanfill_overlay_opens_total {}",
        overlay.opens
    );
    let _ = writeln!(
        o,
        "# HELP fanfill_overlay_opens_inflight Opens through watched overlays held now (waiting for their fill).\n# TYPE fanfill_overlay_opens_inflight gauge\nfanfill_overlay_opens_inflight {}",
        overlay.inflight
    );
    histogram(
        &mut o,
        "fanfill_overlay_open_held_seconds",
        "Time an open through a watched overlay was held, from reading it to answering it (its lower file's fill).",
        &overlay.held,
    );
    let _ = writeln!(
        o,
        "# HELP fanfill_loader_ahead_total Files the loader-aware read-ahead asked to fill.\n# TYPE fanfill_loader_ahead_total counter\nfanfill_loader_ahead_total {}",
        overlay.loader_ahead
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

/// Connections answered at once; more are closed unanswered until one ends.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest a connection may take to send its request head, and to take the answer.
pub const CONNECTION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest request head read (its content is not needed).
const MAX_REQUEST_HEAD: usize = 8192;

/// Answers every connection on `listener` with the current metrics: at most
/// [`MAX_CONNECTIONS`] at once (others are closed at once), each given
/// [`CONNECTION_DEADLINE`] in all to send at most 8 KiB of request head and again to take
/// the answer, so no client can hold the daemon's memory or tasks.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<dyn Fn() -> String + Send + Sync>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let mut conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics: too many connections; one closed unanswered");
            drop(conn);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Read the request head (up to a blank line or 8 KiB).
            let head = async {
                let mut buf = vec![0u8; MAX_REQUEST_HEAD];
                let mut got = 0;
                while got < buf.len() {
                    match conn.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => got += n,
                    }
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
                true
            };
            if !matches!(
                tokio::time::timeout(CONNECTION_DEADLINE, head).await,
                Ok(true)
            ) {
                return;
            }
            let body = tokio::task::spawn_blocking(move || metrics())
                .await
                .unwrap_or_default();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, async {
                conn.write_all(head.as_bytes()).await?;
                conn.write_all(body.as_bytes()).await
            })
            .await;
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
        let mut held = vec![0u64; 32];
        held[13] = 2;
        let overlay = OverlayFigures {
            opens: 7,
            inflight: 1,
            held,
            loader_ahead: 3,
        };
        let t = render(&s, &lat, 2, &overlay, &[]);
        assert!(t.contains("fanfill_misses_total 4"));
        assert!(t.contains("fanfill_inflight_events 2"));
        assert!(t.contains("fanfill_fill_latency_seconds_bucket{le=\"0.000032\"} 3"));
        assert!(t.contains("fanfill_fill_latency_seconds_bucket{le=\"+Inf\"} 4"));
        assert!(t.contains("fanfill_fill_latency_seconds_count 4"));
        assert!(t.contains("fanfill_overlay_opens_total 7"));
        assert!(t.contains("fanfill_overlay_opens_inflight 1"));
        assert!(t.contains("fanfill_overlay_open_held_seconds_bucket{le=\"0.008192\"} 0"));
        assert!(t.contains("fanfill_overlay_open_held_seconds_bucket{le=\"0.016384\"} 2"));
        assert!(t.contains("fanfill_overlay_open_held_seconds_count 2"));
        assert!(t.contains("fanfill_loader_ahead_total 3"));
    }
}
