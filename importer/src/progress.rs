//! Progress of one import: bytes read from the source against the expected
//! total, speeds, the Prometheus gauges DVP's controller scrapes
//! (`registry_progress`, `registry_average_speed`, `registry_current_speed`
//! labelled `ownerUID`), the final JSON report and a terminal progress bar.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Shared progress counters.
#[derive(Debug)]
pub struct Progress {
    read: AtomicU64,
    total: AtomicU64,
    done: AtomicBool,
    started: Instant,
    /// (when, bytes read then) of the last speed sample.
    sample: Mutex<(Instant, u64, f64)>,
}

impl Default for Progress {
    fn default() -> Self {
        let now = Instant::now();
        Progress {
            read: AtomicU64::new(0),
            total: AtomicU64::new(0),
            done: AtomicBool::new(false),
            started: now,
            sample: Mutex::new((now, 0, 0.0)),
        }
    }
}

impl Progress {
    /// Counts bytes read from the source.
    pub fn add_read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes read so far.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Sets the expected total (0: unknown).
    pub fn set_total(&self, total: Option<u64>) {
        self.total.store(total.unwrap_or(0), Ordering::Relaxed);
    }

    /// Marks the import stored: progress becomes 100.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Relaxed);
    }

    /// Percent done, `None` while the total is unknown; below 100 until
    /// the image is stored.
    pub fn percent(&self) -> Option<f64> {
        if self.done.load(Ordering::Relaxed) {
            return Some(100.0);
        }
        let total = self.total.load(Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        Some((self.read() as f64 * 100.0 / total as f64).min(99.9))
    }

    /// Time since the import started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Average bytes per second since the start.
    pub fn average_speed(&self) -> f64 {
        let seconds = self.elapsed().as_secs_f64();
        if seconds <= 0.0 {
            0.0
        } else {
            self.read() as f64 / seconds
        }
    }

    /// Bytes per second over the last second or so.
    pub fn current_speed(&self) -> f64 {
        let mut sample = self.sample.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(sample.0).as_secs_f64();
        if elapsed >= 0.5 {
            let read = self.read();
            sample.2 = (read - sample.1) as f64 / elapsed;
            *sample = (now, read, sample.2);
        }
        sample.2
    }

    /// The Prometheus text exposition of the three gauges.
    pub fn metrics(&self, owner_uid: &str) -> String {
        let label = owner_uid.replace('\\', "\\\\").replace('"', "\\\"");
        let mut text = String::new();
        let mut gauge = |name: &str, help: &str, value: f64| {
            text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{ownerUID=\"{label}\"}} {value}\n"));
        };
        if let Some(percent) = self.percent() {
            gauge("registry_progress", "Import progress in percent (absent while the size is unknown).", percent);
        }
        gauge("registry_average_speed", "Average import speed in bytes per second.", self.average_speed());
        gauge("registry_current_speed", "Current import speed in bytes per second.", self.current_speed());
        text
    }

    /// One line for a terminal: bytes, percent, speed and ETA.
    pub fn bar_line(&self) -> String {
        let read = self.read();
        let speed = self.current_speed();
        let total = self.total.load(Ordering::Relaxed);
        match self.percent() {
            Some(percent) if total > 0 => {
                let width = 30;
                let filled = ((percent / 100.0) * width as f64) as usize;
                let eta = if speed > 0.0 { format!("{:.0}s", (total.saturating_sub(read)) as f64 / speed) } else { "?".into() };
                format!(
                    "[{}{}] {:5.1}% {} / {} {}/s ETA {eta}",
                    "#".repeat(filled),
                    "-".repeat(width - filled),
                    percent,
                    human(read as f64),
                    human(total as f64),
                    human(speed)
                )
            }
            _ => format!("{} read, {}/s (size unknown)", human(read as f64), human(speed)),
        }
    }
}

fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

/// The final report (DVP writes it as the pod's termination message); the
/// controller reads it back from there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Report {
    /// Bytes stored.
    pub source_image_size: u64,
    /// Virtual size.
    pub source_image_virtual_size: u64,
    /// `qcow2`, `raw`, `iso`, ...
    pub source_image_format: String,
    /// Whether the image is an ISO (a cdrom).
    pub cdrom: bool,
    /// Nanoseconds the import took.
    pub duration: u64,
    /// Bytes per second.
    pub average_speed: u64,
    /// Where the image is, when stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_url: Option<String>,
    /// Why the import failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// A machine-readable reason for a failure (`BadImageChecksum`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve_metrics(listener: tokio::net::TcpListener, progress: Arc<Progress>, owner_uid: String) {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = progress.metrics(&owner_uid);
            async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
        }),
    );
    if let Err(error) = axum::serve(listener, router).await {
        tracing::warn!(%error, "metrics server stopped");
    }
}

/// Redraws a progress line on stderr twice a second.
pub async fn terminal_bar(progress: Arc<Progress>) {
    use std::io::Write;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        ticker.tick().await;
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[2K{}", progress.bar_line());
        let _ = stderr.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_never_say_100_before_done() {
        let progress = Progress::default();
        assert!(!progress.metrics("u").contains("registry_progress{"));
        progress.set_total(Some(10));
        progress.add_read(10);
        assert_eq!(progress.percent(), Some(99.9));
        progress.finish();
        assert!(progress.metrics("a\"b").contains("registry_progress{ownerUID=\"a\\\"b\"} 100"));
    }
}
